"""Pure-PyTorch implementation of the fused ops, used when the compiled extension is not available.

Same semantics and outputs as the C++/CUDA kernels (see csrc/registration.cpp), vectorised by loss kind rather
than looping over tasks: all element-wise columns (BCE / MSE / L1 / Huber) in one pass, cross-entropy tasks
batched by class count, distillation tasks by target form and class count. The backward ops mirror the kernels'
(csrc/cpu/multi_task_loss_backward_cpu.cpp, csrc/composite_ops.cpp).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from mtlfast.tasks import LossKind, is_distillation

_DENSE_KINDS = (LossKind.BCE, LossKind.MSE, LossKind.L1, LossKind.HUBER)

# The schemas of csrc/registration.cpp, defined here only when the extension is not loaded.
# tests/test_ops.py checks that they match the C++ ones whenever the extension is built.
SCHEMAS = {
    "multi_task_loss": (
        "(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor task_weights, Tensor? col_weight, "
        "Tensor col_task, int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, float[] params, "
        "str[] task_names, bool return_logits) -> (Tensor total, Tensor losses, Tensor grad_logits, Tensor logits)"
    ),
    "multi_task_loss_chunked": (
        "(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor task_weights, Tensor? col_weight, "
        "Tensor col_task, int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, float[] params, "
        "str[] task_names, int chunk_rows) -> (Tensor total, Tensor losses, Tensor grad_h_per_task, "
        "Tensor grad_weight, Tensor grad_bias)"
    ),
    "multi_task_loss_backward": (
        "(Tensor? grad_total, Tensor? grad_losses, Tensor task_weights, Tensor? grad_logits_output, "
        "Tensor grad_logits, Tensor h, Tensor weight, Tensor col_task, bool has_bias) -> (Tensor grad_h, "
        "Tensor grad_weight, Tensor grad_bias)"
    ),
    "multi_task_loss_chunked_backward": (
        "(Tensor? grad_total, Tensor? grad_losses, Tensor task_weights, Tensor grad_h_per_task, "
        "Tensor grad_weight, Tensor grad_bias, Tensor col_task, ScalarType h_dtype) -> (Tensor grad_h, "
        "Tensor grad_weight, Tensor grad_bias)"
    ),
    "multi_task_loss_recompute": (
        "(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor task_weights, Tensor? col_weight, "
        "Tensor col_task, int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, float[] params, "
        "str[] task_names, int chunk_rows) -> (Tensor total, Tensor losses, Tensor row_stats, "
        "Tensor inverse_denominators)"
    ),
    "multi_task_loss_recompute_backward": (
        "(Tensor? grad_total, Tensor? grad_losses, Tensor task_weights, Tensor h, Tensor weight, Tensor? bias, "
        "Tensor[] targets, Tensor? col_weight, Tensor col_task, Tensor row_stats, Tensor inverse_denominators, "
        "int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, float[] params, str[] task_names, "
        "int block_columns) -> (Tensor grad_h, Tensor grad_weight, Tensor grad_bias)"
    ),
    "per_task_input_grads": "(Tensor grad_logits, Tensor weight, int[] col_offsets) -> Tensor",
}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@lru_cache(maxsize=256)
def _plan(kinds: tuple[int, ...], col_offsets: tuple[int, ...]):
    """Column groups of a task mix: dense task ids, cross-entropy task ids grouped by class count, and
    distillation task ids grouped by (kind, class count)."""
    dense = [t for t, k in enumerate(kinds) if k in _DENSE_KINDS]
    by_classes: dict[int, list[int]] = {}
    distill: dict[tuple[int, int], list[int]] = {}
    for t, k in enumerate(kinds):
        if k == LossKind.CROSS_ENTROPY:
            by_classes.setdefault(col_offsets[t + 1] - col_offsets[t], []).append(t)
        elif is_distillation(k):
            distill.setdefault((k, col_offsets[t + 1] - col_offsets[t]), []).append(t)
    return dense, sorted(by_classes.items()), sorted(distill.items())


@lru_cache(maxsize=1024)
def _const_cached(values: tuple, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _const(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small constant index/parameter tensor, made once per device: a per-call host-to-device copy would cost a
    copy each step and break CUDA-graph capture."""
    return _const_cached(tuple(values), dtype, device)


def _per_column(values_per_task, tasks, col_offsets):
    return [values_per_task[t] for t in tasks for _ in range(col_offsets[t + 1] - col_offsets[t])]


