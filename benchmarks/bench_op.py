"""Op-level benchmark: forward+backward time and peak extra memory of the fused multi-task loss.

For each config (a batch of shared representations ``h`` and a set of task heads) every provider runs the same
training-step core: heads' logits, every task loss, Σ λ_t·L_t, and the backward to ``h`` and the head parameters.
Providers (see :data:`PROVIDERS`):

* ``mtlfast``: ``mtlfast.MultiTaskHeads(h, targets).loss.backward()`` (the fused op: the compiled extension if it
  is built, else the pure-PyTorch fallback; the CSV records which).
* ``mtlfast_recompute`` / ``mtlfast_chunked`` (configs with a big head): the same with the large-head path forced:
  logits recomputed in the backward from saved row statistics, or gradients finished chunk by chunk in the forward.
* ``eager_loop``: ``nn.ModuleDict`` of ``nn.Linear`` + one ``F.*`` loss per task + Σ λ_t·L_t (what users write).
* ``eager_concat``: one concatenated ``nn.Linear``, logits split per task, per-task losses, sum.
* ``compiled_loop``: ``torch.compile`` of the ``eager_loop`` loss function (backward through the compiled graph).
* ``gemm_only``: the three GEMMs alone (logits = h Wᵀ + b; grad_h = G W; grad_W = Gᵀ h), the lower bound.
* ``gemm_autograd``: the same GEMMs (and grad_b = Σ_rows G) the way a training step runs them: an ``nn.Linear``-style
  ``addmm`` forward on leaves that require grad, then ``.backward(G)``; the lower bound for any op used in a
  training step, which pays the autograd engine that ``gemm_only`` skips (on a GPU, in small host-bound steps,
  that costs more than the GEMMs themselves).
* ``linear_cross_entropy`` (configs with a big head): ``F.linear_cross_entropy`` for the big head + eager small heads.
* ``liger`` (CUDA, configs with a big head): Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` for the big head.

All providers of a config live in the same process; their timed steps are interleaved round-robin (rotating the
order each round) so machine drift hits all of them alike. Before timing, each provider's total loss and
``h.grad`` are checked against ``eager_loop``'s. Speed is reported, never asserted.

Run from the repository root: ``python -m mtlfast bench --device cpu`` (same as ``python -m benchmarks.bench_op``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keeps the CPU memory profiler from logging to stderr

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mtlfast as mf  # noqa: E402
from mtlfast.tasks import Binary, Classification, LossKind, Regression, Task  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

CSV_FIELDS = (
    "date", "git_sha", "config", "provider", "metric", "median", "iqr", "unit", "ratio_vs_mtlfast", "repeats",
    "device", "device_name", "dtype", "torch_version", "mtlfast_backend", "memory_method", "note",
)


# ---------------------------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class Config:
    name: str
    batch: int
    dim: int
    tasks: tuple[Task, ...]
    big_head: str | None = None
    """The task whose head is large enough for fused linear+cross-entropy baselines (S5), if any."""
    summary: str = ""


def _mixed_tasks(count: int) -> tuple[Task, ...]:
    """A fixed mix: task i is cross-entropy (3, 5 or 10 classes) when i % 3 == 0, BCE when 1, MSE when 2;
    λ_i = 0.5 + 0.25·(i % 4) so the weighting is exercised."""
    tasks: list[Task] = []
    for i in range(count):
        weight = 0.5 + 0.25 * (i % 4)
        if i % 3 == 0:
            tasks.append(Classification(f"ce{i}", num_classes=(3, 5, 10)[(i // 3) % 3], weight=weight))
        elif i % 3 == 1:
            tasks.append(Binary(f"bce{i}", weight=weight))
        else:
            tasks.append(Regression(f"mse{i}", weight=weight))
    return tuple(tasks)


CONFIGS: dict[str, Config] = {
    config.name: config
    for config in (
        Config("S1", 256, 512, tuple(Binary(f"bin{i}") for i in range(64)), summary="64 binary heads"),
        Config("S2", 1024, 768, tuple(Classification(f"cls{i}", num_classes=5) for i in range(32)),
               summary="32 tasks x 5-class CE"),
        Config("S3", 4096, 256, _mixed_tasks(16), summary="16 mixed tasks (6 CE / 5 BCE / 5 MSE)"),
        Config("S4", 512, 512, tuple(Binary(f"attr{i}") for i in range(40)),
               summary="40 binary attributes as 40 Binary tasks"),
        Config("S5", 4096, 1024,
               (Classification("vocab", num_classes=32000), Classification("small", num_classes=5), Binary("flag")),
               big_head="vocab", summary="32000-class CE head + 5-class CE + Binary"),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# One config materialised on a device: the shared inputs every provider starts from


@dataclass
class Problem:
    config: Config
    device: torch.device
    dtype: torch.dtype
    h: torch.Tensor
    """(B, D) representation, no grad; each provider takes its own leaf copy."""
    targets: dict[str, torch.Tensor]
    heads: nn.ModuleDict
    """The initial weights: one nn.Linear(D, C_t) per task. Each provider works on its own copy."""

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.config.tasks

    def leaf_h(self) -> torch.Tensor:
        return self.h.detach().clone().requires_grad_(True)

    def copy_heads(self) -> nn.ModuleDict:
        return copy.deepcopy(self.heads)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, D) weight and (S,) bias of all heads concatenated in task order (no grad)."""
        layers = [self.heads[task.name] for task in self.tasks]
        return torch.cat([l.weight.detach() for l in layers]), torch.cat([l.bias.detach() for l in layers])

    def split_big_head(self) -> tuple[Task, tuple[Task, ...]]:
        big = next(task for task in self.tasks if task.name == self.config.big_head)
        return big, tuple(task for task in self.tasks if task is not big)


