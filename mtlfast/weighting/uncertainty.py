"""Uncertainty weighting: learnable per-task (homoscedastic) variances."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtlfast.weighting.base import LossWeighting


class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics", CVPR 2018).

    Each task has a learnable log-variance ``s_t = log σ_t²`` (the (T,) ``nn.Parameter`` ``log_variance``) and

        ``total = Σ_t [L_t ≠ 0]·( exp(−s_t)·L_t + s_t )``.

    Which form, and why: the paper's Gaussian-likelihood objective (its eq. 7, also LibMTL's form) is
    ``Σ_t 1/(2σ_t²)·L_t + log σ_t = ½·Σ_t (exp(−s_t)·L_t + s_t)``, i.e. exactly half of the form used here. Both
    have the same minimiser in s (``s_t* = log L_t``), so they weight the tasks identically up to one global
    factor 2. We use the unhalved form (the one in the authors' own reference example, and the most common in
    practice) because at the usual start ``s = 0`` it equals the plain sum ``Σ_t L_t``: switching from equal
    weighting to uncertainty weighting then keeps the effective learning rate of the model. Writing it in
    ``s = log σ²`` rather than σ keeps it free of divisions by zero and of the positivity constraint on σ.

    Gradients: ``∂total/∂L_t = exp(−s_t)``, ``∂total/∂s_t = 1 − exp(−s_t)·L_t``.

    A task whose loss is exactly 0 (absent from the batch: ``MultiTaskOutput.loss_vector`` holds 0 there) is left
    out, so its ``s_t`` gets no gradient: with the term kept, ``∂/∂s_t = 1`` would drive ``s_t → −∞`` while the
    task is absent and give it a huge weight when it returns. The mask is a tensor op (no host sync). A NaN loss is
    not masked: it makes the total NaN, as it should.

    ``log_variance`` is a parameter: put this module's parameters in the optimiser (e.g.
    ``torch.optim.Adam([*model.parameters(), *weighting.parameters()])``).
    ``task_weights`` records ``exp(−s_t)`` (the current precision of every task, absent or not).

    Args:
        num_tasks: T.
        init_log_variance: initial s, one float for every task or T floats (default 0: σ² = 1); a floating tensor
            keeps its dtype, anything else becomes the default dtype.

    Input: a (T,) loss vector (or a ``MultiTaskOutput``); output: a scalar in the losses' dtype and device.
    """

    def __init__(self, num_tasks: int, init_log_variance: float | Sequence[float] | torch.Tensor = 0.0):
        super().__init__(num_tasks)
        init = torch.as_tensor(init_log_variance).detach().flatten()
        if not init.is_floating_point():
            init = init.to(torch.get_default_dtype())
        if init.numel() == 1:
            init = init.expand(self.num_tasks)
        if init.numel() != self.num_tasks:
            raise ValueError(f"mtlfast: UncertaintyWeighting init_log_variance has {init.numel()} entries for "
                             f"{self.num_tasks} tasks")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("mtlfast: UncertaintyWeighting init_log_variance must be finite")
        self.log_variance = nn.Parameter(init.clone())

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(T,) precisions ``exp(−s_t)`` in the losses' dtype (differentiable w.r.t. ``log_variance``)."""
        return torch.exp(-self.log_variance.to(losses.dtype))

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        log_variance = self.log_variance.to(losses.dtype)
        precision = torch.exp(-log_variance)
        self._record(precision)
        terms = precision * losses + log_variance
        return torch.where(losses != 0, terms, torch.zeros_like(terms)).sum()
