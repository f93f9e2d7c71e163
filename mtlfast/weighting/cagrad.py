"""CAGrad: the update closest to the mean gradient that maximises the worst task's improvement."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from mtlfast.weighting.base import GradientMode, GradientWeighting


def conflict_averse_dual(gram: torch.Tensor, c: float, iterations: int) -> torch.Tensor:
    """(T,) ``w* = argmin_{w ∈ Δ} F(w)``, ``F(w) = wᵀa + r·√(wᵀKw)``, ``a = K b``, ``r = c·√(bᵀKb)``, b the uniform
    weights over the active tasks; 0 on the inactive tasks.

    Pairwise Frank-Wolfe (Lacoste-Julien & Jaggi, NeurIPS 2015) with an exact line search in closed form: with
    ``∇F = a + r·Kw/||g_w||``, s = argmin ∇F (active), v = argmax ∇F (support), ``d = e_s − e_v``, and along d
    ``A = dᵀa``, ``B = dᵀKw``, ``C = dᵀKd``, ``q = wᵀKw``, the convex ``F(w + γd)`` has its minimum at::

        γ* = −(B + A·√((Cq − B²) / (r²C − A²))) / C      when r²C > A²  (else F is monotone along d: γ* = ±∞)

    clipped to [0, w_v]. K is first divided by its mean diagonal: w* does not depend on the scale of the gradients.
    """
    num_tasks = gram.shape[0]
    diagonal = torch.diagonal(gram)
    active = diagonal > 0
    count = active.sum().clamp_min(1).to(gram.dtype)
    scale = diagonal.sum() / count
    gram = gram / torch.where(scale > 0, scale, torch.ones_like(scale))
    weights = active.to(gram.dtype) / count
    mean_products = gram @ weights  # a_t = <g_t, g_0>
    radius = c * torch.sqrt((weights @ mean_products).clamp_min(0))
    # Keeps ∇F finite at g_w = 0; far below the unit scale of the normalised Gram matrix.
    smoothing = torch.finfo(gram.dtype).eps ** 2
    inf = torch.full_like(weights, float("inf"))
    zero, one = torch.zeros_like(radius), torch.ones_like(radius)
    for _ in range(iterations):
        k_weights = gram @ weights
        quadratic = (weights @ k_weights).clamp_min(0)
        gradient = mean_products + radius * k_weights / torch.sqrt(quadratic + smoothing)
        toward = torch.argmin(torch.where(active, gradient, inf))
        away = torch.argmax(torch.where(weights > 0, gradient, -inf))
        direction = (nn.functional.one_hot(toward, num_tasks) - nn.functional.one_hot(away, num_tasks)).to(gram.dtype)
        slope_linear = direction @ mean_products  # A
        cross = direction @ k_weights  # B
        curvature = (direction @ gram @ direction).clamp_min(0)  # C
        denominator = radius * radius * curvature - slope_linear * slope_linear
        interior = (denominator > 0) & (curvature > 0)
        spread = (curvature * quadratic - cross * cross).clamp_min(0) / torch.where(interior, denominator, one)
        root = -(cross + slope_linear * torch.sqrt(spread)) / torch.where(curvature > 0, curvature, one)
        limit = weights.index_select(0, away.unsqueeze(0)).squeeze(0)
        step = torch.where(interior, root, torch.where(slope_linear < 0, limit, zero))
        step = torch.minimum(step.clamp_min(0), limit)
        weights = weights + step * direction
    return weights * active


class CAGrad(GradientWeighting):
    """CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021).

    With ``g_0 = (1/T) Σ_t g_t`` the mean gradient and ``φ = c²||g_0||²``, the paper's dual problem is::

        w* = argmin_{w ∈ Δ}  g_wᵀ g_0 + √φ · ||g_w||,      g_w = Σ_t w_t g_t
           = argmin_{w ∈ Δ}  wᵀ K b + √φ · √(wᵀ K w),       b = (1/T, …, 1/T)

    and the update is ``d = (g_0 + √φ / ||g_w*|| · g_w*) / (1 + c²)`` (the official code's ``rescale=1``), i.e. the
    weights ``(b + √φ / ||g_w*|| · w*) / (1 + c²)``. ``c = 0`` is plain gradient averaging.

    The official code solves the dual with scipy's SLSQP on the CPU; here it is solved on the device by a fixed
    number of pairwise Frank-Wolfe steps with an exact closed-form line search (:func:`conflict_averse_dual`).

    Modes: ``"representation"`` and ``"parameters"`` (the paper uses the shared parameters). Inactive tasks (zero
    gradient) get weight 0 and are left out of ``g_0`` and of the simplex.

    Args:
        num_tasks: T.
        c: the conflict-aversion radius, ``c ≥ 0`` (the paper's α; 0.4–0.5 in its experiments).
        iterations: Frank-Wolfe steps (no convergence test, so no host sync). Measured on random 5–8-task problems
            (c = 0.5), error of w*'s gradient relative to the largest task gradient after 100 steps: ≤ 1e-15 with
            linearly independent gradients, ≤ 1e-7 when T exceeds their rank (other c, ill-conditioned cases: up to
            ~2e-3 seen after 100).
        mode, shared_parameters: see :class:`~mtlfast.weighting.GradientWeighting`.
    """

    def __init__(self, num_tasks: int, *, c: float = 0.5, iterations: int = 100,
                 mode: GradientMode = "representation", shared_parameters: Iterable[nn.Parameter] | None = None):
        super().__init__(num_tasks, mode=mode, shared_parameters=shared_parameters)
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"mtlfast: CAGrad c must be a finite number >= 0, got {c!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"mtlfast: CAGrad iterations must be a positive int, got {iterations!r}")
        self.c = float(c)
        self.iterations = iterations

    def solve_dual(self, gram: torch.Tensor) -> torch.Tensor:
        """(T,) w* on the simplex over the active tasks, for the (T, T) Gram matrix."""
        return conflict_averse_dual(gram, self.c, self.iterations)

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) weights of the CAGrad update from the (T, T) Gram matrix; ``losses`` are not used."""
        diagonal = torch.diagonal(gram)
        active = diagonal > 0
        mean_weights = active.to(gram.dtype) / active.sum().clamp_min(1).to(gram.dtype)
        if self.c == 0:
            return mean_weights
        dual = self.solve_dual(gram)
        mean_norm = torch.sqrt((mean_weights @ gram @ mean_weights).clamp_min(0))
        dual_norm = torch.sqrt((dual @ gram @ dual).clamp_min(0))
        # ||g_w*|| = 0 only when the hull touches 0 and c ≥ 1; the floor keeps the weights finite there (g_w* ≈ 0).
        floor = torch.finfo(gram.dtype).eps * torch.sqrt(diagonal.max().clamp_min(0))
        multiplier = self.c * mean_norm / torch.maximum(dual_norm, floor)
        multiplier = torch.where(dual_norm > 0, multiplier, torch.zeros_like(multiplier))
        return (mean_weights + multiplier * dual) / (1 + self.c ** 2)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, mode={self.mode!r}, c={self.c}, iterations={self.iterations}"
