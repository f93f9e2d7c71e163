"""Batches as the training loop takes them, ``(inputs, targets)``, and the model behind its wrappers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def split_batch(batch: Any) -> tuple[Any, Mapping[str, torch.Tensor | None]]:
    """``(inputs, targets)`` with ``targets`` a mapping task name → tensor, or a clear error."""
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) != 2:
        raise TypeError(f"mtlfast: fit expects batches (inputs, targets_dict), got {type(batch).__name__}")
    inputs, targets = batch
    if not isinstance(targets, Mapping):
        raise TypeError(
            f"mtlfast: a batch's targets must be a mapping task name → tensor, got {type(targets).__name__}"
        )
    return inputs, targets


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists and tuples) moved to ``device`` without blocking the host."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers (which do not forward
    ``tasks`` or ``predict``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_tasks(model: nn.Module) -> tuple[Any, ...]:
    core = unwrap_model(model)
    tasks = getattr(core, "tasks", None)
    if tasks is None or not hasattr(core, "task_names") or not hasattr(core, "predict"):
        raise TypeError(
            f"mtlfast: fit needs a multi-task model with .tasks, .task_names and .predict (MultiTaskHeads or an "
            f"mtlfast.models model), got {type(core).__name__}"
        )
    return tuple(tasks)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else buffers) live; CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
