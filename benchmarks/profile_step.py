"""Where one forward+backward step of a benchmark config spends its time and its memory (CUDA; time also on CPU).

``bench_op.py`` says how fast a provider is; this says why. For each config and provider it prints

* **time**: wall time per step, GPU kernel time per step (summed over kernels, so overlap is not subtracted),
  kernel launches per step, the kernels that take the most GPU time, and the host-side ops (ATen calls, launches,
  autograd nodes) that take the most CPU self time (``torch.profiler``, after warm-up);
* **memory**: the peak extra memory of one step (as ``bench_op`` measures it) and the allocations alive at that
  peak, largest first, each named by the innermost frames of the code that made it
  (``torch.cuda.memory._record_memory_history``).

Run from the repository root on a GPU machine::

    python -m benchmarks.profile_step --configs S1,S5 --providers mtlfast,gemm_only --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines on stderr

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.bench_op import CONFIGS, PROVIDERS, Step, _stderr_silenced, make_problem, synchronizer  # noqa: E402


def time_profile(step: Step, device: torch.device, steps: int, top: int) -> None:
    sync = synchronizer(device)
    for _ in range(5):
        step.zero_grad()
        step.run()
    sync()
    walls = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _stderr_silenced(), profile(activities=activities) as prof:
        for _ in range(steps):
            step.zero_grad()
            sync()
            start = time.perf_counter()
            step.run()
            sync()
            walls.append((time.perf_counter() - start) * 1e3)
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name].append(event.device_time)
    gpu_us = sum(sum(times) for times in kernels.values()) / steps
    launches = sum(len(times) for times in kernels.values()) / steps
    gpu = f"; GPU ops {gpu_us / 1e3:.3f} ms/step, {launches:.1f} kernels + copies + memsets/step" if kernels else ""
    print(f"  wall {statistics.median(walls):.3f} ms/step (median of {steps}, under the profiler){gpu}")
    ranked = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
    for name, times in ranked:
        print(f"    {sum(times) / steps:9.1f} us  x{len(times) / steps:5.1f}  {name[:110]}")
    # The host side: where a host-bound step's wall time goes (self time, so nested calls are not counted twice).
    host_ops = sorted(prof.key_averages(), key=lambda op: -op.self_cpu_time_total)
    print(f"  host: {sum(op.self_cpu_time_total for op in host_ops) / steps / 1e3:.3f} ms/step of self"
          f" CPU time in profiled ops; the largest:")
    for op in host_ops[:top]:
        print(f"    {op.self_cpu_time_total / steps:9.1f} us  x{op.count / steps:5.1f}  {op.key[:110]}")


# Frames of the allocator and of the recorder itself, matched at the start of the name (or the file): a substring
# match on "c10::" also dropped ATen kernels templated on c10 types, such as the
# at::native::gpu_reduce_kernel<c10::BFloat16, ...> that allocated S5's 32 MiB staging buffer.
_ALLOCATOR_NAME_PREFIXES = ("c10::", "torch::unwind", "torch::CapturedTraceback", "torch::cuda::(anonymous namespace)::")
_RECORDER_FILES = ("memory.py",)


def _is_allocator_frame(frame: dict) -> bool:
    return (frame["name"].startswith(_ALLOCATOR_NAME_PREFIXES) or "CachingAllocator" in frame["name"]
            or frame["filename"].rsplit("/", 1)[-1] in _RECORDER_FILES)


def _frame_label(frames: Sequence[dict], depth: int) -> str:
    """The innermost frames that are not the allocator's or the profiler's own."""
    useful = [f for f in frames if f["name"] != "??" and not _is_allocator_frame(f)]
    picked = useful[:depth]
    return " < ".join(f"{f['name'][:60]}@{f['filename'].rsplit('/', 1)[-1]}:{f['line']}" for f in picked)


def memory_profile(step: Step, device: torch.device, top: int, depth: int) -> None:
    step.zero_grad()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="all")
    try:
        step.run()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    trace = snapshot["device_traces"][device.index or 0]
    live: dict[int, dict] = {}
    running = peak = 0
    at_peak: list[dict] = []
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            running += event["size"]
            if running > peak:
                peak, at_peak = running, list(live.values())
        elif event["action"] == "free_requested" and event["addr"] in live:
            running -= live.pop(event["addr"])["size"]
    print(f"  peak extra {peak_mib:.1f} MiB (allocator); {peak / 2**20:.1f} MiB allocated during the step at its"
          f" peak, by allocation:")
    for event in sorted(at_peak, key=lambda e: -e["size"])[:top]:
        print(f"    {event['size'] / 2**20:8.2f} MiB  {_frame_label(event.get('frames', []), depth)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="S1,S5")
    parser.add_argument("--providers", default="mtlfast,gemm_only,gemm_autograd")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--depth", type=int, default=4, help="frames named per allocation")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu: the time part only (no GPU kernels, no memory snapshot)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    for config_name in args.configs.split(","):
        problem = make_problem(CONFIGS[config_name], device, dtype)
        for provider_name in args.providers.split(","):
            provider = PROVIDERS[provider_name]
            if not provider.applies(problem.config, device):
                continue
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            print(f"== {config_name} {provider_name} ({args.dtype}, {where})")
            step = provider.build(problem)
            time_profile(step, device, args.steps, args.top)
            if not args.no_memory and device.type == "cuda":
                memory_profile(step, device, args.top, args.depth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
