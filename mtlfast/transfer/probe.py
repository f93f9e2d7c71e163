"""Linear probing: train task heads on precomputed backbone features (see :mod:`mtlfast.transfer.feature_cache`).

The standard protocol for measuring how well frozen features transfer (e.g. Kornblith, Shlens & Le, "Do Better
ImageNet Models Transfer Better?", CVPR 2019); with :class:`mtlfast.MultiTaskHeads` every task is probed in the same
fused step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mtlfast.nn import MultiTaskHeads
from mtlfast.transfer.feature_cache import FeatureDataset


def fit_heads(
    heads: MultiTaskHeads,
    data: FeatureDataset,
    *,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Train ``heads`` on ``data`` with mini-batch AdamW (or ``optimizer``), shuffling every epoch.

    Args:
        heads: the task heads (their ``in_features`` must match ``data.feature_dim``).
        data: features with targets as a mapping task name → tensor (a bare tensor is accepted for a single task).
            Moved once to the heads' device.
        epochs, lr, batch_size, weight_decay: the usual; ``lr`` / ``weight_decay`` build the default AdamW.
        optimizer: used instead of the default AdamW.
        generator: seeds the shuffling.
        progress: show a tqdm bar over epochs.

    Returns:
        (epochs,) the mean training loss Σ λ_t L_t of each epoch (a tensor on the heads' device; nothing is read on
        the host during training).
    """
    if epochs < 1:
        raise ValueError(f"mtlfast: epochs must be >= 1, got {epochs}")
    if data.targets is None:
        raise ValueError("mtlfast: fit_heads needs features with targets")
    if not isinstance(data.targets, Mapping):
        if len(heads.task_names) != 1 or not isinstance(data.targets, torch.Tensor):
            raise ValueError(
                f"mtlfast: targets must be a mapping task name → tensor for tasks {list(heads.task_names)}"
            )
        data = FeatureDataset(data.features, {heads.task_names[0]: data.targets}, key=data.key)
    weight = next(heads.parameters())
    data = data.to(weight.device)
    optimizer = optimizer or torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    heads.train()
    history = []
    for _ in _epochs(epochs, progress):
        total = torch.zeros((), device=weight.device, dtype=torch.float64)
        for features, targets in data.batches(batch_size, shuffle=True, generator=generator):
            out = heads(features, targets)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            total += out.loss.detach().to(total.dtype) * _rows(features)
        history.append(total / len(data))
    return torch.stack(history)


def _rows(features) -> int:
    first = next(iter(features.values())) if isinstance(features, Mapping) else features
    return first.shape[0]


def _epochs(epochs: int, progress: bool):
    if progress:
        try:
            from tqdm.auto import trange

            return trange(epochs, desc="mtlfast: training heads", unit="epoch")
        except ImportError:
            pass
    return range(epochs)


__all__ = ["fit_heads"]
