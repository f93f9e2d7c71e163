"""Standalone GPU self-check of the CUDA kernels of torch.ops.mtlfast.multi_task_loss(_chunked / _recompute).

Builds nothing. Loads the ops from ``--lib path/to/_C*.so`` (``torch.ops.load_library``) or, without it, by
importing ``mtlfast``. Then, for random task mixes in fp32 / bf16 / fp16:

* ``e2e``: the CUDA op against a float64 reference on the CPU (the CPU op in float64 when it is registered, and a
  plain ``torch.nn.functional`` reference in any case): losses, grad_logits, and the chunked op's per-task input
  gradients, weight and bias gradients;
* ``kernel``: the loss kernels alone: the CUDA op's own logits (``return_logits``) fed to the float64 reference,
  so GEMM rounding drops out and the tolerance can be tight;
* determinism (two calls give bitwise equal outputs), CUDA-graph capture and replay, T > 64 tasks (several launch
  groups), and an out-of-range class index (that task's loss NaN, its row's gradient 0, other tasks untouched).

Finally it times the op against the plain GEMM on the benchmark shapes (S1, S2, S3, S5 of DESIGN.md §6), and for the
small-head configs ("+bw" rows) the op's forward and backward against the three GEMMs of a linear layer's step: "ms"
columns are eager back-to-back calls (host overhead included where the call is host-bound), "graph" columns the
same call replayed from a CUDA graph (GPU time only), "+peak MiB" the memory one op call allocates at its peak.
``--profile`` prints per-kernel GPU times instead.

    python benchmarks/cuda_selfcheck.py --lib build/dev/_C.cpython-311-x86_64-linux-gnu.so
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NONE, CE, BCE, MSE, L1, HUBER = 0, 1, 2, 3, 4, 5
KIND_NAMES = {NONE: "none", CE: "ce", BCE: "bce", MSE: "mse", L1: "l1", HUBER: "huber"}

# Normalised max error bounds: max|actual - expected| / max(max|expected|, 1e-6 floor).
E2E_TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
KERNEL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------------------------------------------
# Problems


@dataclass
class Task:
    kind: int
    width: int
    ignore_index: int = -100
    param: float = 0.0  # label smoothing (CE) / delta (Huber)
    col_weight: list[float] | None = None  # class weights (CE) / pos_weight (BCE)
    ignored_fraction: float = 0.0  # CE: rows set to ignore_index
    nan_fraction: float = 0.0  # dense kinds: NaN (missing) targets


@dataclass
class Problem:
    name: str
    h: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: list[torch.Tensor]
    col_weight: torch.Tensor | None
    col_task: torch.Tensor
    kinds: list[int]
    col_offsets: list[int]
    ignore_index: list[int]
    params: list[float]
    names: list[str] = field(default_factory=list)

    def args(self, device=None, dtype=None):
        """The op's positional arguments (targets and col_weight in the accumulation dtype of `dtype`)."""
        dtype = dtype or self.h.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def move(t, to_dtype=None):
            return None if t is None else t.to(device=device or t.device, dtype=to_dtype or t.dtype)

        targets = [move(y, None if y.dtype == torch.int64 else acc) for y in self.targets]
        # Targets here are (N,) class indices and (N, C) dense arrays, so every dense task has a class dim.
        class_dims = [0 if kind == CE else 1 for kind in self.kinds]
        task_weights = torch.ones(len(self.kinds), dtype=acc, device=device or self.h.device)
        return (move(self.h, dtype), move(self.weight, dtype), move(self.bias, dtype), targets, task_weights,
                move(self.col_weight, acc), move(self.col_task), self.kinds, self.col_offsets, class_dims,
                self.ignore_index, self.params, self.names)


