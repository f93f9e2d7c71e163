"""The fused path (functional API and MultiTaskHeads, small-head and chunked code paths) against the per-task
oracle mtlfast._reference.reference_multi_task_loss: losses, total, and the gradients of h, the packed weight,
the bias and the task weights λ."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

import mtlfast as mf
import mtlfast.functional
from mtl_helpers import (
    assert_close,
    assert_results_close,
    fused_result,
    linear_logits,
    make_case,
    random_tasks,
    targets_in_many_forms,
    reference_result,
)

VIAS = ["functional", "heads"]
# (chunk_rows, recompute_logits). chunk_rows None: the small-head path (logit gradient kept from the forward); ints:
# a large-head path, the chunked op (gradients finished in the forward) or the recompute op (logits recomputed in the
# backward from saved row statistics).
PATHS = [
    pytest.param(None, None, id="small"),
    pytest.param(7, False, id="chunked7"),
    pytest.param(1, False, id="chunked1"),
    pytest.param(7, True, id="recompute7"),
    pytest.param(1, True, id="recompute1"),
]
LARGE_HEAD_PATHS = [
    pytest.param(None, None, id="small"),
    pytest.param(4, False, id="chunked"),
    pytest.param(4, True, id="recompute"),
]


# ---------------------------------------------------------------------------------------------------------------
# Random task mixes


@pytest.mark.parametrize("chunk_rows, recompute_logits", PATHS)
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("seed", range(10))
def test_random_mix(seed, via, chunk_rows, recompute_logits):
    rng = random.Random(1000 + seed)
    case = make_case(
        seed,
        random_tasks(rng),
        batch_shape=rng.choice([(1,), (2,), (13,), (37,), (3, 5)]),
        features=rng.choice([1, 3, 8]),
        bias=rng.random() < 0.7,
        lam=rng.random() < 0.7,
        p_missing=rng.choice([0.0, 0.2, 0.5]),
    )
    expected = reference_result(case)
    actual = fused_result(case, via=via, chunk_rows=chunk_rows, recompute_logits=recompute_logits)
    assert_results_close(actual, expected)


# One task of every kind and option, so that coverage never depends on what the random mixes drew.
SINGLE_TASKS = {
    "ce2": mf.Classification("t", num_classes=2),
    "ce5_smooth": mf.Classification("t", num_classes=5, label_smoothing=0.1),
    "ce5_weights": mf.Classification("t", num_classes=5, class_weights=[0.5, 2.0, 1.0, 0.1, 3.0]),
    "ce7_weights_smooth": mf.Classification("t", num_classes=7, label_smoothing=0.3, class_weights=[1, 2, 3, 4, 5, 6, 7]),
    "ce3_smooth_one": mf.Classification("t", num_classes=3, label_smoothing=1.0),
    "ce4_ignore_minus1": mf.Classification("t", num_classes=4, ignore_index=-1),
    "ce4_ignore_real_class": mf.Classification("t", num_classes=4, ignore_index=2),
    "binary": mf.Binary("t"),
    "binary_pos_weight": mf.Binary("t", pos_weight=2.5),
    "binary_pos_weight_zero": mf.Binary("t", pos_weight=0.0),
    "multilabel1": mf.MultiLabel("t", num_labels=1),
    "multilabel12": mf.MultiLabel("t", num_labels=12),
    "multilabel_pos_weight_list": mf.MultiLabel("t", num_labels=3, pos_weight=[0.5, 1.0, 4.0]),
    "multilabel_pos_weight_scalar": mf.MultiLabel("t", num_labels=4, pos_weight=3.0),
    "mse": mf.Regression("t"),
    "mse_dim3": mf.Regression("t", dim=3),
    "l1": mf.Regression("t", loss="l1"),
    "l1_dim2": mf.Regression("t", dim=2, loss="l1"),
    "huber": mf.Regression("t", loss="huber"),
    "huber_small_delta_dim4": mf.Regression("t", dim=4, loss="huber", delta=0.2),
    "huber_large_delta": mf.Regression("t", loss="huber", delta=5.0),
}


@pytest.mark.parametrize("chunk_rows, recompute_logits", LARGE_HEAD_PATHS)
@pytest.mark.parametrize("key", sorted(SINGLE_TASKS))
def test_each_task_kind_and_option(key, chunk_rows, recompute_logits):
    # A second task next to it checks that columns of different tasks do not mix.
    tasks = [SINGLE_TASKS[key], mf.Regression("other", dim=2, weight=0.7)]
    case = make_case(sorted(SINGLE_TASKS).index(key), tasks, batch_shape=(11,), features=5, logit_scale=3.0)
    actual = fused_result(case, chunk_rows=chunk_rows, recompute_logits=recompute_logits)
    assert_results_close(actual, reference_result(case))


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize(
    "batch_shape, features",
    [((1,), 4), ((37,), 4), ((3, 5), 4), ((2, 3, 2), 3), ((9,), 1), ((1,), 1), ((5,), 33)],
    ids=str,
)
def test_odd_shapes(batch_shape, features, chunk_rows):
    tasks = [
        mf.Classification("c2", num_classes=2),
        mf.Classification("c7", num_classes=7, label_smoothing=0.2),
        mf.Binary("b"),
        mf.MultiLabel("m1", num_labels=1),
        mf.Regression("r3", dim=3, loss="huber"),
    ]
    case = make_case(7, tasks, batch_shape=batch_shape, features=features)
    for via in VIAS:
        assert_results_close(fused_result(case, via=via, chunk_rows=chunk_rows), reference_result(case))


def test_chunk_larger_than_batch_and_not_dividing_it():
    case = make_case(3, random_tasks(random.Random(3), count=4), batch_shape=(10,))
    expected = reference_result(case)
    for chunk_rows in (3, 9, 10, 11, 1000):
        assert_results_close(fused_result(case, chunk_rows=chunk_rows), expected)


def test_extreme_logits_stay_finite_and_exact():
    """Huge logits: softmax / softplus / sigmoid must be evaluated stably (the oracle is)."""
    tasks = [
        mf.Classification("c", num_classes=4, label_smoothing=0.1),
        mf.Binary("b", pos_weight=2.0),
        mf.MultiLabel("m", num_labels=3),
    ]
    case = make_case(11, tasks, batch_shape=(9,), features=4, logit_scale=300.0)
    expected = reference_result(case)
    assert float(expected.losses.max()) > 50  # really in the saturated regime
    for chunk_rows in (None, 4):
        assert_results_close(fused_result(case, chunk_rows=chunk_rows), expected)


# ---------------------------------------------------------------------------------------------------------------
# Tasks with no valid entry, tasks absent from the batch


def _all_kinds():
    return [
        mf.Classification("ce", num_classes=3),
        mf.Classification("ce_smooth_weighted", num_classes=4, label_smoothing=0.2, class_weights=[1, 2, 3, 4]),
        mf.Binary("bin", pos_weight=2.0),
        mf.MultiLabel("multi", num_labels=3),
        mf.Regression("mse", dim=2),
        mf.Regression("l1", loss="l1"),
        mf.Regression("huber", loss="huber", delta=0.5),
    ]


@pytest.mark.parametrize("chunk_rows, recompute_logits", LARGE_HEAD_PATHS)
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("empty", [t.name for t in _all_kinds()])
def test_task_without_valid_entries(empty, via, chunk_rows, recompute_logits):
    tasks = _all_kinds()
    case = make_case(5, tasks, batch_shape=(3, 3), features=4, empty=[empty])
    actual = fused_result(case, via=via, chunk_rows=chunk_rows, recompute_logits=recompute_logits)
    t = case.names.index(empty)
    assert float(actual.losses[t]) == 0.0
    columns = case.layout.columns(t)
    assert torch.equal(actual.grads["weight"][columns], torch.zeros_like(actual.grads["weight"][columns]))
    assert torch.equal(actual.grads["bias"][columns], torch.zeros_like(actual.grads["bias"][columns]))
    assert float(actual.grads["lam"][t]) == 0.0
    assert_results_close(actual, reference_result(case))


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_every_task_without_valid_entries(chunk_rows):
    tasks = _all_kinds()
    case = make_case(6, tasks, batch_shape=(5,), features=3, empty=[t.name for t in tasks])
    actual = fused_result(case, chunk_rows=chunk_rows)
    assert torch.equal(actual.losses, torch.zeros(len(tasks), dtype=torch.float64))
    for name in ("h", "weight", "bias", "lam"):
        assert torch.equal(actual.grads[name], torch.zeros_like(actual.grads[name])), name


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_class_weights_summing_to_zero_over_the_batch(chunk_rows):
    """Every present target has class weight 0: the weighted mean is 0/0 → loss 0 and zero gradient, not NaN."""
    task = mf.Classification("c", num_classes=3, class_weights=[0.0, 1.0, 2.0], label_smoothing=0.1)
    case = make_case(8, [task, mf.Binary("b")], batch_shape=(6,), features=3)
    case.targets["c"] = torch.tensor([0, 0, -100, 0, 0, -100])
    actual = fused_result(case, chunk_rows=chunk_rows)
    assert float(actual.losses[0]) == 0.0
    assert torch.equal(actual.grads["weight"][:3], torch.zeros(3, 3, dtype=torch.float64))
    assert_results_close(actual, reference_result(case))


@pytest.mark.parametrize("chunk_rows, recompute_logits", LARGE_HEAD_PATHS)
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("targets_as", ["dict", "list"])
def test_absent_tasks(targets_as, via, chunk_rows, recompute_logits):
    if via == "heads" and targets_as == "list":
        pytest.skip("MultiTaskHeads takes a mapping")
    tasks = _all_kinds()
    absent = ["ce_smooth_weighted", "multi", "l1"]
    case = make_case(9, tasks, batch_shape=(7,), features=4, absent=absent)
    actual = fused_result(case, via=via, chunk_rows=chunk_rows, targets_as=targets_as,
                          recompute_logits=recompute_logits)
    for name in absent:
        t = case.names.index(name)
        assert float(actual.losses[t]) == 0.0
        columns = case.layout.columns(t)
        assert torch.equal(actual.grads["weight"][columns], torch.zeros_like(actual.grads["weight"][columns]))
        assert torch.equal(actual.grads["bias"][columns], torch.zeros_like(actual.grads["bias"][columns]))
    assert_results_close(actual, reference_result(case))


# ---------------------------------------------------------------------------------------------------------------
# chunk_rows="auto"


def _big_head_case(seed=21):
    tasks = [mf.Classification("vocab", num_classes=60, label_smoothing=0.1), mf.Binary("b"), mf.Regression("r", dim=2)]
    return make_case(seed, tasks, batch_shape=(5, 8), features=4)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    "recompute_logits, input_grads, op",
    [(True, False, "multi_task_loss_recompute"), (False, False, "multi_task_loss_chunked"),
     (True, True, "multi_task_loss_chunked")],  # the chunked forward produces the per-task input gradients
    ids=["recompute", "chunked", "per_task_input_grads"],
)
def test_auto_chunks_a_big_head(via, recompute_logits, input_grads, op, op_spy, monkeypatch):
    monkeypatch.setattr(mtlfast.functional, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(mtlfast.functional, "MIN_CHUNK_ROWS", 1)
    case = _big_head_case()
    actual = fused_result(case, via=via, chunk_rows="auto", per_task_input_grads=input_grads,
                          recompute_logits=recompute_logits)
    assert op_spy.names == [op]
    chunk_rows = op_spy.calls[0][1][-1]
    assert 1 <= chunk_rows < 40  # really several chunks of the 40 rows
    expected = reference_result(case, input_grads=input_grads)
    assert_results_close(actual, expected)
    if input_grads:
        assert_close(actual.input_grads, expected.input_grads, what="per-task input grads")


def test_auto_keeps_small_heads_unchunked(op_spy, monkeypatch):
    monkeypatch.setattr(mtlfast.functional, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(mtlfast.functional, "MIN_CHUNK_ROWS", 1)
    # N·S is large but S <= D: chunking would not save memory.
    tasks = [mf.Classification("c", num_classes=3), mf.Binary("b")]
    case = make_case(4, tasks, batch_shape=(600,), features=8)
    actual = fused_result(case, chunk_rows="auto")
    assert op_spy.names == ["multi_task_loss"]
    assert_results_close(actual, reference_result(case))


def test_chunk_rows_none_never_chunks(op_spy, monkeypatch):
    monkeypatch.setattr(mtlfast.functional, "CHUNK_ELEMENTS", 16)
    monkeypatch.setattr(mtlfast.functional, "MIN_CHUNK_ROWS", 1)
    case = _big_head_case(22)
    actual = fused_result(case, chunk_rows=None)
    assert op_spy.names == ["multi_task_loss"]
    assert_results_close(actual, reference_result(case))


def test_explicit_chunk_rows_reach_the_op(op_spy):
    case = _big_head_case(23)
    fused_result(case, via="heads", chunk_rows=7, recompute_logits=True)
    fused_result(case, via="heads", chunk_rows=5, recompute_logits=False)
    assert op_spy.names == ["multi_task_loss_recompute", "multi_task_loss_chunked"]
    assert [args[-1] for _, args in op_spy.calls] == [7, 5]


def test_default_large_head_path_follows_the_device_type(op_spy, monkeypatch):
    """recompute_logits=None recomputes on the device types in RECOMPUTE_DEVICE_TYPES (CUDA), not elsewhere."""
    monkeypatch.setattr(mtlfast.functional, "RECOMPUTE_DEVICE_TYPES", frozenset({"cuda"}))
    fused_result(_big_head_case(24), chunk_rows=7)  # CPU tensors
    monkeypatch.setattr(mtlfast.functional, "RECOMPUTE_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    fused_result(_big_head_case(24), chunk_rows=7)
    assert op_spy.names == ["multi_task_loss_chunked", "multi_task_loss_recompute"]


# ---------------------------------------------------------------------------------------------------------------
# return_logits


@pytest.mark.parametrize("chunk_rows", [None, 5, "auto"])
@pytest.mark.parametrize("via", VIAS)
def test_return_logits_equal_linear_and_carry_gradient(via, chunk_rows):
    case = make_case(31, random_tasks(random.Random(31), count=4), batch_shape=(3, 4), features=5)

    def objective(total, losses, logits):
        return total + 0.3 * (logits.sin() * logits).sum()

    actual = fused_result(case, via=via, chunk_rows=chunk_rows, return_logits=True, objective=objective)
    expected = reference_result(case, objective)
    assert_close(actual.logits, linear_logits(case), what="logits vs F.linear")
    assert_results_close(actual, expected)


def test_return_logits_unused_gradient_is_the_plain_one():
    case = make_case(32, random_tasks(random.Random(32), count=3), batch_shape=(6,), features=4)
    actual = fused_result(case, return_logits=True)
    assert_close(actual.logits, linear_logits(case), what="logits")
    assert_results_close(actual, reference_result(case))


def test_no_logits_unless_asked():
    case = make_case(33, random_tasks(random.Random(33), count=2))
    out = mf.functional.multi_task_loss(case.h, case.weight, case.bias, case.targets, case.tasks)
    assert out.logits is None and out.input_grads is None


# ---------------------------------------------------------------------------------------------------------------
# per_task_input_grads


@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("via", VIAS)
def test_per_task_input_grads(via, chunk_rows):
    tasks = _all_kinds()
    case = make_case(41, tasks, batch_shape=(3, 5), features=6, absent=["l1"], empty=["multi"])
    actual = fused_result(case, via=via, chunk_rows=chunk_rows, per_task_input_grads=True)
    expected = reference_result(case, input_grads=True)
    assert actual.input_grads.shape == (len(tasks), 3, 5, 6)
    if via == "functional":
        out = mf.functional.multi_task_loss(
            case.h.clone().requires_grad_(), case.weight.clone().requires_grad_(), case.bias, case.targets, case.tasks,
            per_task_input_grads=True, chunk_rows=chunk_rows,
        )
        assert not out.input_grads.requires_grad  # documented as not differentiable
    assert_close(actual.input_grads, expected.input_grads, what="per-task input grads")
    for name in ("l1", "multi"):
        assert torch.equal(actual.input_grads[case.names.index(name)], torch.zeros(3, 5, 6, dtype=torch.float64))
    # Asking for them changes nothing else.
    assert_results_close(actual, expected)


def test_per_task_input_grads_combine_to_the_input_gradient():
    case = make_case(42, random_tasks(random.Random(42), count=5), batch_shape=(8,), features=3)
    for chunk_rows in (None, 3):
        actual = fused_result(case, chunk_rows=chunk_rows, per_task_input_grads=True)
        combined = torch.einsum("t,t...->...", case.lam, actual.input_grads)
        assert_close(combined, actual.grads["h"], what="Σ λ_t dL_t/dh")


def test_per_task_input_grads_with_logits():
    case = make_case(43, random_tasks(random.Random(43), count=3), batch_shape=(4,), features=3)
    actual = fused_result(case, return_logits=True, per_task_input_grads=True, chunk_rows=2)
    expected = reference_result(case, input_grads=True)
    assert_close(actual.input_grads, expected.input_grads, what="per-task input grads")
    assert_close(actual.logits, linear_logits(case), what="logits")


# ---------------------------------------------------------------------------------------------------------------
# Any differentiable function of the per-task losses


def _uncertainty(log_vars):
    def objective(total, losses, logits):
        return (torch.exp(-log_vars) * losses + log_vars).sum()

    return objective


@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("via", VIAS)
def test_uncertainty_weighting_of_per_task_losses(via, chunk_rows):
    """Σ exp(-s_t) L_t + s_t with learnable s: gradients for h, W, b and s; λ (unused) gets exactly zero."""
    case = make_case(51, random_tasks(random.Random(51), count=5), batch_shape=(9,), features=4)
    s_fused = torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_()
    s_ref = s_fused.detach().clone().requires_grad_()
    actual = fused_result(case, via=via, chunk_rows=chunk_rows, objective=_uncertainty(s_fused), extra={"s": s_fused})
    expected = reference_result(case, _uncertainty(s_ref), extra={"s": s_ref})
    assert_results_close(actual, expected, grads=["h", "weight", "bias", "s"])
    assert torch.equal(actual.grads["lam"], torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("via", VIAS)
def test_total_plus_nonlinear_function_of_losses(via, chunk_rows):
    """Gradient through both outputs: c_t = λ_t + f'(L_t)."""
    case = make_case(52, random_tasks(random.Random(52), count=4), batch_shape=(2, 5), features=3)

    def objective(total, losses, logits):
        return total + (losses**2).sum() + losses[0] * losses[-1]

    actual = fused_result(case, via=via, chunk_rows=chunk_rows, objective=objective)
    assert_results_close(actual, reference_result(case, objective))