def _cols(tasks: Sequence[int], col_offsets: Sequence[int]) -> list[int]:
    return [c for t in tasks for c in range(col_offsets[t], col_offsets[t + 1])]


def _check_class_targets(names, kinds, col_offsets, ignore_index, targets) -> None:
    for t, kind in enumerate(kinds):
        if kind != LossKind.CROSS_ENTROPY or targets[t].device.type != "cpu":
            continue
        y = targets[t]
        classes = col_offsets[t + 1] - col_offsets[t]
        bad = (y != ignore_index[t]) & ((y < 0) | (y >= classes))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise IndexError(
                f"mtlfast: task '{names[t]}' (cross-entropy): class index {int(y[row])} at row {row} is out of "
                f"range [0, {classes}) (ignore_index is {ignore_index[t]})"
            )


def _check_distillation_targets(names, kinds, col_offsets, targets) -> None:
    """CPU only (no host sync on a GPU), as in csrc/task_table.cpp: probabilities are NaN or finite and >= 0."""
    for t, kind in enumerate(kinds):
        if kind != LossKind.DISTILL_PROBS or targets[t].device.type != "cpu":
            continue
        y = targets[t]
        bad = ~torch.isnan(y) & ~((y >= 0) & torch.isfinite(y))
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"mtlfast: task '{names[t]}' ({_KIND_NAMES[LossKind(kind)]}): target probabilities must be "
                f"non-negative and finite (NaN marks a missing row), got {float(y[row, column])} at row {row}, "
                f"class {column}"
            )


def _denominators(targets, col_weight, kinds, col_offsets, ignore_index, acc, device) -> torch.Tensor:
    denominators = torch.zeros(len(kinds), dtype=acc, device=device)
    for t, kind in enumerate(kinds):  # one reduction per task, over targets only (no logits)
        if kind == LossKind.CROSS_ENTROPY:
            y = targets[t]
            kept = y != ignore_index[t]
            if col_weight is None:
                denominators[t] = kept.sum()
            else:
                classes = col_offsets[t + 1] - col_offsets[t]
                w = col_weight[col_offsets[t] : col_offsets[t + 1]]
                denominators[t] = (w[y.clamp(0, classes - 1)] * kept).sum()
        elif kind in _DENSE_KINDS:
            denominators[t] = (~torch.isnan(targets[t])).sum()
        elif is_distillation(kind):  # valid rows: a NaN anywhere marks the row missing
            denominators[t] = (~torch.isnan(targets[t]).any(1)).sum()
    return denominators


def _elementwise_loss_and_grad(z, target, col_kind, delta, pos_weight):
    """Unnormalised per-entry loss and logit gradient of the element-wise kinds (BCE / MSE / L1 / Huber, chosen per
    column by ``col_kind``), as loss_math.h's elementwise_loss; both 0 where the target is NaN (missing).
    ``col_kind`` / ``delta`` / ``pos_weight`` broadcast against the columns of ``z`` (rows, columns)."""
    valid = ~torch.isnan(target)
    y = torch.where(valid, target, torch.zeros_like(target))
    d = z - y
    bce_loss = pos_weight * y * torch.nn.functional.softplus(-z) + (1 - y) * torch.nn.functional.softplus(z)
    sig = torch.sigmoid(z)
    bce_grad = (1 - y) * sig - pos_weight * y * (1 - sig)
    small = d.abs() < delta
    huber_loss = torch.where(small, 0.5 * d * d, delta * (d.abs() - 0.5 * delta))
    huber_grad = torch.where(small, d, delta * torch.sign(d))
    loss = torch.where(col_kind == LossKind.BCE, bce_loss,
           torch.where(col_kind == LossKind.MSE, d * d,
           torch.where(col_kind == LossKind.L1, d.abs(), huber_loss)))
    g = torch.where(col_kind == LossKind.BCE, bce_grad,
        torch.where(col_kind == LossKind.MSE, 2 * d,
        torch.where(col_kind == LossKind.L1, torch.sign(d), huber_grad)))
    return torch.where(valid, loss, torch.zeros_like(loss)), torch.where(valid, g, torch.zeros_like(g))


