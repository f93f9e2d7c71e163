"""mtlfast: fast multi-task and transfer learning for PyTorch.

One fused operator computes every task head, every task loss and Σ λ_t·L_t (and the backward) in one pass;
:class:`MultiTaskHeads` puts it behind a drop-in ``nn.Module``. ``python -m mtlfast info`` shows which backend runs.
"""

from mtlfast import functional, ops
from mtlfast._extension import HAS_C, HAS_CUDA_KERNELS, backend_for, why_not_fast
from mtlfast._layout import TaskLayout
from mtlfast.nn import MultiTaskHeads, MultiTaskOutput
from mtlfast.tasks import Binary, Classification, Distillation, LossKind, MultiLabel, Regression, Task

__version__ = "0.1.0"

# Layers above the op load on first use: `import mtlfast` stays cheap and never fails because of them.
_SUBMODULES = ("data", "models", "training", "transfer", "weighting")


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"mtlfast.{name}")
    if name == "fit":
        return importlib.import_module("mtlfast.training").fit
    raise AttributeError(f"module 'mtlfast' has no attribute {name!r}")


__all__ = [
    "Binary",
    "Classification",
    "Distillation",
    "HAS_C",
    "HAS_CUDA_KERNELS",
    "LossKind",
    "MultiLabel",
    "MultiTaskHeads",
    "MultiTaskOutput",
    "Regression",
    "Task",
    "TaskLayout",
    "backend_for",
    "data",
    "fit",
    "models",
    "training",
    "transfer",
    "weighting",
    "functional",
    "ops",
    "why_not_fast",
]
