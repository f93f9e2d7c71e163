"""The large-head ops that recompute the logits in the backward, torch.ops.mtlfast.multi_task_loss_recompute and
multi_task_loss_recompute_backward (schemas and semantics: csrc/registration.cpp), against the float64 oracle
mtlfast._reference: losses and total of the forward, the saved row statistics, and the backward's gradients for any
incoming gradients of the total and of the losses, with blocks of head columns that cut through wide tasks. Then
opcheck of both ops and gradcheck of the forward op (through its registered autograd formula).

The op arguments are built as mtlfast.functional builds them (mtl_helpers.op_args: a TaskLayout's col_task,
col_weight, col_offsets, kinds, class_dims, ignore_index, params and names). Every test runs on the CPU and, where a
GPU (or the CUDA emulation) is present, on CUDA."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mtlfast as mf
import mtlfast.ops  # noqa: F401  (registers the fake kernels and the autograd formulas of torch.ops.mtlfast.*)
from mtlfast import _fallback
from mtl_helpers import (
    CUDA_TEST_DEVICE,
    assert_close,
    cpu_kernel_semantics,
    flat_targets,
    make_case,
    op_args,
    random_tasks,
    reference_result,
    requires_cuda,
)

ops = torch.ops.mtlfast

FORWARD, BACKWARD = "multi_task_loss_recompute", "multi_task_loss_recompute_backward"
DEVICES = ["cpu", pytest.param(CUDA_TEST_DEVICE, marks=[pytest.mark.cuda, requires_cuda], id="cuda")]
# Which incoming gradients the backward gets: of the total, of the losses, or both (neither: c = 0, zero gradients).
OUTPUT_GRADS = {"total": (True, False), "losses": (False, True), "both": (True, True), "none": (False, False)}


def _all_kinds():
    """One task of every kind and option (label smoothing with class weights, a real class as ignore_index,
    pos_weight, both distillation target forms)."""
    return [
        mf.Classification("ce", num_classes=3),
        mf.Classification("ce_smooth_weighted", num_classes=5, label_smoothing=0.2, class_weights=[1, 2, 0.5, 3, 1.5],
                          ignore_index=1),
        mf.Binary("bin", pos_weight=2.0),
        mf.MultiLabel("multi", num_labels=3, pos_weight=[0.5, 1.0, 3.0]),
        mf.Regression("mse", dim=2),
        mf.Regression("l1", loss="l1"),
        mf.Regression("huber", dim=2, loss="huber", delta=0.5),
        mf.Distillation("kd_logits", num_classes=4, temperature=2.0),
        mf.Distillation("kd_probs", num_classes=5, temperature=0.5, targets="probs"),
    ]


def _wide_tasks():
    """Wide cross-entropy and distillation tasks, for column blocks that cut through them."""
    return [
        mf.Binary("bin"),
        mf.Classification("ce37", num_classes=37, label_smoothing=0.1,
                          class_weights=[0.2 + 0.05 * c for c in range(37)], ignore_index=-1),
        mf.Distillation("kd300", num_classes=300, temperature=2.0),
        mf.Distillation("kd37_probs", num_classes=37, temperature=0.5, targets="probs"),
        mf.Regression("huber", dim=3, loss="huber", delta=0.7),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Running the ops


def _forward(args: dict, chunk_rows: int):
    return ops.multi_task_loss_recompute(*args.values(), chunk_rows)


def _backward_args(args: dict, saved, grad_total, grad_losses, block_columns: int) -> tuple:
    _total, _losses, row_stats, inverse_denominators = saved
    return (grad_total, grad_losses, args["task_weights"], args["h"], args["weight"], args["bias"], args["targets"],
            args["col_weight"], args["col_task"], row_stats, inverse_denominators, args["kinds"], args["col_offsets"],
            args["class_dims"], args["ignore_index"], args["params"], args["task_names"], block_columns)


def _output_grads(used: str, num_tasks: int, seed: int = 0):
    """Random float64 CPU gradients of the total and of the losses (None where unused)."""
    with_total, with_losses = OUTPUT_GRADS[used]
    gen = torch.Generator().manual_seed(seed)
    grad_total = torch.rand((), generator=gen, dtype=torch.float64) * 2 - 0.5 if with_total else None
    grad_losses = torch.randn(num_tasks, generator=gen, dtype=torch.float64) if with_losses else None
    return grad_total, grad_losses


def _objective(grad_total, grad_losses):
    """grad_total·total + Σ_t grad_losses_t·L_t: the reference quantity whose gradient the backward op returns."""

    def objective(total, losses, _logits):
        out = total * 0.0
        if grad_total is not None:
            out = out + grad_total * total
        if grad_losses is not None:
            out = out + (grad_losses * losses).sum()
        return out

    return objective


def _on(tensor, device, dtype):
    return None if tensor is None else tensor.to(device=device, dtype=dtype)


def _run_backward(case, args, saved, used, block_columns, *, seed=0):
    """The backward op for random incoming gradients, and the reference result of the same objective."""
    acc = args["task_weights"].dtype
    device = args["h"].device
    grad_total, grad_losses = _output_grads(used, len(case.tasks), seed)
    grads = ops.multi_task_loss_recompute_backward(*_backward_args(
        args, saved, _on(grad_total, device, acc), _on(grad_losses, device, acc), block_columns))
    return grads, reference_result(case, _objective(grad_total, grad_losses))


def _assert_grads_close(grads, expected, case, dtype=torch.float64, what=""):
    grad_h, grad_weight, grad_bias = grads
    assert grad_h.dtype == grad_weight.dtype == grad_bias.dtype == dtype, what
    assert grad_h.shape == case.h.shape, f"{what}: grad_h {tuple(grad_h.shape)} vs h {tuple(case.h.shape)}"
    assert_close(grad_h, expected.grads["h"], dtype, f"{what} grad h")
    assert_close(grad_weight, expected.grads["weight"], dtype, f"{what} grad weight")
    if case.bias is None:
        assert grad_bias.shape == (0,), f"{what}: grad_bias without bias is {tuple(grad_bias.shape)}"
    else:
        assert_close(grad_bias, expected.grads["bias"], dtype, f"{what} grad bias")


def _cuts_through(block_columns: int, case, name: str) -> bool:
    """Whether a block boundary (a multiple of block_columns) falls strictly inside task ``name``'s columns."""
    columns = case.layout.columns(case.names.index(name))
    return any(boundary % block_columns == 0 for boundary in range(columns.start + 1, columns.stop))


