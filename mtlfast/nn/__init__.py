"""Modules: drop-in fused task heads."""

from mtlfast.nn.heads import MultiTaskHeads, MultiTaskOutput

__all__ = ["MultiTaskHeads", "MultiTaskOutput"]
