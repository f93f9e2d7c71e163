"""The fused op on CUDA against the float64 CPU oracle. Skipped cleanly where no GPU is present; run on CPU tensors by
the emulated CUDA backend under MTLFAST_TEST_CUDA_EMULATION=1 (tests/test_cuda_emulation.py), except the tests that
need a real device (requires_gpu).

For fp32 / bf16 / fp16 the bar is plain PyTorch: the fused op's error (vs the float64 CPU reference on the same
rounded inputs) must be at most twice the error of the reference loop itself evaluated in the same precision on
the GPU, plus a small epsilon."""

from __future__ import annotations

import random

import pytest
import torch

import mtlfast as mf
from mtl_helpers import (
    CUDA_TEST_DEVICE,
    assert_close,
    assert_results_close,
    fused_result,
    make_case,
    random_tasks,
    reference_result,
    relative_error,
    requires_cuda,
    requires_gpu,
    targets_in_many_forms,
)

pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = CUDA_TEST_DEVICE
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
EPSILON = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}


def _all_kinds():
    return [
        mf.Classification("ce", num_classes=5, label_smoothing=0.1),
        mf.Classification("ce_weighted", num_classes=7, class_weights=[1, 2, 3, 0.5, 1, 1, 2], ignore_index=-1),
        mf.Binary("bin", pos_weight=2.0),
        mf.MultiLabel("multi", num_labels=6, pos_weight=[0.5, 1, 2, 1, 1, 3]),
        mf.Regression("mse", dim=3),
        mf.Regression("l1", loss="l1"),
        mf.Regression("huber", dim=2, loss="huber", delta=0.5),
    ]


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would make plain PyTorch's fp32 reference (and the bar it sets) an fp19 one."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@requires_gpu
def test_backend_reporting():
    expected = "cuda" if mf.HAS_CUDA_KERNELS else "fallback"
    assert mf.backend_for(torch.device("cuda")) == expected
    assert (mf.why_not_fast(torch.device("cuda")) is None) == (expected == "cuda")


@pytest.mark.parametrize("chunk_rows", [None, 7])
@pytest.mark.parametrize("via", ["functional", "heads"])
@pytest.mark.parametrize("seed", range(4))
def test_float64_on_cuda_matches_cpu_reference(seed, via, chunk_rows):
    rng = random.Random(seed)
    case = make_case(
        seed, random_tasks(rng, count=5), batch_shape=rng.choice([(1,), (37,), (3, 5)]), features=rng.choice([1, 8])
    )
    actual = fused_result(case, via=via, device=DEVICE, chunk_rows=chunk_rows)
    assert_results_close(actual, reference_result(case))


@pytest.mark.parametrize("chunk_rows", [None, 64])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_error_at_most_twice_plain_pytorch(dtype, chunk_rows):
    case = make_case(5, _all_kinds(), batch_shape=(16, 33), features=64)
    case.h, case.weight, case.bias = (t.to(dtype).double() for t in (case.h, case.weight, case.bias))
    exact = reference_result(case)  # float64, CPU
    plain = reference_result(case, dtype=dtype, device=DEVICE)  # the per-task loop in `dtype` on the GPU
    fused = fused_result(case, dtype=dtype, device=DEVICE, chunk_rows=chunk_rows)
    pairs = {"losses": (fused.losses, plain.losses, exact.losses), "total": (fused.total, plain.total, exact.total)}
    for name in ("h", "weight", "bias", "lam"):
        pairs[f"grad {name}"] = (fused.grads[name], plain.grads[name], exact.grads[name])
    for what, (ours, theirs, truth) in pairs.items():
        assert torch.isfinite(ours).all(), what
        ours_error, plain_error = relative_error(ours, truth), relative_error(theirs, truth)
        assert ours_error <= 2 * plain_error + EPSILON[dtype], (
            f"{what} ({dtype}): fused error {ours_error:.3g} vs plain PyTorch {plain_error:.3g}"
        )


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_output_dtypes(dtype):
    case = make_case(6, _all_kinds(), batch_shape=(8,), features=16)
    h = case.h.to(DEVICE, dtype).requires_grad_()
    w = case.weight.to(DEVICE, dtype).requires_grad_()
    b = case.bias.to(DEVICE, dtype).requires_grad_()
    targets = {k: v.to(DEVICE) for k, v in case.targets.items()}
    for chunk_rows in (None, 3):
        out = mf.functional.multi_task_loss(h, w, b, targets, case.tasks, chunk_rows=chunk_rows)
        assert out.losses.dtype == torch.float32 and out.losses.device.type == DEVICE
        out.total.backward()
        assert h.grad.dtype == w.grad.dtype == b.grad.dtype == dtype