def make_problem(name: str, tasks: list[Task], n: int, d: int, bias: bool, seed: int, dtype=torch.float32,
                 device="cpu", logit_scale: float = 3.0) -> Problem:
    """Random inputs whose logits have a spread of about `logit_scale`; tensors are rounded to `dtype` once so
    every implementation sees the same values (targets and col_weight hold float32 values, so the float32 copies
    the op gets are exact)."""
    g = torch.Generator().manual_seed(seed)
    widths = [t.width for t in tasks]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    s = offsets[-1]
    h = torch.randn(n, d, generator=g)
    weight = torch.randn(s, d, generator=g) * (logit_scale / math.sqrt(d))
    b = torch.randn(s, generator=g) * 0.5 if bias else None
    targets = []
    col_weight = torch.ones(s, dtype=torch.float64)
    any_weight = False
    for t, task in enumerate(tasks):
        lo, hi = offsets[t], offsets[t + 1]
        if task.col_weight is not None:
            col_weight[lo:hi] = torch.tensor(task.col_weight, dtype=torch.float32).double()
            any_weight = True
        if task.kind == NONE:
            targets.append(torch.empty(0))
        elif task.kind == CE:
            y = torch.randint(0, task.width, (n,), generator=g)
            y[torch.rand(n, generator=g) < task.ignored_fraction] = task.ignore_index
            targets.append(y)
        else:
            if task.kind == BCE:
                y = (torch.rand(n, task.width, generator=g) < 0.3).double()
            else:
                y = (torch.randn(n, task.width, generator=g) * 2).double()
            y[torch.rand(n, task.width, generator=g) < task.nan_fraction] = float("nan")
            targets.append(y)
    col_task = torch.repeat_interleave(torch.arange(len(tasks)), torch.tensor(widths))
    return Problem(
        name=name,
        h=h.to(dtype).to(device),
        weight=weight.to(dtype).to(device),
        bias=None if b is None else b.to(dtype).to(device),
        targets=[y.to(device) for y in targets],
        col_weight=col_weight.to(device) if any_weight else None,
        col_task=col_task.to(device),
        kinds=[t.kind for t in tasks],
        col_offsets=offsets,
        ignore_index=[t.ignore_index for t in tasks],
        params=[t.param for t in tasks],
        names=[f"{KIND_NAMES[t.kind]}{i}" for i, t in enumerate(tasks)],
    )


def random_small_task(g: torch.Generator) -> Task:
    r = lambda: torch.rand((), generator=g).item()  # noqa: E731
    kind = [CE, BCE, MSE, L1, HUBER, NONE][int(torch.randint(0, 6, (), generator=g))]
    if kind == CE:
        c = [2, 3, 5, 7, 33, 100][int(torch.randint(0, 6, (), generator=g))]
        return Task(CE, c, ignore_index=[-100, -1, 1][int(torch.randint(0, 3, (), generator=g))],
                    param=[0.0, 0.1, 0.4][int(torch.randint(0, 3, (), generator=g))],
                    col_weight=[0.2 + 1.8 * r() for _ in range(c)] if r() < 0.5 else None, ignored_fraction=0.2)
    if kind == BCE:
        c = [1, 3, 6, 40][int(torch.randint(0, 4, (), generator=g))]
        return Task(BCE, c, col_weight=[0.3 + 2.7 * r() for _ in range(c)] if r() < 0.5 else None, nan_fraction=0.2)
    if kind == NONE:
        return Task(NONE, [1, 4][int(torch.randint(0, 2, (), generator=g))])
    return Task(kind, [1, 3, 8][int(torch.randint(0, 3, (), generator=g))], param=0.3 + 1.7 * r(), nan_fraction=0.2)


def correctness_problems(dtype, device) -> list[Problem]:
    g = torch.Generator().manual_seed(0)
    mixed = [random_small_task(g) for _ in range(16)]
    mixed += [Task(CE, 5, ignored_fraction=1.0), Task(BCE, 3, nan_fraction=1.0)]  # no valid entry: loss 0
    many = [random_small_task(g) for _ in range(70)]  # two launch groups
    wide = [  # block-per-row kernel, odd offsets (vector head / tail paths)
        Task(MSE, 3, nan_fraction=0.1),
        Task(CE, 3001, param=0.1, col_weight=[0.5 + (i % 7) / 5 for i in range(3001)], ignored_fraction=0.1),
        Task(BCE, 1500, col_weight=[0.5 + (i % 5) / 3 for i in range(1500)], nan_fraction=0.3),
        Task(CE, 1025, ignore_index=3),
        Task(HUBER, 1100, param=0.7, nan_fraction=0.1),
        Task(NONE, 2000),
        Task(CE, 5, param=0.2),
    ]
    binary = [Task(BCE, 1, col_weight=[0.5 + i / 32], nan_fraction=0.1) for i in range(64)]
    ce5 = [Task(CE, 5, param=0.1 * (i % 3), col_weight=[1.0, 2.0, 0.5, 1.5, 1.0] if i % 2 else None,
                ignored_fraction=0.1) for i in range(32)]
    return [
        make_problem("binary64", binary, 256, 64, True, 1, dtype, device),
        make_problem("ce5x32", ce5, 203, 48, True, 2, dtype, device),
        make_problem("mixed18", mixed, 203, 40, True, 3, dtype, device),
        make_problem("many70", many, 97, 32, False, 4, dtype, device),
        make_problem("wide", wide, 75, 64, True, 5, dtype, device),
    ]