# ---------------------------------------------------------------------------------------------------------------
# Task weights


def test_default_task_weights_are_the_tasks_weights():
    tasks = [mf.Classification("a", num_classes=3, weight=0.3), mf.Binary("b", weight=2.5), mf.Regression("c", weight=0.0)]
    case = make_case(61, tasks, lam=False)
    for via in VIAS:
        actual = fused_result(case, via=via)
        expected = reference_result(case)
        assert_results_close(actual, expected, grads=["h", "weight", "bias"])
        manual = (torch.tensor([0.3, 2.5, 0.0], dtype=torch.float64) * actual.losses).sum()
        assert_close(actual.total, manual, what=f"total via {via}")


def test_zero_task_weight_gives_zero_gradient_but_a_loss():
    tasks = [mf.Classification("a", num_classes=3), mf.Binary("b")]
    case = make_case(62, tasks, batch_shape=(5,), features=2)
    case.lam = torch.tensor([0.0, 1.0], dtype=torch.float64)
    actual = fused_result(case, chunk_rows=None)
    assert float(actual.losses[0]) > 0
    assert torch.equal(actual.grads["weight"][:3], torch.zeros(3, 2, dtype=torch.float64))
    assert_results_close(actual, reference_result(case))


# ---------------------------------------------------------------------------------------------------------------
# Lower precision