@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("via", ["functional", "heads"])
def test_per_task_input_grads_on_cuda(via, chunk_rows):
    case = make_case(7, _all_kinds(), batch_shape=(3, 5), features=6, absent=["l1"], empty=["multi"])
    actual = fused_result(case, via=via, device=DEVICE, chunk_rows=chunk_rows, per_task_input_grads=True)
    expected = reference_result(case, input_grads=True)
    assert_close(actual.input_grads, expected.input_grads, what="per-task input grads")
    assert_results_close(actual, expected)


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_zero_valid_and_absent_tasks_on_cuda(chunk_rows):
    tasks = _all_kinds()
    case = make_case(8, tasks, batch_shape=(9,), features=5, empty=["ce", "bin", "huber"], absent=["mse"])
    actual = fused_result(case, device=DEVICE, chunk_rows=chunk_rows)
    for name in ("ce", "bin", "huber", "mse"):
        assert float(actual.losses[case.names.index(name)]) == 0.0, name
    assert_results_close(actual, reference_result(case))


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_return_logits_on_cuda(chunk_rows):
    case = make_case(9, _all_kinds(), batch_shape=(6,), features=5)

    def objective(total, losses, logits):
        return total + 0.2 * logits.square().sum()

    actual = fused_result(case, device=DEVICE, chunk_rows=chunk_rows, return_logits=True, objective=objective)
    assert_close(actual.logits, torch.nn.functional.linear(case.h, case.weight, case.bias), what="logits")
    assert_results_close(actual, reference_result(case, objective))


def _decomposition_edges():
    """Task layouts at the edges of the kernels' work decomposition (csrc/cuda/multi_task_loss_kernels.h)."""
    many = [mf.Binary(f"b{i}", pos_weight=1.0 + i % 3) for i in range(58)]
    many += [mf.Classification("w1024", num_classes=1024, label_smoothing=0.1),  # the widest warp-kernel segment
             mf.Classification("w1025", num_classes=1025, ignore_index=-1),  # the narrowest block-kernel one
             mf.MultiLabel("ml33", num_labels=33), mf.Regression("r3", dim=3, loss="huber", delta=0.3),
             mf.Distillation("kd", 1030, temperature=2.0), mf.Distillation("kp", 6, targets="probs"),
             mf.Classification("c5", num_classes=5), mf.Regression("l1", loss="l1")]
    yield pytest.param(many, (45,), id="66 tasks in two launch groups")
    unaligned = [mf.Binary("a"), mf.Classification("c3", num_classes=3, class_weights=[1.0, 2.0, 0.5]),
                 mf.Classification("wide", num_classes=1027, label_smoothing=0.2),
                 mf.MultiLabel("wide_ml", num_labels=1031, pos_weight=[1.0 + (i % 4) for i in range(1031)]),
                 mf.Distillation("wide_kp", 1029, temperature=1.5, targets="probs")]
    yield pytest.param(unaligned, (2, 17), id="wide segments off the 16-byte grid")
    few = [mf.Classification("c", 5), mf.Binary("b"), mf.Regression("r", dim=2)]
    yield pytest.param(few, (4500,), id="4500 rows in 32 denominator slots")
    # Narrow tasks in one launch group: on small batches the segment pass counts the denominators itself
    # (segment_counts_denominators). Every kind, class weights and probabilities with missing rows.
    narrow = [*_all_kinds(), mf.Distillation("kd", 9, temperature=2.0), mf.Distillation("kp", 4, targets="probs")]
    yield pytest.param(narrow, (3, 7), id="every kind, denominators counted in the loss pass")
    yield pytest.param(narrow, (300,), id="every kind, denominators launched first")