# ---------------------------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("name", [FORWARD, BACKWARD])
def test_schema_matches_registration_source(name):
    """The fallback's schema string is csrc/registration.cpp's, and the op registered (by either) has it."""
    source = (Path(__file__).resolve().parents[1] / "csrc" / "registration.cpp").read_text()
    definitions = {}
    for call in re.finditer(r'm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\)', source):
        text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call.group(1)))
        definitions[text.split("(")[0]] = text
    cpp = str(torch._C.parse_schema(f"mtlfast::{definitions[name]}"))
    assert cpp == f"mtlfast::{name}{_fallback.SCHEMAS[name]}"
    assert str(getattr(ops, name).default._schema) == cpp


# ---------------------------------------------------------------------------------------------------------------
# Forward: losses and total


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("device", DEVICES)
def test_forward_random_mix(device, seed):
    rng = random.Random(500 + seed)
    case = make_case(
        seed,
        random_tasks(rng, count=rng.randint(1, 6)),
        batch_shape=rng.choice([(1,), (2,), (13,), (3, 5)]),
        features=rng.choice([1, 3, 8]),
        bias=rng.random() < 0.7,
        p_missing=rng.choice([0.0, 0.2, 0.5]),
    )
    args = op_args(case, device=device)
    total, losses, row_stats, inverse = _forward(args, rng.choice([1, 2, 5, 64]))
    expected = reference_result(case)
    assert_close(losses, expected.losses, what="losses")
    assert_close(total, expected.total, what="total")
    T, N = len(case.tasks), math.prod(case.batch_shape)
    assert total.shape == () and losses.shape == (T,) and row_stats.shape == (T, N, 4) and inverse.shape == (T,)
    assert total.dtype == losses.dtype == row_stats.dtype == inverse.dtype == torch.float64


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_the_chunked_op(device, chunk_rows):
    """Same arguments, same total and losses as multi_task_loss_chunked."""
    case = make_case(7, _all_kinds(), batch_shape=(3, 4), features=5, absent=["l1"], empty=["multi"])
    args = op_args(case, device=device)
    total, losses, _, _ = _forward(args, chunk_rows)
    chunked_total, chunked_losses, *_ = ops.multi_task_loss_chunked(*args.values(), chunk_rows)
    assert_close(losses, chunked_losses, what="losses vs the chunked op")
    assert_close(total, chunked_total, what="total vs the chunked op")