# ---------------------------------------------------------------------------------------------------------------
# float64 reference (torch.nn.functional; mean over valid entries, 0 and zero gradient when none)


def reference_from_logits(p: Problem, logits: torch.Tensor):
    """Per-task losses and dL_t/dz (N, S) in float64 on the CPU."""
    z = logits.detach().to("cpu", torch.float64).requires_grad_(True)
    cw = None if p.col_weight is None else p.col_weight.to("cpu", torch.float64)
    losses = []
    for t, kind in enumerate(p.kinds):
        lo, hi = p.col_offsets[t], p.col_offsets[t + 1]
        seg = z[:, lo:hi]
        if kind == NONE:
            losses.append(seg.sum() * 0)
            continue
        y = p.targets[t].to("cpu")
        if kind == CE:
            w = None if cw is None else cw[lo:hi]
            valid = y != p.ignore_index[t]
            denom = valid.sum() if w is None else w[y[valid]].sum()
            if denom == 0:
                losses.append(seg.sum() * 0)
                continue
            losses.append(F.cross_entropy(seg, y, weight=w, ignore_index=p.ignore_index[t],
                                          label_smoothing=p.params[t]))
            continue
        y = y.to(torch.float64)
        mask = ~torch.isnan(y)
        y0 = torch.where(mask, y, torch.zeros_like(y))
        if kind == BCE:
            pw = None if cw is None else cw[lo:hi]
            per = F.binary_cross_entropy_with_logits(seg, y0, pos_weight=pw, reduction="none")
        elif kind == MSE:
            per = F.mse_loss(seg, y0, reduction="none")
        elif kind == L1:
            per = F.l1_loss(seg, y0, reduction="none")
        else:
            per = F.huber_loss(seg, y0, reduction="none", delta=p.params[t])
        count = mask.sum()
        losses.append((per * mask).sum() / count if count > 0 else seg.sum() * 0)
    losses = torch.stack(losses)
    (grad,) = torch.autograd.grad(losses.sum(), z)  # segments are disjoint: the sum separates per task
    return losses.detach(), grad


def reference_chunked(p: Problem, grad_logits: torch.Tensor):
    h = p.h.to("cpu", torch.float64)
    w = p.weight.to("cpu", torch.float64)
    per_task = torch.stack([grad_logits[:, lo:hi] @ w[lo:hi] for lo, hi in zip(p.col_offsets, p.col_offsets[1:])])
    return per_task, grad_logits.t() @ h, grad_logits.sum(0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return float("inf")
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("inf")
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-6)).item() if e.numel() else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Checks


class Report:
    def __init__(self):
        self.rows = []
        self.failures = 0

    def add(self, problem: str, dtype, check: str, err: float, tol: float, note: str = ""):
        ok = err <= tol
        self.failures += not ok
        self.rows.append((problem, str(dtype).replace("torch.", ""), check, err, tol, "ok" if ok else "FAIL", note))

    def flag(self, problem: str, dtype, check: str, ok: bool, note: str = ""):
        self.add(problem, dtype, check, 0.0 if ok else float("inf"), 0.0, note)

    def print(self):
        print(f"{'problem':10s} {'dtype':9s} {'check':34s} {'max rel err':>12s} {'tol':>8s}  result")
        for problem, dtype, check, err, tol, result, note in self.rows:
            print(f"{problem:10s} {dtype:9s} {check:34s} {err:12.2e} {tol:8.0e}  {result} {note}")


def loss_op(*args):
    """torch.ops.mtlfast.multi_task_loss without its first output (the total): (losses, grad_logits, logits)."""
    return torch.ops.mtlfast.multi_task_loss(*args)[1:]


def chunked_op(*args):
    """torch.ops.mtlfast.multi_task_loss_chunked without the total: (losses, grad_h_per_task, grad_w, grad_b)."""
    return torch.ops.mtlfast.multi_task_loss_chunked(*args)[1:]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mtlfast::{op}", key)


