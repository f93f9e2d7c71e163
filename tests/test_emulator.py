"""The CUDA emulation itself (mtlfast._cuda_emulation): it really runs the CUDA kernels for every entry point, their
results do not depend on the order in which it resumes a block's threads, and it catches the synchronisation bugs
it claims to (planted in its self-test kernels). Runs only under MTLFAST_TEST_CUDA_EMULATION=1, i.e. in the
subprocess of tests/test_cuda_emulation.py."""

from __future__ import annotations

import random

import pytest
import torch

import mtlfast as mf
from mtl_helpers import CUDA_EMULATION, fused_result, make_case, op_arg_tuple, op_args, random_tasks

pytestmark = pytest.mark.skipif(not CUDA_EMULATION, reason="runs under MTLFAST_TEST_CUDA_EMULATION=1 (test_cuda_emulation.py)")

if CUDA_EMULATION:
    from mtlfast import _cuda_emulation as emulation


ORDERS = [("forward", 0), ("reverse", 0), ("shuffled", 1), ("shuffled", 2), ("warps_forward", 0), ("warps_reverse", 0)]


@pytest.fixture
def thread_order():
    yield emulation.set_thread_order
    emulation.set_thread_order("forward", 0)


def _launches(fn) -> int:
    before = emulation.launches()
    fn()
    return emulation.launches() - before


def _mixed_case(seed: int, batch_shape=(37,)):
    """Narrow segments (warp kernel) and wide ones (> 1024 columns: block kernel) of every kind."""
    tasks = [
        mf.Classification("ce", num_classes=5, label_smoothing=0.1),
        mf.Classification("vocab", num_classes=1100, label_smoothing=0.05, ignore_index=-1),
        mf.Binary("bin", pos_weight=2.0),
        mf.MultiLabel("wide_tags", num_labels=1030),
        mf.Regression("huber", dim=3, loss="huber", delta=0.5),
        mf.Distillation("kd", 7, temperature=2.0),
        mf.Distillation("kd_wide", 1200, temperature=3.0, targets="probs"),
        mf.Regression("absent", dim=2),
    ]
    return make_case(seed, tasks, batch_shape=batch_shape, features=8, absent=["absent"])