def _loss_sums_and_grads(z, targets, row_slice, col_weight, kinds, col_offsets, ignore_index, params, *,
                         with_grads=True, row_stats=None):
    """Unnormalised per-task loss sums (T,) and per-entry logit gradients for a block of rows ``z`` (rows, S).

    ``with_grads=False``: the gradient is not computed (None is returned in its place). ``row_stats`` (T, rows, 4):
    filled with the softmax statistics of the cross-entropy and distillation rows (multi_task_loss_recompute's
    row_stats; the rows of the other tasks are left as they are)."""
    acc = z.dtype
    T = len(kinds)
    sums = torch.zeros(T, dtype=acc, device=z.device)
    grad = torch.zeros_like(z) if with_grads else None
    dense, ce_groups, distill_groups = _plan(tuple(kinds), tuple(col_offsets))
    if dense:
        cols = _const(_cols(dense, col_offsets), z.device)
        zd = z.index_select(1, cols)
        yd = torch.cat([targets[t][row_slice] for t in dense], dim=1)
        col_kind = _const(_per_column(kinds, dense, col_offsets), z.device)
        delta = _const(_per_column(params, dense, col_offsets), z.device, acc)
        pos_weight = col_weight.index_select(0, cols) if col_weight is not None else torch.ones_like(delta)
        loss, g = _elementwise_loss_and_grad(zd, yd, col_kind, delta, pos_weight)
        if with_grads:
            grad.index_copy_(1, cols, g)
        col_owner = _const(_per_column(range(T), dense, col_offsets), z.device)
        sums.index_add_(0, col_owner, loss.sum(0))
    for classes, group in ce_groups:
        cols = _const(_cols(group, col_offsets), z.device)
        G = len(group)
        zc = z.index_select(1, cols).view(-1, G, classes)
        y = torch.stack([targets[t][row_slice] for t in group], dim=1)  # (rows, G)
        ignore = _const([ignore_index[t] for t in group], z.device)
        in_range = (y >= 0) & (y < classes)
        kept = (y != ignore) & in_range
        y_safe = torch.where(kept, y, torch.zeros_like(y))
        w = col_weight.index_select(0, cols).view(G, classes) if col_weight is not None else torch.ones(G, classes, dtype=acc, device=z.device)
        eps = _const([params[t] for t in group], z.device, acc)
        log_p = torch.log_softmax(zc, dim=-1)
        w_y = torch.gather(w.expand(y.shape[0], G, classes), 2, y_safe.unsqueeze(-1)).squeeze(-1) * kept
        a = (1 - eps) * w_y  # (rows, G)
        b = (eps / classes).unsqueeze(-1) * w * kept.unsqueeze(-1)  # (rows, G, C)
        row_loss = -a * torch.gather(log_p, 2, y_safe.unsqueeze(-1)).squeeze(-1) - (b * log_p).sum(-1)
        if with_grads:
            one_hot = torch.nn.functional.one_hot(y_safe, classes).to(acc)
            g = (a + b.sum(-1)).unsqueeze(-1) * log_p.exp() - a.unsqueeze(-1) * one_hot - b
            grad.index_copy_(1, cols, g.reshape(-1, G * classes))
        if row_stats is not None:  # [lse, a, B, ε/C], all 0 for an ignored (or out-of-range) row
            lse = torch.logsumexp(zc, dim=-1)
            stats = torch.stack([lse, a, b.sum(-1), (eps / classes).expand_as(lse)], dim=-1)  # (rows, G, 4)
            stats = torch.where(kept.unsqueeze(-1), stats, torch.zeros_like(stats))
            row_stats.index_copy_(0, _const(group, z.device), stats.transpose(0, 1))
        # An out-of-range index (only reachable off the CPU, where it is not raised) poisons its task's loss.
        bad = (~in_range) & (y != ignore)
        row_loss = torch.where(bad, torch.full_like(row_loss, float("nan")), row_loss)
        sums.index_add_(0, _const(group, z.device), row_loss.sum(0))
    for (kind, classes), group in distill_groups:
        cols = _const(_cols(group, col_offsets), z.device)
        G = len(group)
        zc = z.index_select(1, cols).view(-1, G, classes)
        y = torch.stack([targets[t][row_slice] for t in group], dim=1)  # (rows, G, C)
        tau = _const([params[t] for t in group], z.device, acc).view(G, 1)
        missing = torch.isnan(y).any(-1, keepdim=True)  # (rows, G, 1)
        y = torch.where(missing, torch.zeros_like(y), y)
        log_q = torch.log_softmax(zc / tau, dim=-1)
        if kind == LossKind.DISTILL:  # teacher logits
            log_p = torch.log_softmax(y / tau, dim=-1)
            p = log_p.exp()
            mass = torch.ones_like(p[..., :1])
        else:  # probabilities; a negative one (only reachable off the CPU) makes log p, hence the loss, NaN
            p, log_p = y, y.log()
            mass = p.sum(-1, keepdim=True)
        # 0 · log 0 = 0: torch.where, since p · (log p - log q) is 0 · (-inf) = NaN there.
        elements = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))
        row_loss = torch.where(missing.squeeze(-1), torch.zeros_like(elements[..., 0]), tau.square().view(G) * elements.sum(-1))
        if with_grads:
            g = torch.where(missing, torch.zeros_like(p), tau * (mass * log_q.exp() - p))
            grad.index_copy_(1, cols, g.reshape(-1, G * classes))
        if row_stats is not None:  # [lse_s, lse_t, m, valid], all 0 for a missing row
            lse_s = torch.logsumexp(zc / tau, dim=-1)
            lse_t = torch.logsumexp(y / tau, dim=-1) if kind == LossKind.DISTILL else torch.zeros_like(lse_s)
            stats = torch.stack([lse_s, lse_t, mass.squeeze(-1), torch.ones_like(lse_s)], dim=-1)  # (rows, G, 4)
            stats = torch.where(missing, torch.zeros_like(stats), stats)
            row_stats.index_copy_(0, _const(group, z.device), stats.transpose(0, 1))
        sums.index_add_(0, _const(group, z.device), row_loss.sum(0))
    return sums, grad


