"""The dispatcher ops ``torch.ops.mtlfast.*``: fake (meta) kernels and autograd formulas.

Schemas and kernels come from the compiled extension (csrc/registration.cpp, csrc/cpu, csrc/cuda) or, when it is
not available, from :mod:`mtlfast._fallback`. Either way the ops below are registered once, here, so they are
differentiable and trace under ``torch.compile(fullgraph=True)`` without graph breaks.
"""

from __future__ import annotations

import math

import torch

from mtlfast import _extension, _fallback

if _extension.HAS_C:
    from mtlfast import _C as _compiled
else:
    _compiled = None
    _fallback.define_ops()

_ops = torch.ops.mtlfast


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes only.


def _rows(h: torch.Tensor):
    return math.prod(h.shape[:-1])


def _check_target_devices(h, targets, kinds, task_names):
    # A target on the meta device sends the whole call to these fake kernels instead of the device's kernel, which
    # would have reported it; so they report it too, as the kernels do.
    for target, kind, name in zip(targets, kinds, task_names):
        if kind != 0 and target.device != h.device:
            raise ValueError(f"mtlfast: task '{name}': target is on {target.device} but h is on {h.device}")


@torch.library.register_fake("mtlfast::multi_task_loss")
def _(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims, ignore_index,
      params, task_names, return_logits):
    _check_target_devices(h, targets, kinds, task_names)
    n, s, acc = _rows(h), weight.shape[0], _acc(h.dtype)
    logits = h.new_empty(n, s) if return_logits else h.new_empty(0)
    return h.new_empty((), dtype=acc), h.new_empty(len(kinds), dtype=acc), h.new_empty(n, s), logits


@torch.library.register_fake("mtlfast::multi_task_loss_chunked")
def _(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims, ignore_index,
      params, task_names, chunk_rows):
    _check_target_devices(h, targets, kinds, task_names)
    acc = _acc(h.dtype)
    n, d, s, t = _rows(h), h.shape[-1], weight.shape[0], len(kinds)
    grad_bias = h.new_empty(s, dtype=acc) if bias is not None else h.new_empty(0, dtype=acc)
    return (h.new_empty((), dtype=acc), h.new_empty(t, dtype=acc), h.new_empty(t, n, d, dtype=acc),
            h.new_empty(s, d, dtype=acc), grad_bias)


@torch.library.register_fake("mtlfast::multi_task_loss_recompute")
def _(h, weight, bias, targets, task_weights, col_weight, col_task, kinds, col_offsets, class_dims, ignore_index,
      params, task_names, chunk_rows):
    _check_target_devices(h, targets, kinds, task_names)
    acc = _acc(h.dtype)
    n, t = _rows(h), len(kinds)
    return (h.new_empty((), dtype=acc), h.new_empty(t, dtype=acc), h.new_empty(t, n, 4, dtype=acc),
            h.new_empty(t, dtype=acc))


@torch.library.register_fake("mtlfast::multi_task_loss_recompute_backward")
def _(grad_total, grad_losses, task_weights, h, weight, bias, targets, col_weight, col_task, row_stats,
      inverse_denominators, kinds, col_offsets, class_dims, ignore_index, params, task_names, block_columns):
    grad_bias = h.new_empty(weight.shape[0]) if bias is not None else h.new_empty(0)
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight), grad_bias


@torch.library.register_fake("mtlfast::multi_task_loss_backward")
def _(grad_total, grad_losses, task_weights, grad_logits_output, grad_logits, h, weight, col_task, has_bias):
    grad_bias = h.new_empty(weight.shape[0]) if has_bias else h.new_empty(0)
    return torch.empty_like(h), torch.empty_like(weight), grad_bias


@torch.library.register_fake("mtlfast::multi_task_loss_chunked_backward")
def _(grad_total, grad_losses, task_weights, grad_h_per_task, grad_weight, grad_bias, col_task, h_dtype):
    _, n, d = grad_h_per_task.shape
    return (
        grad_h_per_task.new_empty(n, d, dtype=h_dtype),
        grad_weight.new_empty(grad_weight.shape, dtype=h_dtype),
        grad_bias.new_empty(grad_bias.shape, dtype=h_dtype),
    )