@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_against_float64_reference(dtype, via, chunk_rows):
    case = make_case(71, _all_kinds(), batch_shape=(4, 6), features=16)
    # The reference sees exactly the values the low-precision run sees.
    case.h, case.weight, case.bias = (t.to(dtype).double() for t in (case.h, case.weight, case.bias))
    actual = fused_result(case, via=via, dtype=dtype, chunk_rows=chunk_rows)
    expected = reference_result(case)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    raw = mf.functional.multi_task_loss(
        case.h.to(dtype), case.weight.to(dtype), case.bias.to(dtype), case.targets, case.tasks, chunk_rows=chunk_rows
    )
    assert raw.losses.dtype == acc and raw.total.dtype == acc
    assert_results_close(actual, expected, dtype)


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_low_precision_gradients_have_the_input_dtype(chunk_rows):
    case = make_case(72, random_tasks(random.Random(72), count=3), batch_shape=(6,), features=4)
    h = case.h.to(torch.bfloat16).requires_grad_()
    w = case.weight.to(torch.bfloat16).requires_grad_()
    b = case.bias.to(torch.bfloat16).requires_grad_()
    out = mf.functional.multi_task_loss(h, w, b, case.targets, case.tasks, chunk_rows=chunk_rows)
    out.total.backward()
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_autocast_bfloat16(chunk_rows):
    case = make_case(73, _all_kinds(), batch_shape=(12,), features=16)
    heads = mf.MultiTaskHeads(16, case.tasks, chunk_rows=chunk_rows)  # float32 parameters
    group = heads.packed["default"]
    with torch.no_grad():
        group.weight.copy_(case.weight)
        group.bias.copy_(case.bias)
    h = case.h.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = heads(h, case.targets)
    assert out.loss.dtype == torch.float32 and out.loss_vector.dtype == torch.float32
    out.loss.backward()
    assert group.weight.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    # The reference on the bf16-rounded operands, in float64.
    case.h, case.weight, case.bias = (t.to(torch.bfloat16).double() for t in (case.h, case.weight, case.bias))
    case.lam = heads.task_weights.double()
    expected = reference_result(case)
    assert_close(out.loss_vector, expected.losses, torch.bfloat16, "losses")
    assert_close(h.grad, expected.grads["h"], torch.bfloat16, "grad h")
    assert_close(group.weight.grad, expected.grads["weight"], torch.bfloat16, "grad weight")
    assert_close(group.bias.grad, expected.grads["bias"], torch.bfloat16, "grad bias")


