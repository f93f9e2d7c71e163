"""PCGrad: project away the conflicting part of each task gradient, in coefficient space."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mtlfast.weighting import _solvers
from mtlfast.weighting.base import GradientMode, GradientWeighting
from mtlfast.weighting._counter_rng import _MASK32, _hash32, _key_of


def pcgrad_task_orders(rng_key: torch.Tensor | int, step: torch.Tensor | int, num_tasks: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) int64: row i is the random order in which task i's gradient visits the tasks j (a permutation of
    0..T-1; j == i is skipped by the algorithm). A pure function of (rng_key, step): the same on every rank and device.
    """
    step = torch.as_tensor(step, dtype=torch.long, device=device)
    key = torch.as_tensor(rng_key, dtype=torch.long, device=step.device)
    cell = torch.arange(num_tasks * num_tasks, device=step.device, dtype=torch.long).view(num_tasks, num_tasks)
    counter_low = _hash32((step & _MASK32) ^ key)
    counter_high = _hash32(((step >> 32) & _MASK32) ^ counter_low)
    bits = _hash32(_hash32(counter_high ^ cell) ^ key)
    # Hash values are distinct within a row with overwhelming probability; a stable sort makes ties deterministic.
    return torch.argsort(bits, dim=1, stable=True)


def pcgrad_weights(gram: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """(T,) PCGrad combination weights from the (T, T) Gram matrix and the (T, T) visiting orders.

    Task i's projected gradient is tracked as coefficients ``C[i] (T,)`` with ``g_i^PC = Σ_k C[i, k] g_k``, so every
    inner product is read from the Gram matrix: ``<g_i^PC, g_j> = (C K)[i, j]``, and the projection
    ``g_i^PC -= <g_i^PC, g_j> / ||g_j||² · g_j`` is ``C[i, j] -= (C K)[i, j] / K[j, j]``. All T tasks take their
    k-th projection at once (T rounds of one (T, T) product each). Inactive tasks (``K[t, t] == 0``) start from a
    zero row and are never projected on.
    """
    num_tasks = gram.shape[0]
    diagonal = torch.diagonal(gram)
    active = diagonal > 0
    safe_diagonal = torch.where(active, diagonal, torch.ones_like(diagonal))
    tasks = torch.arange(num_tasks, device=gram.device)
    coefficients = torch.diag(active.to(gram.dtype))
    for k in range(num_tasks):
        other = orders[:, k]
        # <g_i^PC, g_other(i)> for every i: row i of C against row other(i) of the symmetric K.
        inner = (coefficients * gram.index_select(0, other)).sum(1)
        conflicting = (inner < 0) & active.index_select(0, other) & (other != tasks)
        step = torch.where(conflicting, inner / safe_diagonal.index_select(0, other), torch.zeros_like(inner))
        coefficients = coefficients.scatter_add(1, other.unsqueeze(1), -step.unsqueeze(1))
    return coefficients.sum(0)


class PCGrad(GradientWeighting):
    """PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    Algorithm 1 of the paper, for task gradients ``g_1 … g_T``::

        for each task i:
            g_i^PC = g_i
            for each task j ≠ i, in random order:
                if <g_i^PC, g_j> < 0:
                    g_i^PC = g_i^PC − <g_i^PC, g_j> / ||g_j||² · g_j
        update = Σ_i g_i^PC

    Every ``g_i^PC`` stays a combination of the task gradients, so the update is ``Σ_t w_t g_t`` with ``w`` the
    column sums of the coefficient matrix computed by :func:`pcgrad_weights` from ``K`` alone: the same numbers as the
    vector algorithm, without touching the gradients. Each task i gets its own random order at every step.

    Randomness: the orders of step n are a pure function of (seed, n) (:func:`pcgrad_task_orders`, a counter-based
    integer hash computed with tensor ops on the Gram matrix's device, as :class:`~mtlfast.weighting.RLW` draws its
    weights) rather than a ``torch.Generator``: identical on every DDP rank and device, no host↔device copy, no graph
    break under ``torch.compile(fullgraph=True)`` (Dynamo cannot trace a ``Generator``), and ``rng_step`` /
    ``rng_key`` are persistent buffers, so ``state_dict()`` resumes the stream exactly. The counter advances once per
    call in training mode; in eval mode a call uses the next training step's orders without consuming them.

    Modes: ``"representation"`` (gradients w.r.t. the shared representation, from the fused op) and ``"parameters"``
    (w.r.t. ``shared_parameters``, as in the paper). Inactive tasks (zero gradient) get weight 0 and are skipped.

    Args:
        num_tasks: T.
        mode: where the task gradients are taken, see :class:`~mtlfast.weighting.GradientWeighting`.
        shared_parameters: the shared parameters (``mode="parameters"`` only).
        seed: any int; two instances with the same seed use the same orders step by step.
    """

    rng_key: torch.Tensor
    rng_step: torch.Tensor

    def __init__(self, num_tasks: int, *, mode: GradientMode = "representation",
                 shared_parameters: Iterable[nn.Parameter] | None = None, seed: int = 0):
        super().__init__(num_tasks, mode=mode, shared_parameters=shared_parameters)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"mtlfast: PCGrad seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.register_buffer("rng_key", torch.tensor(_key_of(seed), dtype=torch.long))
        self.register_buffer("rng_step", torch.zeros((), dtype=torch.long))

    def task_orders(self) -> torch.Tensor:
        """(T, T) visiting orders the next call will use (row i: the order for task i)."""
        return pcgrad_task_orders(self.rng_key, self.rng_step, self.num_tasks)

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) weights from the (T, T) Gram matrix; ``losses`` are not used."""
        orders = self.task_orders().to(gram.device)
        if self.training:
            with torch.no_grad():
                self.rng_step.add_(1)
        return _solvers.pcgrad_weights(gram, orders, reference=pcgrad_weights)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, mode={self.mode!r}, seed={self.seed}"
