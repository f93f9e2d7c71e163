"""Knowledge distillation as a task kind of the fused op (mf.Distillation): teacher logits or probabilities,
temperature τ, loss τ²·KL(p_teacher ‖ softmax(z / τ)) averaged over the rows whose target holds no NaN.

Checked against an independent hand-written KL (plain Python math), against the kl_div oracle of
mtlfast._reference on random task mixes (every gradient, small-head and chunked paths), with opcheck, for
C++ / fallback parity, for bad input, and on CUDA where a GPU exists (skipped elsewhere)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import mtlfast as mf
from mtlfast import _fallback
from mtl_helpers import (
    CUDA_TEST_DEVICE,
    KINDS,
    assert_close,
    assert_results_close,
    cpu_kernel_semantics,
    fused_result,
    make_case,
    op_arg_tuple,
    op_args,
    random_tasks,
    reference_result,
    relative_error,
    requires_c,
    requires_cuda,
)

ops = torch.ops.mtlfast

VIAS = ["functional", "heads"]
# None: the small-head path; ints: the chunked path (1 = one row per chunk).
PATHS = [None, 1, 4]
ENCODINGS = ["logits", "probs"]


def _distill_mix(seed: int, encoding: str | None = None, **kwargs):
    """Two distillation tasks (one per encoding unless fixed) next to a CE and a multi-label task."""
    tasks = [
        mf.Distillation("kd_a", 5, temperature=2.0, targets=encoding or "logits", weight=0.7),
        mf.Classification("topic", num_classes=3, label_smoothing=0.1),
        mf.Distillation("kd_b", 3, temperature=0.5, targets=encoding or "probs"),
        mf.MultiLabel("tags", num_labels=2),
    ]
    kwargs.setdefault("batch_shape", (9,))
    kwargs.setdefault("features", 4)
    return make_case(seed, tasks, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The independent formula: τ²·Σ_c p_c (log p_c − log q_c), mean over valid rows; dL/dz = τ·(q − p) / n_valid.


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _hand_kl(z: torch.Tensor, y: torch.Tensor, tau: float, from_logits: bool) -> tuple[float, torch.Tensor]:
    """Loss and dLoss/dz of one distillation task, row by row in Python floats."""
    rows = [i for i in range(z.shape[0]) if not any(math.isnan(v) for v in y[i].tolist())]
    grad = torch.zeros_like(z)
    total = 0.0
    for i in rows:
        q = _softmax([v / tau for v in z[i].tolist()])
        p = _softmax([v / tau for v in y[i].tolist()]) if from_logits else y[i].tolist()
        total += tau * tau * sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)
        grad[i] = tau * (torch.tensor(q, dtype=z.dtype) - torch.tensor(p, dtype=z.dtype)) / len(rows)
    return (total / len(rows) if rows else 0.0), grad


@pytest.mark.parametrize("chunk_rows", PATHS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_matches_hand_written_kl(tau, encoding, chunk_rows):
    task = mf.Distillation("kd", 4, temperature=tau, targets=encoding)
    case = make_case(int(tau * 10), [task], batch_shape=(7,), features=3, lam=False, p_missing=0.3)
    y = case.targets["kd"]
    assert torch.isnan(y).any(1).any() and not torch.isnan(y).any(1).all()  # some rows missing, not all
    z = torch.nn.functional.linear(case.h, case.weight, case.bias)
    loss, dz = _hand_kl(z, y, tau, encoding == "logits")

    actual = fused_result(case, chunk_rows=chunk_rows)
    assert actual.losses.tolist() == pytest.approx([loss], rel=1e-12, abs=1e-12)
    assert_close(actual.grads["h"], dz @ case.weight, what="grad h")
    assert_close(actual.grads["weight"], dz.t() @ case.h, what="grad weight")
    assert_close(actual.grads["bias"], dz.sum(0), what="grad bias")


def test_hand_computed_two_class_value():
    """One row, C = 2, τ = 2: student logits (0, 2), teacher logits (2, 0) → p = q reversed."""
    task = mf.Distillation("kd", 2, temperature=2.0)
    h = torch.eye(2, dtype=torch.float64)[:1]  # (1, 2): the logits are the first column of the weight
    weight = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # z = (0, 2)
    out = mf.functional.multi_task_loss(h, weight, None, {"kd": torch.tensor([[2.0, 0.0]], dtype=torch.float64)}, [task])
    s = 1 / (1 + math.e)  # softmax((0, 1)) = (s, 1 - s); p = (1 - s, s)
    kl = (1 - s) * math.log((1 - s) / s) + s * math.log(s / (1 - s))
    assert float(out.total) == pytest.approx(4.0 * kl, rel=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Against the kl_div oracle (every gradient: h, weight, bias, λ)


@pytest.mark.parametrize("chunk_rows", PATHS)
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("seed", range(6))
def test_random_mixes_with_distillation(seed, via, chunk_rows):
    rng = random.Random(500 + seed)
    kinds = ["distill"] + [rng.choice(KINDS) for _ in range(rng.randint(1, 4))]
    rng.shuffle(kinds)
    case = make_case(
        seed,
        random_tasks(rng, kinds=kinds),
        batch_shape=rng.choice([(1,), (6,), (13,), (2, 5)]),
        features=rng.choice([1, 3, 8]),
        bias=rng.random() < 0.7,
        lam=rng.random() < 0.7,
        p_missing=rng.choice([0.0, 0.3]),
        logit_scale=rng.choice([1.0, 4.0]),
    )
    assert_results_close(fused_result(case, via=via, chunk_rows=chunk_rows), reference_result(case))


@pytest.mark.parametrize("chunk_rows", PATHS)
@pytest.mark.parametrize("encoding", [None, *ENCODINGS])
def test_fixed_mix_both_encodings(encoding, chunk_rows):
    case = _distill_mix(1, encoding, p_missing=0.25)
    assert_results_close(fused_result(case, chunk_rows=chunk_rows), reference_result(case))


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_per_task_input_grads_with_distillation(chunk_rows):
    case = _distill_mix(2, batch_shape=(2, 4))
    actual = fused_result(case, chunk_rows=chunk_rows, per_task_input_grads=True)
    expected = reference_result(case, input_grads=True)
    assert_close(actual.input_grads, expected.input_grads, what="per-task input grads")


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_large_logits_stay_finite(chunk_rows):
    tasks = [mf.Distillation("kd", 6, temperature=0.5), mf.Distillation("kp", 4, temperature=1.0, targets="probs")]
    case = make_case(3, tasks, batch_shape=(8,), features=4, logit_scale=200.0)
    case.targets["kd"] = 300.0 * case.targets["kd"]
    expected = reference_result(case)
    assert float(expected.losses.max()) > 50  # really saturated
    assert_results_close(fused_result(case, chunk_rows=chunk_rows), expected)


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_teacher_logits_equal_their_probabilities(chunk_rows):
    """Teacher logits t (with -inf entries: p = 0 exactly) and probabilities softmax(t / τ) give the same loss and
    gradients: the two encodings agree, and 0·log 0 = 0 holds on both."""
    tau = 1.5
    logits_task = mf.Distillation("kd", 5, temperature=tau)
    probs_task = mf.Distillation("kd", 5, temperature=tau, targets="probs")
    case = make_case(4, [logits_task], batch_shape=(6,), features=3, p_missing=0.0)
    teacher = case.targets["kd"].clone()
    teacher[0, 1] = teacher[3, 4] = -math.inf
    teacher[5, 2] = math.nan
    case.targets["kd"] = teacher
    from_logits = fused_result(case, chunk_rows=chunk_rows)
    probs = torch.softmax(teacher / tau, dim=-1)  # NaN rows stay NaN: still missing
    assert probs[0, 1] == 0 and probs[3, 4] == 0
    case.tasks, case.targets["kd"] = [probs_task], probs
    from_probs = fused_result(case, chunk_rows=chunk_rows)
    assert torch.isfinite(from_logits.losses).all()
    assert_results_close(from_logits, from_probs)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_unnormalised_probabilities_follow_kl_div(chunk_rows):
    """Rows not summing to 1 are used as given (documented): the loss is F.kl_div's Σ p (log p − log q)."""
    task = mf.Distillation("kp", 4, temperature=2.0, targets="probs")
    case = make_case(5, [task, mf.Binary("b")], batch_shape=(7,), features=3)
    case.targets["kp"] = case.targets["kp"] * torch.linspace(0.3, 2.0, 7, dtype=torch.float64).unsqueeze(1)
    assert_results_close(fused_result(case, chunk_rows=chunk_rows), reference_result(case))


