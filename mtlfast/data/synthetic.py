"""The embedded default dataset: MMoE's synthetic tasks with controllable relatedness, generalised to T tasks.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018, §4.
The paper draws two orthogonal unit vectors u_1, u_2 ∈ R^d, sets w_1 = c·u_1 and w_2 = c·(ρ·u_1 + √(1−ρ²)·u_2), so
cos(w_1, w_2) = ρ, draws x ~ N(0, I_d) and labels each task with

    y_t = w_tᵀx + Σ_{i=1..m} sin(α_i·w_tᵀx + β_i) + ε_t,        ε_t ~ N(0, σ²)

(the α_i, β_i are shared by the tasks). The label correlation grows with ρ but, because of the sines, is not ρ.

Generalisation to T tasks: the weight vectors are w_t = c·Σ_k F_tk·u_k with u_1..u_T orthonormal (a random
orthonormal basis from the QR of a Gaussian matrix) and F Fᵀ = R, the wanted (T, T) cosine-similarity matrix. With
a scalar ρ, R is the equicorrelation matrix (1 on the diagonal, ρ elsewhere), valid for −1/(T−1) ≤ ρ ≤ 1. F comes
from the eigendecomposition of R (so ρ = 1 works); for T = 2 this differs from the paper's Cholesky form only by
an orthogonal change of basis, which leaves the distribution of (w_1, w_2) unchanged because the basis is random.

Classification variants (to demo mixed task kinds): ``"binary"`` thresholds y_t at its training-split median;
``"classification"`` cuts it into ``num_classes`` equal-frequency bins at training-split quantiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtlfast.data._common import MultiTaskDataset, Split
from mtlfast.tasks import Binary, Classification, Regression, Task

TASK_KINDS = ("regression", "binary", "classification")


def _similarity_matrix(num_tasks: int, correlation: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (T, T) cosine-similarity matrix R and a factor F with F Fᵀ = R."""
    if isinstance(correlation, torch.Tensor) and correlation.dim() == 2:
        matrix = correlation.to(torch.float64)
        if tuple(matrix.shape) != (num_tasks, num_tasks):
            raise ValueError(f"mtlfast: correlation matrix must be ({num_tasks}, {num_tasks}), "
                             f"got {tuple(matrix.shape)}")
        unit_diagonal = torch.allclose(matrix.diagonal(), torch.ones_like(matrix.diagonal()))
        if not (torch.allclose(matrix, matrix.T) and unit_diagonal):
            raise ValueError("mtlfast: correlation matrix must be symmetric with a unit diagonal")
    else:
        rho = float(correlation)
        lowest = -1.0 / (num_tasks - 1) if num_tasks > 1 else -1.0
        if not lowest <= rho <= 1.0:
            raise ValueError(f"mtlfast: with {num_tasks} tasks the correlation must lie in [{lowest:g}, 1] "
                             f"(else no set of weight vectors has those pairwise cosines), got {rho}")
        matrix = torch.full((num_tasks, num_tasks), rho, dtype=torch.float64)
        matrix.fill_diagonal_(1.0)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    if bool(eigenvalues.min() < -1e-9):
        raise ValueError("mtlfast: correlation matrix must be positive semi-definite")
    return matrix, eigenvectors * eigenvalues.clamp(min=0).sqrt()  # F with F Fᵀ = matrix


