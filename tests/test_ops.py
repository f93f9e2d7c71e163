"""The dispatcher ops torch.ops.mtlfast.*: opcheck (schema, fake kernels, autograd registration, AOT dispatch),
gradcheck of the functional API, schema parity between the C++ extension and the fallback, and kernel parity
between the compiled CPU kernels and mtlfast._fallback."""

from __future__ import annotations

import random

import pytest
import torch

import mtlfast as mf
from mtlfast import _fallback
from mtl_helpers import assert_close, make_case, op_arg_tuple, op_args, random_tasks, requires_c

ops = torch.ops.mtlfast

OP_NAMES = sorted(_fallback.SCHEMAS)


def _mixed_case(seed=0, **kwargs):
    tasks = [
        mf.Classification("topic", num_classes=4, label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5, 1.5]),
        mf.Binary("spam", pos_weight=2.0),
        mf.MultiLabel("tags", num_labels=3),
        mf.Regression("score", loss="huber", delta=0.7),
        mf.Regression("vec", dim=2, loss="l1"),
    ]
    kwargs.setdefault("batch_shape", (6,))
    kwargs.setdefault("features", 3)
    return make_case(seed, tasks, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("return_logits", [False, True])
def test_opcheck_multi_task_loss(return_logits, bias):
    args = op_args(_mixed_case(bias=bias), requires_grad=True)
    torch.library.opcheck(ops.multi_task_loss.default, op_arg_tuple(args, return_logits))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_opcheck_multi_task_loss_chunked(chunk_rows, bias):
    args = op_args(_mixed_case(bias=bias), requires_grad=True)
    torch.library.opcheck(ops.multi_task_loss_chunked.default, op_arg_tuple(args, chunk_rows))


def test_opcheck_with_absent_task_and_no_class_weights():
    case = make_case(1, [mf.Classification("a", num_classes=3), mf.Binary("b"), mf.Regression("c")], absent=["b"])
    args = op_args(case, requires_grad=True)
    assert args["col_weight"] is None and args["kinds"][1] == int(mf.LossKind.NONE)
    torch.library.opcheck(ops.multi_task_loss.default, op_arg_tuple(args, True))
    torch.library.opcheck(ops.multi_task_loss_chunked.default, op_arg_tuple(args, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_low_precision(dtype):
    args = op_args(_mixed_case(2), dtype=dtype, requires_grad=True)
    # Only the checks that do not compare numerics against a float64 gradient.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.multi_task_loss.default, op_arg_tuple(args, True), test_utils=utils)
    torch.library.opcheck(ops.multi_task_loss_chunked.default, op_arg_tuple(args, 4), test_utils=utils)


def _backward_inputs(bias=True, seed=3):
    args = op_args(_mixed_case(seed, bias=bias))
    _, _, grad_logits, _ = ops.multi_task_loss(*op_arg_tuple(args, False))
    T = len(args["kinds"])
    grad_losses = torch.linspace(0.5, 2.0, T, dtype=torch.float64)
    return args, grad_logits, grad_losses


# Which incoming gradients the backward gets: of the total, of the losses, or both (both None: c = 0).
_OUTPUT_GRADS = {"total": (True, False), "losses": (False, True), "both": (True, True), "none": (False, False)}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_logit_grad", [False, True])
@pytest.mark.parametrize("used", list(_OUTPUT_GRADS))
def test_opcheck_multi_task_loss_backward(used, with_logit_grad, bias):
    args, grad_logits, grad_losses = _backward_inputs(bias)
    with_total, with_losses = _OUTPUT_GRADS[used]
    grad_total = torch.tensor(0.7, dtype=torch.float64) if with_total else None
    grad_out = torch.randn_like(grad_logits) if with_logit_grad else None
    torch.library.opcheck(
        ops.multi_task_loss_backward.default,
        (grad_total, grad_losses if with_losses else None, args["task_weights"], grad_out, grad_logits, args["h"],
         args["weight"], args["col_task"], bias),
    )


def test_backward_coefficients_are_total_times_lambda_plus_loss_grads():
    """c = dTotal·λ + dL: the backward with both equals the backward of the combined per-task gradient alone."""
    args, grad_logits, grad_losses = _backward_inputs()
    grad_total = torch.tensor(0.7, dtype=torch.float64)
    lam = args["task_weights"]
    rest = (None, grad_logits, args["h"], args["weight"], args["col_task"], True)
    both = ops.multi_task_loss_backward(grad_total, grad_losses, lam, *rest)
    combined = ops.multi_task_loss_backward(None, grad_total * lam + grad_losses, lam, *rest)
    for got, expected in zip(both, combined):
        assert_close(got, expected, what="backward with grad_total and grad_losses")


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_multi_task_loss_chunked_backward(bias):
    args = op_args(_mixed_case(4, bias=bias))
    _, _, grad_h_per_task, grad_weight, grad_bias = ops.multi_task_loss_chunked(*op_arg_tuple(args, 4))
    grad_losses = torch.linspace(0.5, 2.0, len(args["kinds"]), dtype=torch.float64)
    grad_total = torch.tensor(1.3, dtype=torch.float64)
    for h_dtype in (torch.float64, torch.float32):
        torch.library.opcheck(
            ops.multi_task_loss_chunked_backward.default,
            (grad_total, grad_losses, args["task_weights"], grad_h_per_task, grad_weight, grad_bias,
             args["col_task"], h_dtype),
        )


def test_opcheck_per_task_input_grads():
    args, grad_logits, _ = _backward_inputs()
    torch.library.opcheck(ops.per_task_input_grads.default, (grad_logits, args["weight"], args["col_offsets"]))


@pytest.mark.parametrize("return_logits", [False, True])
def test_only_losses_and_logits_are_differentiable_outputs(return_logits):
    """grad_logits is a by-product for the backward (and per_task_input_grads), never part of the graph."""
    args = op_args(_mixed_case(6), requires_grad=True)
    total, losses, grad_logits, logits = ops.multi_task_loss(*op_arg_tuple(args, return_logits))
    assert total.requires_grad and losses.requires_grad
    assert not grad_logits.requires_grad
    assert logits.requires_grad == return_logits
    outputs = ops.multi_task_loss_chunked(*op_arg_tuple(args, 2))
    assert outputs[0].requires_grad and outputs[1].requires_grad
    assert not any(t.requires_grad for t in outputs[2:])


def test_per_task_input_grads_op_with_a_weight_that_requires_grad():
    """The functional API passes the (learnable) head weight straight in; the op must not try to record autograd
    for an output that is documented as not differentiable."""
    args, grad_logits, _ = _backward_inputs()
    weight = args["weight"].clone().requires_grad_()
    out = ops.per_task_input_grads(grad_logits, weight, args["col_offsets"])
    expected = ops.per_task_input_grads(grad_logits, weight.detach(), args["col_offsets"])
    assert_close(out, expected, what="per-task input grads")


# ---------------------------------------------------------------------------------------------------------------
# gradcheck of the functional API


def _functional(case, chunk_rows, return_logits):
    def run(h, weight, bias, lam):
        out = mf.functional.multi_task_loss(
            h, weight, bias, case.targets, case.tasks, lam, chunk_rows=chunk_rows, return_logits=return_logits
        )
        return (out.total, out.losses) + ((out.logits,) if return_logits else ())

    return run


@pytest.mark.parametrize(
    "chunk_rows, return_logits", [(None, False), (None, True), (2, False), (5, False)], ids=str
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_functional(seed, chunk_rows, return_logits):
    rng = random.Random(seed)
    case = _mixed_case(seed, batch_shape=(2, 3)) if seed == 0 else make_case(seed, random_tasks(rng, count=4), batch_shape=(5,), features=3)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (case.h, case.weight, case.bias, case.lam))
    assert torch.autograd.gradcheck(_functional(case, chunk_rows, return_logits), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_gradcheck_without_bias_with_absent_task(chunk_rows):
    case = _mixed_case(5, bias=False, absent=["tags"])
    inputs = tuple(t.detach().clone().requires_grad_() for t in (case.h, case.weight, case.lam))

    def run(h, weight, lam):
        return _functional(case, chunk_rows, False)(h, weight, None, lam)

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Schemas and kernels: C++ extension vs fallback


@requires_c
@pytest.mark.parametrize("name", OP_NAMES)
def test_fallback_schema_matches_cpp(name):
    assert str(getattr(ops, name).default._schema) == f"mtlfast::{name}{_fallback.SCHEMAS[name]}"


def test_every_schema_op_exists():
    for name in OP_NAMES:
        assert hasattr(ops, name), name
    assert set(OP_NAMES) == {
        "multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_backward",
        "multi_task_loss_chunked_backward", "multi_task_loss_recompute", "multi_task_loss_recompute_backward",
        "per_task_input_grads",
    }


def _parity_tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]


def _assert_parity(cpp, py, dtype, what):
    tol = _parity_tolerance(dtype)
    assert cpp.shape == py.shape, f"{what}: {cpp.shape} vs {py.shape}"
    assert cpp.dtype == py.dtype, f"{what}: {cpp.dtype} vs {py.dtype}"
    torch.testing.assert_close(cpp.double(), py.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _parity_cases():
    yield "mixed", _mixed_case(10)
    yield "no_bias_absent", _mixed_case(11, bias=False, absent=["spam", "vec"])
    yield "empty_task", _mixed_case(12, empty=["topic"])
    for seed in range(3):
        rng = random.Random(seed)
        yield f"random{seed}", make_case(100 + seed, random_tasks(rng, count=5), batch_shape=(17,), features=5)


@requires_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cpp_kernels_match_fallback(dtype):
    for label, case in _parity_cases():
        args = op_args(case, dtype=dtype)
        for return_logits in (False, True):
            cpp = ops.multi_task_loss(*op_arg_tuple(args, return_logits))
            py = _fallback.multi_task_loss(*op_arg_tuple(args, return_logits))
            for what, a, b in zip(("total", "losses", "grad_logits", "logits"), cpp, py):
                _assert_parity(a, b, dtype, f"{label} multi_task_loss {what}")
        for chunk_rows in (1, 5, 64):
            cpp = ops.multi_task_loss_chunked(*op_arg_tuple(args, chunk_rows))
            py = _fallback.multi_task_loss_chunked(*op_arg_tuple(args, chunk_rows))
            for what, a, b in zip(("total", "losses", "grad_h_per_task", "grad_weight", "grad_bias"), cpp, py):
                _assert_parity(a, b, dtype, f"{label} chunked({chunk_rows}) {what}")


@requires_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpp_backward_ops_match_fallback(dtype):
    args = op_args(_mixed_case(13), dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, _, grad_logits, _ = ops.multi_task_loss(*op_arg_tuple(args, False))
    grad_losses = torch.linspace(-1.0, 2.0, len(args["kinds"]), dtype=acc)
    grad_total = torch.tensor(0.6, dtype=acc)
    lam = args["task_weights"]
    for grad_out in (None, torch.randn_like(grad_logits)):
        for has_bias in (True, False):
            for output_grads in ((grad_total, grad_losses), (grad_total, None), (None, grad_losses)):
                call = (*output_grads, lam, grad_out, grad_logits, args["h"], args["weight"], args["col_task"],
                        has_bias)
                for what, a, b in zip(("h", "weight", "bias"), ops.multi_task_loss_backward(*call),
                                      _fallback.multi_task_loss_backward(*call)):
                    _assert_parity(a, b, dtype, f"backward grad_{what}")
    chunked = ops.multi_task_loss_chunked(*op_arg_tuple(args, 4))
    call = (grad_total, grad_losses, lam, *chunked[2:], args["col_task"], dtype)
    for what, a, b in zip(("h", "weight", "bias"), ops.multi_task_loss_chunked_backward(*call),
                          _fallback.multi_task_loss_chunked_backward(*call)):
        _assert_parity(a, b, dtype, f"chunked backward grad_{what}")
    _assert_parity(
        ops.per_task_input_grads(grad_logits, args["weight"], args["col_offsets"]),
        _fallback.per_task_input_grads(grad_logits, args["weight"], args["col_offsets"]),
        dtype, "per_task_input_grads",
    )


def test_backend_reporting():
    expected = "cpu" if mf.HAS_C else "fallback"
    assert mf.backend_for(torch.device("cpu")) == expected
    assert (mf.why_not_fast(torch.device("cpu")) is None) == mf.HAS_C
