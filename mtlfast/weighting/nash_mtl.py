"""Nash-MTL: the Nash bargaining solution among the tasks, K α = 1/α."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mtlfast.weighting.base import GradientMode, GradientWeighting


def nash_bargaining_weights(gram: torch.Tensor, iterations: int) -> torch.Tensor:
    """(T,) α > 0 solving ``K α = 1/α`` (element-wise) on the active tasks, 0 on the inactive ones.

    The equation is the stationarity condition of the strictly convex ``f(α) = ½ αᵀKα − Σ_t log α_t`` (α > 0),
    minimised by damped Newton with a fixed number of steps. With ``S = diag(α)`` and the scale-free residual
    ``r = α ∘ (Kα) − 1 = S ∇f``::

        z = (S K S + I)⁻¹ r                 (S K S + I ⪰ I: a Cholesky that cannot fail)
        λ = √(rᵀ z)                         (the Newton decrement)
        α ← α ∘ (1 − z / (1 + λ))           (the damped Newton step −S z / (1 + λ))

    ``f`` is self-concordant (a convex quadratic plus a log barrier), so the damped step keeps α > 0 (it stays inside
    the Dikin ellipsoid, where ``|z_t| / (1 + λ) < 1``), decreases f by at least ``λ − log(1 + λ)`` and becomes
    quadratically convergent once λ is small. Start: ``α_t ∝ 1/√K[t, t]`` (the solution when the gradients are
    orthogonal), scaled to the minimum of f along that ray. Inactive tasks are decoupled by setting ``K[t, t] = 1``
    (their off-diagonal entries are already 0).

    A solution exists when no non-negative combination of the gradients vanishes (e.g. the gradients are linearly
    independent, as the paper assumes); otherwise f is unbounded below and α grows with the iteration count.
    """
    diagonal = torch.diagonal(gram)
    active = diagonal > 0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    gram = gram + torch.diag((~active).to(gram.dtype))
    alpha = torch.rsqrt(torch.diagonal(gram))
    # The best point on that ray (min_s f(s·α)) satisfies Σ_t α_t (Kα)_t = T: correlated gradients start close too.
    alpha = alpha * torch.sqrt(gram.shape[0] / (alpha @ gram @ alpha))
    for _ in range(iterations):
        residual = alpha * (gram @ alpha) - 1
        scaled = alpha.unsqueeze(1) * gram * alpha.unsqueeze(0) + eye
        factor, _ = torch.linalg.cholesky_ex(scaled)
        direction = torch.cholesky_solve(residual.unsqueeze(1), factor).squeeze(1)
        decrement = torch.sqrt((residual @ direction).clamp_min(0))
        alpha = alpha * (1 - direction / (1 + decrement))
    return alpha * active


class NashMTL(GradientWeighting):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022).

    The update ``Δ = Σ_t α_t g_t`` is the Nash bargaining solution: α > 0 with ``g_tᵀ Δ = 1/α_t`` for every task,
    i.e. ``K α = 1/α``. The paper approximates it with a sequence of convex problems solved by cvxpy on the CPU;
    here it is solved exactly (to floating-point accuracy) on the device by :func:`nash_bargaining_weights`, a fixed
    number of damped Newton steps, without host syncs.

    Scale: the exact solution always has ``||Δ||² = αᵀKα = T``. With ``normalize=True`` (default, as the official
    code) the equation is solved on ``K / ||K||_F`` and those α are used as weights: the same direction, with
    ``||Δ||² = T·||K||_F``, so the step shrinks as the gradients do. ``normalize=False`` returns the exact solution on
    K. The official code also clips the shared gradient norm (``max_norm=1``); clip in your training loop if you
    want that.

    Modes: ``"representation"`` and ``"parameters"`` (the paper uses the shared parameters). Inactive tasks (zero
    gradient) get weight 0 and are not part of the game.

    Args:
        num_tasks: T.
        iterations: damped Newton steps (no convergence test, so no host sync). 20 reach the solution to
            floating-point accuracy on well-conditioned problems; ill-conditioned ones need more damped steps.
        normalize: solve on ``K / ||K||_F`` (the official code) or on K.
        mode, shared_parameters: see :class:`~mtlfast.weighting.GradientWeighting`.
    """

    def __init__(self, num_tasks: int, *, iterations: int = 20, normalize: bool = True,
                 mode: GradientMode = "representation", shared_parameters: Iterable[nn.Parameter] | None = None):
        super().__init__(num_tasks, mode=mode, shared_parameters=shared_parameters)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"mtlfast: NashMTL iterations must be a positive int, got {iterations!r}")
        self.iterations = iterations
        self.normalize = bool(normalize)

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) weights α from the (T, T) Gram matrix; ``losses`` are not used."""
        # Solving on K/s always (s = ||K||_F) keeps the Newton steps well scaled; α for K itself is α_s / √s.
        size = torch.linalg.matrix_norm(gram)
        size = torch.where(size > 0, size, torch.ones_like(size))
        alpha = nash_bargaining_weights(gram / size, self.iterations)
        return alpha if self.normalize else alpha * torch.rsqrt(size)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, mode={self.mode!r}, iterations={self.iterations}, "
                f"normalize={self.normalize}")
