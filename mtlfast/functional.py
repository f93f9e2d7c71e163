"""Functional API: the fused multi-task loss on explicit tensors.

>>> out = multi_task_loss(h, weight, bias, {"topic": y_topic, "spam": y_spam}, layout)
>>> out.total.backward()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from mtlfast import ops as _fused
from mtlfast._layout import TaskLayout, accumulation_dtype
from mtlfast.tasks import LossKind, Task, is_distillation

_ops = torch.ops.mtlfast

# Heads whose N×S logits would exceed CHUNK_ELEMENTS are processed in row chunks of about that many logits
# (see DESIGN.md §2 Memory), but never fewer than MIN_CHUNK_ROWS rows: each chunk re-reads the (S, D) weight and
# its gradient, so short chunks turn a large head into many passes over its parameters.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS = 512


class MultiTaskLossOutput(NamedTuple):
    total: torch.Tensor
    """Σ λ_t·L_t, a scalar (float32; float64 for float64 inputs)."""
    losses: torch.Tensor
    """(T,) per-task losses, differentiable; 0 for a task absent from the batch or with no valid entry."""
    logits: torch.Tensor | None
    """(..., S) packed logits when ``return_logits``."""
    input_grads: torch.Tensor | None
    """(T, ..., D) dL_t/dh for every task (unweighted) when ``per_task_input_grads``; not differentiable."""


Targets = Mapping[str, torch.Tensor | None] | Sequence[torch.Tensor | None]


def _normalise_target(task: Task, target: torch.Tensor, batch_shape: torch.Size, h: torch.Tensor) -> torch.Tensor:
    """Reshape one task's target to the kernel layout, raising errors that name the task."""
    kind_name = type(task).__name__
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"mtlfast: task '{task.name}' ({kind_name}): target must be a tensor, got {type(target).__name__}")
    if target.device != h.device:
        raise ValueError(f"mtlfast: task '{task.name}' ({kind_name}): target is on {target.device} but h is on {h.device}")
    expected = tuple(batch_shape) + ((task.num_outputs,) if task.target_has_class_dim else ())
    if tuple(target.shape) != expected:
        raise ValueError(
            f"mtlfast: task '{task.name}' ({kind_name}): target must have shape {expected} "
            f"(the batch shape of h{', plus the output dimension' if task.target_has_class_dim else ''}), "
            f"got {tuple(target.shape)}"
        )
    rows = batch_shape.numel()
    if task.target_is_index:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"mtlfast: task '{task.name}' ({kind_name}): targets must be integer class indices, got {target.dtype}")
        return target.reshape(rows).to(torch.int64)
    if not target.is_floating_point() and is_distillation(task.kind):
        # Teacher logits / probabilities are real-valued: integers here are most likely class indices.
        raise TypeError(
            f"mtlfast: task '{task.name}' ({kind_name}): targets must be floating point teacher "
            f"{'logits' if task.kind == LossKind.DISTILL else 'probabilities'} of shape (..., {task.num_outputs}), "
            f"got {target.dtype}"
        )
    if not target.is_floating_point():
        if target.dtype == torch.bool or not target.is_complex():
            target = target.to(accumulation_dtype(h.dtype))
        else:
            raise TypeError(f"mtlfast: task '{task.name}' ({kind_name}): targets must be real, got {target.dtype}")
    return target.reshape(rows, task.num_outputs).to(accumulation_dtype(h.dtype)).contiguous()


def _flatten_targets(
    layout: TaskLayout, given: Sequence[torch.Tensor | None], batch_shape: torch.Size, h: torch.Tensor
) -> list[torch.Tensor]:
    """Every task's target in the kernel layout: (N,) int64 or (N, C) accumulation dtype; empty when absent.

    The common case (right shape, dtype and device) costs one view per task; anything else goes through
    :func:`_normalise_target`, which converts or raises an error naming the task.
    """
    rows = batch_shape.numel()
    acc = accumulation_dtype(h.dtype)
    device = h.device
    flat = []
    for task, (index, trailing, width), target in zip(layout.tasks, layout.target_specs, given):
        if target is None:
            flat.append(h.new_empty(0))
            continue
        if (
            isinstance(target, torch.Tensor)
            and target.dtype == (torch.int64 if index else acc)
            and target.shape == batch_shape + trailing
            and target.device == device
        ):
            flat.append(target.reshape(rows) if index else target.reshape(rows, width))
        else:
            flat.append(_normalise_target(task, target, batch_shape, h))
    return flat


def _gather_targets(layout: TaskLayout, targets: Targets) -> list[torch.Tensor | None]:
    if isinstance(targets, Mapping):
        unknown = sorted(set(targets) - set(layout.names))
        if unknown:
            raise KeyError(f"mtlfast: targets given for unknown tasks {unknown}; tasks are {list(layout.names)}")
        return [targets.get(name) for name in layout.names]
    targets = list(targets)
    if len(targets) != layout.num_tasks:
        raise ValueError(f"mtlfast: {len(targets)} targets for {layout.num_tasks} tasks")
    return targets