# ---------------------------------------------------------------------------------------------------------------
# Backward: gradients of h, weight and bias


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("used", list(OUTPUT_GRADS))
@pytest.mark.parametrize("device", DEVICES)
def test_backward_random_mix(device, used, seed):
    rng = random.Random(600 + seed)
    case = make_case(
        100 + seed,
        random_tasks(rng, count=rng.randint(2, 6)),
        batch_shape=rng.choice([(1,), (7,), (3, 5)]),
        features=rng.choice([1, 4]),
        bias=seed % 2 == 0,
        p_missing=rng.choice([0.0, 0.3]),
    )
    args = op_args(case, device=device)
    saved = _forward(args, rng.choice([1, 3, 64]))
    block_columns = rng.choice([1, 2, 5, case.layout.num_columns, 1000])
    grads, expected = _run_backward(case, args, saved, used, block_columns, seed=seed)
    _assert_grads_close(grads, expected, case, what=f"{used}, blocks of {block_columns}")
    if used == "none":
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", list(OUTPUT_GRADS))
@pytest.mark.parametrize("device", DEVICES)
def test_every_kind_with_absent_and_empty_tasks(device, used, bias):
    """All kinds and options; two tasks absent from the batch and two with no valid entry (loss 0, zero gradient,
    inverse denominator 0), missing entries everywhere else."""
    absent, empty = ["l1", "kd_probs"], ["ce_smooth_weighted", "kd_logits"]
    case = make_case(11, _all_kinds(), batch_shape=(4, 5), features=6, bias=bias, p_missing=0.3, absent=absent,
                     empty=empty)
    args = op_args(case, device=device)
    saved = _forward(args, 3)
    total, losses, row_stats, inverse = saved
    expected = reference_result(case)
    assert_close(losses, expected.losses, what="losses")
    assert_close(total, expected.total, what="total")
    grads, expected = _run_backward(case, args, saved, used, block_columns=4, seed=3)
    _assert_grads_close(grads, expected, case, what=used)
    for name in absent + empty:
        t = case.names.index(name)
        columns = case.layout.columns(t)
        assert float(losses[t]) == 0.0 and float(inverse[t]) == 0.0, name
        assert torch.equal(row_stats[t], torch.zeros_like(row_stats[t])), name
        assert torch.equal(grads[1][columns], torch.zeros_like(grads[1][columns])), name
        if bias:
            assert torch.equal(grads[2][columns], torch.zeros_like(grads[2][columns])), name


@pytest.mark.parametrize("device", DEVICES)
def test_class_weights_summing_to_zero_over_the_batch(device):
    """Every present target has class weight 0: denominator 0, so loss 0 and zero gradient, not NaN."""
    task = mf.Classification("c", num_classes=3, class_weights=[0.0, 1.0, 2.0], label_smoothing=0.1)
    case = make_case(8, [task, mf.Binary("b")], batch_shape=(6,), features=3)
    case.targets["c"] = torch.tensor([0, 0, -100, 0, 0, -100])
    args = op_args(case, device=device)
    saved = _forward(args, 2)
    assert float(saved[1][0]) == 0.0 and float(saved[3][0]) == 0.0
    grads, expected = _run_backward(case, args, saved, "both", block_columns=2)
    assert torch.equal(grads[1][:3], torch.zeros_like(grads[1][:3]))
    _assert_grads_close(grads, expected, case)


