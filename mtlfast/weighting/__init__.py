"""Loss weighting and gradient-balancing methods, one per file, each citing its paper.

Every method is an ``nn.Module``: ``total = method(out)`` with ``out`` the ``MultiTaskOutput`` of the heads (or a
(T,) loss vector), then ``total.backward()``. See :mod:`mtlfast.weighting.base` for how gradient methods get task
gradients without T backward passes. Methods are imported on first use, so ``import mtlfast`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtlfast.weighting.base import GradientWeighting, LossWeighting, Weighting, parameter_gram

# public name → module (file) defining it
_METHODS = {
    "EqualWeighting": "ew",
    "StaticWeighting": "static",
    "UncertaintyWeighting": "uncertainty",
    "DWA": "dwa",
    "RLW": "rlw",
    "GLS": "gls",
    "GradNorm": "gradnorm",
    "PCGrad": "pcgrad",
    "MGDAUB": "mgda",
    "CAGrad": "cagrad",
    "IMTLG": "imtl",
    "NashMTL": "nash_mtl",
    "TorchJDWeighting": "torchjd_adapter",
}


def __getattr__(name: str) -> Any:
    module = _METHODS.get(name)
    if module is None:
        raise AttributeError(f"module 'mtlfast.weighting' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mtlfast.weighting.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_METHODS])


__all__ = ["GradientWeighting", "LossWeighting", "Weighting", "parameter_gram", *_METHODS]