def test_every_entry_point_runs_the_emulated_kernels():
    case = make_case(0, random_tasks(random.Random(0), count=4), batch_shape=(9,), features=5)
    heads = mf.MultiTaskHeads(5, case.tasks, dtype=torch.float64)
    h = case.h.clone().requires_grad_()
    args = op_args(case)
    # Two launches for a small batch of narrow tasks: segment losses (which count the denominators themselves),
    # finalize; one more in the backward (the per-task coefficients applied to the saved logit gradient).
    assert _launches(lambda: heads(h, case.targets).loss.backward()) == 3  # the C++ eager entry point
    assert _launches(lambda: heads(h, case.targets).loss) == 2
    assert _launches(lambda: fused_result(case, via="functional", chunk_rows=None)) == 3
    assert _launches(lambda: torch.ops.mtlfast.multi_task_loss(*op_arg_tuple(args, False))) == 2
    compiled = torch.compile(lambda x: heads(x, case.targets).loss, fullgraph=True)
    assert _launches(lambda: compiled(case.h)) == 2
    # Chunks are rounded up to multiples of 32 rows: 70 rows in chunks of 4 -> 3 chunks, a segment launch each.
    # The recompute path's backward then launches one gradient kernel per block of head columns.
    long_case = make_case(0, case.tasks, batch_shape=(70,), features=5)
    columns = long_case.layout.num_columns
    blocks = -(-columns // mf.ops.recompute_block_columns(70, columns, 4))
    assert blocks > 1
    assert _launches(lambda: fused_result(long_case, via="functional", chunk_rows=4)) == 1 + 3 + 1 + blocks
    assert _launches(lambda: torch.ops.mtlfast.multi_task_loss_chunked(*op_arg_tuple(op_args(long_case), 4))) == 5
    gram = torch.eye(3, dtype=torch.float64)
    assert _launches(lambda: torch.ops.mtlfast.pcgrad_weights(gram, torch.zeros(3, 3, dtype=torch.int64))) == 1
    assert _launches(lambda: torch.ops.mtlfast.min_norm_weights(gram, 5)) == 1



@pytest.mark.parametrize("rows, wide, launches", [(200, False, 2), (3000, False, 3), (200, True, 4)],
                         ids=["small batch: denominators counted in the pass", "larger: denominators first",
                              "a wide head: warp and block kernels"])
def test_loss_pass_launches(rows, wide, launches):
    """multi_task_loss's loss pass on a small batch of narrow heads is the segment pass (which counts the denominators
    itself) and the finalize; on a larger one the denominator launch comes first; a head wider than a warp segment
    adds the block kernel."""
    tasks = [mf.Binary(f"b{i}") for i in range(8)] + [mf.Classification("c", 5, ignore_index=-1)]
    tasks += [mf.Classification("wide", num_classes=1100)] if wide else []
    case = make_case(3, tasks, batch_shape=(rows,), features=4)
    # fp32 targets for an fp32 model: nothing to convert (no target packing launch)
    targets = {name: target.float() if target.is_floating_point() else target for name, target in case.targets.items()}
    args = (case.h.float(), case.weight.float(), case.bias.float(), targets, tasks)
    mf.functional.multi_task_loss(*args, chunk_rows=None)  # warm-up: the layout's tables
    assert _launches(lambda: mf.functional.multi_task_loss(*args, chunk_rows=None)) == launches

def test_targets_outside_the_kernel_layout_are_converted_in_one_launch():
    """70 binary tasks whose labels are bf16 columns of one label matrix, plus a class-index column: one packing
    launch per kernel dtype and group of 64 tasks, not a conversion per task."""
    tasks = [mf.Binary(f"b{i}") for i in range(70)] + [mf.Classification("ce", num_classes=3)]
    heads = mf.MultiTaskHeads(4, tasks, dtype=torch.float32)
    h = torch.randn(6, 4)
    labels = torch.randint(0, 2, (6, 70)).to(torch.bfloat16)
    classes = torch.randint(0, 3, (6, 2))
    targets = {f"b{i}": labels[:, i] for i in range(70)} | {"ce": classes[:, 1]}
    in_kernel_layout = {
        name: y.to(torch.int64 if name == "ce" else torch.float32).contiguous() for name, y in targets.items()
    }
    # Forward: denominators, segment losses, finalize per group of 64 tasks (2 groups).
    assert _launches(lambda: heads(h, in_kernel_layout).loss) == 6
    assert _launches(lambda: heads(h, targets).loss) == 6 + 2 + 1  # bf16 labels: 2 groups; class indices: 1
    torch.testing.assert_close(heads(h, targets).loss_vector, heads(h, in_kernel_layout).loss_vector, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dense_targets_in_the_model_dtype_are_read_in_place(dtype):
    """Binary / regression / distillation targets of a half or bfloat16 model, given contiguous in its dtype: no
    packing launch (the kernels convert them as they read), and the results of the same values given in fp32."""
    tasks = [mf.Binary(f"b{i}") for i in range(6)] + [mf.Regression("r", dim=3), mf.Distillation("kd", 5)]
    tasks += [mf.Classification("ce", num_classes=4)]  # int64 class indices: read in place in every model dtype
    case = make_case(7, tasks, batch_shape=(20,), features=4)
    model_dtype = {name: y.to(dtype) if y.is_floating_point() else y for name, y in case.targets.items()}
    as_fp32 = {name: y.float() if y.is_floating_point() else y for name, y in model_dtype.items()}
    heads = mf.MultiTaskHeads(4, tasks, dtype=dtype)
    h = case.h.to(dtype)
    heads(h, model_dtype).loss  # warm-up: the layout's tables
    in_place = _launches(lambda: heads(h, model_dtype).loss)
    assert in_place == 2  # the segment pass (counting the denominators) and the finalize
    assert _launches(lambda: heads(h, as_fp32).loss) == in_place  # fp32 targets of a half model: read in place too
    assert _launches(lambda: heads(h, {**model_dtype, "b0": model_dtype["b0"].double()}).loss) == in_place + 1
    torch.testing.assert_close(heads(h, model_dtype).loss_vector, heads(h, as_fp32).loss_vector, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_rows", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_results_do_not_depend_on_the_thread_order(thread_order, dtype, chunk_rows):
    """Every reduction runs in a fixed order and every barrier is in place: bitwise the same results whichever
    order the emulator resumes a block's threads in (a missing __syncthreads reads stale shared memory under
    one of them; see test_planted_bugs_are_caught)."""
    case = _mixed_case(1, batch_shape=(70,))
    results = []
    for order, seed in ORDERS:
        thread_order(order, seed)
        results.append(fused_result(case, dtype=dtype, chunk_rows=chunk_rows, return_logits=True))
    first = results[0]
    assert torch.isfinite(first.losses).all()
    for other in results[1:]:
        assert torch.equal(other.losses, first.losses) and torch.equal(other.total, first.total)
        for name, grad in first.grads.items():
            assert torch.equal(other.grads[name], grad), name


def test_planted_bugs_are_caught(thread_order):
    values = [float((7 * i) % 11) - 3.0 for i in range(256)]
    total = sum(values)
    seen_without_barrier = set()
    for order, seed in ORDERS:
        thread_order(order, seed)
        assert emulation.selftest("block_sum", values)[0] == total
        assert set(emulation.selftest("two_sums", values)) == {total}
        seen_without_barrier.add(emulation.selftest("block_sum_without_barrier", values)[0])
        seen_without_barrier.update(emulation.selftest("two_sums_without_trailing_barrier", values))
        with pytest.raises(RuntimeError, match="divergent __syncthreads"):
            emulation.selftest("divergent_barrier", values)
        with pytest.raises(RuntimeError, match="lanes of the warp returned"):
            emulation.selftest("shuffle_after_exit", values)
        with pytest.raises(RuntimeError, match="deadlock.*1 of 32 threads at __syncthreads"):
            emulation.selftest("deadlock", values)
    # A missing barrier before a read (block_sum) or after one (two_sums) gives wrong sums under some order.
    assert seen_without_barrier - {total}
    # Shared memory keeps what the last launch left (as on a GPU): new values, so stale partial sums are wrong ones.
    shifted = [v + 1.0 for v in values]
    thread_order("forward", 0)
    assert emulation.selftest("block_sum_without_barrier", shifted)[0] != sum(shifted)
    thread_order("warps_forward", 0)
    assert set(emulation.selftest("two_sums_without_trailing_barrier", shifted)) != {sum(shifted)}


def test_a_failed_launch_raises_and_leaves_the_emulator_usable():
    with pytest.raises(RuntimeError, match="deadlock"):
        emulation.selftest("deadlock", [0.0] * 256)
    case = _mixed_case(2, batch_shape=(5,))
    assert torch.isfinite(fused_result(case, chunk_rows=None).losses).all()