def _autocast(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return h, weight, bias


def _resolve_chunk_rows(chunk_rows: int | str | None, rows: int, columns: int, features: int, logits_wanted: bool) -> int:
    if chunk_rows is None or logits_wanted:
        return 0
    if chunk_rows == "auto":
        if rows * columns <= CHUNK_ELEMENTS or columns <= features:
            return 0
        return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // columns)
    return int(chunk_rows)


def multi_task_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: Targets,
    tasks: TaskLayout | Sequence[Task],
    task_weights: torch.Tensor | None = None,
    *,
    return_logits: bool = False,
    per_task_input_grads: bool = False,
    chunk_rows: int | str | None = "auto",
    _tables: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> MultiTaskLossOutput:
    """Every head's output, every task's loss and Σ λ_t·L_t in one fused op.

    Args:
        h: (..., D) shared representation (fp32 / fp64 / bf16 / fp16; autocast applies).
        weight: (S, D) task heads packed row-wise in task order, S = Σ_t num_outputs_t.
        bias: (S,) or None.
        targets: per task (mapping by name, or a sequence in task order): class indices (...) for
            Classification, floats (...) for Binary / Regression(dim=1), (..., C) for MultiLabel /
            Regression(dim=C) / Distillation (teacher logits or probabilities; a row holding a NaN is missing). A missing or None target skips that task for this batch (loss 0, no gradient).
        tasks: the task specs (or a prebuilt :class:`TaskLayout`, which caches per-device tables).
        task_weights: (T,) λ, any tensor (learnable is fine); defaults to each task's ``weight``.
        return_logits: also return the (..., S) logits (then the small-head path is used).
        per_task_input_grads: also return dL_t/dh for every task, (T, ..., D), from the same fused pass.
        chunk_rows: rows per chunk for large heads; "auto" chunks when N·S is large and S > D; None never.

    ``_tables`` (internal): the layout's (col_task, col_weight) tensors already on the device, as modules keep them
    in buffers.
    """
    layout = tasks if isinstance(tasks, TaskLayout) else TaskLayout(tasks)
    if h.dim() < 1 or h.shape[-1] != weight.shape[-1]:
        raise ValueError(f"mtlfast: h must be (..., D) with D = {weight.shape[-1]}, got {tuple(h.shape)}")
    if weight.shape[0] != layout.num_columns:
        raise ValueError(f"mtlfast: weight has {weight.shape[0]} rows but the tasks need {layout.num_columns}")
    batch_shape = h.shape[:-1]
    if batch_shape.numel() == 0:
        raise ValueError("mtlfast: empty batch (h has no rows)")
    if not h.is_floating_point():
        raise TypeError(f"mtlfast: h must be floating point, got {h.dtype}")
    h, weight, bias = _autocast(h, weight, bias)
    if weight.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        raise TypeError(f"mtlfast: head weight/bias dtype {weight.dtype} differs from h dtype {h.dtype}")
    if weight.device != h.device:
        raise ValueError(f"mtlfast: head weight is on {weight.device} but h is on {h.device}")

    given = _gather_targets(layout, targets)
    present = [t is not None for t in given]
    if not any(present):
        raise ValueError(f"mtlfast: no targets given for any task of {list(layout.names)}")
    flat_targets = _flatten_targets(layout, given, batch_shape, h)
    kinds = layout.kinds_present(present) if not all(present) else layout.kinds
    h2 = h.reshape(-1, h.shape[-1])
    acc = accumulation_dtype(h.dtype)
    if _tables is not None:
        col_task, col_weight = _tables
        col_weight = None if col_weight is None else col_weight.to(acc)
    else:
        col_task, col_weight = layout.col_task(h.device), layout.col_weight(h.device, acc)
    common = (list(kinds), list(layout.col_offsets), list(layout.ignore_index), list(layout.params), list(layout.names))

    logits = input_grads = None
    chunk = _resolve_chunk_rows(chunk_rows, h2.shape[0], layout.num_columns, h2.shape[1], return_logits)
    if chunk > 0:
        losses, grad_h_per_task, _, _ = _fused.multi_task_loss_chunked(
            h2, weight, bias, flat_targets, col_weight, col_task, *common, chunk
        )
        if per_task_input_grads:
            input_grads = grad_h_per_task.detach().view(layout.num_tasks, *batch_shape, h.shape[-1])
    else:
        losses, grad_logits, packed_logits = _fused.multi_task_loss(
            h2, weight, bias, flat_targets, col_weight, col_task, *common, return_logits
        )
        if return_logits:
            logits = packed_logits.view(*batch_shape, layout.num_columns)
        if per_task_input_grads:
            grads = _ops.per_task_input_grads(grad_logits, weight.detach(), list(layout.col_offsets))
            input_grads = grads.view(layout.num_tasks, *batch_shape, h.shape[-1])

    if task_weights is None:
        task_weights = layout.default_task_weights(h.device, acc)
    total = (task_weights.to(losses.dtype) * losses).sum()
    return MultiTaskLossOutput(total, losses, logits, input_grads)


__all__ = ["multi_task_loss", "MultiTaskLossOutput", "LossKind"]
