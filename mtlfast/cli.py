"""Command line: ``python -m mtlfast demo | bench | info``."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys

import torch


def _info(_: argparse.Namespace) -> int:
    from mtlfast import __version__, _extension

    print(f"mtlfast {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"extension mtlfast._C: {'loaded' if _extension.HAS_C else 'not loaded'}")
    for key, value in _extension.BUILD_INFO.items():
        print(f"  {key}: {value}")
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        reason = _extension.why_not_fast(device)
        backend = _extension.backend_for(device)
        print(f"{device} ({name}): backend {backend}" + (f" — fast path not taken: {reason}" if reason else ""))
    if not torch.cuda.is_available():
        print("cuda: not available in this torch / on this machine")
    print(f"cpu threads: {torch.get_num_threads()}")
    return 0


def _bench(argv: list[str]) -> int:
    """The op benchmark with the given arguments, then the training-step benchmark on the same device/threads."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("benchmarks")
    if spec is None:  # the suite lives in the repository, not in the wheel
        print("mtlfast bench: the benchmark suite is in the repository's benchmarks/ folder; run this from the root "
              "of a clone (make bench)", file=sys.stderr)
        return 2
    wants_help = "-h" in argv or "--help" in argv
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--device", default="cpu")
    shared.add_argument("--threads")
    shared.add_argument("--plot")
    known, _ = shared.parse_known_args(argv)
    op_args = list(argv)
    if known.plot is None and not wants_help:  # next to the CSVs, wherever this is run from
        results = Path(next(iter(spec.submodule_search_locations))) / "results"
        op_args += ["--plot", str(results / f"op_{torch.device(known.device).type}.png")]
    status = subprocess.call([sys.executable, "-m", "benchmarks.bench_op", *op_args])
    if status != 0 or wants_help:
        return status
    forwarded = ["--device", known.device] + (["--threads", known.threads] if known.threads else [])
    return subprocess.call([sys.executable, "-m", "benchmarks.bench_train", *forwarded])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "demo" / "bench" belongs to that command's own parser (argparse.REMAINDER would refuse a
    # leading "--device").
    if argv[:1] == ["demo"]:
        from mtlfast import demo

        return demo.main(argv[1:])
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="mtlfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which backend runs the fused op, and why").set_defaults(run=_info)
    commands.add_parser("demo", help="train fused vs plain-PyTorch multi-task models; metrics, speedup, plot "
                        "(mtlfast/demo.py; --help for options)")
    commands.add_parser("bench", help="run the benchmark suite: op level (benchmarks/bench_op.py, arguments pass "
                        "through) then training-step level (benchmarks/bench_train.py)")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
