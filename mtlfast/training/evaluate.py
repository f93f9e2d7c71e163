"""Evaluation of a multi-task model on a loader: per-task metrics from ``model.predict``, without gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mtlfast.training._batches import model_device, model_tasks, split_batch, to_device, unwrap_model
from mtlfast.training.metrics import MetricsSpec, TaskMetrics, build_task_metrics


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    if amp_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"mtlfast: amp_dtype must be torch.float16, torch.bfloat16 or None, got {amp_dtype}")
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    metrics: str | MetricsSpec | TaskMetrics = "auto",
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """task → metric → value over every batch ``(inputs, targets)`` of ``loader``.

    The model runs in eval mode under ``torch.no_grad`` (afterwards every submodule gets back its own mode);
    ``model.predict(inputs)`` gives each task's logits, which :class:`~mtlfast.training.metrics.TaskMetrics` scores
    with missing labels masked out.
    ``metrics``: ``"auto"`` (by task kind, see :func:`~mtlfast.training.metrics.default_metrics`), a mapping
    task → {name: torchmetrics.Metric}, or a ``TaskMetrics`` (reset before use).
    """
    task_metrics = build_task_metrics(model_tasks(model), metrics)
    if task_metrics is None:
        raise ValueError("mtlfast: evaluate needs metrics ('auto' or a mapping task → {name: Metric})")
    device = torch.device(device) if device is not None else model_device(model)
    task_metrics.to(device)
    task_metrics.reset()
    core = unwrap_model(model)
    # Per module, not model.train(previous): that would overwrite per-layer choices (e.g. BatchNorm pinned in eval).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        for batch in loader:
            inputs, targets = split_batch(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            with autocast_context(device, amp_dtype):
                predictions = core.predict(inputs)
            task_metrics.update(predictions, targets)
        return task_metrics.compute()
    finally:
        for module, training in modes:
            module.training = training


__all__ = ["evaluate"]
