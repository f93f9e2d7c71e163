"""Use a TorchJD aggregator (UPGrad, DualProj, …) as an mtlfast gradient method, driven by the task Gram matrix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mtlfast.weighting.base import GradientMode, GradientWeighting


def _gramian_weighting_of(method: Any) -> nn.Module:
    """The TorchJD weighting that maps a Gramian (m, m) to weights (m,), taken from ``method``."""
    try:
        from torchjd import aggregation
    except ImportError as error:
        raise ImportError("mtlfast: TorchJDWeighting needs torchjd (pip install torchjd)") from error
    if isinstance(method, aggregation.GramianWeightedAggregator):
        return method.gramian_weighting
    gramian_base = getattr(getattr(aggregation, "_weighting_bases", None), "_GramianWeighting", None)
    if gramian_base is not None and isinstance(method, gramian_base):
        return method
    if isinstance(method, (aggregation.Aggregator, aggregation.Weighting)):
        raise TypeError(
            f"mtlfast: TorchJDWeighting needs a TorchJD method whose weights depend only on the Gramian of the "
            f"task gradients (a GramianWeightedAggregator such as UPGrad, or its Gramian weighting such as "
            f"UPGradWeighting); {type(method).__name__} needs the gradients themselves"
        )
    raise TypeError(f"mtlfast: TorchJDWeighting takes a TorchJD aggregator or weighting, got {type(method).__name__}")


class TorchJDWeighting(GradientWeighting):
    """A TorchJD aggregator as a gradient method (TorchJD: Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024; https://github.com/TorchJD/torchjd).

    A TorchJD ``GramianWeightedAggregator`` aggregates the Jacobian J (rows: task gradients) as ``wᵀJ`` with
    ``w = weighting(J Jᵀ)``. ``J Jᵀ`` is the Gram matrix K, so the same weights applied to the losses give the same
    update: ``total = Σ_t w_t L_t`` with ``w = weighting(K)``, without materialising J. Accepted: such an aggregator
    (``UPGrad()``, ``DualProj()``, ``MGDA()``, ``IMTLG()``, ``AlignedMTL()``, ``PCGrad()``, …) or its Gramian
    weighting (``UPGradWeighting()``, …). Aggregators that need J itself (``GradDrop``, ``ConFIG``, ``NashMTL``,
    ``TrimmedMean``, …) raise TypeError.

    Host syncs: TorchJD's weightings are not written for a sync-free step (UPGrad and DualProj solve their quadratic
    programs with numpy on the CPU, PCGrad and MGDA branch on tensor values). Inactive tasks (zero gradient) are
    removed before the call — a boolean index, itself a host sync — so TorchJD sees only the active tasks' Gramian,
    and they get weight 0. Use the native mtlfast methods where a step must not sync. Randomised TorchJD weightings
    (e.g. its PCGrad) draw from torch's global RNG: seed it identically on every DDP rank.

    Modes: ``"representation"`` and ``"parameters"``, see :class:`~mtlfast.weighting.GradientWeighting`.

    Args:
        aggregator_or_weighting: the TorchJD aggregator or Gramian weighting (torchjd is imported here, on first use).
        num_tasks: T.
        mode, shared_parameters: see :class:`~mtlfast.weighting.GradientWeighting`.
    """

    def __init__(self, aggregator_or_weighting: Any, num_tasks: int, *, mode: GradientMode = "representation",
                 shared_parameters: Iterable[nn.Parameter] | None = None):
        super().__init__(num_tasks, mode=mode, shared_parameters=shared_parameters)
        self.gramian_weighting = _gramian_weighting_of(aggregator_or_weighting)
        self.method_name = type(aggregator_or_weighting).__name__

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) weights: the TorchJD weighting of the active tasks' Gramian, 0 for inactive tasks."""
        active = torch.diagonal(gram) > 0
        index = active.nonzero().squeeze(1)
        weights = torch.zeros_like(torch.diagonal(gram))
        if index.numel() == 0:
            return weights
        sub_gram = gram.index_select(0, index).index_select(1, index)
        sub_weights = torch.as_tensor(self.gramian_weighting(sub_gram)).to(device=gram.device, dtype=gram.dtype)
        return weights.index_copy(0, index, sub_weights)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, mode={self.mode!r}, method={self.method_name}"