# ---------------------------------------------------------------------------------------------------------------
# Missing rows


@pytest.mark.parametrize("chunk_rows", PATHS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_single_nan_makes_the_row_missing(encoding, chunk_rows):
    task = mf.Distillation("kd", 4, temperature=2.0, targets=encoding)
    case = make_case(6, [task], batch_shape=(5,), features=3, p_missing=0.0)
    full = case.targets["kd"].clone()
    case.targets["kd"][1, 2] = math.nan
    with_nan = fused_result(case, chunk_rows=chunk_rows)
    case.targets["kd"] = full[[0, 2, 3, 4]]
    case.h = case.h[[0, 2, 3, 4]]
    case.batch_shape = (4,)
    without_row = fused_result(case, chunk_rows=chunk_rows)
    assert_results_close(with_nan, without_row, grads=["weight", "bias", "lam"])
    assert_close(with_nan.grads["h"][[0, 2, 3, 4]], without_row.grads["h"], what="grad h of the kept rows")
    assert torch.equal(with_nan.grads["h"][1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("chunk_rows", PATHS)
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_row_missing_gives_zero_loss_and_zero_grads(encoding, via, chunk_rows):
    tasks = [mf.Distillation("kd", 4, temperature=2.0, targets=encoding)]
    case = make_case(7, tasks, batch_shape=(6,), features=3, empty=["kd"])
    actual = fused_result(case, via=via, chunk_rows=chunk_rows)
    assert torch.equal(actual.losses, torch.zeros(1, dtype=torch.float64))
    for name in ("h", "weight", "bias", "lam"):
        assert torch.equal(actual.grads[name], torch.zeros_like(actual.grads[name])), name
    assert_results_close(actual, reference_result(case))


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_empty_and_absent_distillation_next_to_other_tasks(chunk_rows):
    case = _distill_mix(8, empty=["kd_a"], absent=["kd_b"])
    actual = fused_result(case, chunk_rows=chunk_rows)
    for name in ("kd_a", "kd_b"):
        t = case.names.index(name)
        assert float(actual.losses[t]) == 0.0
        columns = case.layout.columns(t)
        assert torch.equal(actual.grads["weight"][columns], torch.zeros_like(actual.grads["weight"][columns]))
    assert_results_close(actual, reference_result(case))


# ---------------------------------------------------------------------------------------------------------------
# Precision, autograd checks, the raw op


@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_against_float64_reference(dtype, chunk_rows):
    case = _distill_mix(9, batch_shape=(4, 6), features=16)
    case.h, case.weight, case.bias = (t.to(dtype).double() for t in (case.h, case.weight, case.bias))
    assert_results_close(fused_result(case, dtype=dtype, chunk_rows=chunk_rows), reference_result(case), dtype)


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_gradcheck(chunk_rows):
    case = _distill_mix(10, batch_shape=(5,), features=3)

    def run(h, weight, bias, lam):
        out = mf.functional.multi_task_loss(h, weight, bias, case.targets, case.tasks, lam, chunk_rows=chunk_rows)
        return out.total, out.losses

    inputs = tuple(t.detach().clone().requires_grad_() for t in (case.h, case.weight, case.bias, case.lam))
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    args = op_args(_distill_mix(11, bias=bias, p_missing=0.3), requires_grad=True)
    assert int(mf.LossKind.DISTILL) in args["kinds"] and int(mf.LossKind.DISTILL_PROBS) in args["kinds"]
    torch.library.opcheck(ops.multi_task_loss.default, op_arg_tuple(args, False))
    torch.library.opcheck(ops.multi_task_loss.default, op_arg_tuple(args, True))
    torch.library.opcheck(ops.multi_task_loss_chunked.default, op_arg_tuple(args, 4))


@requires_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cpp_kernels_match_fallback(dtype):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    cases = [_distill_mix(12), _distill_mix(13, empty=["kd_b"], absent=["topic"], p_missing=0.4)]
    for seed in range(3):
        rng = random.Random(600 + seed)
        cases.append(make_case(600 + seed, random_tasks(rng, kinds=["distill", "distill", rng.choice(KINDS)]),
                               batch_shape=(11,), features=5))
    for case in cases:
        args = op_args(case, dtype=dtype)
        pairs = [(ops.multi_task_loss(*op_arg_tuple(args, True)), _fallback.multi_task_loss(*op_arg_tuple(args, True)))]
        for chunk_rows in (1, 4, 64):
            pairs.append((ops.multi_task_loss_chunked(*op_arg_tuple(args, chunk_rows)),
                          _fallback.multi_task_loss_chunked(*op_arg_tuple(args, chunk_rows))))
        for cpp_outputs, py_outputs in pairs:
            for cpp, py in zip(cpp_outputs, py_outputs):
                assert cpp.dtype == py.dtype and cpp.shape == py.shape
                torch.testing.assert_close(cpp.double(), py.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: errors name the task


B, D = 4, 3


def _heads(encoding="logits"):
    return mf.MultiTaskHeads(D, [mf.Binary("spam"), mf.Distillation("kd", 5, temperature=2.0, targets=encoding)])


def _good_targets(encoding="logits"):
    teacher = torch.randn(B, 5)
    return {"spam": torch.rand(B), "kd": teacher if encoding == "logits" else torch.softmax(teacher, -1)}


@pytest.mark.parametrize("bad_shape", [(B,), (B, 4), (B, 6), (B + 1, 5), (B, 5, 1)], ids=str)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_wrong_target_shape(encoding, bad_shape):
    targets = _good_targets(encoding)
    targets["kd"] = torch.rand(bad_shape)
    with pytest.raises(ValueError, match="mtlfast: task 'kd'.*shape"):
        _heads(encoding)(torch.randn(B, D), targets)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_integer_targets(encoding, dtype):
    targets = _good_targets(encoding)
    targets["kd"] = torch.ones(B, 5, dtype=dtype)
    with pytest.raises(TypeError, match="mtlfast: task 'kd'.*floating point"):
        _heads(encoding)(torch.randn(B, D), targets)
    with pytest.raises(TypeError, match="mtlfast: task 'kd'.*floating point"):
        mf.functional.multi_task_loss(torch.randn(B, D), torch.randn(6, D), None, targets, _heads(encoding).tasks)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive_and_finite(tau):
    with pytest.raises(ValueError, match="mtlfast: task 'kd'.*temperature"):
        mf.Distillation("kd", 3, temperature=tau)


@pytest.mark.parametrize("tau", [0.0, -2.0, math.inf])
@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_rejects_bad_temperature(op, tau):
    """The op's own checks (C++ when built, and the fallback's twins) with the same message."""
    args = op_args(_distill_mix(14))
    args["params"][0] = tau
    last = False if op == "multi_task_loss" else 3
    for fn in (getattr(ops, op), getattr(_fallback, op)):
        with pytest.raises(ValueError, match="mtlfast: task 'kd_a' \\(distillation from teacher logits\\): temperature"):
            fn(*op_arg_tuple(args, last))


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_rejects_integer_target(op):
    args = op_args(_distill_mix(15))
    args["targets"][2] = torch.zeros(9, 3, dtype=torch.int64)
    last = False if op == "multi_task_loss" else 3
    for fn in (getattr(ops, op), getattr(_fallback, op)):
        with pytest.raises(TypeError, match="mtlfast: task 'kd_b' \\(distillation from teacher probabilities\\)"):
            fn(*op_arg_tuple(args, last))


@cpu_kernel_semantics
@pytest.mark.parametrize("bad", [-0.25, math.inf])
@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_bad_probabilities_raise_on_cpu(chunk_rows, bad):
    heads = _heads("probs")
    heads.chunk_rows = chunk_rows
    targets = _good_targets("probs")
    targets["kd"][2, 3] = bad
    with pytest.raises(ValueError, match="mtlfast: task 'kd'.*non-negative and finite.*row 2, class 3"):
        heads(torch.randn(B, D), targets)
    args = op_args(_distill_mix(16))
    args["targets"][2][4, 1] = bad
    with pytest.raises(ValueError, match="'kd_b'.*non-negative.*row 4, class 1"):
        _fallback.multi_task_loss(*op_arg_tuple(args, False))


def test_probabilities_may_be_zero_and_rows_missing():
    targets = _good_targets("probs")
    targets["kd"][0] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])
    targets["kd"][1, 0] = math.nan
    out = _heads("probs")(torch.randn(B, D), targets)
    assert torch.isfinite(out.loss_vector).all()


def test_bad_task_options():
    with pytest.raises(ValueError, match="mtlfast: task 'kd'.*targets"):
        mf.Distillation("kd", 3, targets="soft")
    with pytest.raises(ValueError, match="mtlfast: task 'kd'.*num_classes"):
        mf.Distillation("kd", 1)


def test_task_spec():
    task = mf.Distillation("kd", 7, temperature=3.0, targets="probs", weight=0.5)
    assert (task.num_outputs, task.param, task.kind, task.weight) == (7, 3.0, mf.LossKind.DISTILL_PROBS, 0.5)
    assert task.target_has_class_dim and not task.target_is_index
    assert mf.Distillation("kd", 2).kind == mf.LossKind.DISTILL == 6 and mf.LossKind.DISTILL_PROBS == 7


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@requires_cuda
@pytest.mark.cuda
class TestCuda:
    DEVICE = CUDA_TEST_DEVICE

    @pytest.mark.parametrize("chunk_rows", [None, 7])
    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.parametrize("seed", range(3))
    def test_float64_matches_cpu_reference(self, seed, via, chunk_rows):
        rng = random.Random(700 + seed)
        kinds = ["distill", "distill", *(rng.choice(KINDS) for _ in range(3))]
        case = make_case(seed, random_tasks(rng, kinds=kinds), batch_shape=rng.choice([(1,), (37,), (3, 5)]),
                         features=rng.choice([1, 8]), p_missing=0.3)
        assert_results_close(fused_result(case, via=via, device=self.DEVICE, chunk_rows=chunk_rows),
                             reference_result(case))

    @pytest.mark.parametrize("chunk_rows", [None, 32])
    @pytest.mark.parametrize("encoding", ENCODINGS)
    def test_wide_segments_use_the_block_kernel(self, encoding, chunk_rows):
        """More than 1024 classes: a block per (row, task) instead of a lane group."""
        tasks = [mf.Distillation("vocab", 1500, temperature=2.0, targets=encoding), mf.Binary("b")]
        case = make_case(1, tasks, batch_shape=(40,), features=8, p_missing=0.2)
        assert_results_close(fused_result(case, device=self.DEVICE, chunk_rows=chunk_rows), reference_result(case))

    @pytest.mark.parametrize("chunk_rows", [None, 4])
    @pytest.mark.parametrize("classes", [5, 1500])
    def test_every_row_missing(self, classes, chunk_rows):
        tasks = [mf.Distillation("kd", classes), mf.Distillation("kp", classes, targets="probs"), mf.Binary("b")]
        case = make_case(2, tasks, batch_shape=(9,), features=4, empty=["kd", "kp"])
        actual = fused_result(case, device=self.DEVICE, chunk_rows=chunk_rows)
        assert float(actual.losses[0]) == float(actual.losses[1]) == 0.0
        assert torch.equal(actual.grads["weight"][: 2 * classes], torch.zeros_like(actual.grads["weight"][: 2 * classes]))
        assert_results_close(actual, reference_result(case))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    def test_low_precision_error_at_most_twice_plain_pytorch(self, dtype):
        epsilon = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}[dtype]
        torch.backends.cuda.matmul.allow_tf32 = False
        case = _distill_mix(3, batch_shape=(16, 33), features=64)
        case.h, case.weight, case.bias = (t.to(dtype).double() for t in (case.h, case.weight, case.bias))
        exact = reference_result(case)
        plain = reference_result(case, dtype=dtype, device=self.DEVICE)
        fused = fused_result(case, dtype=dtype, device=self.DEVICE)
        for what in ("losses", "h", "weight", "bias"):
            pick = (lambda r: r.losses) if what == "losses" else (lambda r: r.grads[what])
            ours, theirs = relative_error(pick(fused), pick(exact)), relative_error(pick(plain), pick(exact))
            assert ours <= 2 * theirs + epsilon, f"{what} ({dtype}): fused {ours:.3g} vs plain {theirs:.3g}"

    @pytest.mark.parametrize("classes", [5, 1500])
    def test_negative_probability_gives_nan_for_that_task(self, classes):
        """No host sync on CUDA: a bad probability poisons its task's loss instead of raising."""
        tasks = [mf.Distillation("kp", classes, targets="probs"), mf.Binary("b")]
        case = make_case(4, tasks, batch_shape=(6,), features=4, p_missing=0.0)
        case.targets["kp"][2, 1] = -0.5
        heads = mf.MultiTaskHeads(4, tasks, device=self.DEVICE, dtype=torch.float64)
        losses = heads(case.h.to(self.DEVICE), {k: v.to(self.DEVICE) for k, v in case.targets.items()}).loss_vector
        losses = losses.cpu()
        assert torch.isnan(losses[0]) and torch.isfinite(losses[1])
