"""Static weighting: fixed, user-chosen task weights λ."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtlfast.weighting.base import LossWeighting


def _validated_weights(weights: Sequence[float] | torch.Tensor, num_tasks: int | None) -> torch.Tensor:
    # Construction time, not the training step: reading values on the host to validate them is fine here.
    if isinstance(weights, torch.Tensor):
        tensor = weights.detach().to("cpu", copy=True)
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                                torch.uint8)):
            raise TypeError(f"mtlfast: StaticWeighting weights must be real numbers, got a {tensor.dtype} tensor")
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.get_default_dtype())
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"mtlfast: StaticWeighting weights must be a sequence of numbers or a tensor, "
                            f"got {type(weights).__name__}")
        if any(isinstance(value, bool) or not isinstance(value, (int, float)) for value in weights):
            raise TypeError(f"mtlfast: StaticWeighting weights must be numbers, got {list(weights)!r}")
        tensor = torch.tensor([float(value) for value in weights], dtype=torch.get_default_dtype())
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"mtlfast: StaticWeighting weights must be a non-empty 1-D sequence, got shape "
                         f"{tuple(tensor.shape)}")
    if num_tasks is not None and tensor.numel() != num_tasks:
        raise ValueError(f"mtlfast: StaticWeighting got {tensor.numel()} weights for {num_tasks} tasks")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"mtlfast: StaticWeighting weights must be finite, got {tensor.tolist()}")
    if bool((tensor < 0).any()):
        raise ValueError(f"mtlfast: StaticWeighting weights must be non-negative, got {tensor.tolist()}")
    return tensor


class StaticWeighting(LossWeighting):
    """Static (fixed) weighting, the hand-tuned linear scalarisation used as the baseline in e.g. Kendall, Gal &
    Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018
    (their grid-searched weights).

    ``total = Σ_t λ_t·L_t`` with the λ given at construction, unchanged during training.

    Args:
        weights: λ, T finite non-negative numbers (a sequence or a 1-D tensor). A floating tensor keeps its dtype
            (pass float64 for exact float64 weights); a sequence becomes the default dtype.
        num_tasks: optional T, checked against ``len(weights)``.

    λ is the persistent buffer ``fixed_weights``: it follows ``.to(device)`` and is saved in ``state_dict()``.
    Input: a (T,) loss vector (or a ``MultiTaskOutput``); output: a scalar in the losses' dtype and device.
    """

    fixed_weights: torch.Tensor

    def __init__(self, weights: Sequence[float] | torch.Tensor, *, num_tasks: int | None = None):
        tensor = _validated_weights(weights, num_tasks)
        super().__init__(tensor.numel())
        self.register_buffer("fixed_weights", tensor)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(T,) λ, as stored (the caller casts it to the losses' dtype)."""
        return self.fixed_weights