def check_problem(p: Problem, dtype, report: Report, cpu_op: bool, chunk_rows: int):
    ops = torch.ops.mtlfast
    args = p.args()
    losses, grad, logits = loss_op(*args, True)
    losses2, grad2, _ = loss_op(*args, False)  # second call, gradient written over the logits
    same = torch.equal(losses.nan_to_num(), losses2.nan_to_num()) and torch.equal(grad, grad2)
    report.flag(p.name, dtype, "2 calls bitwise equal (2nd in place)", same)

    # Kernel only: the op's own logits through the float64 reference.
    ref_losses, ref_grad = reference_from_logits(p, logits)
    report.add(p.name, dtype, "kernel losses", rel_err(losses, ref_losses), KERNEL_TOL[dtype])
    report.add(p.name, dtype, "kernel grad_logits", rel_err(grad, ref_grad), KERNEL_TOL[dtype])

    # End to end: float64 logits from the (dtype-rounded) inputs.
    h64, w64 = p.h.to("cpu", torch.float64), p.weight.to("cpu", torch.float64)
    logits64 = h64 @ w64.t() + (0 if p.bias is None else p.bias.to("cpu", torch.float64))
    e_losses, e_grad = reference_from_logits(p, logits64)
    report.add(p.name, dtype, "e2e losses vs F reference", rel_err(losses, e_losses), E2E_TOL[dtype])
    report.add(p.name, dtype, "e2e grad_logits vs F reference", rel_err(grad, e_grad), E2E_TOL[dtype])
    if cpu_op:
        c_losses, c_grad, _ = loss_op(*p.args("cpu", torch.float64), False)
        report.add(p.name, dtype, "e2e losses vs CPU op (f64)", rel_err(losses, c_losses), E2E_TOL[dtype])
        report.add(p.name, dtype, "e2e grad_logits vs CPU op (f64)", rel_err(grad, c_grad), E2E_TOL[dtype])

    # Chunked op (chunks not a divisor of N, rounded up to a multiple of 32 inside).
    ch_losses, ch_dh, ch_dw, ch_db = chunked_op(*args, chunk_rows)
    r_dh, r_dw, r_db = reference_chunked(p, e_grad)
    report.add(p.name, dtype, f"chunked({chunk_rows}) losses", rel_err(ch_losses, e_losses), E2E_TOL[dtype])
    report.add(p.name, dtype, f"chunked({chunk_rows}) grad_h_per_task", rel_err(ch_dh, r_dh), E2E_TOL[dtype])
    report.add(p.name, dtype, f"chunked({chunk_rows}) grad_weight", rel_err(ch_dw, r_dw), E2E_TOL[dtype])
    if p.bias is not None:
        report.add(p.name, dtype, f"chunked({chunk_rows}) grad_bias", rel_err(ch_db, r_db), E2E_TOL[dtype])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    report.flag(p.name, dtype, "chunked output dtypes", all(t.dtype == acc for t in (ch_losses, ch_dh, ch_dw)))
    if cpu_op and has_kernel("multi_task_loss_chunked", "CPU"):
        c = chunked_op(*p.args("cpu", torch.float64), chunk_rows)
        report.add(p.name, dtype, "chunked grad_weight vs CPU op", rel_err(ch_dw, c[2]), E2E_TOL[dtype])

    # Recompute op: losses from the forward, then the backward (grad_total = 1, so c = λ = 1) with blocks of head
    # columns that cut through wide tasks, against the float64 reference's gradients.
    _, rc_losses, row_stats, inverse_denominators = ops.multi_task_loss_recompute(*args, chunk_rows)
    report.add(p.name, dtype, f"recompute({chunk_rows}) losses", rel_err(rc_losses, e_losses), E2E_TOL[dtype])
    h, weight, bias, targets, task_weights, col_weight, col_task, kinds, offsets, class_dims, ignore, params, names = args
    rc_dh, rc_dw, rc_db = ops.multi_task_loss_recompute_backward(
        torch.ones((), dtype=acc, device=h.device), None, task_weights, h, weight, bias, targets, col_weight,
        col_task, row_stats, inverse_denominators, kinds, offsets, class_dims, ignore, params, names, 37)
    report.add(p.name, dtype, "recompute grad_h", rel_err(rc_dh, e_grad @ w64), E2E_TOL[dtype])
    report.add(p.name, dtype, "recompute grad_weight", rel_err(rc_dw, e_grad.t() @ h64), E2E_TOL[dtype])
    if p.bias is not None:
        report.add(p.name, dtype, "recompute grad_bias", rel_err(rc_db, e_grad.sum(0)), E2E_TOL[dtype])
    report.flag(p.name, dtype, "recompute gradient dtypes", all(t.dtype == dtype for t in (rc_dh, rc_dw)))


