"""Command line: ``python -m mtlfast info | bench``."""

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to the benchmark's own parser (argparse.REMAINDER would refuse a
        # leading "--device").
        return subprocess.call([sys.executable, "-m", "benchmarks.bench_op", *argv[1:]])
    parser = argparse.ArgumentParser(prog="mtlfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which backend runs the fused op, and why").set_defaults(run=_info)
    commands.add_parser("bench", help="run the op benchmark (benchmarks/bench_op.py; arguments pass through)")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
