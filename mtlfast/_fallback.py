"""Pure-PyTorch implementation of the fused ops, used when the compiled extension is not available.

Same semantics and outputs as the C++/CUDA kernels (see csrc/registration.cpp), vectorised by loss kind rather
than looping over tasks: all element-wise columns (BCE / MSE / L1 / Huber) in one pass, cross-entropy tasks
batched by class count. The backward ops mirror csrc/multi_task_loss_backward.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from mtlfast.tasks import LossKind

_DENSE_KINDS = (LossKind.BCE, LossKind.MSE, LossKind.L1, LossKind.HUBER)

# The schemas of csrc/registration.cpp, defined here only when the extension is not loaded.
# tests/test_ops.py checks that they match the C++ ones whenever the extension is built.
SCHEMAS = {
    "multi_task_loss": (
        "(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor? col_weight, Tensor col_task, "
        "int[] kinds, int[] col_offsets, int[] ignore_index, float[] params, str[] task_names, "
        "bool return_logits) -> (Tensor losses, Tensor grad_logits, Tensor logits)"
    ),
    "multi_task_loss_chunked": (
        "(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor? col_weight, Tensor col_task, "
        "int[] kinds, int[] col_offsets, int[] ignore_index, float[] params, str[] task_names, "
        "int chunk_rows) -> (Tensor losses, Tensor grad_h_per_task, Tensor grad_weight, Tensor grad_bias)"
    ),
    "multi_task_loss_backward": (
        "(Tensor grad_losses, Tensor? grad_logits_output, Tensor grad_logits, Tensor h, "
        "Tensor weight, Tensor col_task, bool has_bias) -> (Tensor grad_h, Tensor grad_weight, Tensor grad_bias)"
    ),
    "multi_task_loss_chunked_backward": (
        "(Tensor grad_losses, Tensor grad_h_per_task, Tensor grad_weight, "
        "Tensor grad_bias, Tensor col_task, ScalarType h_dtype) -> (Tensor grad_h, Tensor grad_weight, "
        "Tensor grad_bias)"
    ),
    "per_task_input_grads": "(Tensor grad_logits, Tensor weight, int[] col_offsets) -> Tensor",
}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@lru_cache(maxsize=256)
def _plan(kinds: tuple[int, ...], col_offsets: tuple[int, ...]):
    """Column groups of a task mix: dense task ids, and cross-entropy task ids grouped by class count."""
    dense = [t for t, k in enumerate(kinds) if k in _DENSE_KINDS]
    by_classes: dict[int, list[int]] = {}
    for t, k in enumerate(kinds):
        if k == LossKind.CROSS_ENTROPY:
            by_classes.setdefault(col_offsets[t + 1] - col_offsets[t], []).append(t)
        elif k == LossKind.DISTILL:
            raise NotImplementedError("mtlfast: distillation tasks are not implemented yet")
    return dense, sorted(by_classes.items())


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
    return denominators


def _loss_sums_and_grads(z, targets, row_slice, col_weight, kinds, col_offsets, ignore_index, params):
    """Unnormalised per-task loss sums (T,) and per-entry logit gradients for a block of rows ``z`` (rows, S)."""
    acc = z.dtype
    T = len(kinds)
    sums = torch.zeros(T, dtype=acc, device=z.device)
    grad = torch.zeros_like(z)
    dense, ce_groups = _plan(tuple(kinds), tuple(col_offsets))
    if dense:
        cols = torch.tensor(_cols(dense, col_offsets), device=z.device)
        zd = z.index_select(1, cols)
        yd = torch.cat([targets[t][row_slice] for t in dense], dim=1)
        col_kind = torch.tensor([kinds[t] for t in dense for _ in range(col_offsets[t + 1] - col_offsets[t])], device=z.device)
        delta = torch.tensor([params[t] for t in dense for _ in range(col_offsets[t + 1] - col_offsets[t])], dtype=acc, device=z.device)
        pos_weight = col_weight.index_select(0, cols) if col_weight is not None else torch.ones_like(delta)
        valid = ~torch.isnan(yd)
        y = torch.where(valid, yd, torch.zeros_like(yd))
        d = zd - y
        bce_loss = pos_weight * y * torch.nn.functional.softplus(-zd) + (1 - y) * torch.nn.functional.softplus(zd)
        sig = torch.sigmoid(zd)
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
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        grad.index_copy_(1, cols, torch.where(valid, g, torch.zeros_like(g)))
        col_owner = torch.tensor([t for t in dense for _ in range(col_offsets[t + 1] - col_offsets[t])], device=z.device)
        sums.index_add_(0, col_owner, loss.sum(0))
    for classes, group in ce_groups:
        cols = torch.tensor(_cols(group, col_offsets), device=z.device)
        G = len(group)
        zc = z.index_select(1, cols).view(-1, G, classes)
        y = torch.stack([targets[t][row_slice] for t in group], dim=1)  # (rows, G)
        ignore = torch.tensor([ignore_index[t] for t in group], device=z.device)
        in_range = (y >= 0) & (y < classes)
        kept = (y != ignore) & in_range
        y_safe = torch.where(kept, y, torch.zeros_like(y))
        w = col_weight.index_select(0, cols).view(G, classes) if col_weight is not None else torch.ones(G, classes, dtype=acc, device=z.device)
        eps = torch.tensor([params[t] for t in group], dtype=acc, device=z.device)
        log_p = torch.log_softmax(zc, dim=-1)
        p = log_p.exp()
        w_y = torch.gather(w.expand(y.shape[0], G, classes), 2, y_safe.unsqueeze(-1)).squeeze(-1) * kept
        a = (1 - eps) * w_y  # (rows, G)
        b = (eps / classes).unsqueeze(-1) * w * kept.unsqueeze(-1)  # (rows, G, C)
        row_loss = -a * torch.gather(log_p, 2, y_safe.unsqueeze(-1)).squeeze(-1) - (b * log_p).sum(-1)
        one_hot = torch.nn.functional.one_hot(y_safe, classes).to(acc)
        g = (a + b.sum(-1)).unsqueeze(-1) * p - a.unsqueeze(-1) * one_hot - b
        # An out-of-range index (only reachable off the CPU, where it is not raised) poisons its task's loss.
        bad = (~in_range) & (y != ignore)
        row_loss = torch.where(bad, torch.full_like(row_loss, float("nan")), row_loss)
        grad.index_copy_(1, cols, g.reshape(-1, G * classes))
        sums.index_add_(0, torch.tensor(group, device=z.device), row_loss.sum(0))
    return sums, grad


def _scale_by_task(grad, denominators, col_task):
    inverse = torch.where(denominators > 0, 1.0 / denominators.clamp_min(torch.finfo(denominators.dtype).tiny), torch.zeros_like(denominators))
    return grad * inverse.index_select(0, col_task), inverse


def _prepare(h, col_weight, targets, kinds, col_offsets, ignore_index, task_names):
    if h.shape[0] == 0:
        raise ValueError("mtlfast: empty batch (h has 0 rows)")
    _check_class_targets(task_names, kinds, col_offsets, ignore_index, targets)
    acc = _acc(h.dtype)
    return acc, _denominators(targets, col_weight, kinds, col_offsets, ignore_index, acc, h.device)


def multi_task_loss(h, weight, bias, targets, col_weight, col_task, kinds, col_offsets, ignore_index, params,
                    task_names, return_logits):
    acc, denominators = _prepare(h, col_weight, targets, kinds, col_offsets, ignore_index, task_names)
    logits = torch.nn.functional.linear(h, weight, bias)
    sums, grad = _loss_sums_and_grads(logits.to(acc), targets, slice(None), col_weight, kinds, col_offsets, ignore_index, params)
    grad, inverse = _scale_by_task(grad, denominators, col_task)
    losses = sums * inverse
    return losses, grad.to(h.dtype), logits if return_logits else h.new_empty(0)


def multi_task_loss_chunked(h, weight, bias, targets, col_weight, col_task, kinds, col_offsets, ignore_index,
                            params, task_names, chunk_rows):
    acc, denominators = _prepare(h, col_weight, targets, kinds, col_offsets, ignore_index, task_names)
    T, (N, D), S = len(kinds), h.shape, weight.shape[0]
    sums = torch.zeros(T, dtype=acc, device=h.device)
    grad_h_per_task = torch.empty(T, N, D, dtype=acc, device=h.device)
    grad_weight = torch.zeros(S, D, dtype=acc, device=h.device)
    grad_bias = torch.zeros(S, dtype=acc, device=h.device) if bias is not None else h.new_empty(0, dtype=acc)
    inverse = None
    for start in range(0, N, max(1, chunk_rows)):
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
    return sums * inverse, grad_h_per_task, grad_weight, grad_bias


def multi_task_loss_backward(grad_losses, grad_logits_output, grad_logits, h, weight, col_task, has_bias):
    coeff = grad_losses.index_select(0, col_task)
    if grad_logits_output is not None:
        dz = (grad_logits.to(coeff.dtype) * coeff + grad_logits_output.to(coeff.dtype)).to(h.dtype)
        grad_h, grad_weight = dz @ weight, dz.t() @ h
        grad_bias = dz.sum(0, dtype=coeff.dtype).to(h.dtype) if has_bias else h.new_empty(0)
        return grad_h, grad_weight, grad_bias
    grad_h = grad_logits @ (weight.to(coeff.dtype) * coeff.unsqueeze(1)).to(h.dtype)
    grad_weight = ((grad_logits.t() @ h).to(coeff.dtype) * coeff.unsqueeze(1)).to(h.dtype)
    grad_bias = (grad_logits.sum(0, dtype=coeff.dtype) * coeff).to(h.dtype) if has_bias else h.new_empty(0)
    return grad_h, grad_weight, grad_bias


def multi_task_loss_chunked_backward(grad_losses, grad_h_per_task, grad_weight, grad_bias, col_task, h_dtype):
    T, N, D = grad_h_per_task.shape
    c = grad_losses.to(grad_h_per_task.dtype)
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
        "per_task_input_grads": per_task_input_grads,
    }
    for name, schema in SCHEMAS.items():
        _library.define(name + schema)
        _library.impl(name, implementations[name], "CompositeExplicitAutograd")
