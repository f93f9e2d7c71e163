"""Keeping weighting state identical on every rank of a DistributedDataParallel job.

Each rank sees its own slice of the batch, so anything a weighting method derives from the batch (loss history,
task-gradient Gram matrices) must be reduced across ranks before it is used; otherwise ranks drift apart. With equal
per-rank batch sizes the reductions below reproduce exactly what one process would compute on the concatenated batch.
Outside a distributed job every function here returns its input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a per-rank batch mean (per-task losses, per-task parameter gradients)."""
    ranks = world_size()
    if ranks == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced / ranks


def representation_gram_over_ranks(gram: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the task gradients w.r.t. the whole batch's representation.

    Rank r holds the gradients of its local mean losses, i.e. the global per-row gradients scaled by R (rows are
    disjoint across ranks), so the global Gram is Σ_r G_r / R².
    """
    ranks = world_size()
    if ranks == 1:
        return gram
    reduced = gram.detach().clone()
    dist.all_reduce(reduced)
    return reduced / (ranks * ranks)
