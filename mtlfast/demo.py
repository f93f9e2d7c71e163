"""``python -m mtlfast demo``: train multi-task models with fused heads and compare them with the same models written
in plain PyTorch — per-task test metrics (quality parity) and training step time (the speedup), on a dataset that
needs no download.

For every model kind and seed, the mtlfast model and its plain twin (:func:`mtlfast.models.plain.plain_twin`: the same
weights, ``nn.Linear`` heads, a Python loop of losses; gradient methods by one backward pass per task, the LibMTL
way) are trained by :func:`mtlfast.fit` on the same batches in the same order, then scored on the test split.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import mtlfast as mf
from mtlfast.data import MultiTaskDataset
from mtlfast.models.plain import plain_twin
from mtlfast.training import evaluate

WEIGHTINGS = {
    "ew": "EqualWeighting", "uncertainty": "UncertaintyWeighting", "dwa": "DWA", "rlw": "RLW", "gls": "GLS",
    "pcgrad": "PCGrad", "mgda_ub": "MGDAUB", "cagrad": "CAGrad", "imtl_g": "IMTLG", "gradnorm": "GradNorm",
    "nash_mtl": "NashMTL",
}
MODELS = ("hard", "mmoe")
SYNTHETIC_KINDS = ("regression", "binary", "classification")


@dataclass
class Run:
    """One training run: which model, implementation and seed, its test metrics and its step time."""

    model: str
    implementation: str  # "mtlfast" | "plain"
    seed: int
    test_metrics: dict[str, dict[str, float]]
    step_ms: float
    """Median training step (forward, weighting, backward, Adam step), timed interleaved with the other
    implementation on the same batch after training."""
    train_loss: list[dict[str, float]] = field(default_factory=list)


def load_dataset(name: str, seed: int, num_tasks: int, num_train: int) -> MultiTaskDataset:
    if name == "synthetic":
        kinds = [SYNTHETIC_KINDS[t % len(SYNTHETIC_KINDS)] for t in range(num_tasks)]
        return mf.data.load("synthetic", num_tasks=num_tasks, correlation=0.5, task_kinds=kinds, seed=seed,
                            num_train=num_train, num_val=num_train // 5, num_test=num_train // 5)
    data = mf.data.load(name, seed=seed)
    return _flattened(data)


def _flattened(data: MultiTaskDataset) -> MultiTaskDataset:
    """Image inputs (N, C, H, W) become feature vectors, which both architectures here take."""
    first = data.split("train").inputs
    if isinstance(first, dict) or first.dim() == 2:
        return data
    splits = {name: type(split)(split.inputs.flatten(1), split.targets) for name, split in data.splits.items()}
    return MultiTaskDataset(data.name, data.tasks, feature_names=data.feature_names, info=data.info, **splits)


def build_model(kind: str, data: MultiTaskDataset, hidden: int) -> nn.Module:
    features = data.in_features
    if kind == "hard":
        return mf.models.HardSharing.mlp(features, (hidden, hidden // 2), data.tasks)
    return mf.models.MMoE(features, data.tasks, num_experts=8, expert_hidden=(hidden // 2,), tower_hidden=(hidden // 4,))


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What every task's gradient flows through, for gradient methods in parameter mode."""
    for name in ("encoder", "experts"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            return list(part.parameters())
    raise TypeError(f"mtlfast: no shared parameters known for {type(model).__name__}")


def build_weighting(name: str, model: nn.Module, num_tasks: int):
    cls = getattr(mf.weighting, WEIGHTINGS[name])
    if not getattr(cls, "requires_grads", False):
        return cls(num_tasks)
    # The fused model hands out gradients w.r.t. its shared representation from the forward pass; a model without
    # one (MMoE, the plain twins) takes them w.r.t. its shared parameters, one backward pass per task.
    if getattr(model, "shares_representation", False):
        return cls(num_tasks)
    return cls(num_tasks, mode="parameters", shared_parameters=shared_parameters(model))


def train(model: nn.Module, data: MultiTaskDataset, args: argparse.Namespace, seed: int) -> tuple[dict, float, list]:
    weighting = build_weighting(args.weighting, model, len(data.tasks))
    params = list(model.parameters()) + list(weighting.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    history = mf.fit(model, data.loader("train", args.batch_size, seed=seed), optimizer, epochs=args.epochs,
                     weighting=weighting, device=args.device, progress=args.progress)
    test = evaluate(model, data.loader("test", 1024), device=args.device)
    metrics = {task: {name: float(value) for name, value in values.items()} for task, values in test.items()}
    return metrics, [record.train_loss for record in history]


def step_times_ms(models: dict[str, nn.Module], data: MultiTaskDataset, args: argparse.Namespace,
                  rounds: int = 25) -> dict[str, float]:
    """Median ms of one training step per implementation, on copies of the trained models and one batch, the
    implementations alternating step by step (so machine noise hits both alike, unlike per-epoch wall times)."""
    inputs, targets = next(iter(data.loader("train", args.batch_size, seed=0)))
    steps = {}
    for name, trained in models.items():
        model = copy.deepcopy(trained).train()
        weighting = build_weighting(args.weighting, model, len(data.tasks)).to(inputs.device)
        optimizer = torch.optim.Adam(list(model.parameters()) + list(weighting.parameters()), lr=args.lr)
        wants_grads = getattr(weighting, "requires_grads", False) and weighting.mode == "representation"

        def step(model=model, weighting=weighting, optimizer=optimizer, wants_grads=wants_grads) -> None:
            optimizer.zero_grad(set_to_none=True)
            out = model(inputs, targets, per_task_input_grads=wants_grads) if wants_grads else model(inputs, targets)
            weighting(out).backward()
            optimizer.step()

        steps[name] = step
    sync = torch.cuda.synchronize if inputs.device.type == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds + 3):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if round_index >= 3:  # warm-up rounds dropped
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_demo(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    for seed in range(args.seed, args.seed + args.seeds):
        data = load_dataset(args.dataset, seed, args.tasks, args.num_train).to(args.device)
        for kind in args.models:
            torch.manual_seed(seed)
            ours = build_model(kind, data, args.hidden).to(args.device)
            twin = plain_twin(ours)  # identical initial weights
            trained = {"mtlfast": ours, "plain": twin}
            results = {}
            for implementation, model in trained.items():
                print(f"== {kind} / {implementation} / seed {seed}", file=sys.stderr, flush=True)
                torch.manual_seed(seed)  # same dropout / random weighting draws for both
                results[implementation] = train(model, data, args, seed)
            times = step_times_ms(trained, data, args)
            for implementation, (metrics, losses) in results.items():
                runs.append(Run(kind, implementation, seed, metrics, times[implementation], losses))
    return runs


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(runs: list[Run], args: argparse.Namespace) -> str:
    lines = [f"dataset {args.dataset}, weighting {args.weighting}, {args.epochs} epochs, batch {args.batch_size}, "
             f"{args.seeds} seed(s), device {args.device}, backend {mf.backend_for(torch.device(args.device))}", ""]
    for kind in args.models:
        mine = [r for r in runs if r.model == kind and r.implementation == "mtlfast"]
        plain = [r for r in runs if r.model == kind and r.implementation == "plain"]
        ours_ms = statistics.median(r.step_ms for r in mine)
        theirs_ms = statistics.median(r.step_ms for r in plain)
        lines.append(f"### {kind}: step {ours_ms:.2f} ms (mtlfast) vs {theirs_ms:.2f} ms (plain PyTorch) — "
                     f"speedup {theirs_ms / ours_ms:.2f}×")
        lines += ["", "| task | metric | mtlfast | plain PyTorch |", "|---|---|---|---|"]
        for task, values in mine[0].test_metrics.items():
            for metric in values:
                a = [r.test_metrics[task][metric] for r in mine]
                b = [r.test_metrics[task][metric] for r in plain]
                lines.append(f"| {task} | {metric} | {_mean_std(a)} | {_mean_std(b)} |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[Run], args: argparse.Namespace, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("mtlfast demo: matplotlib is not installed; no plot written (pip install matplotlib)", file=sys.stderr)
        return
    figure = Figure(figsize=(5 * (len(args.models) + 1), 4), layout="constrained")
    axes = figure.subplots(1, len(args.models) + 1)
    for axis, kind in zip(axes, args.models):
        for implementation, style in (("mtlfast", "-"), ("plain", "--")):
            run = next(r for r in runs if r.model == kind and r.implementation == implementation)
            for task in run.train_loss[0]:
                axis.plot(range(1, len(run.train_loss) + 1), [epoch[task] for epoch in run.train_loss], style,
                          label=f"{task} ({implementation})")
        axis.set(title=f"{kind}: train loss per task (— mtlfast, -- plain)", xlabel="epoch", yscale="log")
        axis.legend(fontsize="x-small", ncols=2)
    speed = axes[-1]
    ratios = [statistics.median(r.step_ms for r in runs if r.model == k and r.implementation == "plain")
              / statistics.median(r.step_ms for r in runs if r.model == k and r.implementation == "mtlfast")
              for k in args.models]
    speed.bar(list(args.models), ratios)
    speed.axhline(1.0, color="gray", linewidth=0.8)
    speed.set(title="step-time speedup over plain PyTorch", ylabel="×")
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def model_list(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """``--models a,b`` as a list, each one of :data:`MODELS` (else a usage error)."""
    models = [m for m in text.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {MODELS}")
    return models


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mtlfast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic", choices=mf.data.DATASETS,
                        help=f"installed here: {', '.join(mf.data.available())}")
    parser.add_argument("--models", default="hard,mmoe", help="comma-separated: hard, mmoe")
    parser.add_argument("--weighting", default="ew", choices=sorted(WEIGHTINGS))
    parser.add_argument("--tasks", type=int, default=8, help="number of synthetic tasks")
    parser.add_argument("--num-train", type=int, default=10_000, help="synthetic training rows (val/test: a fifth)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds (mean ± std)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", type=Path, default=Path("mtlfast_demo.png"))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    args.models = model_list(parser, args.models)
    if args.dataset not in mf.data.available():
        parser.error(f"dataset {args.dataset!r} is not installed: {mf.data.install_hint(args.dataset)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    runs = run_demo(args)
    print(report(runs, args))
    plot(runs, args, args.plot)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