@pytest.mark.parametrize("chunk_rows", [None, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tasks, batch_shape", list(_decomposition_edges()))
def test_decomposition_edges(tasks, batch_shape, dtype, chunk_rows):
    case = make_case(13, tasks, batch_shape=batch_shape, features=6, p_missing=0.2)
    if dtype != torch.float64:  # the reference on the same rounded inputs
        case.h, case.weight, case.bias = (t.to(dtype).double() for t in (case.h, case.weight, case.bias))
    actual = fused_result(case, dtype=dtype, device=DEVICE, chunk_rows=chunk_rows)
    assert_results_close(actual, reference_result(case), dtype)


def test_big_head_auto_chunks_on_cuda(monkeypatch):
    monkeypatch.setattr(mf.functional, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(mf.functional, "MIN_CHUNK_ROWS", 1)
    tasks = [mf.Classification("vocab", num_classes=300, label_smoothing=0.1), mf.Binary("b")]
    case = make_case(10, tasks, batch_shape=(64,), features=16)
    assert_results_close(fused_result(case, device=DEVICE, chunk_rows="auto"), reference_result(case))


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_out_of_range_class_index_gives_nan_for_that_task(chunk_rows):
    tasks = [mf.Classification("topic", num_classes=5), mf.Binary("spam"), mf.Regression("score")]
    case = make_case(11, tasks, batch_shape=(12,), features=4)
    bad = case.targets["topic"].clone()
    bad[3] = 5  # == num_classes: out of range, not ignore_index
    heads = mf.MultiTaskHeads(4, tasks, chunk_rows=chunk_rows, device=DEVICE, dtype=torch.float64)
    h = case.h.to(DEVICE)
    out = heads(h, {**{k: v.to(DEVICE) for k, v in case.targets.items()}, "topic": bad.to(DEVICE)})
    losses = out.loss_vector.cpu()  # synchronises: a device-side assert would surface here
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.isnan(losses[0])
    # The other tasks are unaffected.
    clean = heads(h, {k: v.to(DEVICE) for k, v in case.targets.items() if k != "topic"}).loss_vector.cpu()
    assert torch.isfinite(losses[1:]).all()
    torch.testing.assert_close(losses[1:], clean[1:], rtol=1e-12, atol=1e-12)
    # The device is still usable.
    assert float(torch.ones(2, device=DEVICE).sum()) == 2.0


@pytest.mark.parametrize("used", ["total", "losses", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("N, S", [(37, 9), (600, 45)], ids=["one bias slab", "3 bias slabs, 2 column tiles"])
def test_backward_op_against_its_formula(dtype, used, N, S):
    """multi_task_loss_backward's kernel: dz = g · c[col_task] + (logits' gradient), c = dTotal·λ + dL, then
    dh = dz W, dW = dzᵀ h, db = Σ_rows dz (summed by the scale kernel: in one row slab, or in several plus a
    second pass). Incoming gradients as autograd may pass them: an expanded (stride 0) dL and a transposed logits
    gradient."""
    T, D = 3, 6
    col_task = torch.tensor([0, 0, 1, 2, 2, 2, 2, 1, 0] * (S // 9))
    # Small integers in the tall case: its 600-term fp32 sums would otherwise differ from float64 by more than the
    # fp32 tolerance (made for short sums) through rounding alone.
    draw = torch.randn if N < 100 else lambda *shape: torch.randint(-3, 4, shape).double()
    rounded = [draw(*shape).to(dtype) for shape in ((N, S), (N, D), (S, D), (S, N))]
    g, h, weight, logits_grad_t = rounded
    lam = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    grad_total = torch.tensor(0.75, dtype=torch.float64) if used != "losses" else None
    grad_losses = torch.tensor(1.5, dtype=torch.float64).expand(T) if used != "total" else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    on_device = lambda t, cast=acc: None if t is None else t.to(device=DEVICE, dtype=cast)  # noqa: E731
    grad_h, grad_weight, grad_bias = torch.ops.mtlfast.multi_task_loss_backward(
        on_device(grad_total), on_device(grad_losses), on_device(lam), on_device(logits_grad_t, dtype).t(),
        on_device(g, dtype), on_device(h, dtype), on_device(weight, dtype), col_task.to(DEVICE), True)

    c = torch.zeros(T, dtype=torch.float64)
    c = c + (lam * grad_total if grad_total is not None else 0) + (grad_losses if grad_losses is not None else 0)
    dz = g.double() * c[col_task] + logits_grad_t.double().t()
    assert grad_h.dtype == grad_weight.dtype == grad_bias.dtype == dtype
    assert_close(grad_h, dz @ weight.double(), dtype, "grad_h")
    assert_close(grad_weight, dz.t() @ h.double(), dtype, "grad_weight")
    assert_close(grad_bias, dz.sum(0), dtype, "grad_bias")


@requires_gpu
def test_backward_op_rejects_a_tensor_on_another_device():
    """The kernel reads its inputs through raw pointers: a CPU tensor among CUDA ones is an error, not a crash."""
    S, N, D = 4, 5, 3
    g, h, weight = (torch.randn(shape, device="cuda") for shape in ((N, S), (N, D), (S, D)))
    one, lam = torch.tensor(1.0, device="cuda"), torch.ones(2, device="cuda")
    col_task = torch.tensor([0, 1, 1, 0], device="cuda")
    with pytest.raises(ValueError, match="col_task is on cpu"):
        torch.ops.mtlfast.multi_task_loss_backward(one, None, lam, None, g, h, weight, col_task.cpu(), True)
    with pytest.raises(ValueError, match="grad_losses is on cpu"):
        torch.ops.mtlfast.multi_task_loss_backward(one, lam.cpu(), lam, None, g, h, weight, col_task, True)


def test_backward_op_bad_column_task_gives_nan_not_a_read_out_of_bounds():
    """col_task is built by the Python layer; a wrong entry (a task index ≥ T) must not index the (T,) vectors."""
    S, N, D = 4, 5, 3
    g, h, weight = (torch.randn(shape, dtype=torch.float64, device=DEVICE) for shape in ((N, S), (N, D), (S, D)))
    col_task = torch.tensor([0, 1, 7, 1])
    one, lam = torch.tensor(1.0, dtype=torch.float64, device=DEVICE), torch.ones(2, dtype=torch.float64, device=DEVICE)
    _, grad_weight, grad_bias = torch.ops.mtlfast.multi_task_loss_backward(
        one, None, lam, None, g, h, weight, col_task.to(DEVICE), True)
    bad = col_task >= 2
    assert torch.isnan(grad_weight.cpu()[bad]).all() and torch.isfinite(grad_weight.cpu()[~bad]).all()
    assert torch.isnan(grad_bias.cpu()[bad]).all() and torch.isfinite(grad_bias.cpu()[~bad]).all()


@pytest.mark.parametrize("chunk_rows", [None, 32, "recompute"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_targets_in_any_dtype_and_layout(dtype, chunk_rows):
    """Targets not in the kernel layout (another dtype, strided) give bitwise the results of the same values given
    contiguous in the kernel dtype, whether the glue packs them in one launch, converts them with Tensor.to or (dense
    targets of a half / bfloat16 model in its dtype) lets the kernels read them in place."""
    kwargs = dict(dtype=dtype, device=DEVICE, chunk_rows=None if chunk_rows == "recompute" else chunk_rows,
                  recompute_logits=True if chunk_rows == "recompute" else None)
    given, expected_form = targets_in_many_forms(14, dtype, DEVICE)
    actual, expected = fused_result(given, **kwargs), fused_result(expected_form, **kwargs)
    assert torch.isfinite(expected.losses).all()
    assert torch.equal(actual.losses, expected.losses) and torch.equal(actual.total, expected.total)
    for name, grad in expected.grads.items():
        assert torch.equal(actual.grads[name], grad), name


def _graph_inputs():
    tasks = [mf.Classification("topic", num_classes=5, label_smoothing=0.1), mf.Binary("spam"), mf.Regression("r", dim=2)]
    case = make_case(12, tasks, batch_shape=(32,), features=16)
    return case


@requires_gpu
@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_cuda_graph_capture_and_replay(chunk_rows):
    case = _graph_inputs()
    heads = mf.MultiTaskHeads(16, case.tasks, chunk_rows=chunk_rows, device=DEVICE)
    h = case.h.float().to(DEVICE)
    targets = {k: (v.float() if v.is_floating_point() else v).to(DEVICE) for k, v in case.targets.items()}
    params = list(heads.parameters())

    def step():
        out = heads(h, targets)
        grads = torch.autograd.grad(out.loss, params)
        return out.loss_vector, grads

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up (caches, workspaces) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses, static_grads = step()
    for seed in range(2):  # new data in the static tensors, replay, compare with eager
        gen = torch.Generator().manual_seed(100 + seed)
        h.copy_(torch.randn(h.shape, generator=gen).to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        eager_losses, eager_grads = step()
        torch.testing.assert_close(static_losses, eager_losses, rtol=1e-5, atol=1e-6)
        for a, e in zip(static_grads, eager_grads):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@requires_gpu
def test_compile_reduce_overhead_smoke():
    torch._dynamo.reset()
    case = _graph_inputs()
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 16, device=DEVICE)
    heads = mf.MultiTaskHeads(16, case.tasks, device=DEVICE)
    targets = {k: (v.float() if v.is_floating_point() else v).to(DEVICE) for k, v in case.targets.items()}

    def loss_fn(x, y):
        return heads(torch.relu(encoder(x)), y).loss

    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 16, generator=gen).to(DEVICE)
        expected = loss_fn(x, targets)
        actual = compiled(x, targets)
        torch.testing.assert_close(actual.clone(), expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