def _safe_reciprocal(denominators):
    """1 / denominator per task, 0 for a task with no valid entry (loss_math.h's safe_reciprocal)."""
    return torch.where(denominators > 0, 1.0 / denominators.clamp_min(torch.finfo(denominators.dtype).tiny), torch.zeros_like(denominators))


def _scale_by_task(grad, denominators, col_task):
    inverse = _safe_reciprocal(denominators)
    return grad * inverse.index_select(0, col_task), inverse


_KIND_NAMES = {
    LossKind.NONE: "absent", LossKind.CROSS_ENTROPY: "cross-entropy", LossKind.BCE: "BCE", LossKind.MSE: "MSE",
    LossKind.L1: "L1", LossKind.HUBER: "Huber", LossKind.DISTILL: "distillation from teacher logits",
    LossKind.DISTILL_PROBS: "distillation from teacher probabilities",
}


def _prepare_target(y, where, kind, width, class_dim, param, h, batch_shape, acc):
    """One task's target in the kernel layout, with csrc/task_table.cpp's check_target's checks and messages."""
    if y.device != h.device:
        raise ValueError(f"{where}: target is on {y.device} but h is on {h.device}")
    expected = tuple(batch_shape) + ((width,) if class_dim else ())
    if tuple(y.shape) != expected:
        raise ValueError(
            f"{where}: target must have shape {expected} (the batch shape of h"
            f"{', plus the output dimension' if class_dim else ''}), got {tuple(y.shape)}"
        )
    if kind == LossKind.CROSS_ENTROPY:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{where}: targets must be integer class indices, got {y.dtype}")
        if not 0.0 <= param <= 1.0:
            raise ValueError(f"{where}: label_smoothing must be in [0, 1], got {param}")
        y = y.to(torch.int64)
    elif is_distillation(kind):
        if not y.is_floating_point():
            form = "teacher logits" if kind == LossKind.DISTILL else "teacher probabilities"
            raise TypeError(f"{where}: targets must be floating point {form} of shape (..., {width}), got {y.dtype}")
        if not (param > 0 and math.isfinite(param)):
            raise ValueError(f"{where}: temperature must be positive and finite, got {param}")
        y = y.to(acc)
    else:
        if y.is_complex():
            raise TypeError(f"{where}: targets must be real, got {y.dtype}")
        if kind == LossKind.HUBER and not param > 0:
            raise ValueError(f"{where}: delta must be positive, got {param}")
        y = y.to(acc)
    rows = math.prod(batch_shape)
    return y.reshape(rows) if kind == LossKind.CROSS_ENTROPY else y.reshape(rows, width)