@pytest.mark.parametrize("chunk_rows, recompute_logits", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_targets_in_any_dtype_and_layout_match_the_kernel_layout(dtype, chunk_rows, recompute_logits):
    """bool / integer / half / double targets, columns of a label matrix, class-major and non-flattenable layouts:
    bitwise the results of the same values given as contiguous arrays of the kernel dtype (the backends convert
    them on their own: one pass for all tasks, Tensor.to where that cannot be done)."""
    given, in_kernel_layout = targets_in_many_forms(14, dtype, "cpu")
    kwargs = dict(dtype=dtype, chunk_rows=chunk_rows, recompute_logits=recompute_logits)
    actual, expected = fused_result(given, **kwargs), fused_result(in_kernel_layout, **kwargs)
    assert torch.isfinite(expected.losses).all()
    assert torch.equal(actual.losses, expected.losses) and torch.equal(actual.total, expected.total)
    for name, grad in expected.grads.items():
        assert torch.equal(actual.grads[name], grad), name


@pytest.mark.cpu_kernel_semantics
def test_out_of_range_class_index_in_a_strided_int32_column_is_reported():
    tasks = [mf.Classification("topic", num_classes=3), mf.Binary("spam")]
    case = make_case(5, tasks, batch_shape=(6,), features=4)
    labels = torch.stack([case.targets["topic"], case.targets["topic"]], dim=1).to(torch.int32)
    labels[4, 0] = 3
    with pytest.raises(IndexError, match="task 'topic'.*class index 3 at row 4"):
        fused_result(replace(case, targets={"topic": labels[:, 0], "spam": case.targets["spam"]}))