@pytest.mark.parametrize("block_columns", [1, 5, 16, 30])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_column_blocks_cut_through_wide_tasks(device, chunk_rows, block_columns):
    case = make_case(21, _wide_tasks(), batch_shape=(3, 7), features=8, p_missing=0.25)
    case.targets["kd37_probs"][:, ::2] *= 0.6  # probability rows of mass m != 1
    for name in ("ce37", "kd300", "kd37_probs"):
        assert _cuts_through(block_columns, case, name), (name, block_columns)  # the test tests what it says
    args = op_args(case, device=device)
    saved = _forward(args, chunk_rows)
    expected = reference_result(case)
    assert_close(saved[1], expected.losses, what="losses")
    assert_close(saved[0], expected.total, what="total")
    grads, expected = _run_backward(case, args, saved, "both", block_columns, seed=chunk_rows)
    _assert_grads_close(grads, expected, case, what=f"chunk_rows {chunk_rows}, blocks of {block_columns}")


@pytest.mark.parametrize("device", DEVICES)
def test_saturated_logits_with_ignored_and_missing_rows(device):
    """Huge logits: the ignored / missing rows, whose statistics are all 0, must give a zero gradient (not
    exp(z)·0 = inf·0 = NaN), and the valid ones the reference's."""
    tasks = [mf.Classification("ce", num_classes=6, label_smoothing=0.1), mf.Distillation("kd", num_classes=5),
             mf.Distillation("kdp", num_classes=4, targets="probs", temperature=0.5)]
    case = make_case(12, tasks, batch_shape=(12,), features=4, logit_scale=800.0, p_missing=0.4)
    # exp(z - 0) of a skipped row overflows even in float64, in every task.
    logits, targets = F.linear(case.h, case.weight, case.bias), flat_targets(case)
    skipped = [targets[0] == tasks[0].ignored_class, torch.isnan(targets[1]).any(-1), torch.isnan(targets[2]).any(-1)]
    for t, task in enumerate(tasks):
        scale = 1.0 if task.kind == mf.LossKind.CROSS_ENTROPY else 1.0 / task.param
        assert float(logits[skipped[t]][:, case.layout.columns(t)].max()) * scale > 709, task.name
    args = op_args(case, device=device)
    saved = _forward(args, 4)
    grads, expected = _run_backward(case, args, saved, "both", block_columns=3)
    assert float(expected.losses.max()) > 50  # really in the saturated regime
    assert_close(saved[1], expected.losses, what="losses")
    _assert_grads_close(grads, expected, case)
    # float32: overflow far sooner; the gradients stay finite.
    args32 = op_args(case, dtype=torch.float32, device=device)
    saved32 = _forward(args32, 4)
    grads32 = ops.multi_task_loss_recompute_backward(*_backward_args(
        args32, saved32, torch.tensor(1.0, device=device), torch.ones(3, device=device), 3))
    for output in (*saved32, *grads32):
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision(device, bias, dtype):
    """fp32 statistics and losses, gradients in h's dtype, against the float64 reference on the rounded inputs."""
    case = make_case(31, _all_kinds() + _wide_tasks()[1:3], batch_shape=(4, 6), features=16, bias=bias)
    case.h, case.weight = case.h.to(dtype).double(), case.weight.to(dtype).double()
    if bias:
        case.bias = case.bias.to(dtype).double()
    args = op_args(case, dtype=dtype, device=device)
    saved = _forward(args, 5)
    assert all(t.dtype == torch.float32 for t in saved)
    expected = reference_result(case)
    assert_close(saved[1], expected.losses, dtype, "losses")
    assert_close(saved[0], expected.total, dtype, "total")
    grads, expected = _run_backward(case, args, saved, "both", block_columns=7)
    _assert_grads_close(grads, expected, case, dtype)