@torch.library.register_fake("mtlfast::per_task_input_grads")
def _(grad_logits, weight, col_offsets):
    return grad_logits.new_empty(len(col_offsets) - 1, grad_logits.shape[0], weight.shape[1])


if _extension.HAS_C:  # compiled only: without the extension mtlfast.weighting runs these solvers as PyTorch ops

    @torch.library.register_fake("mtlfast::pcgrad_weights")
    def _(gram, orders):
        return gram.new_empty(gram.shape[0])

    @torch.library.register_fake("mtlfast::min_norm_weights")
    def _(gram, iterations):
        return gram.new_empty(gram.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Autograd: the forward hands the backward the logit gradient of every task (or, chunked, the per-task input
# gradients); the backward only applies the per-task coefficients c = dTotal·λ + dL that autograd delivers. The
# recompute path's forward hands over row statistics instead, and its backward recomputes the logits.
# Inputs: h 0, weight 1, bias 2, targets 3, task_weights 4, then 9 non-tensor / table arguments.
_NUM_INPUTS = 14
_TASK_WEIGHTS = 4


def _save(ctx, *tensors, task_weights, losses):
    # λ and L last: the backward needs L for a learnable λ. (The setup cannot tell whether λ needs a gradient:
    # under register_autograd its needs_input_grad is over the flattened inputs; the backward's is not.)
    ctx.save_for_backward(*tensors, task_weights, losses)


def _task_weights_grad(ctx, task_weights, losses, grad_total):
    """dTotal/dλ = L, times the incoming gradient of the total; None when λ needs no gradient."""
    if not ctx.needs_input_grad[_TASK_WEIGHTS] or grad_total is None:
        return None
    return (grad_total * losses).to(task_weights.dtype)


def _setup_multi_task_loss(ctx, inputs, output):
    h, weight, bias, _targets, task_weights, _col_weight, col_task, kinds, *_rest = inputs
    _total, losses, grad_logits, logits = output
    _save(ctx, h, weight, grad_logits, col_task, task_weights=task_weights, losses=losses)
    ctx.has_bias = bias is not None
    ctx.num_tasks = len(kinds)
    # One call: each call replaces the previous set of non-differentiable outputs.
    if logits.numel() == 0:
        ctx.mark_non_differentiable(grad_logits, logits)
    else:
        ctx.mark_non_differentiable(grad_logits)
    ctx.set_materialize_grads(False)  # an unused output must not cost a tensor of zeros


def _backward_multi_task_loss(ctx, grad_total, grad_losses, _grad_grad_logits, grad_logits_output):
    h, weight, grad_logits, col_task, task_weights, losses = ctx.saved_tensors
    grad_h, grad_weight, grad_bias = _ops.multi_task_loss_backward(
        grad_total, grad_losses, task_weights, grad_logits_output, grad_logits, h, weight, col_task, ctx.has_bias
    )
    return (grad_h, grad_weight, grad_bias if ctx.has_bias else None, [None] * ctx.num_tasks,
            _task_weights_grad(ctx, task_weights, losses, grad_total), *(None,) * (_NUM_INPUTS - 5))


def _setup_chunked(ctx, inputs, output):
    h, _weight, bias, _targets, task_weights, _col_weight, col_task, kinds, *_rest = inputs
    _total, losses, grad_h_per_task, grad_weight, grad_bias = output
    _save(ctx, grad_h_per_task, grad_weight, grad_bias, col_task, task_weights=task_weights, losses=losses)
    ctx.has_bias = bias is not None
    ctx.h_dtype = h.dtype
    ctx.h_shape = h.shape
    ctx.num_tasks = len(kinds)
    ctx.mark_non_differentiable(grad_h_per_task, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)


def _backward_chunked(ctx, grad_total, grad_losses, *_unused):
    grad_h_per_task, grad_weight, grad_bias, col_task, task_weights, losses = ctx.saved_tensors
    grad_h, dW, db = _ops.multi_task_loss_chunked_backward(
        grad_total, grad_losses, task_weights, grad_h_per_task, grad_weight, grad_bias, col_task, ctx.h_dtype
    )
    return (grad_h.view(ctx.h_shape), dW, db if ctx.has_bias else None, [None] * ctx.num_tasks,
            _task_weights_grad(ctx, task_weights, losses, grad_total), *(None,) * (_NUM_INPUTS - 5))


# The recompute path (large heads): the backward recomputes the logits in blocks of head columns from the saved h,
# weight, bias and targets and the forward's row statistics. A block holds about this many logits (8 MiB in bf16:
# with the weight's own gradient it keeps a 32k-class head's step near 1/8 of the eager loop's memory), and never
# more than a forward chunk (chunk_rows rows of the S columns).
RECOMPUTE_BLOCK_ELEMENTS = 1 << 22


def recompute_block_columns(rows: int, columns: int, chunk_rows: int) -> int:
    """Head columns per block of the recompute path's backward, for N = ``rows`` and S = ``columns``."""
    return max(1, min(columns, RECOMPUTE_BLOCK_ELEMENTS // max(rows, 1), chunk_rows * columns // max(rows, 1)))


def _setup_recompute(ctx, inputs, output):
    h, weight, bias, targets, task_weights, col_weight, col_task, kinds, *table, chunk_rows = inputs
    _total, losses, row_stats, inverse_denominators = output
    _save(ctx, h, weight, bias, col_weight, col_task, row_stats, inverse_denominators, *targets,
          task_weights=task_weights, losses=losses)
    ctx.table = (kinds, *table)
    ctx.num_tasks = len(kinds)
    ctx.block_columns = recompute_block_columns(_rows(h), weight.shape[0], chunk_rows)
    ctx.mark_non_differentiable(row_stats, inverse_denominators)
    ctx.set_materialize_grads(False)


def _backward_recompute(ctx, grad_total, grad_losses, *_unused):
    h, weight, bias, col_weight, col_task, row_stats, inverse_denominators, *rest = ctx.saved_tensors
    *targets, task_weights, losses = rest
    grad_h, grad_weight, grad_bias = _ops.multi_task_loss_recompute_backward(
        grad_total, grad_losses, task_weights, h, weight, bias, targets, col_weight, col_task, row_stats,
        inverse_denominators, *ctx.table, ctx.block_columns
    )
    return (grad_h, grad_weight, grad_bias if bias is not None else None, [None] * ctx.num_tasks,
            _task_weights_grad(ctx, task_weights, losses, grad_total), *(None,) * (_NUM_INPUTS - 5))


torch.library.register_autograd("mtlfast::multi_task_loss", _backward_multi_task_loss, setup_context=_setup_multi_task_loss)
torch.library.register_autograd("mtlfast::multi_task_loss_chunked", _backward_chunked, setup_context=_setup_chunked)
torch.library.register_autograd("mtlfast::multi_task_loss_recompute", _backward_recompute, setup_context=_setup_recompute)


# ---------------------------------------------------------------------------------------------------------------
# Eager fast path. The registered autograd above is what torch.compile and opcheck see; in eager mode its generic
# wrapper flattens every list argument with pytree on each call (~0.5 ms per step with 64 tasks). These Functions
# apply the same setup and backward with the op called directly below autograd.


# Chunked (large-head) backward in eager mode rescales the saved weight gradient in place when it has at least this
# many elements (~64 MB in fp32): one backward per forward then (retain_graph raises a clear error).
INPLACE_BACKWARD_MIN_ELEMENTS = 1 << 24


def _below_autograd(op, args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _as_function_grads(grads):
    # The op's autograd formula returns one None per target (a Tensor[] input); an autograd.Function takes the
    # list as one non-tensor argument, whose gradient is a single None.
    return (*grads[:3], None, *grads[4:])


class _MultiTaskLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        output = _below_autograd(_ops.multi_task_loss, args)
        _setup_multi_task_loss(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _as_function_grads(_backward_multi_task_loss(ctx, *grads))


class _MultiTaskLossChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        output = _below_autograd(_ops.multi_task_loss_chunked, args)
        _setup_chunked(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_total, grad_losses, *_unused):
        # Checked before unpacking: after an in-place rescale, unpacking would fail with autograd's generic
        # "modified by an inplace operation" error instead of this one.
        if getattr(ctx, "used_up", False):
            raise RuntimeError(
                "mtlfast: the chunked large-head path rescales its saved gradients in place, so it supports one "
                "backward per forward (no retain_graph); pass chunk_rows=None to keep them"
            )
        grad_h_per_task, grad_weight, grad_bias, col_task, task_weights, losses = ctx.saved_tensors
        if grad_weight.numel() < INPLACE_BACKWARD_MIN_ELEMENTS:
            return _as_function_grads(_backward_chunked(ctx, grad_total, grad_losses))
        # A large saved weight gradient is rescaled in place instead of copied: for a 32k-class head it is the
        # largest tensor of the step. The saved tensors are then used up by one backward.
        ctx.used_up = True
        T, N, D = grad_h_per_task.shape
        c = _fallback.task_coefficients(grad_total, grad_losses, task_weights, grad_h_per_task.dtype)
        grad_h = (c.view(1, T) @ grad_h_per_task.view(T, N * D)).view(ctx.h_shape).to(ctx.h_dtype)
        coeff = c.index_select(0, col_task)
        grad_w = grad_weight.mul_(coeff.unsqueeze(1)).to(ctx.h_dtype)
        grad_b = grad_bias.mul_(coeff).to(ctx.h_dtype) if ctx.has_bias else None
        return (grad_h, grad_w, grad_b, None, _task_weights_grad(ctx, task_weights, losses, grad_total),
                *(None,) * (_NUM_INPUTS - 5))


class _MultiTaskLossRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        output = _below_autograd(_ops.multi_task_loss_recompute, args)
        _setup_recompute(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _as_function_grads(_backward_recompute(ctx, *grads))


def task_spec(kinds, col_offsets, class_dims, ignore_index, params, task_names):
    """The op's per-task list arguments as one ``mtlfast._C.TaskSpec`` for :func:`multi_task_loss_eager`; None
    without the compiled extension. Build it once per task layout (it converts the lists)."""
    if _compiled is None:
        return None
    return _compiled.TaskSpec(
        list(kinds), list(col_offsets), list(class_dims), list(ignore_index), list(params), list(task_names)
    )


def multi_task_loss_eager(spec, h, weight, bias, targets, task_weights, col_weight, col_task, return_logits):
    """The eager fast path of ``torch.ops.mtlfast.multi_task_loss``: the op and its backward run in C++
    (``mtlfast._C.multi_task_loss_eager``, with the autograd formula registered above), and ``targets`` (a dict by
    task name or a list in task order, None for an absent task) are looked up there.

    Returns ``(total, losses, grad_logits, logits, present)``, ``present`` None when every task has a target, else
    a tuple of bools; or None when the call needs the general path: no extension (``spec`` None), under
    torch.compile, functorch transforms or ``__torch_function__`` overrides, or targets that are not plain tensors
    (the general path then also reports unknown names and missing targets).
    """
    if spec is None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if torch.overrides.has_torch_function((h, weight, bias, task_weights)):
        return None
    return _compiled.multi_task_loss_eager(
        spec, h, weight, bias, targets, task_weights, col_weight, col_task, return_logits
    )


def _op_or_eager_function(op, function, args):
    # Under torch.compile the registered autograd formula is what traces; without grad mode nothing is recorded.
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return op(*args)
    return function.apply(*args)


def multi_task_loss(*args):
    """``torch.ops.mtlfast.multi_task_loss`` with the eager fast path (same arguments and outputs)."""
    return _op_or_eager_function(_ops.multi_task_loss, _MultiTaskLoss, args)


def multi_task_loss_chunked(*args):
    """``torch.ops.mtlfast.multi_task_loss_chunked`` with the eager fast path (same arguments and outputs)."""
    return _op_or_eager_function(_ops.multi_task_loss_chunked, _MultiTaskLossChunked, args)


def multi_task_loss_recompute(*args):
    """``torch.ops.mtlfast.multi_task_loss_recompute`` with the eager fast path (same arguments and outputs)."""
    return _op_or_eager_function(_ops.multi_task_loss_recompute, _MultiTaskLossRecompute, args)