def _prepare_inputs(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims,
                    ignore_index, params, names):
    """The checks and conversions of csrc/task_table.cpp (prepare_multi_task_inputs), with the same messages:
    returns h as (N, D), the targets in the kernel layout ((N,) / (N, C); None when absent) and λ in the
    accumulation dtype."""
    T = len(kinds)
    if T == 0:
        raise ValueError("mtlfast: at least one task is required")
    if not (len(col_offsets) == T + 1 and len(class_dims) == T and len(ignore_index) == T and len(params) == T
            and len(names) == T and len(targets) == T):
        raise ValueError(
            f"mtlfast: per-task lists disagree on the number of tasks (kinds {T}, col_offsets {len(col_offsets)} "
            f"(expects T+1), class_dims {len(class_dims)}, ignore_index {len(ignore_index)}, params {len(params)}, "
            f"task_names {len(names)}, targets {len(targets)})"
        )
    if h.dim() < 1:
        raise ValueError("mtlfast: the shared input h must be (..., D), got a 0-dim tensor")
    if not h.is_floating_point():
        raise TypeError(f"mtlfast: h must be floating point, got {h.dtype}")
    batch_shape, D = h.shape[:-1], h.shape[-1]
    if batch_shape.numel() == 0:
        raise ValueError("mtlfast: empty batch (h has no rows)")
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"mtlfast: packed head weight must be (S, D) with D = {D}, got {tuple(weight.shape)}")
    for what, tensor in (("head weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != h.dtype:
            raise TypeError(f"mtlfast: {what} dtype {tensor.dtype} differs from h dtype {h.dtype}")
        if tensor.device != h.device:
            raise ValueError(f"mtlfast: {what} is on {tensor.device} but h is on {h.device}")
    S = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (S,):
        raise ValueError(f"mtlfast: bias must be (S,) = ({S},), got {tuple(bias.shape)}")
    if col_offsets[0] != 0 or col_offsets[-1] != S:
        raise ValueError(f"mtlfast: col_offsets must start at 0 and end at S = {S}")
    acc = _acc(h.dtype)
    prepared = []
    for t, kind in enumerate(kinds):
        if kind not in _KIND_NAMES.keys():
            raise ValueError(f"mtlfast: task '{names[t]}': unknown loss kind {kind}")
        where = f"mtlfast: task '{names[t]}' ({_KIND_NAMES[LossKind(kind)]})"
        width = col_offsets[t + 1] - col_offsets[t]
        if width <= 0:
            raise ValueError(f"{where}: owns no head column")
        if class_dims[t] not in (0, 1) or (class_dims[t] == 1 and kind == LossKind.CROSS_ENTROPY):
            raise ValueError(f"{where}: class_dims must be 0 or 1 (0 for class indices), got {class_dims[t]}")
        prepared.append(None if kind == LossKind.NONE else _prepare_target(
            targets[t], where, kind, width, class_dims[t], params[t], h, batch_shape, acc))
    if task_weights.dim() != 1 or task_weights.shape[0] != T:
        raise ValueError(f"mtlfast: task_weights must be (T,) = ({T},), got {tuple(task_weights.shape)}")
    if not task_weights.is_floating_point():
        raise TypeError(f"mtlfast: task_weights must be floating point, got {task_weights.dtype}")
    if task_weights.device != h.device:
        raise ValueError(f"mtlfast: task_weights are on {task_weights.device} but h is on {h.device}")
    if col_weight is not None:
        if tuple(col_weight.shape) != (S,):
            raise ValueError(f"mtlfast: col_weight must be (S,) = ({S},), got {tuple(col_weight.shape)}")
        if col_weight.dtype != acc:
            raise TypeError(f"mtlfast: col_weight must be {acc}, got {col_weight.dtype}")
        if col_weight.device != h.device:
            raise ValueError(f"mtlfast: col_weight is on {col_weight.device} but h is on {h.device}")
    if col_task.shape != (S,) or col_task.dtype != torch.int64 or col_task.device != h.device:
        raise ValueError(f"mtlfast: col_task must be an int64 (S,) tensor on {h.device}")
    return h.reshape(-1, D), prepared, task_weights.to(acc)


def _prepare(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims,
             ignore_index, params, task_names):
    h, targets, task_weights = _prepare_inputs(h, weight, bias, targets, task_weights, col_weight, col_task, kinds,
                                               col_offsets, class_dims, ignore_index, params, task_names)
    _check_class_targets(task_names, kinds, col_offsets, ignore_index, targets)
    _check_distillation_targets(task_names, kinds, col_offsets, targets)
    acc = _acc(h.dtype)
    denominators = _denominators(targets, col_weight, kinds, col_offsets, ignore_index, acc, h.device)
    return h, targets, task_weights, acc, denominators


def multi_task_loss(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims,
                    ignore_index, params, task_names, return_logits):
    h, targets, task_weights, acc, denominators = _prepare(
        h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims, ignore_index,
        params, task_names)
    logits = torch.nn.functional.linear(h, weight, bias)
    sums, grad = _loss_sums_and_grads(logits.to(acc), targets, slice(None), col_weight, kinds, col_offsets, ignore_index, params)
    grad, inverse = _scale_by_task(grad, denominators, col_task)
    losses = sums * inverse
    return (losses * task_weights).sum(), losses, grad.to(h.dtype), logits if return_logits else h.new_empty(0)


def multi_task_loss_chunked(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets,
                            class_dims, ignore_index, params, task_names, chunk_rows):
    h, targets, task_weights, acc, denominators = _prepare(
        h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims, ignore_index,
        params, task_names)
    if chunk_rows <= 0:
        raise ValueError(f"mtlfast: chunk_rows must be positive, got {chunk_rows}")
    T, (N, D), S = len(kinds), h.shape, weight.shape[0]
    sums = torch.zeros(T, dtype=acc, device=h.device)
    grad_h_per_task = torch.empty(T, N, D, dtype=acc, device=h.device)
    grad_weight = torch.zeros(S, D, dtype=acc, device=h.device)
    grad_bias = torch.zeros(S, dtype=acc, device=h.device) if bias is not None else h.new_empty(0, dtype=acc)
    inverse = None
    for start in range(0, N, chunk_rows):
        rows = slice(start, min(N, start + chunk_rows))
        logits = torch.nn.functional.linear(h[rows], weight, bias).to(acc)
        chunk_sums, grad = _loss_sums_and_grads(logits, targets, rows, col_weight, kinds, col_offsets, ignore_index, params)
        sums += chunk_sums
        grad, inverse = _scale_by_task(grad, denominators, col_task)
        grad_weight += grad.t() @ h[rows].to(acc)
        if bias is not None:
            grad_bias += grad.sum(0)
        for t in range(T):
            cols = slice(col_offsets[t], col_offsets[t + 1])
            grad_h_per_task[t, rows] = grad[:, cols] @ weight[cols].to(acc)
    losses = sums * inverse
    return (losses * task_weights).sum(), losses, grad_h_per_task, grad_weight, grad_bias


def multi_task_loss_recompute(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets,
                              class_dims, ignore_index, params, task_names, chunk_rows):
    """Losses of multi_task_loss_chunked without any gradient, plus what the backward needs to recompute the logit
    gradient: the softmax statistics of every cross-entropy / distillation row and 1 / each task's denominator."""
    h, targets, task_weights, acc, denominators = _prepare(
        h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims, ignore_index,
        params, task_names)
    if chunk_rows <= 0:
        raise ValueError(f"mtlfast: chunk_rows must be positive, got {chunk_rows}")
    T, N = len(kinds), h.shape[0]
    sums = torch.zeros(T, dtype=acc, device=h.device)
    row_stats = torch.zeros(T, N, 4, dtype=acc, device=h.device)
    for start in range(0, N, chunk_rows):
        rows = slice(start, min(N, start + chunk_rows))
        logits = torch.nn.functional.linear(h[rows], weight, bias).to(acc)
        chunk_sums, _ = _loss_sums_and_grads(logits, targets, rows, col_weight, kinds, col_offsets, ignore_index,
                                             params, with_grads=False, row_stats=row_stats[:, rows])
        sums += chunk_sums
    inverse = _safe_reciprocal(denominators)
    losses = sums * inverse
    return (losses * task_weights).sum(), losses, row_stats, inverse


def _recomputed_logit_grads(z, start, targets, col_weight, row_stats, kinds, col_offsets, params):
    """The unnormalised logit gradient (N, width) of head columns [start, start + width) from their recomputed
    logits ``z`` (N, width), accumulation dtype, and the forward's ``row_stats``: the formulas of loss_math.h,
    with the softmax of a row taken from its saved log-sum-exp. A block of columns may cut through a task."""
    stop = start + z.shape[1]
    grad = torch.zeros_like(z)
    for t, kind in enumerate(kinds):
        lo, hi = max(start, col_offsets[t]), min(stop, col_offsets[t + 1])
        if lo >= hi or kind == LossKind.NONE:
            continue
        zt = z[:, lo - start : hi - start]
        classes = slice(lo - col_offsets[t], hi - col_offsets[t])  # the task's own columns in this block
        w = col_weight[lo:hi] if col_weight is not None else None
        if kind in _DENSE_KINDS:
            delta = _const([params[t]], z.device, z.dtype)
            pos_weight = w if w is not None else torch.ones_like(delta)
            _, g = _elementwise_loss_and_grad(zt, targets[t][:, classes], _const([kind], z.device), delta, pos_weight)
        elif kind == LossKind.CROSS_ENTROPY:
            # (a + B)·p_c - a·[c == y] - (ε/C)·w_c; an ignored row has all four statistics 0, hence gradient 0
            # (a + B = 0 also keeps its exp(z - 0) from overflowing into 0 · inf).
            lse, a, B, eps_c = row_stats[t].unsqueeze(-1).unbind(1)  # each (N, 1)
            is_target = targets[t].unsqueeze(1) == torch.arange(classes.start, classes.stop, device=z.device)
            softmax_part = torch.where(a + B != 0, (a + B) * torch.exp(zt - lse), torch.zeros_like(zt))
            g = softmax_part - a * is_target - eps_c * (w if w is not None else 1.0)
        else:  # distillation: τ·(m·q_c - p_c) on valid rows, 0 on missing ones
            lse_s, lse_t, mass, valid = row_stats[t].unsqueeze(-1).unbind(1)  # each (N, 1)
            tau = params[t]
            live = valid != 0
            y = targets[t][:, classes]
            y = torch.where(live, y, torch.zeros_like(y))  # a missing row's NaN
            p = torch.exp(y / tau - lse_t) if kind == LossKind.DISTILL else y
            g = torch.where(live, tau * (mass * torch.exp(zt / tau - lse_s) - p), torch.zeros_like(zt))
        grad[:, lo - start : hi - start] = g
    return grad


def multi_task_loss_recompute_backward(grad_total, grad_losses, task_weights, h_in, weight, bias, targets,
                                       col_weight, col_task, row_stats, inverse_denominators, kinds, col_offsets,
                                       class_dims, ignore_index, params, task_names, block_columns):
    """Backward of multi_task_loss_recompute, as csrc/recompute_backward.cpp: the logits are recomputed in blocks of
    ``block_columns`` head columns (all N rows of them), their gradient rebuilt from the saved row statistics and
    scaled by c_t / denominator_t; each block writes its rows of dW and db once and adds its part of dh."""
    h, targets, task_weights = _prepare_inputs(
        h_in, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims, ignore_index,
        params, task_names)
    acc = _acc(h.dtype)
    T, (N, D), S = len(kinds), h.shape, weight.shape[0]
    _check_recompute_state(T, N, row_stats, inverse_denominators, h, acc)
    if block_columns <= 0:
        raise ValueError(f"mtlfast: block_columns must be positive, got {block_columns}")
    scale = task_coefficients(grad_total, grad_losses, task_weights, acc) * inverse_denominators
    h_acc = h.to(acc)
    grad_h = torch.zeros(N, D, dtype=acc, device=h.device)
    grad_weight = h.new_empty(S, D)
    grad_bias = h.new_empty(S if bias is not None else 0)
    for start in range(0, S, block_columns):
        cols = slice(start, min(S, start + block_columns))
        # The logits exactly as the forward computed them (in h's dtype, then the accumulation dtype).
        z = torch.nn.functional.linear(h, weight[cols], None if bias is None else bias[cols]).to(acc)
        dz = _recomputed_logit_grads(z, start, targets, col_weight, row_stats, kinds, col_offsets, params)
        dz = dz * scale.index_select(0, col_task[cols])
        grad_h += dz @ weight[cols].to(acc)
        grad_weight[cols] = (dz.t() @ h_acc).to(h.dtype)
        if bias is not None:
            grad_bias[cols] = dz.sum(0).to(h.dtype)
    return grad_h.to(h.dtype).view(h_in.shape), grad_weight, grad_bias


def _check_recompute_state(T, N, row_stats, inverse_denominators, h, acc) -> None:
    """The forward's saved state fits the inputs (csrc/recompute_backward.cpp's check_saved_state, same messages)."""
    if row_stats.dim() != 3 or tuple(row_stats.shape) != (T, N, 4):
        raise ValueError(f"mtlfast: row_stats must be (T, N, 4) = ({T}, {N}, 4), got {list(row_stats.shape)}")
    if tuple(inverse_denominators.shape) != (T,):
        raise ValueError(f"mtlfast: inverse_denominators must be (T,) = ({T},), got {list(inverse_denominators.shape)}")
    for saved in (row_stats, inverse_denominators):
        if saved.dtype != acc:
            raise TypeError(f"mtlfast: the saved row statistics must be {acc}, got {saved.dtype}")
        if saved.device != h.device:
            raise ValueError(f"mtlfast: the saved row statistics are on {saved.device} but h is on {h.device}")


def task_coefficients(grad_total, grad_losses, task_weights, acc):
    """c = grad_total·λ + grad_losses in dtype ``acc`` (csrc/task_table.cpp's task_coefficients); either gradient
    may be None."""
    c = torch.zeros(task_weights.shape[0], dtype=acc, device=task_weights.device)
    if grad_total is not None:
        c = c + task_weights.to(acc) * grad_total.to(acc)
    if grad_losses is not None:
        c = c + grad_losses.to(acc)
    return c


def multi_task_loss_backward(grad_total, grad_losses, task_weights, grad_logits_output, grad_logits, h_in, weight,
                             col_task, has_bias):
    h = h_in.reshape(-1, h_in.shape[-1])
    coeff = task_coefficients(grad_total, grad_losses, task_weights, _acc(h.dtype)).index_select(0, col_task)
    if grad_logits_output is not None:
        dz = (grad_logits.to(coeff.dtype) * coeff + grad_logits_output.to(coeff.dtype)).to(h.dtype)
        grad_h, grad_weight = dz @ weight, dz.t() @ h
        grad_bias = dz.sum(0, dtype=coeff.dtype).to(h.dtype) if has_bias else h.new_empty(0)
        return grad_h.view(h_in.shape), grad_weight, grad_bias
    grad_h = grad_logits @ (weight.to(coeff.dtype) * coeff.unsqueeze(1)).to(h.dtype)
    grad_weight = ((grad_logits.t() @ h).to(coeff.dtype) * coeff.unsqueeze(1)).to(h.dtype)
    grad_bias = (grad_logits.sum(0, dtype=coeff.dtype) * coeff).to(h.dtype) if has_bias else h.new_empty(0)
    return grad_h.view(h_in.shape), grad_weight, grad_bias


def multi_task_loss_chunked_backward(grad_total, grad_losses, task_weights, grad_h_per_task, grad_weight, grad_bias,
                                     col_task, h_dtype):
    T, N, D = grad_h_per_task.shape
    c = task_coefficients(grad_total, grad_losses, task_weights, grad_h_per_task.dtype)
    grad_h = (c.view(1, T) @ grad_h_per_task.reshape(T, N * D)).view(N, D).to(h_dtype)
    coeff = c.index_select(0, col_task)
    grad_b = (grad_bias * coeff).to(h_dtype) if grad_bias.numel() > 0 else grad_bias.new_empty(0, dtype=h_dtype)
    return grad_h, (grad_weight * coeff.unsqueeze(1)).to(h_dtype), grad_b


def per_task_input_grads(grad_logits, weight, col_offsets):
    return torch.stack(
        [grad_logits[:, col_offsets[t] : col_offsets[t + 1]] @ weight[col_offsets[t] : col_offsets[t + 1]]
         for t in range(len(col_offsets) - 1)]
    )


_library = None


def define_ops() -> None:
    """Define torch.ops.mtlfast.* with these implementations (only when the extension did not)."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("mtlfast", "DEF")
    implementations = {
        "multi_task_loss": multi_task_loss,
        "multi_task_loss_chunked": multi_task_loss_chunked,
        "multi_task_loss_backward": multi_task_loss_backward,
        "multi_task_loss_chunked_backward": multi_task_loss_chunked_backward,
        "multi_task_loss_recompute": multi_task_loss_recompute,
        "multi_task_loss_recompute_backward": multi_task_loss_recompute_backward,
        "per_task_input_grads": per_task_input_grads,
    }
    for name, schema in SCHEMAS.items():
        _library.define(name + schema)
        _library.impl(name, implementations[name], "CompositeExplicitAutograd")