# ---------------------------------------------------------------------------------------------------------------
# The saved state: row statistics and inverse denominators


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("chunk_rows", [1, 5, 100])
@pytest.mark.parametrize("device", DEVICES)
def test_row_stats_and_inverse_denominators(device, chunk_rows, dtype):
    """Against torch.logsumexp of the logits, task by task: CE [lse, a, B, ε/C], distillation
    [lse_s, lse_t, m, valid], zeros for ignored / missing rows, for the element-wise kinds and for absent tasks."""
    tasks = [
        mf.Classification("ce37", num_classes=37, label_smoothing=0.2, class_weights=[0.5 + 0.1 * c for c in range(37)],
                          ignore_index=-1),
        mf.Classification("ce5", num_classes=5, ignore_index=2),  # a real class as ignore_index
        mf.Classification("ce_smooth", num_classes=4, label_smoothing=0.3),
        mf.Distillation("kd", num_classes=9, temperature=2.0),
        mf.Distillation("kdp", num_classes=6, temperature=0.5, targets="probs"),
        mf.Binary("bin", pos_weight=2.0),
        mf.Regression("huber", dim=2, loss="huber"),
        mf.Regression("absent", dim=3),
    ]
    case = make_case(41, tasks, batch_shape=(2, 7), features=5, p_missing=0.3, absent=["absent"])
    # A probability row that sums to 0.5 (m = Σ_c p_c is not assumed to be 1).
    case.targets["kdp"][0, 0] = torch.tensor([0.05, 0.1, 0.0, 0.2, 0.1, 0.05], dtype=torch.float64)
    args = op_args(case, dtype=dtype, device=device)
    _total, _losses, row_stats, inverse = _forward(args, chunk_rows)
    acc = dtype
    assert row_stats.dtype == inverse.dtype == acc and row_stats.shape == (len(tasks), 14, 4)
    stats = row_stats.double().cpu()
    # The logits the op sees: F.linear in the input dtype, then the accumulation dtype.
    h = case.h.to(dtype).reshape(14, -1)
    logits = F.linear(h, case.weight.to(dtype), case.bias.to(dtype)).to(acc).double()
    targets = flat_targets(case)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for t, task in enumerate(tasks):
        columns = case.layout.columns(t)
        z, y = logits[:, columns], targets[t]
        what = f"task {task.name}"
        if task.kind == mf.LossKind.CROSS_ENTROPY:
            C, eps = task.num_outputs, task.param
            w = task.column_weights()
            w = torch.ones(C, dtype=torch.float64) if w is None else w.double()
            kept = y != task.ignored_class
            expected = torch.stack([
                torch.logsumexp(z, -1),
                (1 - eps) * w[y.clamp(0, C - 1)],
                torch.full((14,), eps / C * float(w.sum()), dtype=torch.float64),
                torch.full((14,), eps / C, dtype=torch.float64),
            ], -1) * kept.unsqueeze(-1)
            denominator = float(w[y.clamp(0, C - 1)][kept].sum())
            assert 0 < int(kept.sum()) < 14, what  # both kinds of rows are checked
        elif mf.tasks.is_distillation(task.kind):
            tau = task.param
            valid = ~torch.isnan(y).any(-1)
            y0 = torch.where(valid.unsqueeze(-1), y, torch.zeros_like(y))
            if task.kind == mf.LossKind.DISTILL:
                lse_t, mass = torch.logsumexp(y0 / tau, -1), torch.ones(14, dtype=torch.float64)
            else:
                lse_t, mass = torch.zeros(14, dtype=torch.float64), y0.sum(-1)
            expected = torch.stack([torch.logsumexp(z / tau, -1), lse_t, mass, torch.ones(14, dtype=torch.float64)],
                                   -1) * valid.unsqueeze(-1)
            denominator = float(valid.sum())
            assert 0 < denominator < 14, what
        else:
            expected = torch.zeros(14, 4, dtype=torch.float64)
            denominator = 0.0 if y is None else float((~torch.isnan(y)).sum())
        torch.testing.assert_close(stats[t], expected, **tol, msg=lambda m: f"{what} row_stats: {m}")
        expected_inverse = 1.0 / denominator if denominator > 0 else 0.0
        assert float(inverse[t]) == pytest.approx(expected_inverse, rel=1e-12 if dtype == torch.float64 else 1e-6), what


