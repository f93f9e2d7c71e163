"""What a small-head training step costs the host, next to what any step through autograd must cost it (CUDA).

On a GPU the small-head configs are host-bound: their kernels take tens of microseconds, the calls that launch them
hundreds. This prints, per config, microseconds per step for

* one kernel launch (``x.add_(1)``) and one allocation, to calibrate the host;
* ``gemm_only`` (the three raw GEMM calls) and ``gemm_autograd`` (the same GEMMs through autograd, as in a training
  step), the two lower bounds of ``bench_op.py``;
* the mtlfast step and its ``MultiTaskHeads`` forward alone;
* S1 only: the best hand-written alternative for 64 binary tasks, one ``nn.Linear`` and one BCE over all columns.

Each is timed "pipelined" (N steps back to back, one sync at the end: the host cost when the GPU keeps up) and
"synced" (a sync after every step, as ``bench_op.py`` measures). Run from the repository root on a GPU machine::

    python -m benchmarks.host_costs --configs S1,S2,S3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import mtlfast as mf
from benchmarks.bench_op import CONFIGS, PROVIDERS, make_problem, synchronizer


def per_step_us(fn: Callable[[], object], steps: int, synced: bool, sync: Callable[[], None]) -> float:
    for _ in range(20):
        fn()
    sync()
    if synced:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e6


def report(name: str, fn: Callable[[], object], steps: int, sync: Callable[[], None]) -> None:
    pipelined, synced = per_step_us(fn, steps, False, sync), per_step_us(fn, steps, True, sync)
    print(f"| {name} | {pipelined:.1f} | {synced:.1f} |", flush=True)


def provider_step(name: str, problem) -> Callable[[], None]:
    step = PROVIDERS[name].build(problem)

    def run() -> None:
        step.zero_grad()
        step.run()

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="S1,S2,S3")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu: a smoke run (there the kernels are host time too)")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype, sync = getattr(torch, args.dtype), synchronizer(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}, {args.dtype}; us per step")
    print("\n| step | pipelined | synced |\n|---|---|---|")
    x = torch.randn(256, 64, device=device, dtype=dtype)
    report("one launch (x.add_(1))", lambda: x.add_(1), args.steps, sync)
    report("one allocation (torch.empty)", lambda: torch.empty(256, 64, device=device, dtype=dtype), args.steps, sync)
    for config in args.configs.split(","):
        problem = make_problem(CONFIGS[config], device, dtype)
        print(f"\n{config}:\n\n| step | pipelined | synced |\n|---|---|---|")
        for name in ("gemm_only", "gemm_autograd", "mtlfast"):
            report(name, provider_step(name, problem), args.steps, sync)
        heads = mf.MultiTaskHeads.from_linear(problem.copy_heads(), problem.tasks)
        h = problem.leaf_h()
        report("MultiTaskHeads forward alone", lambda: heads(h, problem.targets), args.steps, sync)
        if all(isinstance(task, mf.Binary) for task in problem.tasks):
            linear = torch.nn.Linear(h.shape[-1], len(problem.tasks), device=device, dtype=dtype)
            labels = torch.stack([problem.targets[task.name] for task in problem.tasks], dim=-1).to(dtype)

            def one_bce() -> None:
                linear.zero_grad(set_to_none=True)
                h.grad = None
                F.binary_cross_entropy_with_logits(linear(h), labels).backward()

            report("one nn.Linear + one BCE over all columns", one_bce, args.steps, sync)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
