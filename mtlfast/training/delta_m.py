"""Δm: the relative multi-task gain over single-task baselines.

Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019, and Vandenhende et al., "Multi-Task Learning
for Dense Prediction Tasks: A Survey", TPAMI 2021, define

    Δm = (1/T) · Σ_t (−1)^{l_t} · (M_t − M_{b,t}) / M_{b,t} · 100 %

with M_t the multi-task model's metric on task t, M_{b,t} the single-task baseline's, and l_t = 1 when a *lower*
value of that metric is better (0 when higher is better). So Δm > 0 means the multi-task model beats its single-task
baselines on average. When a task has several metrics, the task's term is the mean over its metrics
(``average="tasks"``, LibMTL's convention) or every metric counts once (``average="metrics"``, as in Navon et al.,
Nash-MTL, ICML 2022).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

# Direction of the metrics mtlfast reports by default (and of a few common others), by metric name.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "macro_f1": True,
    "f1": True,
    "auroc": True,
    "average_precision": True,
    "rmse": False,
    "mse": False,
    "mae": False,
    "loss": False,
}

MetricValues = Mapping[str, Mapping[str, "float | torch.Tensor"]]


def _scalar(value: float | torch.Tensor, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"mtlfast: {where} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).cpu())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"mtlfast: {where} must be a number, got {type(value).__name__}") from None


def metric_direction(task: str, metric: str, directions: Mapping[str, Mapping[str, bool | None]] | None = None) -> bool:
    """Whether a higher value of ``metric`` on ``task`` is better: from ``directions[task][metric]`` when given
    (e.g. a torchmetrics ``Metric.higher_is_better``), else from :data:`HIGHER_IS_BETTER` by metric name."""
    given = None if directions is None else directions.get(task, {}).get(metric)
    if given is not None:
        return bool(given)
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    raise ValueError(
        f"mtlfast: Δm needs to know whether higher is better for metric {metric!r} of task {task!r}; "
        f"pass directions={{{task!r}: {{{metric!r}: True/False}}}}"
    )


def delta_m(
    results: MetricValues,
    baselines: MetricValues,
    directions: Mapping[str, Mapping[str, bool | None]] | None = None,
    *,
    average: Literal["tasks", "metrics"] = "tasks",
) -> float:
    """Δm in percent of the multi-task ``results`` over the single-task ``baselines``.

    Args:
        results: task → metric → value of the multi-task model (floats or one-element tensors).
        baselines: task → metric → value of the single-task model; only these (task, metric) pairs enter Δm.
        directions: task → metric → whether higher is better; missing entries fall back to
            :data:`HIGHER_IS_BETTER` by metric name.
        average: ``"tasks"`` — mean over tasks of each task's mean over its metrics (the papers' 1/T Σ_t); or
            ``"metrics"`` — mean over every (task, metric) pair.

    Returns:
        Δm as a Python float (a reporting quantity computed once per evaluation, on the host); > 0 is a gain.
    """
    if average not in ("tasks", "metrics"):
        raise ValueError(f"mtlfast: delta_m average must be 'tasks' or 'metrics', got {average!r}")
    if not baselines:
        raise ValueError("mtlfast: delta_m needs at least one baseline metric")
    per_task: list[list[float]] = []
    for task, task_baselines in baselines.items():
        if not task_baselines:
            raise ValueError(f"mtlfast: single-task baseline of task {task!r} names no metric")
        if task not in results:
            raise ValueError(f"mtlfast: Δm: no result for task {task!r} (results have {sorted(results)})")
        gains = []
        for metric, base_value in task_baselines.items():
            if metric not in results[task]:
                raise ValueError(
                    f"mtlfast: Δm: task {task!r} has no result for metric {metric!r} (it has {sorted(results[task])})"
                )
            base = _scalar(base_value, f"baseline {task}/{metric}")
            if base == 0.0:
                raise ValueError(f"mtlfast: Δm: baseline {task}/{metric} is 0; the relative gain is undefined")
            value = _scalar(results[task][metric], f"result {task}/{metric}")
            sign = 1.0 if metric_direction(task, metric, directions) else -1.0
            gains.append(sign * (value - base) / base)
        per_task.append(gains)
    if average == "tasks":
        return 100.0 * sum(sum(g) / len(g) for g in per_task) / len(per_task)
    flat = [gain for gains in per_task for gain in gains]
    return 100.0 * sum(flat) / len(flat)


__all__ = ["HIGHER_IS_BETTER", "delta_m", "metric_direction"]
