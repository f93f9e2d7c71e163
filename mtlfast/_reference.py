"""The oracle: the obvious per-task loop over ``torch.nn.functional`` losses.

Every implementation of the fused op is tested against this, and benchmarks use it as the "eager" baseline shape
of computation. It is deliberately naive (one Linear + one loss per task) and never the fast path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mtlfast.tasks import LossKind, Task, is_distillation


def _masked_mean(elements: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if not bool(valid.any()):
        return elements.sum() * 0.0  # no valid entry: 0 with zero gradient (PyTorch would give NaN)
    return elements[valid].mean()


def distillation_loss(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """τ²·KL(p_teacher ‖ softmax(logits / τ)) averaged over the rows whose target (N, C) holds no NaN
    (Hinton et al. 2015); the teacher's p is softmax(target / τ) for teacher logits, else the target itself."""
    tau = task.param
    valid = ~torch.isnan(target).any(-1)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    log_q = F.log_softmax(logits[valid] / tau, dim=-1)
    if task.kind == LossKind.DISTILL:
        log_p = F.log_softmax(target[valid] / tau, dim=-1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(log_q, target[valid], reduction="batchmean")
    return tau * tau * kl


def task_loss(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of one task: ``logits`` (N, C), ``target`` (N,) class indices or (N, C) floats with NaN = missing."""
    kind = task.kind
    if is_distillation(kind):
        return distillation_loss(task, logits, target)
    if kind == LossKind.CROSS_ENTROPY:
        weights = task.column_weights()
        if weights is not None:
            weights = weights.to(device=logits.device, dtype=logits.dtype)
        kept = target != task.ignored_class
        if not bool(kept.any()):
            return logits.sum() * 0.0
        denominator = weights[target[kept]].sum() if weights is not None else None
        if denominator is not None and float(denominator) == 0.0:
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits, target, weight=weights, ignore_index=task.ignored_class, label_smoothing=task.param
        )
    valid = ~torch.isnan(target)
    return _masked_mean(elementwise_loss(task, logits, torch.where(valid, target, torch.zeros_like(target))), valid)


def elementwise_loss(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unreduced ``F.*`` loss of a BCE / regression task on complete targets (missing entries already filled)."""
    kind = task.kind
    if kind == LossKind.BCE:
        pos_weight = task.column_weights()
        if pos_weight is not None:
            pos_weight = pos_weight.to(device=logits.device, dtype=logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    if kind == LossKind.MSE:
        return F.mse_loss(logits, target, reduction="none")
    if kind == LossKind.L1:
        return F.l1_loss(logits, target, reduction="none")
    if kind == LossKind.HUBER:
        return F.huber_loss(logits, target, reduction="none", delta=task.param)
    raise NotImplementedError(f"mtlfast: task {task.name!r}: no reference for loss kind {kind!r}")


def reference_multi_task_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: Sequence[torch.Tensor | None],
    tasks: Sequence[Task],
    task_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per-task loop. ``h`` (N, D); ``weight`` (S, D) heads packed in task order; ``targets[t]`` is (N,) class
    indices or (N, C_t) floats, or None for a task absent from the batch (loss 0).

    Returns ``(total, losses (T,), logits per task)`` with total = Σ λ_t L_t, all differentiable by autograd.
    """
    losses = []
    logits_per_task = []
    offset = 0
    for task, target in zip(tasks, targets):
        rows = slice(offset, offset + task.num_outputs)
        offset += task.num_outputs
        logits = F.linear(h, weight[rows], None if bias is None else bias[rows])
        logits_per_task.append(logits)
        if target is None:
            losses.append(logits.sum() * 0.0)
        else:
            losses.append(task_loss(task, logits.to(target.dtype) if target.is_floating_point() else logits, target))
    losses_tensor = torch.stack([loss.to(torch.float64 if h.dtype == torch.float64 else torch.float32) for loss in losses])
    if task_weights is None:
        task_weights = torch.tensor([task.weight for task in tasks], dtype=losses_tensor.dtype, device=h.device)
    total = (task_weights.to(losses_tensor.dtype) * losses_tensor).sum()
    return total, losses_tensor, logits_per_task