def make_problem(config: Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    heads = nn.ModuleDict(
        {task.name: nn.Linear(config.dim, task.num_outputs, device=device, dtype=dtype) for task in config.tasks}
    )
    generator = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(config.batch, config.dim, generator=generator).to(device=device, dtype=dtype)
    targets = {task.name: _random_target(task, config.batch, generator).to(device) for task in config.tasks}
    targets = {name: t.to(dtype) if t.is_floating_point() else t for name, t in targets.items()}
    return Problem(config, device, dtype, h, targets, heads)


def _random_target(task: Task, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch, task.num_outputs) if task.target_has_class_dim else (batch,)
    if task.kind == LossKind.CROSS_ENTROPY:
        return torch.randint(task.num_outputs, shape, generator=generator)
    if task.kind == LossKind.BCE:
        return torch.randint(2, shape, generator=generator).float()
    return torch.randn(shape, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# The hand-written per-task losses the eager baselines use (no missing-label handling: none are missing here)


def task_loss(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kind = task.kind
    if kind == LossKind.CROSS_ENTROPY:
        return F.cross_entropy(logits, target)
    if not task.target_has_class_dim:
        logits = logits.squeeze(-1)
    if kind == LossKind.BCE:
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == LossKind.MSE:
        return F.mse_loss(logits, target)
    raise NotImplementedError(f"no eager baseline for loss kind {kind!r}")


def weighted_sum(tasks: Sequence[Task], logits: Sequence[torch.Tensor], targets: Mapping[str, torch.Tensor]):
    return sum(task.weight * task_loss(task, out, targets[task.name]) for task, out in zip(tasks, logits))


def loop_loss(heads: nn.ModuleDict, tasks: Sequence[Task], h: torch.Tensor, targets: Mapping[str, torch.Tensor]):
    return weighted_sum(tasks, [heads[task.name](h) for task in tasks], targets)


# ---------------------------------------------------------------------------------------------------------------
# Providers: each builds a Step from a Problem


class Skip(Exception):
    """The provider cannot run here (missing package or feature); recorded as skipped, not as an error."""


@dataclass
class Step:
    """One provider's forward+backward on its own parameters and its own leaf ``h``."""

    run: Callable[[], torch.Tensor | None]
    """Forward + backward; returns the detached total loss (None for gemm_only and gemm_autograd)."""
    params: list[torch.Tensor]
    h: torch.Tensor | None
    note: str = ""

    def zero_grad(self) -> None:
        if self.h is not None:
            self.h.grad = None
        for param in self.params:
            param.grad = None


def autograd_step(loss_fn: Callable[[], torch.Tensor], params, h: torch.Tensor, note: str = "") -> Step:
    def run() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return Step(run, list(params), h, note)


def build_mtlfast(p: Problem, recompute_logits: bool | None = None) -> Step:
    heads = mf.MultiTaskHeads.from_linear(p.copy_heads(), p.tasks)
    heads.recompute_logits = recompute_logits
    h = p.leaf_h()
    note = "" if recompute_logits is None else f"recompute_logits={recompute_logits}"
    return autograd_step(lambda: heads(h, p.targets).loss, heads.parameters(), h, note)


def build_eager_loop(p: Problem) -> Step:
    heads, h = p.copy_heads(), p.leaf_h()
    return autograd_step(lambda: loop_loss(heads, p.tasks, h, p.targets), heads.parameters(), h)


def build_eager_concat(p: Problem) -> Step:
    weight, bias = p.packed()
    linear = nn.Linear(p.config.dim, weight.shape[0], device=p.device, dtype=p.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    sizes = [task.num_outputs for task in p.tasks]
    h = p.leaf_h()
    return autograd_step(
        lambda: weighted_sum(p.tasks, linear(h).split(sizes, dim=-1), p.targets), linear.parameters(), h
    )


def build_compiled_loop(p: Problem) -> Step:
    torch._dynamo.reset()  # a fresh cache per config: no recompile-limit effects from earlier configs
    heads, h, tasks, targets = p.copy_heads(), p.leaf_h(), p.tasks, p.targets

    def step_loss(x: torch.Tensor) -> torch.Tensor:
        return loop_loss(heads, tasks, x, targets)

    compiled = torch.compile(step_loss)
    return autograd_step(lambda: compiled(h), heads.parameters(), h, "torch.compile default mode")


def packed_gemm_operands(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The GEMM lower bounds' operands: the packed (S', D) weight, (S',) bias and (B, S') G, and the padding S' - S.

    G is the real dTotal/dlogits of this batch, computed once, so the GEMMs see the data the providers see. None of
    the returned tensors requires grad; each call returns new ones.
    """
    weight, bias = p.packed()
    logits = F.linear(p.h, weight, bias).requires_grad_(True)
    weighted_sum(p.tasks, logits.split([task.num_outputs for task in p.tasks], dim=-1), p.targets).backward()
    grad_logits = logits.grad
    del logits
    # Rows padded with zeros to a multiple of 8: unaligned leading dimensions (S = 32006 in S5) cost bf16 GEMMs
    # several times on GPU, and a lower bound should not include that.
    padding = -weight.shape[0] % 8
    if padding:
        weight, bias = F.pad(weight, (0, 0, 0, padding)), F.pad(bias, (0, padding))
        grad_logits = F.pad(grad_logits, (0, padding))
    return weight, bias, grad_logits, padding


def _padding_note(weight: torch.Tensor, padding: int) -> str:
    rows = weight.shape[0]
    return f"; S padded {rows - padding} -> {rows}" if padding else ""


def build_gemm_only(p: Problem) -> Step:
    weight, bias, grad_logits, padding = packed_gemm_operands(p)
    h = p.h

    def run() -> None:
        logits = torch.addmm(bias, h, weight.t())  # noqa: F841  (kept alive to the end, as in a real step)
        grad_h = grad_logits.mm(weight)  # noqa: F841
        grad_weight = grad_logits.t().mm(h)  # noqa: F841

    note = f"3 GEMMs on the packed (S, D) heads{_padding_note(weight, padding)}; no loss (not checked)"
    return Step(run, [], None, note)


def build_gemm_autograd(p: Problem) -> Step:
    weight, bias, grad_logits, padding = packed_gemm_operands(p)
    weight, bias, h = weight.requires_grad_(True), bias.requires_grad_(True), p.leaf_h()

    def run() -> None:
        # nn.Linear's forward; its backward computes grad_h = G W, grad_W = Gᵀ h and grad_b = Σ_rows G.
        torch.addmm(bias, h, weight.t()).backward(grad_logits)

    note = (f"the same GEMMs through autograd (addmm forward, .backward(G)) on the packed (S, D) heads"
            f"{_padding_note(weight, padding)}: the lower bound for any op used in a training step; "
            "no loss (not checked)")
    return Step(run, [weight, bias], h, note)


def build_linear_cross_entropy(p: Problem) -> Step:
    if not hasattr(F, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    options_cls = getattr(nn, "LinearCrossEntropyOptions", None)
    kwargs = {"options": options_cls()} if options_cls is not None else {}
    note = "chunked path (options=LinearCrossEntropyOptions())" if kwargs else "reference path (no options class)"
    big, small = p.split_big_head()
    heads, h = p.copy_heads(), p.leaf_h()
    layer = heads[big.name]

    def loss() -> torch.Tensor:
        big_loss = F.linear_cross_entropy(h, layer.weight, p.targets[big.name], linear_bias=layer.bias, **kwargs)
        return big.weight * big_loss + loop_loss(heads, small, h, p.targets)

    return autograd_step(loss, heads.parameters(), h, note + "; small heads eager")


def build_liger(p: Problem) -> Step:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        raise Skip(f"liger_kernel is not importable ({error})") from None
    big, small = p.split_big_head()
    heads, h = p.copy_heads(), p.leaf_h()
    layer, fused = heads[big.name], LigerFusedLinearCrossEntropyLoss()

    def loss() -> torch.Tensor:
        big_loss = fused(layer.weight, h, p.targets[big.name], layer.bias)
        big_loss = big_loss[0] if isinstance(big_loss, tuple) else big_loss  # versions returning (loss, z_loss)
        return big.weight * big_loss + loop_loss(heads, small, h, p.targets)

    return autograd_step(loss, heads.parameters(), h, "LigerFusedLinearCrossEntropyLoss; small heads eager")


@dataclass(frozen=True)
class Provider:
    build: Callable[[Problem], Step]
    big_head_only: bool = False
    cuda_only: bool = False
    checked: bool = True
    """Whether its loss and h.grad are compared with eager_loop's (not for the gemm_* bounds: they compute no loss)."""

    def applies(self, config: Config, device: torch.device) -> bool:
        return (config.big_head is not None or not self.big_head_only) and (device.type == "cuda" or not self.cuda_only)


PROVIDERS: dict[str, Provider] = {
    "mtlfast": Provider(build_mtlfast),
    # The two large-head paths forced (the default picks one per device: functional.RECOMPUTE_DEVICE_TYPES).
    "mtlfast_recompute": Provider(lambda p: build_mtlfast(p, recompute_logits=True), big_head_only=True),
    "mtlfast_chunked": Provider(lambda p: build_mtlfast(p, recompute_logits=False), big_head_only=True),
    "eager_loop": Provider(build_eager_loop),
    "eager_concat": Provider(build_eager_concat),
    "compiled_loop": Provider(build_compiled_loop),
    "gemm_only": Provider(build_gemm_only, checked=False),
    "gemm_autograd": Provider(build_gemm_autograd, checked=False),
    "linear_cross_entropy": Provider(build_linear_cross_entropy, big_head_only=True),
    "liger": Provider(build_liger, big_head_only=True, cuda_only=True),
}


# ---------------------------------------------------------------------------------------------------------------
# Correctness, timing, memory


def check_against_reference(step: Step, loss: torch.Tensor, ref_loss: torch.Tensor, ref_grad: torch.Tensor,
                            dtype: torch.dtype) -> None:
    """Total loss within relative 1e-4 (fp32) of eager_loop's, and h.grad within 1e-3 of it (max-norm relative)."""
    loss_tol, grad_tol = (1e-4, 1e-3) if dtype in (torch.float32, torch.float64) else (2e-2, 5e-2)
    got, want = float(loss), float(ref_loss)
    rel = abs(got - want) / max(abs(want), 1e-12)
    if not rel <= loss_tol:
        raise AssertionError(f"total loss {got:.8g} differs from eager_loop's {want:.8g} (relative {rel:.2e} > {loss_tol})")
    if step.h.grad is None:
        raise AssertionError("h.grad was not produced")
    grad_rel = float((step.h.grad.float() - ref_grad).abs().max()) / max(float(ref_grad.abs().max()), 1e-30)
    if not grad_rel <= grad_tol:
        raise AssertionError(f"h.grad differs from eager_loop's (max-norm relative {grad_rel:.2e} > {grad_tol})")


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(steps: dict[str, Step], device: torch.device, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Milliseconds per forward+backward, one sample per provider per round; the order rotates every round."""
    sync = synchronizer(device)
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for round_index in range(warmup + repeat):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                step = steps[name]
                step.zero_grad()
                sync()
                start = time.perf_counter()
                step.run()
                sync()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    samples[name].append(elapsed * 1e3)
    finally:
        gc.enable()
    return samples


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda caching allocator: max_memory_allocated after reset_peak_memory_stats minus memory_allocated before the step"
    return ("torch.profiler(profile_memory=True): peak of the running sum of c10 CPU allocator alloc/free events during "
            "one step; misses memory that BLAS/oneDNN/OpenMP take outside the c10 allocator")


def peak_extra_memory_mib(step: Step, device: torch.device) -> float:
    """Peak memory the step allocates on top of what was in use before it (grads set to None first)."""
    step.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step.run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.run()  # it ran cleanly before; kineto's start/stop lines on fd 2 are all this hides
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------------------------
# Running a config


@dataclass
class Outcome:
    provider: str
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def iqr_ms(self) -> float | None:
        if len(self.times_ms) < 2:
            return 0.0 if self.times_ms else None
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4)
        return q3 - q1


def _short(error: BaseException, limit: int = 400) -> str:
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bench_config(config: Config, providers: Sequence[str], device: torch.device, dtype: torch.dtype,
                 warmup: int, repeat: int) -> list[Outcome]:
    print(f"\n== {config.name}: B={config.batch} D={config.dim} {config.summary} ({device}, {dtype})", flush=True)
    problem = make_problem(config, device, dtype)
    reference = build_eager_loop(problem)
    ref_loss = reference.run()
    ref_grad = reference.h.grad.detach().float().clone()
    print(f"   eager_loop reference loss {float(ref_loss):.6g}", flush=True)

    outcomes: dict[str, Outcome] = {}
    steps: dict[str, Step] = {}
    for name in providers:
        provider = PROVIDERS[name]
        if not provider.applies(config, device):
            continue
        outcome = outcomes[name] = Outcome(name)
        try:
            step = reference if name == "eager_loop" else provider.build(problem)
            step.zero_grad()
            started = time.perf_counter()
            loss = step.run()  # also the warm-up that compiles, outside the timed region
            first_s = time.perf_counter() - started
            if provider.checked:
                check_against_reference(step, loss, ref_loss, ref_grad, dtype)
        except Skip as skip:
            outcome.status, outcome.note = "skipped", str(skip)
        except Exception as error:  # noqa: BLE001  (any failure of one provider must not stop the others)
            outcome.status, outcome.note = "error", _short(error)
        else:
            outcome.note = step.note
            steps[name] = step
            checked = "checked vs eager_loop" if provider.checked else "not checked"
            print(f"   {name:<21} ready (first call {first_s * 1e3:.0f} ms, {checked}) {step.note}", flush=True)
            continue
        print(f"   {name:<21} {outcome.status.upper()}: {outcome.note}", flush=True)

    if steps:
        for name, samples in time_interleaved(steps, device, warmup, repeat).items():
            outcomes[name].times_ms = samples
        for name, step in steps.items():
            outcomes[name].peak_mib = peak_extra_memory_mib(step, device)
            outcome = outcomes[name]
            print(f"   {name:<21} median {outcome.median_ms:10.3f} ms  (IQR {outcome.iqr_ms:.3f})  "
                  f"peak extra {outcome.peak_mib:9.1f} MiB", flush=True)

    del steps, reference, problem
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(outcomes.values())


# ---------------------------------------------------------------------------------------------------------------
# Reporting: CSV, markdown, plot


def git_sha() -> str:
    # The device tool's copy of the working tree keeps the .git of the session's first call: its HEAD can be commits
    # behind the files that run (rows said 50f9cfb-dirty for later commits). MTLFAST_GIT_SHA names the commit instead.
    if os.environ.get("MTLFAST_GIT_SHA"):
        return os.environ["MTLFAST_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def run_info(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The CSV columns shared by every row of a run, taken when it starts."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "mtlfast_backend": mf.backend_for(device),
    }


def csv_rows(results: dict[str, list[Outcome]], common: dict[str, str], device: torch.device) -> list[dict]:
    rows = []
    for config, outcomes in results.items():
        base = next((o for o in outcomes if o.provider == "mtlfast" and o.status == "ok"), None)
        for outcome in outcomes:
            row = dict(common, config=config, provider=outcome.provider, note=outcome.note)
            if outcome.status != "ok":
                rows.append(dict(row, metric="status", median=outcome.status))
                continue
            rows.append(dict(
                row, metric="fwd_bwd_time", median=f"{outcome.median_ms:.4f}", iqr=f"{outcome.iqr_ms:.4f}", unit="ms",
                ratio_vs_mtlfast=_fmt(_ratio(outcome.median_ms, base and base.median_ms)), repeats=len(outcome.times_ms),
            ))
            rows.append(dict(
                row, metric="peak_extra_memory", median=f"{outcome.peak_mib:.2f}", unit="MiB",
                ratio_vs_mtlfast=_fmt(_ratio(outcome.peak_mib, base and base.peak_mib)), repeats=1,
                memory_method=memory_method(device),
            ))
    return rows


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    if not new_file:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != CSV_FIELDS:
            raise SystemExit(f"bench_op: {path} has other columns than this version writes; pass another --csv")
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, restval="")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def _cell(outcome: Outcome | None, value: Callable[[Outcome], float | None], digits: int) -> str:
    if outcome is None:
        return "n/a"
    if outcome.status != "ok":
        return outcome.status
    return _fmt(value(outcome), digits)


def markdown_tables(results: dict[str, list[Outcome]], providers: Sequence[str]) -> str:
    shown = [name for name in providers if any(o.provider == name for outs in results.values() for o in outs)]
    # (numerator, denominator) of each ratio column; the autograd bound's only when that provider was run.
    ratio_columns = [("eager_loop", "mtlfast"), ("mtlfast", "gemm_only")]
    if "gemm_autograd" in shown:
        ratio_columns.append(("mtlfast", "gemm_autograd"))
    lines = ["Median forward+backward time (ms):", ""]
    lines.append("| config | " + " | ".join(shown + [f"{a} / {b}" for a, b in ratio_columns]) + " |")
    lines.append("|---" * (len(shown) + len(ratio_columns) + 1) + "|")
    for config, outcomes in results.items():
        by_name = {o.provider: o for o in outcomes}
        median = {n: o.median_ms for n, o in by_name.items() if o.status == "ok"}
        cells = [_cell(by_name.get(n), lambda o: o.median_ms, 3) for n in shown]
        ratios = [_ratio(median.get(a), median.get(b)) for a, b in ratio_columns]
        ratios = [f"{r:.2f}x" if r is not None else "n/a" for r in ratios]
        lines.append(f"| {config} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "Peak extra memory of one step (MiB):", ""]
    lines.append("| config | " + " | ".join(shown) + " |")
    lines.append("|---" * (len(shown) + 1) + "|")
    for config, outcomes in results.items():
        by_name = {o.provider: o for o in outcomes}
        lines.append(f"| {config} | " + " | ".join(_cell(by_name.get(n), lambda o: o.peak_mib, 1) for n in shown) + " |")
    notes = [f"- {config} {o.provider}: {o.status}: {o.note}" for config, outs in results.items() for o in outs
             if o.status != "ok"]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def plot_ratios(results: dict[str, list[Outcome]], providers: Sequence[str], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed; no plot written to {path}", flush=True)
        return
    configs = list(results)
    ran = {o.provider for outcomes in results.values() for o in outcomes if o.status == "ok"}
    others = [name for name in providers if name != "mtlfast" and name in ran]
    width = 0.8 / max(len(others), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(configs) + 3, 4.5))
    for k, name in enumerate(others):
        heights = []
        for config in configs:
            by_name = {o.provider: o for o in results[config] if o.status == "ok"}
            ratio = _ratio(by_name[name].median_ms, by_name["mtlfast"].median_ms) \
                if name in by_name and "mtlfast" in by_name else None
            heights.append(ratio if ratio is not None else float("nan"))
        ax.bar([i + (k - (len(others) - 1) / 2) * width for i in range(len(configs))], heights, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_yscale("log")
    ax.set_ylabel("time / mtlfast time (higher = mtlfast faster)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_op", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), type=lambda s: _names(s, list(CONFIGS), "configs"),
                        help="comma-separated (default: all: %(default)s)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        type=lambda s: _names(s, list(PROVIDERS), "providers"),
                        help="comma-separated (default: all that apply: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds (default: 30 on cuda, 5 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: 5 on cuda, 1 on cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU ops (default: torch's)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="append rows here (default: benchmarks/results/op_<device>.csv)")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart of time ratios (needs matplotlib)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `python -m mtlfast bench -- ...` passes "--"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch / on this machine")
    cuda = args.device == "cuda"
    args.repeat = args.repeat if args.repeat is not None else (30 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    args.csv = args.csv or REPO_ROOT / "benchmarks" / "results" / f"op_{args.device}.csv"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = run_info(device, dtype)
    backend, reason = info["mtlfast_backend"], mf.why_not_fast(device)
    print(f"mtlfast {mf.__version__} backend on {device}: {backend}" + (f" ({reason})" if reason else ""))
    print(f"torch {torch.__version__}, {info['device_name']}, dtype {args.dtype}, "
          f"warmup {args.warmup}, repeat {args.repeat}, git {info['git_sha']}", flush=True)

    results = {name: bench_config(CONFIGS[name], args.providers, device, dtype, args.warmup, args.repeat)
               for name in args.configs}

    append_csv(args.csv, csv_rows(results, info, device))
    print(f"\nrows appended to {args.csv}")
    print(f"\nmtlfast backend: {backend}; device: {info['device_name']}; dtype: {args.dtype}; "
          f"median of {args.repeat} interleaved rounds\n")
    print(markdown_tables(results, args.providers))
    if args.plot is not None:
        plot_ratios(results, args.providers, args.plot, f"{info['device_name']}, {args.dtype}, mtlfast backend {backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