def check_invalid_target(dtype, report: Report):
    tasks = [Task(CE, 7), Task(BCE, 2), Task(CE, 2000)]
    p = make_problem("invalid", tasks, 64, 32, True, 9, dtype, "cuda")
    p.targets[0][5] = 7  # out of range (C = 7)
    p.targets[2][9] = -3
    losses, grad, logits = loss_op(*p.args(), True)
    ok = bool(torch.isnan(losses[0]) and torch.isnan(losses[2]) and torch.isfinite(losses[1]))
    ok &= bool((grad[5, 0:7] == 0).all() and (grad[9, 9:2009] == 0).all())
    p.targets[0][5] = p.ignore_index[0]  # the other rows must match an ignored row
    p.targets[2][9] = p.ignore_index[2]
    ref_losses, ref_grad = reference_from_logits(p, logits)
    ok &= rel_err(losses[1:2], ref_losses[1:2]) <= KERNEL_TOL[dtype]
    report.flag("invalid", dtype, "out-of-range class -> NaN, zero row", ok)


def check_graph_capture(p: Problem, dtype, report: Report):
    ops = torch.ops.mtlfast
    args = p.args()
    eager = loss_op(*args, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            loss_op(*args, False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = loss_op(*args, False)
    graph.replay()
    torch.cuda.synchronize()
    report.flag(p.name, dtype, "CUDA graph capture + replay",
                torch.equal(eager[0].nan_to_num(), captured[0].nan_to_num()) and torch.equal(eager[1], captured[1]))


# ---------------------------------------------------------------------------------------------------------------
# Timing


def time_ms(fn, warmup: int = 10, repeats: int = 30, inner: int = 10) -> float:
    """Median over `repeats` of the mean time of `inner` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def graph_ms(fn) -> float:
    """GPU time per call without host overhead: `fn` captured in a CUDA graph, replays timed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay)


def s3_task(i: int) -> Task:
    """S3's mix: a third each of CE (3..20 classes, some label smoothing), BCE (1 or 4 labels), MSE (1 or 2)."""
    if i % 3 == 0:
        return Task(CE, [3, 5, 10, 20][i % 4], param=0.1 if i % 2 else 0.0, ignored_fraction=0.05)
    if i % 3 == 1:
        return Task(BCE, [1, 4][i % 2], nan_fraction=0.1)
    return Task(MSE, [1, 2][i % 2], nan_fraction=0.1)


def fused_step_and_gemms(p: Problem, args):
    """The small-head op's forward + backward as raw op calls (the backward as autograd runs it for loss.backward():
    grad_total = 1, no loss or logits gradient), and the three GEMMs of a plain linear layer's step, its lower bound."""
    ops = torch.ops.mtlfast
    h, w, b, task_weights, col_task = p.h, p.weight, p.bias, args[4], args[6]
    one = torch.ones((), dtype=task_weights.dtype, device=h.device)
    dz = torch.randn(h.shape[0], w.shape[0], device=h.device).to(h.dtype)

    def step():
        grad_logits = loss_op(*args, False)[1]
        return ops.multi_task_loss_backward(one, None, task_weights, None, grad_logits, h, w, col_task, b is not None)

    def gemms():
        return (torch.addmm(b, h, w.t()) if b is not None else h @ w.t()), dz @ w, dz.t() @ h

    return step, gemms


def bench_configs(dtype):
    """(name, problem, op, baseline, baseline label) for S1, S2, S3 and S5 (chunked) of DESIGN.md §6."""
    s3 = [s3_task(i) for i in range(16)]
    problems = [
        (make_problem("S1", [Task(BCE, 1) for _ in range(64)], 256, 512, True, 11, dtype, "cuda"), None),
        (make_problem("S2", [Task(CE, 5) for _ in range(32)], 1024, 768, True, 12, dtype, "cuda"), None),
        (make_problem("S3", s3, 4096, 256, True, 13, dtype, "cuda"), None),
        (make_problem("S5", [Task(CE, 32000), Task(CE, 5), Task(BCE, 1)], 4096, 1024, False, 14, dtype, "cuda",
                      logit_scale=1.0), 1024),
    ]
    ops = torch.ops.mtlfast
    configs = []
    for p, chunk_rows in problems:
        args = p.args()
        h, w, b = p.h, p.weight, p.bias
        if chunk_rows is None:
            def op(args=args):
                return loss_op(*args, False)

            def gemm(h=h, w=w, b=b):
                return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()

            configs.append((p.name, p, op, gemm, "logits GEMM"))
            configs.append((f"{p.name}+bw", p, *fused_step_and_gemms(p, args), "3 GEMMs (logits, dh, dW)"))
        else:
            z = h @ w.t()

            def op(args=args, chunk_rows=chunk_rows):
                return chunked_op(*args, chunk_rows)

            def gemm(h=h, w=w, z=z):  # the three GEMMs of the chunked op: logits, dW = dzᵀ h, dh = dz W
                return h @ w.t(), z.t() @ h, z @ w

            configs.append((p.name, p, op, gemm, "3 GEMMs (logits, dW, dh)"))
    return configs


def benchmark(dtype):
    rows = []
    for name, p, op, gemm, label in bench_configs(dtype):
        t_op, t_gemm = time_ms(op), time_ms(gemm)
        g_op, g_gemm = graph_ms(op), graph_ms(gemm)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        op()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - before) / 2**20
        shape = f"N={p.h.shape[0]} D={p.h.shape[1]} T={len(p.kinds)} S={p.weight.shape[0]}"
        rows.append((name, shape, str(dtype).replace("torch.", ""), t_op, t_gemm, g_op, g_gemm, label, extra))
    return rows