def _task_kinds(task_kinds: str | Sequence[str], num_tasks: int) -> list[str]:
    kinds = [task_kinds] * num_tasks if isinstance(task_kinds, str) else list(task_kinds)
    if len(kinds) != num_tasks:
        raise ValueError(f"mtlfast: task_kinds has {len(kinds)} entries for {num_tasks} tasks")
    for kind in kinds:
        if kind not in TASK_KINDS:
            raise ValueError(f"mtlfast: unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    return kinds


def load_synthetic(num_tasks: int = 2, correlation: float | torch.Tensor = 0.5, *,
                   task_kinds: str | Sequence[str] = "regression", num_classes: int = 3,
                   num_train: int = 10_000, num_val: int = 2_000, num_test: int = 2_000,
                   num_features: int = 100, num_sines: int = 10, scale: float = 1.0, noise_std: float = 0.1,
                   seed: int = 0, dtype: torch.dtype = torch.float32) -> MultiTaskDataset:
    """MMoE synthetic data (see the module docstring).

    Args:
        num_tasks: T ≥ 1; tasks are named ``task0 … task{T-1}``.
        correlation: ρ, the cosine similarity between every pair of task weight vectors, or a full (T, T)
            similarity matrix (symmetric, unit diagonal, positive semi-definite).
        task_kinds: per task (or one for all) ``"regression"`` (MSE on y_t), ``"binary"`` (y_t > train median)
            or ``"classification"`` (``num_classes`` train-quantile bins of y_t).
        num_features: d ≥ T. ``num_sines``: m. ``scale``: c. ``noise_std``: σ (the paper's N(0, 0.01) noise
            has σ = 0.1). α_i and β_i are drawn from N(0, 1).
        seed: everything (basis, α, β, x, noise) is drawn from one ``torch.Generator`` seeded with it.

    Returns:
        inputs ``(N, d)`` of ``dtype``; targets ``(N,)``: ``dtype`` for regression and binary, int64 class
        indices for classification. ``info`` holds ``weights`` (T, d), ``similarity`` (T, T), ``alphas``,
        ``betas`` (m,), the ``thresholds`` of the classification variants and the generator settings.
    """
    if num_tasks < 1:
        raise ValueError(f"mtlfast: num_tasks must be >= 1, got {num_tasks}")
    if num_features < num_tasks:
        raise ValueError(f"mtlfast: num_features ({num_features}) must be >= num_tasks ({num_tasks}) "
                         "to hold that many orthogonal directions")
    if min(num_train, num_val, num_test) < 1:
        raise ValueError("mtlfast: num_train, num_val and num_test must all be >= 1")
    if num_classes < 2:
        raise ValueError(f"mtlfast: num_classes must be >= 2, got {num_classes}")
    if noise_std < 0:
        raise ValueError(f"mtlfast: noise_std must be >= 0, got {noise_std}")
    kinds = _task_kinds(task_kinds, num_tasks)
    similarity, factor = _similarity_matrix(num_tasks, correlation)

    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(num_features, num_tasks, generator=generator, dtype=torch.float64))
    weights = scale * factor @ basis.T  # (T, d): row t = c·Σ_k F_tk u_k
    alphas = torch.randn(num_sines, generator=generator, dtype=torch.float64)
    betas = torch.randn(num_sines, generator=generator, dtype=torch.float64)
    total = num_train + num_val + num_test
    x = torch.randn(total, num_features, generator=generator, dtype=torch.float64)
    projection = x @ weights.T  # (N, T): w_tᵀx
    waves = torch.sin(projection.unsqueeze(-1) * alphas + betas).sum(dim=-1)
    noise = noise_std * torch.randn(total, num_tasks, generator=generator, dtype=torch.float64)
    labels = projection + waves + noise  # (N, T)

    train_labels = labels[:num_train]
    tasks: list[Task] = []
    columns: dict[str, torch.Tensor] = {}
    thresholds: dict[str, torch.Tensor] = {}
    for t, kind in enumerate(kinds):
        name = f"task{t}"
        y = labels[:, t].contiguous()
        if kind == "regression":
            tasks.append(Regression(name))
            columns[name] = y.to(dtype)
        elif kind == "binary":
            cut = train_labels[:, t].median()
            thresholds[name] = cut.reshape(1)
            tasks.append(Binary(name))
            columns[name] = (y > cut).to(dtype)
        else:
            levels = torch.arange(1, num_classes, dtype=torch.float64) / num_classes
            cuts = torch.quantile(train_labels[:, t], levels)
            thresholds[name] = cuts
            tasks.append(Classification(name, num_classes))
            columns[name] = torch.bucketize(y, cuts, right=True)  # int64 in [0, num_classes)

    inputs = x.to(dtype)
    bounds = (0, num_train, num_train + num_val, total)
    splits = [Split(inputs[lo:hi], {name: col[lo:hi] for name, col in columns.items()})
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    info = {
        "source": "Ma et al. 2018 (MMoE) §4 synthetic generator, generalised to T tasks",
        "weights": weights, "similarity": similarity, "alphas": alphas, "betas": betas,
        "thresholds": thresholds, "task_kinds": tuple(kinds), "scale": scale, "noise_std": noise_std,
        "seed": seed,
    }
    return MultiTaskDataset("synthetic", tuple(tasks), *splits,
                            feature_names=tuple(f"x{i}" for i in range(num_features)), info=info)