# ---------------------------------------------------------------------------------------------------------------
# Errors: the forward validates as the chunked op does; the backward checks its saved state


def _bad_inputs():
    """(label, tasks, mutate(case, args)) of inputs both forward ops must reject."""
    tasks = [mf.Classification("topic", num_classes=4), mf.Distillation("kd", num_classes=3, targets="probs"),
             mf.Regression("score")]

    def out_of_range(args):
        args["targets"][0] = args["targets"][0].clone()
        args["targets"][0][2] = 4

    def wrong_shape(args):
        args["targets"][2] = args["targets"][2][:-1]

    def float_class_indices(args):
        args["targets"][0] = args["targets"][0].double()

    def negative_probability(args):
        args["targets"][1] = args["targets"][1].clone()
        args["targets"][1][1] = torch.tensor([-0.5, 1.0, 0.5])

    def smoothing_out_of_range(args):
        args["params"] = [1.5] + args["params"][1:]

    return tasks, {
        "class_index_out_of_range": out_of_range,
        "target_shape": wrong_shape,
        "float_class_indices": float_class_indices,
        "negative_probability": negative_probability,
        "label_smoothing": smoothing_out_of_range,
    }


# Raised by the CPU kernels only (the CUDA backend reports them as a NaN loss: no host sync).
_CPU_ONLY_ERRORS = ("class_index_out_of_range", "negative_probability")


@pytest.mark.parametrize("problem", [
    pytest.param(name, marks=[cpu_kernel_semantics] if name in _CPU_ONLY_ERRORS else [])
    for name in sorted(_bad_inputs()[1])
])
def test_forward_errors_match_the_chunked_op(problem):
    tasks, mutations = _bad_inputs()
    case = make_case(51, tasks, batch_shape=(6,), features=3, p_missing=0.0)
    args = op_args(case)
    mutations[problem](args)
    with pytest.raises(Exception) as chunked:
        ops.multi_task_loss_chunked(*args.values(), 2)
    with pytest.raises(Exception) as recompute:
        _forward(args, 2)
    assert recompute.type is chunked.type
    first_line = str(recompute.value).splitlines()[0]
    assert first_line == str(chunked.value).splitlines()[0]
    assert "mtlfast: task '" in first_line, first_line  # names the task


@pytest.mark.parametrize("chunk_rows", [0, -3])
def test_chunk_rows_must_be_positive(chunk_rows):
    args = op_args(make_case(52, _all_kinds()[:3], batch_shape=(4,), features=2))
    with pytest.raises(ValueError, match=f"chunk_rows must be positive, got {chunk_rows}"):
        _forward(args, chunk_rows)


def test_backward_checks_its_saved_state():
    case = make_case(53, _all_kinds()[:4], batch_shape=(5,), features=3)
    args = op_args(case)
    total, losses, row_stats, inverse = _forward(args, 2)
    grad_total = torch.tensor(1.0, dtype=torch.float64)

    def backward(saved, block_columns=3):
        return ops.multi_task_loss_recompute_backward(*_backward_args(args, saved, grad_total, None, block_columns))

    with pytest.raises(ValueError, match=r"row_stats must be \(T, N, 4\) = \(4, 5, 4\)"):
        backward((total, losses, row_stats[:, :4], inverse))
    with pytest.raises(ValueError, match=r"inverse_denominators must be \(T,\) = \(4,\)"):
        backward((total, losses, row_stats, inverse[:3]))
    with pytest.raises(TypeError, match="saved row statistics must be"):
        backward((total, losses, row_stats.float(), inverse))
    with pytest.raises(ValueError, match="block_columns must be positive, got 0"):
        backward((total, losses, row_stats, inverse), block_columns=0)
    # And the inputs themselves, as the forward does.
    args["targets"][2] = args["targets"][2][:-1]
    with pytest.raises(ValueError, match="mtlfast: task 'bin'"):
        backward((total, losses, row_stats, inverse))


# ---------------------------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch) and gradcheck


