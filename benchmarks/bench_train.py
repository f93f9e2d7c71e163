"""Training-step benchmark: a whole optimiser step of a multi-task model, mtlfast vs the LibMTL way.

For each config (architecture × number of tasks × weighting method) two providers train the same model from the
same initial weights on the same batch:

* ``mtlfast``: ``mtlfast.models`` (fused heads + losses, batched experts) and ``mtlfast.weighting``; gradient
  methods take the task gradients w.r.t. the shared representation from the fused op (``input_gram``), no T
  backward passes.
* ``libmtl_style``: the same model written as LibMTL does it: ``nn.Linear`` heads in a ``ModuleDict``, a Python
  loop over tasks computing ``F.*`` losses; for gradient methods on the representation, a detached copy of the
  representation per task, T backward passes to collect the task gradients, the method on the stacked (T, N·D)
  gradients with Python control flow, then one backward of the combined gradient into the encoder (LibMTL's
  ``rep_grad=True`` path). MMoE as a Python loop over experts, gates and towers.

A step is zero_grad → forward → weighting → backward → SGD step. Providers are timed interleaved in one process
(medians of ``--repeat`` rounds); before timing, the first step's loss and encoder gradient of both providers are
compared where the two computations are deterministic and share weights (EW and MGDA-UB on hard sharing).

Run from the repository root: ``python -m benchmarks.bench_train --device cpu`` (``python -m mtlfast bench`` runs
it after the op benchmark).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import mtlfast as mf
from benchmarks.bench_op import (
    REPO_ROOT,
    Skip,
    Step,
    append_csv,
    run_info,
    task_loss,
    time_interleaved,
)
from mtlfast.tasks import Binary, Classification, Task

PROVIDERS = ("mtlfast", "libmtl_style")
METHODS = ("ew", "pcgrad", "mgda_ub")


@dataclass(frozen=True)
class TrainConfig:
    arch: str  # "hard" | "mmoe"
    num_tasks: int
    method: str
    batch: int = 512
    in_features: int = 128
    hidden: tuple[int, ...] = (256, 128)
    num_experts: int = 8
    tower_hidden: tuple[int, ...] = (32,)

    @property
    def name(self) -> str:
        return f"{self.arch}{self.num_tasks}-{self.method}"


def default_configs() -> list[TrainConfig]:
    configs = [TrainConfig(arch, tasks, "ew") for arch in ("hard", "mmoe") for tasks in (8, 32)]
    configs += [TrainConfig("hard", tasks, method) for tasks in (8, 32) for method in ("pcgrad", "mgda_ub")]
    return configs


def make_tasks(count: int) -> list[Task]:
    """Alternating binary and 4-class tasks (CTR-style binary labels dominate MTL recommenders)."""
    return [Binary(f"t{i}") if i % 2 == 0 else Classification(f"t{i}", num_classes=4) for i in range(count)]


def make_batch(tasks: Sequence[Task], config: TrainConfig, device, generator: torch.Generator):
    x = torch.randn(config.batch, config.in_features, generator=generator).to(device)
    targets = {}
    for task in tasks:
        if isinstance(task, Classification):
            targets[task.name] = torch.randint(0, task.num_classes, (config.batch,), generator=generator).to(device)
        else:
            targets[task.name] = torch.randint(0, 2, (config.batch,), generator=generator).float().to(device)
    return x, targets


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------------------
# The LibMTL way


def loop_losses(heads: nn.ModuleDict, tasks: Sequence[Task], reps: Sequence[torch.Tensor], targets) -> list[torch.Tensor]:
    return [task_loss(task, heads[task.name](rep), targets[task.name]) for task, rep in zip(tasks, reps)]


def pcgrad_vectors(grads: torch.Tensor) -> torch.Tensor:
    """PCGrad (Yu et al. 2020) on explicit (T, P) gradients, written as LibMTL writes it (Python loops, a host
    branch per pair)."""
    projected = grads.clone()
    order = list(range(grads.shape[0]))
    for i in range(grads.shape[0]):
        random.shuffle(order)
        for j in order:
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= dot * grads[j] / (grads[j].norm().pow(2) + 1e-8)
    return projected.sum(0)


def min_norm_weights(gram: torch.Tensor, iterations: int = 250, tolerance: float = 1e-5) -> torch.Tensor:
    """Frank-Wolfe min-norm point of the convex hull (Sener & Koltun 2018), LibMTL-style with a host-side stop test."""
    tasks = gram.shape[0]
    weights = gram.new_full((tasks,), 1.0 / tasks)
    for _ in range(iterations):
        grad_dir = gram @ weights
        t = int(torch.argmin(grad_dir))
        v1v1 = weights @ gram @ weights
        v1v2 = weights @ gram[:, t]
        v2v2 = gram[t, t]
        if v1v2 >= v1v1:
            gamma = 0.999
        elif v1v2 >= v2v2:
            gamma = 0.001
        else:
            gamma = float((v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2))
        new = gamma * weights
        new[t] += 1 - gamma
        if (new - weights).abs().sum() < tolerance:
            return new
        weights = new
    return weights


class LibMTLHard(nn.Module):
    def __init__(self, encoder: nn.Module, heads: nn.ModuleDict, tasks: Sequence[Task]):
        super().__init__()
        self.encoder, self.heads, self.tasks = encoder, heads, list(tasks)

    def step(self, x, targets, method: str) -> torch.Tensor:
        rep = self.encoder(x)
        if method == "ew":
            total = sum(loop_losses(self.heads, self.tasks, [rep] * len(self.tasks), targets))
            total.backward()
            return total.detach()
        # LibMTL rep_grad=True: one detached copy of the representation per task, T backward passes (each from its
        # own loss tensor, so a pass only walks its own head's graph).
        rep_tasks = [rep.detach().clone().requires_grad_() for _ in self.tasks]
        losses = loop_losses(self.heads, self.tasks, rep_tasks, targets)
        grads = []
        for t in range(len(self.tasks)):
            losses[t].backward(retain_graph=True)
            grads.append(rep_tasks[t].grad.flatten())
        grads = torch.stack(grads)
        if method == "pcgrad":
            combined = pcgrad_vectors(grads)
        else:
            combined = min_norm_weights(grads @ grads.T) @ grads
        rep.backward(combined.view_as(rep))
        return sum(loss.detach() for loss in losses)


class LibMTLMMoE(nn.Module):
    """MMoE (Ma et al. 2018) as a Python loop over experts, gates, towers and heads."""

    def __init__(self, config: TrainConfig, tasks: Sequence[Task]):
        super().__init__()
        width = config.hidden[-1]
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(mlp([config.in_features, *config.hidden]) for _ in range(config.num_experts))
        self.gates = nn.ModuleList(nn.Linear(config.in_features, config.num_experts) for _ in tasks)
        self.towers = nn.ModuleList(mlp([width, *config.tower_hidden]) for _ in tasks)
        out = config.tower_hidden[-1] if config.tower_hidden else width
        self.heads = nn.ModuleDict({t.name: nn.Linear(out, t.num_outputs) for t in tasks})

    def step(self, x, targets, method: str) -> torch.Tensor:
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (N, E, H)
        reps = []
        for gate, tower in zip(self.gates, self.towers):
            mix = torch.softmax(gate(x), dim=-1).unsqueeze(-1)
            reps.append(tower((mix * experts).sum(1)))
        total = sum(loop_losses(self.heads, self.tasks, reps, targets))
        total.backward()
        return total.detach()


# ---------------------------------------------------------------------------------------------------------------
# Providers


@dataclass
class ModelStep(Step):
    """A training step that keeps its model, for the equivalence check."""

    model: nn.Module | None = None


def _sgd_step(model: nn.Module, forward_backward: Callable[[], torch.Tensor], lr: float = 1e-3) -> ModelStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def run() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward()
        optimizer.step()
        return loss

    return ModelStep(run, [], None, model=model)


WEIGHTING = {"ew": "EqualWeighting", "pcgrad": "PCGrad", "mgda_ub": "MGDAUB"}


def build_mtlfast(config: TrainConfig, tasks, encoder: nn.Module | None, batch, device) -> ModelStep:
    x, targets = batch
    if config.arch == "hard":
        model = mf.models.HardSharing(copy.deepcopy(encoder), tasks, in_features=config.hidden[-1]).to(device)
    else:
        model = mf.models.MMoE(config.in_features, tasks, num_experts=config.num_experts, expert_hidden=config.hidden,
                               tower_hidden=config.tower_hidden).to(device)
    options = {"normalization": "none"} if config.method == "mgda_ub" else {}  # as the LibMTL-style baseline
    weighting = getattr(mf.weighting, WEIGHTING[config.method])(len(tasks), **options).to(device)
    wants_grads = weighting.requires_grads

    def forward_backward() -> torch.Tensor:
        out = model(x, targets, per_task_input_grads=wants_grads)
        total = weighting(out)
        total.backward()
        return out.loss_vector.detach().sum()

    return _sgd_step(model, forward_backward)


def build_libmtl(config: TrainConfig, tasks, encoder: nn.Module | None, batch, device, heads_state=None) -> ModelStep:
    x, targets = batch
    if config.arch == "hard":
        heads = nn.ModuleDict({t.name: nn.Linear(config.hidden[-1], t.num_outputs) for t in tasks})
        if heads_state is not None:
            heads.load_state_dict(heads_state)
        model = LibMTLHard(copy.deepcopy(encoder), heads, tasks).to(device)
    else:
        model = LibMTLMMoE(config, tasks).to(device)
    return _sgd_step(model, lambda: model.step(x, targets, config.method))


def check_equivalence(config: TrainConfig, steps: dict[str, ModelStep]) -> str:
    """Same weights, same batch: the first step's encoder gradients must agree (deterministic methods only)."""
    if config.arch != "hard" or config.method == "pcgrad":
        return "not compared (different random order / different initialisation)"
    grads = {}
    for name, step in steps.items():
        model = step.model
        encoder_params = list(model.encoder.parameters())
        for p in model.parameters():
            p.grad = None
        snapshot = [p.detach().clone() for p in model.parameters()]
        step.run()
        grads[name] = torch.cat([p.grad.flatten() for p in encoder_params])
        with torch.no_grad():
            for p, s in zip(model.parameters(), snapshot):
                p.copy_(s)
    a, b = grads["mtlfast"], grads["libmtl_style"]
    error = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    # LibMTL's plain Frank-Wolfe (250 iterations at most) ends ~1e-2 from the min-norm point with many tasks, where
    # mtlfast's pairwise Frank-Wolfe reaches it: MGDA's two answers agree only that far.
    tolerance = 5e-2 if config.method == "mgda_ub" else 1e-3
    if error > tolerance:
        raise SystemExit(f"bench_train: {config.name}: encoder gradients differ between providers (rel. error {error:.2e})")
    return f"encoder grad rel. diff {error:.1e}"


