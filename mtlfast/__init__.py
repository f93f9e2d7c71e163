"""mtlfast: fast multi-task and transfer learning for PyTorch.

One fused operator computes every task head, every task loss and Σ λ_t·L_t (and the backward) in one pass;
:class:`MultiTaskHeads` puts it behind a drop-in ``nn.Module``. ``python -m mtlfast info`` shows which backend runs.
"""

from mtlfast import functional, ops
from mtlfast._extension import HAS_C, HAS_CUDA_KERNELS, backend_for, why_not_fast
from mtlfast._layout import TaskLayout
from mtlfast.nn import MultiTaskHeads, MultiTaskOutput
from mtlfast.tasks import Binary, Classification, LossKind, MultiLabel, Regression, Task

__version__ = "0.1.0"

__all__ = [
    "Binary",
    "Classification",
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
    "functional",
    "ops",
    "why_not_fast",
]
