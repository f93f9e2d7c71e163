"""The few torch.distributed operations the training loop needs; each is the identity outside a distributed job."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (a new tensor; the input is left alone)."""
    if world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in place, for parameters that DistributedDataParallel does not reduce (a
    weighting method's learnable weights). Idempotent when the gradients already agree across ranks."""
    ranks = world_size()
    if ranks == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad.div_(ranks)