def bench(config: TrainConfig, device: torch.device, warmup: int, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    random.seed(0)
    tasks = make_tasks(config.num_tasks)
    generator = torch.Generator().manual_seed(0)
    batch = make_batch(tasks, config, device, generator)
    encoder = mlp([config.in_features, *config.hidden]) if config.arch == "hard" else None
    steps: dict[str, ModelStep] = {"mtlfast": build_mtlfast(config, tasks, encoder, batch, device)}
    heads_state = steps["mtlfast"].model.heads.state_dict() if config.arch == "hard" else None
    steps["libmtl_style"] = build_libmtl(config, tasks, encoder, batch, device, heads_state)
    note = check_equivalence(config, steps)
    samples = time_interleaved(steps, device, warmup, repeat)
    medians = {name: sorted(times)[len(times) // 2] for name, times in samples.items()}
    rows = []
    for name, times in samples.items():
        ordered = sorted(times)
        iqr = ordered[(3 * len(ordered)) // 4] - ordered[len(ordered) // 4]
        rows.append({
            "config": config.name, "provider": name, "metric": "train_step_time", "median": f"{medians[name]:.4f}",
            "iqr": f"{iqr:.4f}", "unit": "ms", "ratio_vs_mtlfast": f"{medians[name] / medians['mtlfast']:.4f}",
            "repeats": len(times), "note": note,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    by_config: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["provider"]] = row
    lines = ["| config | mtlfast ms | LibMTL-style ms | speedup |", "|---|---|---|---|"]
    for config, cells in by_config.items():
        ours, theirs = float(cells["mtlfast"]["median"]), float(cells["libmtl_style"]["median"])
        lines.append(f"| {config} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}× |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bar chart of the LibMTL-style / mtlfast step-time ratio per config (skipped without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("bench_train: matplotlib is not installed; no plot written", file=sys.stderr)
        return
    ratios = {row["config"]: float(row["ratio_vs_mtlfast"]) for row in rows if row["provider"] == "libmtl_style"}
    figure = Figure(figsize=(max(6, len(ratios)), 4), layout="constrained")
    axis = figure.subplots()
    axis.bar(list(ratios), list(ratios.values()))
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set(title=title, ylabel="LibMTL-style time / mtlfast time")
    axis.tick_params(axis="x", labelrotation=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="all", help="comma-separated config names (e.g. hard32-ew) or 'all'")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=None, help="default: benchmarks/results/train_<device>.csv")
    parser.add_argument("--plot", type=Path, default=None, help="default: benchmarks/results/train_<device>.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = default_configs()
    if args.configs != "all":
        wanted = set(args.configs.split(","))
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"bench_train: unknown configs {sorted(unknown)}; known: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in wanted]
    common = run_info(device, torch.float32)
    rows = []
    for config in configs:
        try:
            config_rows = bench(config, device, args.warmup, args.repeat)
        except Skip as reason:
            print(f"{config.name}: skipped ({reason})", file=sys.stderr)
            continue
        rows += [dict(common, **row) for row in config_rows]
        print(f"{config.name}: " + ", ".join(f"{r['provider']} {float(r['median']):.2f} ms" for r in config_rows),
              flush=True)
    path = args.csv or REPO_ROOT / "benchmarks" / "results" / f"train_{device.type}.csv"
    append_csv(path, rows)
    print(markdown(rows))
    print(f"rows appended to {path}")
    if rows:
        plot(rows, args.plot or path.with_suffix(".png"), f"training step, {common['device_name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
