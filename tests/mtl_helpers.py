"""Shared test helpers: random task mixes, random targets, the oracle comparison.

A plain module (not conftest.py) so that a subprocess (tests/test_fallback_subprocess.py) can import it too;
tests/conftest.py puts this directory on sys.path and adds the fixtures.

Conventions:
* a :class:`Case` holds float64 CPU tensors in the user-facing layout: ``h`` is ``batch_shape + (D,)`` and each
  target is ``batch_shape`` (class indices / Binary / Regression(dim=1)) or ``batch_shape + (C,)``;
* :func:`reference_result` runs ``mtlfast._reference.reference_multi_task_loss`` in float64 on flattened copies;
* :func:`fused_result` runs the fused path (functional or ``MultiTaskHeads``) in any dtype on any device;
* both return a :class:`Result` whose tensors are float64 CPU, so they compare directly.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlfast as mf
from mtlfast._layout import TaskLayout
from mtlfast._reference import reference_multi_task_loss

requires_c = pytest.mark.skipif(not mf.HAS_C, reason="the compiled extension mtlfast._C is not loaded")
# MTLFAST_TEST_CUDA_EMULATION=1 (set by tests/test_cuda_emulation.py for its subprocess): tests/conftest.py imports
# mtlfast._cuda_emulation, which puts the CUDA backend (glue + kernels, run by a CPU emulator of the CUDA execution
# model) in place of the CPU kernels. The CUDA tests then run on CPU tensors ("cpu"); those that need a real device
# (streams, CUDA graphs, a second device) are marked requires_gpu, and those that check an error only the CPU
# kernels raise (the CUDA backend reports it as a NaN loss instead: no host sync) are marked cpu_kernel_semantics.
CUDA_EMULATION = os.environ.get("MTLFAST_TEST_CUDA_EMULATION", "0") not in ("", "0")
CUDA_TEST_DEVICE = "cpu" if CUDA_EMULATION else "cuda"
requires_cuda = pytest.mark.skipif(
    not (CUDA_EMULATION or torch.cuda.is_available()), reason="needs a CUDA GPU (or MTLFAST_TEST_CUDA_EMULATION=1)"
)
requires_gpu = pytest.mark.skipif(CUDA_EMULATION or not torch.cuda.is_available(), reason="needs a real CUDA GPU")
cpu_kernel_semantics = pytest.mark.cpu_kernel_semantics

KINDS = ("ce", "binary", "multilabel", "regression", "distill")

# (rtol, atol) for element-wise comparisons against the float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}
# Relative (norm-wise) error bound for the half types: ||actual - expected|| <= tol * max(||expected||, floor).
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


# ---------------------------------------------------------------------------------------------------------------
# Tasks


def random_task(rng: random.Random, name: str, kind: str | None = None, input: str = mf.tasks.DEFAULT_INPUT) -> mf.Task:
    """One task of ``kind`` (random when None) with randomly drawn options."""
    kind = kind or rng.choice(KINDS)
    weight = rng.choice([1.0, 0.5, 2.0, 0.3])
    if kind == "ce":
        classes = rng.choice([2, 3, 5, 7])
        class_weights = rng.choice([None, [round(rng.uniform(0.2, 2.0), 3) for _ in range(classes)]])
        return mf.Classification(
            name,
            num_classes=classes,
            label_smoothing=rng.choice([0.0, 0.0, 0.1, 0.4]),
            class_weights=class_weights,
            ignore_index=rng.choice([-100, -100, -1, 1]),  # 1 is a real class: that class is then ignored
            weight=weight,
            input=input,
        )
    if kind == "binary":
        return mf.Binary(name, pos_weight=rng.choice([None, round(rng.uniform(0.3, 3.0), 3)]), weight=weight, input=input)
    if kind == "multilabel":
        labels = rng.choice([1, 3, 6])
        pos_weight = rng.choice([None, round(rng.uniform(0.3, 3.0), 3), [round(rng.uniform(0.3, 3.0), 3) for _ in range(labels)]])
        return mf.MultiLabel(name, num_labels=labels, pos_weight=pos_weight, weight=weight, input=input)
    if kind == "regression":
        loss = rng.choice(["mse", "l1", "huber"])
        return mf.Regression(
            name, dim=rng.choice([1, 1, 3]), loss=loss, delta=round(rng.uniform(0.3, 2.0), 3), weight=weight, input=input
        )
    if kind == "distill":
        return mf.Distillation(
            name,
            num_classes=rng.choice([2, 3, 5, 9]),
            temperature=rng.choice([0.5, 1.0, 2.0, 4.0]),
            targets=rng.choice(["logits", "probs"]),
            weight=weight,
            input=input,
        )
    raise ValueError(kind)


def random_tasks(rng: random.Random, count: int | None = None, kinds: Sequence[str] | None = None) -> list[mf.Task]:
    """A random mix of ``count`` tasks (1..6 when None); ``kinds`` fixes the kind of each task."""
    if kinds is None:
        count = count if count is not None else rng.randint(1, 6)
        kinds = [rng.choice(KINDS) for _ in range(count)]
    return [random_task(rng, f"{kind}{i}", kind) for i, kind in enumerate(kinds)]


# ---------------------------------------------------------------------------------------------------------------
# Targets


def random_target(
    task: mf.Task, batch_shape: Sequence[int], gen: torch.Generator, *, p_missing: float = 0.2, empty: bool = False
) -> torch.Tensor:
    """A target for ``task`` in the user layout (float64 / int64, CPU), with a fraction ``p_missing`` of missing
    entries (ignore_index / NaN); ``empty`` makes every entry missing."""
    batch_shape = tuple(batch_shape)
    if task.target_is_index:
        y = torch.randint(0, task.num_outputs, batch_shape, generator=gen)
        missing = torch.rand(batch_shape, generator=gen) < p_missing
        if empty:
            missing = torch.ones(batch_shape, dtype=torch.bool)
        return torch.where(missing, torch.full_like(y, task.ignored_class), y)
    shape = batch_shape + ((task.num_outputs,) if task.target_has_class_dim else ())
    if mf.tasks.is_distillation(task.kind):
        return random_distillation_target(task, batch_shape, gen, p_missing=p_missing, empty=empty)
    if task.kind == mf.LossKind.BCE:
        hard = (torch.rand(shape, generator=gen) < 0.5).double()
        soft = torch.rand(shape, generator=gen, dtype=torch.float64)
        y = torch.where(torch.rand(shape, generator=gen) < 0.7, hard, soft)
    else:
        y = 1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    missing = torch.rand(shape, generator=gen) < p_missing
    if empty:
        missing = torch.ones(shape, dtype=torch.bool)
    return torch.where(missing, torch.full_like(y, math.nan), y)


def random_distillation_target(
    task: mf.Task, batch_shape: Sequence[int], gen: torch.Generator, *, p_missing: float = 0.2, empty: bool = False
) -> torch.Tensor:
    """Teacher logits, or probability rows (some entries exactly 0, rows summing to 1), shape batch + (C,); a
    fraction ``p_missing`` of the rows is missing: a NaN in one random entry of the row (the rest stays finite)."""
    shape = tuple(batch_shape) + (task.num_outputs,)
    teacher = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if task.kind == mf.LossKind.DISTILL_PROBS:
        probs = torch.softmax(teacher, dim=-1)
        zeroed = torch.rand(shape, generator=gen) < 0.2
        zeroed[..., 0] = False  # every row keeps some mass
        probs = torch.where(zeroed, torch.zeros_like(probs), probs)
        teacher = probs / probs.sum(-1, keepdim=True)
    missing_rows = torch.rand(tuple(batch_shape), generator=gen) < p_missing
    if empty:
        missing_rows = torch.ones(tuple(batch_shape), dtype=torch.bool)
    nan_column = torch.randint(0, task.num_outputs, tuple(batch_shape), generator=gen)
    nan_at = missing_rows.unsqueeze(-1) & (torch.arange(task.num_outputs) == nan_column.unsqueeze(-1))
    return torch.where(nan_at, torch.full_like(teacher, math.nan), teacher)


# ---------------------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    tasks: list[mf.Task]
    batch_shape: tuple[int, ...]
    h: torch.Tensor  # batch_shape + (D,), float64
    weight: torch.Tensor  # (S, D), float64
    bias: torch.Tensor | None  # (S,), float64
    lam: torch.Tensor | None  # (T,) float64 task weights, None = each task's own weight
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # absent tasks are not keys

    @property
    def layout(self) -> TaskLayout:
        return TaskLayout(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def make_case(
    seed: int,
    tasks: Sequence[mf.Task] | None = None,
    *,
    batch_shape: Sequence[int] = (13,),
    features: int = 6,
    bias: bool = True,
    lam: bool | str = True,
    p_missing: float = 0.2,
    empty: Sequence[str] = (),
    absent: Sequence[str] = (),
    logit_scale: float = 1.0,
) -> Case:
    """A random float64 problem. ``lam``: True = random λ tensor, False = None (tasks' own weights)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tasks = list(tasks) if tasks is not None else random_tasks(rng)
    columns = sum(t.num_outputs for t in tasks)
    batch_shape = tuple(batch_shape)
    h = torch.randn(*batch_shape, features, generator=gen, dtype=torch.float64)
    weight = logit_scale * torch.randn(columns, features, generator=gen, dtype=torch.float64) / math.sqrt(features)
    b = 0.5 * torch.randn(columns, generator=gen, dtype=torch.float64) if bias else None
    lam_tensor = torch.rand(len(tasks), generator=gen, dtype=torch.float64) * 2 + 0.1 if lam else None
    targets = {
        task.name: random_target(task, batch_shape, gen, p_missing=p_missing, empty=task.name in empty)
        for task in tasks
        if task.name not in absent
    }
    return Case(tasks, batch_shape, h, weight, b, lam_tensor, targets)


def flat_targets(case: Case, dtype: torch.dtype = torch.float64, device=None) -> list[torch.Tensor | None]:
    """Targets in the reference / kernel layout: (N,) int64 or (N, C) floats; None for absent tasks."""
    rows = math.prod(case.batch_shape)
    result = []
    for task in case.tasks:
        y = case.targets.get(task.name)
        if y is None:
            result.append(None)
        elif task.target_is_index:
            result.append(y.reshape(rows).to(device=device))
        else:
            result.append(y.reshape(rows, task.num_outputs).to(device=device, dtype=dtype))
    return result


def _as_given(values: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """``values`` in ``dtype`` and a memory layout a user's targets may come in."""
    values = values.to(dtype)
    if layout == "column":  # one column of a wider label matrix: strided, but one stride per dim after flattening
        return torch.stack([torch.zeros_like(values), values], dim=-1)[..., 1]
    if layout == "slice":  # the first C columns of a wider (..., 2C) block
        return torch.cat([values, torch.zeros_like(values)], dim=-1)[..., : values.shape[-1]]
    if layout == "class_major":  # (..., C) stored class by class: a column stride ≠ 1
        return values.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "transposed":  # batch dims that no single stride can flatten
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    return values


# (task, target dtype, layout): every dtype the backends convert in one pass, strided layouts, layouts that take
# Tensor.to instead, and contiguous half / bfloat16 dense targets (which CUDA reads in place for a model of their
# dtype, a narrow and a wide head each).
_TARGET_FORMS = [
    (mf.Classification("ce", num_classes=5, label_smoothing=0.1), torch.int32, "column"),
    (mf.Classification("ce_long", num_classes=3), torch.int64, "column"),
    (mf.Classification("ce_byte", num_classes=4), torch.uint8, "transposed"),
    (mf.Binary("bin_bf16", pos_weight=2.0), torch.bfloat16, "column"),
    (mf.Binary("bin_bool"), torch.bool, "contiguous"),
    (mf.Binary("bin_int8"), torch.int8, "column"),
    (mf.Binary("bin_long"), torch.int64, "transposed"),
    (mf.MultiLabel("tags", num_labels=4), torch.float16, "class_major"),
    (mf.Regression("mse", dim=3), torch.float64, "slice"),
    (mf.Regression("huber", loss="huber", delta=0.5), torch.int16, "contiguous"),
    (mf.Distillation("kd", 6, temperature=2.0), torch.bfloat16, "class_major"),
    (mf.Distillation("kd_probs", 3, targets="probs"), torch.float16, "contiguous"),
    (mf.Binary("bin_bf16_flat", pos_weight=0.5), torch.bfloat16, "contiguous"),
    (mf.Regression("l1_bf16", dim=2, loss="l1"), torch.bfloat16, "contiguous"),
    (mf.Regression("mse_f16", dim=3), torch.float16, "contiguous"),
    (mf.Distillation("kd_wide_bf16", 1030, temperature=1.5), torch.bfloat16, "contiguous"),
    (mf.MultiLabel("tags_wide_bf16", num_labels=1025), torch.bfloat16, "contiguous"),
    (mf.Distillation("kd_wide_f16", 1027, targets="probs"), torch.float16, "contiguous"),
]


def targets_in_many_forms(seed: int, dtype: torch.dtype, device) -> tuple[Case, Case]:
    """One problem twice: its targets in the dtypes and layouts of _TARGET_FORMS (on ``device``), and the same values
    as the contiguous arrays of the dtype the kernels read (int64 class indices, the accumulation dtype of ``dtype``)."""
    tasks = [task for task, _, _ in _TARGET_FORMS]
    case = make_case(seed, tasks, batch_shape=(5, 7), features=6, p_missing=0.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    given, in_kernel_layout = {}, {}
    for task, target_dtype, layout in _TARGET_FORMS:
        values = case.targets[task.name].to(device)
        if task.kind == mf.LossKind.BCE:
            values = (values > 0.5).double()  # 0 / 1: exact in every dtype
        if not target_dtype.is_floating_point and not task.target_is_index:
            values = values.round()
        given[task.name] = _as_given(values, target_dtype, layout)
        in_kernel_layout[task.name] = given[task.name].to(torch.int64 if task.target_is_index else acc).contiguous()
    return replace(case, targets=given), replace(case, targets=in_kernel_layout)



# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    total: torch.Tensor
    losses: torch.Tensor  # (T,)
    grads: dict[str, torch.Tensor | None]  # h, weight, bias, lam
    logits: torch.Tensor | None = None
    input_grads: torch.Tensor | None = None  # (T, *batch, D)


def _leaf(t: torch.Tensor | None, dtype=None, device=None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_(True)


def _as64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def _grads(output: torch.Tensor, inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    names = [k for k, v in inputs.items() if v is not None]
    values = torch.autograd.grad(output, [inputs[k] for k in names], allow_unused=True, materialize_grads=True)
    grads = {k: None for k in inputs}
    grads.update({k: _as64(v) for k, v in zip(names, values)})
    return grads


def default_lam(case: Case) -> torch.Tensor:
    return torch.tensor([t.weight for t in case.tasks], dtype=torch.float64)


def reference_result(
    case: Case, objective=None, *, input_grads: bool = False, dtype=torch.float64, device=None, extra=None
) -> Result:
    """The oracle in ``dtype`` (float64 unless testing plain PyTorch in low precision).

    ``objective(total, losses, logits) -> scalar`` replaces the total as the differentiated quantity; ``extra``
    (name → leaf tensor) are further inputs of the objective whose gradients are returned too.
    """
    h = _leaf(case.h, dtype, device)
    weight, bias = _leaf(case.weight, dtype, device), _leaf(case.bias, dtype, device)
    lam = _leaf(case.lam if case.lam is not None else default_lam(case), None, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h2 = h.reshape(-1, h.shape[-1])
    total, losses, per_task_logits = reference_multi_task_loss(
        h2, weight, bias, flat_targets(case, acc, device), case.tasks, lam.to(acc)
    )
    logits = torch.cat(per_task_logits, dim=-1).view(*case.batch_shape, -1)
    target = total if objective is None else objective(total, losses, logits)
    # Without an explicit λ tensor the fused side has no λ input either: no λ gradient to compare.
    grads_in = {"h": h, "weight": weight, "bias": bias, "lam": lam if case.lam is not None else None, **(extra or {})}
    result_input_grads = None
    if input_grads:
        per_task = []
        for t in range(len(case.tasks)):
            (g,) = torch.autograd.grad(losses[t], h, retain_graph=True, allow_unused=True, materialize_grads=True)
            per_task.append(g)
        result_input_grads = _as64(torch.stack(per_task))
    grads = _grads(target, grads_in)
    return Result(_as64(total), _as64(losses), grads, _as64(logits), result_input_grads)


def build_heads(case: Case, *, dtype=torch.float64, device=None, chunk_rows="auto", learnable_lam: bool = True,
                recompute_logits: bool | None = None):
    """A MultiTaskHeads holding the case's weight / bias (and λ as a learnable parameter)."""
    heads = mf.MultiTaskHeads(
        case.h.shape[-1], case.tasks, bias=case.bias is not None, chunk_rows=chunk_rows,
        recompute_logits=recompute_logits, dtype=dtype, device=device,
    )
    group = heads.packed[mf.tasks.DEFAULT_INPUT]
    with torch.no_grad():
        group.weight.copy_(case.weight)
        if case.bias is not None:
            group.bias.copy_(case.bias)
    if learnable_lam:
        lam = case.lam if case.lam is not None else default_lam(case)
        heads.task_weights = nn.Parameter(lam.to(device=device, dtype=torch.float64).clone())
    return heads


def fused_result(
    case: Case,
    *,
    via: str = "functional",
    dtype: torch.dtype = torch.float64,
    device=None,
    chunk_rows="auto",
    recompute_logits: bool | None = None,
    objective=None,
    return_logits: bool = False,
    per_task_input_grads: bool = False,
    targets_as: str = "dict",
    extra=None,
) -> Result:
    """The fused path (``via`` = "functional" or "heads") in ``dtype`` on ``device``; results in float64 on CPU."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    device_targets = {k: v.to(device) for k, v in case.targets.items()}
    h = _leaf(case.h, dtype, device)
    if via == "functional":
        weight, bias = _leaf(case.weight, dtype, device), _leaf(case.bias, dtype, device)
        lam = _leaf(case.lam, acc, device)
        if targets_as == "list":
            targets = [device_targets.get(name) for name in case.names]
        else:
            targets = device_targets
        out = mf.functional.multi_task_loss(
            h, weight, bias, targets, case.tasks, lam,
            return_logits=return_logits, per_task_input_grads=per_task_input_grads, chunk_rows=chunk_rows,
            recompute_logits=recompute_logits,
        )
        total, losses, logits, input_grads = out
        grads_in = {"h": h, "weight": weight, "bias": bias, "lam": lam}
    elif via == "heads":
        heads = build_heads(case, dtype=dtype, device=device, chunk_rows=chunk_rows, learnable_lam=case.lam is not None,
                            recompute_logits=recompute_logits)
        out = heads(h, device_targets, return_logits=return_logits, per_task_input_grads=per_task_input_grads)
        total, losses = out.loss, out.loss_vector
        logits = input_grads = None
        if return_logits:
            logits = torch.cat(
                [out.logits[t.name].reshape(*case.batch_shape, t.num_outputs) for t in case.tasks], dim=-1
            )
        if per_task_input_grads:
            input_grads = torch.stack([out.input_grads[name] for name in case.names])
        group = heads.packed[mf.tasks.DEFAULT_INPUT]
        lam = heads.task_weights if isinstance(heads.task_weights, nn.Parameter) else None
        grads_in = {"h": h, "weight": group.weight, "bias": group.bias, "lam": lam}
    else:
        raise ValueError(via)
    grads_in.update(extra or {})
    target = total if objective is None else objective(total, losses, logits)
    grads = _grads(target, grads_in)
    return Result(_as64(total), _as64(losses), grads, _as64(logits), _as64(input_grads))


# ---------------------------------------------------------------------------------------------------------------
# Comparisons


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-3) -> float:
    actual, expected = _as64(actual), _as64(expected)
    return float((actual - expected).norm() / max(float(expected.norm()), floor))


def assert_close(actual, expected, dtype: torch.dtype = torch.float64, what: str = "") -> None:
    """``actual`` (any dtype / device) matches the float64 ``expected`` within the tolerance of ``dtype``."""
    assert (actual is None) == (expected is None), f"{what}: {actual} vs {expected}"
    if actual is None:
        return
    actual, expected = _as64(actual), _as64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    if dtype in TOLERANCES:
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what} ({dtype}): {m}")
    else:
        error = relative_error(actual, expected)
        assert error <= HALF_TOLERANCE[dtype], f"{what} ({dtype}): relative error {error:.3g}"


def assert_results_close(actual: Result, expected: Result, dtype: torch.dtype = torch.float64, *, grads=None) -> None:
    assert_close(actual.losses, expected.losses, dtype, "losses")
    assert_close(actual.total, expected.total, dtype, "total")
    for name in grads or actual.grads:
        assert_close(actual.grads[name], expected.grads[name], dtype, f"grad of {name}")


def linear_logits(case: Case) -> torch.Tensor:
    return F.linear(case.h, case.weight, case.bias)


# ---------------------------------------------------------------------------------------------------------------
# Raw op arguments


def op_args(case: Case, *, dtype: torch.dtype = torch.float64, device=None, requires_grad: bool = False) -> dict:
    """The arguments of torch.ops.mtlfast.multi_task_loss[_chunked] for ``case``: h and the targets as the user
    holds them (batch shape kept, dense targets in the accumulation dtype), without the trailing
    ``return_logits`` / ``chunk_rows``."""
    layout = case.layout
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    given = [case.targets.get(task.name) for task in case.tasks]
    present = [t is not None for t in given]
    h = case.h.to(device=device, dtype=dtype)
    weight = case.weight.to(device=device, dtype=dtype)
    bias = None if case.bias is None else case.bias.to(device=device, dtype=dtype)
    lam = case.lam if case.lam is not None else torch.tensor([t.weight for t in case.tasks], dtype=torch.float64)
    lam = lam.to(device=device, dtype=acc)
    if requires_grad:
        h, weight, lam = h.requires_grad_(), weight.requires_grad_(), lam.requires_grad_()
        bias = None if bias is None else bias.requires_grad_()
    targets = []
    for task, y in zip(case.tasks, given):
        if y is None:
            targets.append(h.new_empty(0, dtype=acc))
        else:
            targets.append(y.to(device=device) if task.target_is_index else y.to(device=device, dtype=acc))
    return dict(
        h=h,
        weight=weight,
        bias=bias,
        targets=targets,
        task_weights=lam,
        col_weight=layout.col_weight(torch.device(device or "cpu"), acc),
        col_task=layout.col_task(torch.device(device or "cpu")),
        kinds=[kind if here else 0 for kind, here in zip(layout.kinds, present)],
        col_offsets=list(layout.col_offsets),
        class_dims=list(layout.class_dims),
        ignore_index=list(layout.ignore_index),
        params=list(layout.params),
        task_names=list(layout.names),
    )


def op_arg_tuple(args: dict, last) -> tuple:
    return (*args.values(), last)