def _opcheck_case(seed=0, **kwargs):
    tasks = [
        mf.Classification("topic", num_classes=7, label_smoothing=0.1, class_weights=[1, 2, 0.5, 1.5, 1, 1, 3]),
        mf.Binary("spam", pos_weight=2.0),
        mf.Regression("score", loss="huber", delta=0.7),
        mf.Distillation("kd", num_classes=6, temperature=2.0),
        mf.Distillation("kdp", num_classes=3, targets="probs"),
    ]
    kwargs.setdefault("batch_shape", (2, 3))
    kwargs.setdefault("features", 3)
    return make_case(seed, tasks, **kwargs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device, chunk_rows, bias):
    args = op_args(_opcheck_case(bias=bias), device=device, requires_grad=True)
    torch.library.opcheck(ops.multi_task_loss_recompute.default, (*args.values(), chunk_rows))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_with_absent_task_and_no_class_weights(device):
    case = make_case(1, [mf.Classification("a", num_classes=3), mf.Binary("b"), mf.Distillation("c", num_classes=4)],
                     absent=["b"])
    args = op_args(case, device=device, requires_grad=True)
    assert args["col_weight"] is None and args["kinds"][1] == int(mf.LossKind.NONE)
    torch.library.opcheck(ops.multi_task_loss_recompute.default, (*args.values(), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_low_precision(dtype):
    args = op_args(_opcheck_case(2), dtype=dtype, requires_grad=True)
    # Only the checks that do not compare numerics against a float64 gradient.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.multi_task_loss_recompute.default, (*args.values(), 4), test_utils=utils)
    plain = op_args(_opcheck_case(2), dtype=dtype)
    saved = _forward(plain, 4)
    torch.library.opcheck(ops.multi_task_loss_recompute_backward.default,
                          _backward_args(plain, saved, torch.tensor(0.7), None, 5), test_utils=utils)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", list(OUTPUT_GRADS))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device, used, bias):
    case = _opcheck_case(3, bias=bias)
    args = op_args(case, device=device)
    saved = _forward(args, 4)
    grad_total, grad_losses = _output_grads(used, len(case.tasks))
    for block_columns in (1, 5, 1000):
        torch.library.opcheck(
            ops.multi_task_loss_recompute_backward.default,
            _backward_args(args, saved, _on(grad_total, device, torch.float64), _on(grad_losses, device, torch.float64),
                           block_columns),
        )


def _gradcheck_inputs(case, device, bias=True):
    tensors = (case.h, case.weight, case.bias if bias else None, case.lam)
    return tuple(None if t is None else t.detach().to(device).clone().requires_grad_() for t in tensors)


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_forward_op(device, seed, chunk_rows):
    """gradcheck (float64) of total and losses for h, weight, bias and λ through the op's autograd formula."""
    rng = random.Random(seed)
    case = _opcheck_case(seed) if seed == 0 else make_case(seed, random_tasks(rng, count=4), batch_shape=(5,),
                                                           features=3)
    template = op_args(case, device=device)

    def run(h, weight, bias, lam):
        args = dict(template, h=h, weight=weight, bias=bias, task_weights=lam)
        total, losses, _, _ = ops.multi_task_loss_recompute(*args.values(), chunk_rows)
        return total, losses

    assert torch.autograd.gradcheck(run, _gradcheck_inputs(case, device), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_forward_op_without_bias_with_absent_task(device):
    case = _opcheck_case(5, bias=False, absent=["spam"])
    template = op_args(case, device=device)

    def run(h, weight, lam):
        args = dict(template, h=h, weight=weight, task_weights=lam)
        total, losses, _, _ = ops.multi_task_loss_recompute(*args.values(), 2)
        return total, losses

    h, weight, _, lam = _gradcheck_inputs(case, device, bias=False)
    assert torch.autograd.gradcheck(run, (h, weight, lam), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_only_total_and_losses_are_differentiable(device):
    args = op_args(_opcheck_case(6), device=device, requires_grad=True)
    total, losses, row_stats, inverse = _forward(args, 3)
    assert total.requires_grad and losses.requires_grad
    assert not row_stats.requires_grad and not inverse.requires_grad
