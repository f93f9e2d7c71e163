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
from mtlfast.tasks import LossKind, Task

_ops = torch.ops.mtlfast

# Heads whose N×S logits would exceed CHUNK_ELEMENTS are processed in row chunks of about that many logits
# (see DESIGN.md §2 Memory), but never fewer than MIN_CHUNK_ROWS rows: each chunk re-reads the (S, D) weight and
# its gradient, so short chunks turn a large head into many passes over its parameters. 2^25 fp32 logits (128 MiB)
# per chunk: on S5 (N=4096, a 32k-class head) 4 chunks instead of 8 took the step from 4.84 to 4.63 s on the 2-core
# CPU (torch.compile of the loop: 4.76 s), for a peak of about 0.2x eager's memory.
CHUNK_ELEMENTS = 1 << 25
MIN_CHUNK_ROWS = 512
# Device types on which large heads recompute their logits in the backward by default (multi_task_loss_recompute:
# the forward saves per-row softmax statistics; a step then holds the parameters' gradients plus one block of
# logits). Elsewhere the chunked op, which finishes the gradients in the forward with one GEMM less: on the 2-core
# CPU, S5 in fp32 took 4.5-5.1 s per step chunked vs 7.4 s recomputing, for a peak of 301 vs 157 MiB (eager loop:
# 6.0 s, 1500 MiB; `python -m benchmarks.bench_op --device cpu --configs S5 --providers
# mtlfast,mtlfast_chunked,mtlfast_recompute,eager_loop --repeat 3`, medians).
RECOMPUTE_DEVICE_TYPES = frozenset({"cuda"})


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


def _op_targets(layout: TaskLayout, given: list[torch.Tensor | None], h: torch.Tensor):
    """The op's targets and kinds: a present target goes as given (the op checks and converts it, naming the task);
    an absent task gets an empty placeholder and the kind NONE."""
    if all(isinstance(target, torch.Tensor) for target in given):  # the common case: one pass, no per-task work
        return given, layout.kinds
    kinds, placeholders = list(layout.kinds), list(given)
    for t, target in enumerate(given):
        if target is None:
            kinds[t], placeholders[t] = int(LossKind.NONE), h.new_empty(0)
        elif not isinstance(target, torch.Tensor):
            task = layout.tasks[t]
            raise TypeError(
                f"mtlfast: task '{task.name}' ({type(task).__name__}): target must be a tensor, got {type(target).__name__}"
            )
    if all(kind == LossKind.NONE for kind in kinds):
        raise ValueError(f"mtlfast: no targets given for any task of {list(layout.names)}")
    return placeholders, kinds


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
    recompute_logits: bool | None = None,
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
        recompute_logits: how a chunked (large) head gets its gradients. True: the forward keeps only per-row softmax
            statistics and the backward recomputes the logits in blocks of head columns (the least memory: about
            the parameters' gradients plus one block; one GEMM more). False: the forward finishes the gradients
            chunk by chunk (fp32 accumulators of the weight gradient and of each task's input gradient). None: True
            on CUDA, False on the CPU, where the extra GEMM costs more than the memory saved is worth. Always False
            with ``per_task_input_grads`` (the chunked forward produces them).

    ``_tables`` (internal): the layout's (col_task, col_weight) tensors already on the device, as modules keep them
    in buffers.
    """
    output, _present = fused_multi_task_loss(
        h, weight, bias, targets, tasks, task_weights, return_logits=return_logits,
        per_task_input_grads=per_task_input_grads, chunk_rows=chunk_rows, recompute_logits=recompute_logits,
        _tables=_tables,
    )
    return output


Present = tuple[bool, ...] | None
"""Which tasks had a target in the batch, in task order; None when every task had one."""


def fused_multi_task_loss(
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
    recompute_logits: bool | None = None,
    _tables: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[MultiTaskLossOutput, Present]:
    """:func:`multi_task_loss`, plus which tasks had a target (what :class:`mtlfast.MultiTaskHeads` reports)."""
    layout = tasks if isinstance(tasks, TaskLayout) else TaskLayout(tasks)
    if h.dim() < 1 or h.shape[-1] != weight.shape[-1]:
        raise ValueError(f"mtlfast: h must be (..., D) with D = {weight.shape[-1]}, got {tuple(h.shape)}")
    if weight.shape[0] != layout.num_columns:
        raise ValueError(f"mtlfast: weight has {weight.shape[0]} rows but the tasks need {layout.num_columns}")
    h, weight, bias = _autocast(h, weight, bias)
    acc = accumulation_dtype(h.dtype)
    if _tables is not None:
        col_task, col_weight = _tables
        col_weight = None if col_weight is None else col_weight.to(acc)
    else:
        col_task, col_weight = layout.col_task(h.device), layout.col_weight(h.device, acc)
    if task_weights is None:
        task_weights = layout.default_task_weights(h.device, acc)
    # The op checks everything else (shapes, dtypes, devices of h, the heads and every target) and raises
    # ValueError / TypeError naming the task.
    batch_shape = h.shape[:-1]
    chunk = _resolve_chunk_rows(chunk_rows, batch_shape.numel(), layout.num_columns, h.shape[-1], return_logits)
    fast = None
    if chunk == 0 and not torch.compiler.is_compiling():  # small heads, eager: the C++ entry point (targets looked up there)
        fast = _fused.multi_task_loss_eager(
            layout.task_spec(), h, weight, bias, targets, task_weights, col_weight, col_task, return_logits
        )
    if fast is not None:
        total, losses, grad_logits, packed_logits, present = fast
    else:
        given = _gather_targets(layout, targets)
        op_targets, kinds = _op_targets(layout, given, h)
        flags = tuple(target is not None for target in given)
        present = None if all(flags) else flags
        common = (kinds, layout.col_offsets, layout.class_dims, layout.ignore_index, layout.params, layout.names)
        if recompute_logits is None:
            recompute_logits = h.device.type in RECOMPUTE_DEVICE_TYPES
        if chunk > 0 and (per_task_input_grads or not recompute_logits):  # gradients finished in the forward
            total, losses, grad_h_per_task, _, _ = _fused.multi_task_loss_chunked(
                h, weight, bias, op_targets, task_weights, col_weight, col_task, *common, chunk
            )
            input_grads = None
            if per_task_input_grads:
                input_grads = grad_h_per_task.detach().view(layout.num_tasks, *batch_shape, h.shape[-1])
            return MultiTaskLossOutput(total, losses, None, input_grads), present
        if chunk > 0:  # the backward recomputes the logits: the least memory
            total, losses, _, _ = _fused.multi_task_loss_recompute(
                h, weight, bias, op_targets, task_weights, col_weight, col_task, *common, chunk
            )
            return MultiTaskLossOutput(total, losses, None, None), present
        total, losses, grad_logits, packed_logits = _fused.multi_task_loss(
            h, weight, bias, op_targets, task_weights, col_weight, col_task, *common, return_logits
        )
    logits = packed_logits.view(*batch_shape, layout.num_columns) if return_logits else None
    input_grads = None
    if per_task_input_grads:
        grads = _ops.per_task_input_grads(grad_logits, weight.detach(), layout.col_offsets)
        input_grads = grads.view(layout.num_tasks, *batch_shape, h.shape[-1])
    return MultiTaskLossOutput(total, losses, logits, input_grads), present


__all__ = ["multi_task_loss", "MultiTaskLossOutput", "LossKind"]