def profile(dtype):
    """Per-kernel GPU time of each config (torch.profiler), to see where the time beyond the GEMMs goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, p, op, _, _ in bench_configs(dtype):
        for _ in range(5):
            op()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                op()
            torch.cuda.synchronize()
        print(f"== {name} {str(dtype).replace('torch.', '')}: 10 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


# ---------------------------------------------------------------------------------------------------------------


def load_ops(lib: str | None):
    if lib:
        torch.ops.load_library(lib)
    else:
        try:
            import mtlfast  # noqa: F401  (loads mtlfast._C, which registers the ops)
        except ImportError as e:
            sys.exit(f"cannot import mtlfast ({e}); pass --lib path/to/_C*.so")
    if not has_kernel("multi_task_loss", "CUDA"):
        sys.exit("torch.ops.mtlfast.multi_task_loss has no CUDA kernel (built without CUDA?)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", help="path of the built extension (_C*.so); default: import mtlfast")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="any of these and float64")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--bench-only", action="store_true")
    parser.add_argument("--profile", action="store_true", help="only print per-kernel profiles of the configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    load_ops(args.lib)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; CPU kernel registered: "
          f"{has_kernel('multi_task_loss', 'CPU')}")

    if args.profile:
        for dtype in dtypes:
            profile(dtype)
        return

    failures = 0
    if not args.bench_only:
        report = Report()
        cpu_op = has_kernel("multi_task_loss", "CPU")
        for dtype in dtypes:
            problems = correctness_problems(dtype, "cuda")
            for p in problems:
                check_problem(p, dtype, report, cpu_op, chunk_rows=50)
            check_invalid_target(dtype, report)
            check_graph_capture(problems[2], dtype, report)
        report.print()
        failures = report.failures
        print(f"\n{failures} check(s) failed\n")

    if not args.no_bench:
        print(f"{'config':6s} {'shape':30s} {'dtype':9s} {'op ms':>8s} {'GEMM ms':>8s} {'ratio':>6s} "
              f"{'op graph':>9s} {'GEMM graph':>10s} {'+peak MiB':>9s}  baseline")
        for dtype in dtypes:
            for name, shape, dt, t_op, t_gemm, g_op, g_gemm, label, peak in benchmark(dtype):
                print(f"{name:6s} {shape:30s} {dt:9s} {t_op:8.3f} {t_gemm:8.3f} {t_op / t_gemm:6.2f} "
                      f"{g_op:9.3f} {g_gemm:10.3f} {peak:9.1f}  {label}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
