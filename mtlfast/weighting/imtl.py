"""IMTL-G: the combination of task gradients whose projections on every task's unit gradient are equal."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mtlfast.weighting.base import GradientMode, GradientWeighting


def regularized_least_squares(matrix: torch.Tensor, rhs: torch.Tensor, relative_ridge: float) -> torch.Tensor:
    """``argmin_x ||A x − b||² + δ||x||²`` with ``δ = (relative_ridge · ||A||_F)² / n``, by a QR factorisation of
    ``[A; √δ·I]``: never singular (every singular value of the stacked matrix is ≥ √δ), no status check on the host
    (``linalg.solve``/``lstsq``/``pinv`` check one, i.e. sync on a GPU; QR and triangular solves do not — read from
    PyTorch's implementation, not measured on a GPU here), and the conditioning is not squared as with the normal
    equations. For a well-conditioned A the ridge changes x by about δ/σ_min(A)² relative."""
    size = matrix.shape[1]
    ridge = relative_ridge * torch.linalg.matrix_norm(matrix) / size ** 0.5
    # An all-zero A would give a zero ridge; any positive value then gives x = 0.
    ridge = torch.where(ridge > 0, ridge, torch.ones_like(ridge))
    eye = torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    stacked = torch.cat([matrix, ridge * eye])
    q, r = torch.linalg.qr(stacked)
    projected = q.T @ torch.cat([rhs, torch.zeros(size, dtype=rhs.dtype, device=rhs.device)])
    return torch.linalg.solve_triangular(r, projected.unsqueeze(1), upper=True).squeeze(1)


def imtl_g_weights(gram: torch.Tensor) -> torch.Tensor:
    """(T,) IMTL-G weights α (Σ α = 1 over the active tasks) from the (T, T) Gram matrix.

    The paper's closed form, with task 1 the reference, ``u_t = g_t/||g_t||``, ``D`` the rows ``g_1 − g_t`` and ``U``
    the rows ``u_1 − u_t`` (t = 2…T)::

        α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹,    α_1 = 1 − Σ_{t≥2} α_t

    is the solution of the T equations ``(u_t − u_r)·g_α = 0`` for t ≠ r and ``Σ_t α_t = 1`` (substitute
    ``α_r = 1 − Σ_{t≠r} α_t``: ``g_α = g_r − Σ_{t≠r} α_t (g_r − g_t)``). Written on K, row t reads
    ``Σ_s (K[t, s]/||g_t|| − K[r, s]/||g_r||) α_s = 0``. The reference r is the first active task; an inactive task
    t gets the row ``α_t = 0``. The system is solved by :func:`regularized_least_squares`: when the paper's matrix is
    invertible this is its solution (up to a relative ridge of 1e-6 in float32, 1e-8 in float64, on the scale of
    ``||A||``); when it is singular (linearly dependent gradients) it is the ridge-regularised least-squares
    solution — finite, never NaN.
    """
    num_tasks = gram.shape[0]
    diagonal = torch.diagonal(gram)
    active = diagonal > 0
    # Working on K / mean diagonal makes every row of the system O(1), the sum row included.
    scale = diagonal.sum() / active.sum().clamp_min(1).to(gram.dtype)
    gram = gram / torch.where(scale > 0, scale, torch.ones_like(scale))
    norms = torch.sqrt(torch.diagonal(gram).clamp_min(0))
    inverse_norms = torch.where(active, 1 / torch.where(active, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    unit_products = gram * inverse_norms.unsqueeze(1)  # row t: u_t · g_s
    reference = torch.argmax(active.to(torch.int32))
    is_reference = nn.functional.one_hot(reference, num_tasks).bool()
    equal_projection = unit_products - unit_products.index_select(0, reference.unsqueeze(0))
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    system = torch.where(active.unsqueeze(1), equal_projection, eye)
    system = torch.where(is_reference.unsqueeze(1), active.to(gram.dtype).unsqueeze(0), system)
    rhs = is_reference.to(gram.dtype)
    relative_ridge = 1e-8 if gram.dtype == torch.float64 else 1e-6
    weights = regularized_least_squares(system, rhs, relative_ridge)
    return torch.where(active, weights, torch.zeros_like(weights))


class IMTLG(GradientWeighting):
    """IMTL-G, the gradient part of IMTL (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021).

    The update ``g = Σ_t α_t g_t`` with ``Σ_t α_t = 1`` whose projections on all unit task gradients are equal,
    ``g·u_1 = g·u_t`` for every t: no task is favoured. The closed form (the paper's Eq. 5) and how it is computed
    from K are in :func:`imtl_g_weights`. The loss-scale part of IMTL (IMTL-L) is a separate, loss-based method.

    Modes: ``"representation"`` (the paper applies IMTL-G to the gradients w.r.t. the shared representation) and
    ``"parameters"``. Inactive tasks (zero gradient) get weight 0 and are not part of the system.

    Args:
        num_tasks: T.
        mode, shared_parameters: see :class:`~mtlfast.weighting.GradientWeighting`.
    """

    def __init__(self, num_tasks: int, *, mode: GradientMode = "representation",
                 shared_parameters: Iterable[nn.Parameter] | None = None):
        super().__init__(num_tasks, mode=mode, shared_parameters=shared_parameters)

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) weights α from the (T, T) Gram matrix; ``losses`` are not used."""
        return imtl_g_weights(gram)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, mode={self.mode!r}"
