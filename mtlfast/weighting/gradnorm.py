"""GradNorm: learn task weights that equalise the task gradient norms, relative to each task's training rate."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from mtlfast.weighting import _distributed
from mtlfast.weighting.base import GradientMode, GradientWeighting


class GradNorm(GradientWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018).

    Learnable task weights ``w = T · softmax(θ)`` (positive, ``Σ_t w_t = T`` at every step, which replaces the
    paper's renormalisation after each update); ``θ`` is an ``nn.Parameter`` of this module — put it in an optimiser
    (the paper uses the network's). With ``||g_t|| = √K[t, t]`` the norm of task t's gradient::

        G_t   = w_t · ||g_t||                          (norm of the gradient of w_t L_t)
        Ḡ     = mean_t G_t
        L̃_t   = L_t / L_t(0),   r_t = L̃_t / mean_t L̃_t  (inverse training rate)
        L_grad = Σ_t | G_t − sg[Ḡ · r_t^α] |             (sg: the target is a constant)
        total = Σ_t sg[w_t] · L_t + L_grad

    The task gradients come from ``K`` (detached), so ``L_grad``'s gradient reaches only θ, and the network receives
    ``Σ_t w_t g_t``: one backward of ``total`` does both updates of the paper's Algorithm 1. ``total``'s value is
    therefore the weighted loss plus ``L_grad``.

    ``L_t(0)`` is recorded per task at the first call where the task is active (``initial_losses`` and
    ``initial_recorded`` buffers, tensor ops only), from the losses averaged over DDP ranks, as are the current
    losses in ``r_t``: every rank computes the same ``L_grad`` and the same θ gradient.

    Modes: the paper takes ``||g_t||`` w.r.t. the last shared layer's weights — ``mode="parameters"`` with
    ``shared_parameters=[last_shared_layer.weight]``; ``"representation"`` (default) uses the gradients w.r.t. the
    shared representation instead (no extra backward passes). Inactive tasks (zero gradient) are left out of Ḡ, of
    the mean of L̃ and of ``L_grad``, and get weight 0 in the step.

    Args:
        num_tasks: T.
        alpha: the asymmetry α ≥ 0 (0: equal gradient norms; the paper uses 0.5–3, 1.5 on NYUv2).
        mode, shared_parameters: see :class:`~mtlfast.weighting.GradientWeighting`.
    """

    initial_losses: torch.Tensor
    initial_recorded: torch.Tensor

    def __init__(self, num_tasks: int, *, alpha: float = 1.5, mode: GradientMode = "representation",
                 shared_parameters: Iterable[nn.Parameter] | None = None):
        super().__init__(num_tasks, mode=mode, shared_parameters=shared_parameters)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"mtlfast: GradNorm alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.logits = nn.Parameter(torch.zeros(self.num_tasks))
        self.register_buffer("initial_losses", torch.zeros(self.num_tasks))
        self.register_buffer("initial_recorded", torch.zeros(self.num_tasks, dtype=torch.bool))

    def learned_weights(self) -> torch.Tensor:
        """(T,) ``T · softmax(θ)``, differentiable w.r.t. θ."""
        return self.num_tasks * torch.softmax(self.logits, dim=0)

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) the weights the step applies: the learned weights, 0 for inactive tasks (detached)."""
        active = torch.diagonal(gram) > 0
        return self.learned_weights().detach().to(gram.dtype) * active

    def gradnorm_loss(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """``L_grad`` (a scalar, differentiable w.r.t. θ only) from the (T, T) Gram matrix and the (T,) losses;
        records ``L_t(0)`` for the tasks active for the first time."""
        dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
        gram, losses = gram.detach().to(dtype), _distributed.mean_over_ranks(losses.detach().to(dtype))
        diagonal = torch.diagonal(gram)
        active = diagonal > 0
        recorded = self.initial_recorded
        initial = torch.where(recorded, self.initial_losses.to(dtype), losses)
        with torch.no_grad():
            self.initial_losses.copy_(torch.where(active & ~recorded, losses, self.initial_losses.to(dtype)))
            self.initial_recorded.copy_(recorded | active)
        count = active.sum().clamp_min(1).to(dtype)
        weights = self.learned_weights().to(dtype)
        norms = weights * torch.sqrt(diagonal.clamp_min(0))  # G_t
        mean_norm = (norms * active).sum() / count
        # A task whose first loss was exactly 0 has nothing to normalise by: it counts as on schedule (L̃ = 1).
        ratio = torch.where(initial > 0, losses / torch.where(initial > 0, initial, torch.ones_like(initial)),
                            torch.ones_like(initial))
        ratio = torch.where(active, ratio, torch.zeros_like(ratio))
        mean_ratio = ratio.sum() / count
        rate = ratio / torch.where(mean_ratio > 0, mean_ratio, torch.ones_like(mean_ratio))
        target = (mean_norm * rate.pow(self.alpha)).detach()
        return ((norms - target).abs() * active).sum()

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        # The base class checks the Gram matrix and applies the (detached) learned weights; θ learns only from
        # the GradNorm loss added here.
        weighted = super().combine(losses, gram)
        return weighted + self.gradnorm_loss(gram, losses).to(losses.dtype)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, mode={self.mode!r}, alpha={self.alpha}"
