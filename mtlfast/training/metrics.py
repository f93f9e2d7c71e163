"""Per-task evaluation metrics (torchmetrics objects), fed with mtlfast's missing-label conventions masked out.

What a metric receives for each task kind (after :func:`metric_inputs`), which is also what a user-supplied
``torchmetrics.Metric`` gets:

=============== ================================= ==================================================================
task            preds                             target
=============== ================================= ==================================================================
Classification  (N, C) softmax probabilities      (N,) int64 class; rows whose class is ``ignore_index`` dropped
Binary          (N,) sigmoid probabilities        (N,) int64 in {0, 1} (soft labels binarised at 0.5); NaN rows dropped
MultiLabel      (N, K) sigmoid probabilities      (N, K) int64 in {0, 1}, missing (NaN) entries = :data:`MISSING_LABEL`
                                                  (build multi-label metrics with ``ignore_index=MISSING_LABEL``)
Regression      (M,) predictions, every output    (M,) float; NaN elements dropped
                flattened
=============== ================================= ==================================================================

N flattens every leading (batch, sequence, …) dimension. torchmetrics is imported only when metrics are built, so
``import mtlfast`` does not need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mtlfast.tasks import Binary, Classification, MultiLabel, Regression, Task
from mtlfast.training._ranks import world_size

if TYPE_CHECKING:
    from torchmetrics import Metric

MISSING_LABEL = -1
"""The target value of a missing multi-label entry as metrics see it (their ``ignore_index``)."""

MetricsSpec = Mapping[str, Mapping[str, "Metric"]]


def _torchmetrics():
    try:
        import torchmetrics
    except ImportError as error:  # pragma: no cover - torchmetrics is a dependency of the training loop
        raise ImportError("mtlfast: per-task metrics need torchmetrics (pip install torchmetrics)") from error
    return torchmetrics


def default_metrics(tasks: Iterable[Task]) -> dict[str, dict[str, Metric]]:
    """Fresh metric objects by task kind: Classification → accuracy, macro-F1; Binary → accuracy, AUROC;
    MultiLabel → macro-F1 (threshold 0.5), macro AUROC; Regression → RMSE, MAE (over all outputs).

    Macro averages follow torchmetrics: multi-class macro-F1 averages over the classes present in the targets or
    predictions, multi-label macro-F1 / AUROC over every label. Tasks of another kind get no metric.
    """
    tm = _torchmetrics()
    result: dict[str, dict[str, Metric]] = {}
    for task in tasks:
        if isinstance(task, Classification):
            result[task.name] = {
                "accuracy": tm.classification.MulticlassAccuracy(num_classes=task.num_classes, average="micro"),
                "macro_f1": tm.classification.MulticlassF1Score(num_classes=task.num_classes, average="macro"),
            }
        elif isinstance(task, Binary):
            result[task.name] = {
                "accuracy": tm.classification.BinaryAccuracy(),
                "auroc": tm.classification.BinaryAUROC(),
            }
        elif isinstance(task, MultiLabel):
            result[task.name] = {
                "macro_f1": tm.classification.MultilabelF1Score(
                    num_labels=task.num_labels, average="macro", threshold=0.5, ignore_index=MISSING_LABEL
                ),
                "auroc": tm.classification.MultilabelAUROC(
                    num_labels=task.num_labels, average="macro", ignore_index=MISSING_LABEL
                ),
            }
        elif isinstance(task, Regression):
            result[task.name] = {
                "rmse": tm.regression.MeanSquaredError(squared=False),
                "mae": tm.regression.MeanAbsoluteError(),
            }
    return result


def _metric_dtype(logits: torch.Tensor) -> torch.dtype:
    # Half-precision logits are scored in float32; float64 stays float64.
    return torch.promote_types(logits.dtype, torch.float32)


def metric_inputs(task: Task, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(preds, target) for ``task``'s metrics from its logits (as ``predict`` returns them) and its target (the
    training layout), with missing labels removed or marked as the module docstring's table says."""
    dtype = _metric_dtype(logits)
    if isinstance(task, Classification):
        probabilities = logits.reshape(-1, task.num_classes).to(dtype).softmax(-1)
        labels = target.reshape(-1).long()
        keep = labels != task.ignored_class
        return probabilities[keep], labels[keep]
    if isinstance(task, Binary):
        probabilities = logits.reshape(-1).to(dtype).sigmoid()
        labels = target.reshape(-1).to(dtype)
        keep = ~torch.isnan(labels)
        return probabilities[keep], (labels[keep] >= 0.5).long()
    if isinstance(task, MultiLabel):
        probabilities = logits.reshape(-1, task.num_labels).to(dtype).sigmoid()
        labels = target.reshape(-1, task.num_labels).to(dtype)
        marked = torch.where(torch.isnan(labels), MISSING_LABEL, (labels >= 0.5).long())
        return probabilities, marked
    if isinstance(task, Regression):
        values = logits.reshape(-1).to(dtype)
        labels = target.reshape(-1).to(dtype)
        keep = ~torch.isnan(labels)
        return values[keep], labels[keep]
    raise TypeError(f"mtlfast: no metric input convention for task {task.name!r} of kind {type(task).__name__}")


class TaskMetrics(nn.Module):
    """task → {metric name → ``torchmetrics.Metric``}, updated from ``predict`` outputs and the targets dict.

    An ``nn.Module`` so ``.to(device)`` moves every metric state. Under ``torch.distributed`` torchmetrics gathers
    the states of every rank at :meth:`compute` (every rank must call it).

    Args:
        tasks: the model's task specs.
        metrics: task name → metric name → metric object (e.g. :func:`default_metrics`); tasks not named get none.
    """

    def __init__(self, tasks: Iterable[Task], metrics: MetricsSpec):
        super().__init__()
        self.tasks: dict[str, Task] = {task.name: task for task in tasks}
        if not isinstance(metrics, Mapping):
            raise TypeError("mtlfast: metrics must be 'auto', None or a mapping task → {name: Metric}, "
                            f"got {type(metrics).__name__}")
        unknown = sorted(set(metrics) - set(self.tasks))
        if unknown:
            raise ValueError(f"mtlfast: metrics given for unknown tasks {unknown}; tasks are {list(self.tasks)}")
        metric_base = _torchmetrics().Metric
        self.metrics = nn.ModuleDict()
        for task_name, named in metrics.items():
            if not isinstance(named, Mapping):
                raise TypeError(f"mtlfast: metrics[{task_name!r}] must be a mapping name → torchmetrics.Metric")
            group = nn.ModuleDict()
            for metric_name, metric in named.items():
                if not isinstance(metric, metric_base):
                    raise TypeError(
                        f"mtlfast: metric {metric_name!r} of task {task_name!r} must be a torchmetrics.Metric, "
                        f"got {type(metric).__name__}"
                    )
                if not isinstance(metric_name, str) or not metric_name or "." in metric_name:
                    raise ValueError(f"mtlfast: metric name {metric_name!r} of task {task_name!r} must be a non-empty "
                                     "string without '.'")
                group[metric_name] = metric
            if len(group):
                self.metrics[task_name] = group

    @property
    def names(self) -> dict[str, list[str]]:
        """task → its metric names."""
        return {task: list(group) for task, group in self.metrics.items()}

    def higher_is_better(self) -> dict[str, dict[str, bool | None]]:
        """task → metric → the metric's own ``higher_is_better`` (None when the metric does not say)."""
        return {task: {name: getattr(m, "higher_is_better", None) for name, m in group.items()}
                for task, group in self.metrics.items()}

    @torch.no_grad()
    def update(self, predictions: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor | None]) -> None:
        """Add one batch: ``predictions`` task → logits (as ``model.predict`` returns), ``targets`` task → target in
        the training layout (absent or None: the task is skipped for this batch)."""
        for task_name, group in self.metrics.items():
            target = targets.get(task_name)
            if target is None:
                continue
            if task_name not in predictions:
                raise KeyError(f"mtlfast: predictions have no output for task {task_name!r}")
            preds, labels = metric_inputs(self.tasks[task_name], predictions[task_name], target)
            if preds.shape[0] == 0:  # every label of this batch missing
                continue
            for metric in group.values():
                metric.update(preds, labels)

    def compute(self) -> dict[str, dict[str, torch.Tensor]]:
        """task → metric → value (tensors). A metric that saw no labelled example is NaN (on a single process)."""
        distributed = world_size() > 1
        results: dict[str, dict[str, torch.Tensor]] = {}
        for task_name, group in self.metrics.items():
            results[task_name] = {}
            for metric_name, metric in group.items():
                # Every rank must take part in the gather inside compute(), whatever its own update count.
                if metric.update_count == 0 and not distributed:
                    results[task_name][metric_name] = torch.tensor(float("nan"))
                else:
                    results[task_name][metric_name] = metric.compute()
        return results

    def reset(self) -> None:
        for group in self.metrics.values():
            for metric in group.values():
                metric.reset()


def build_task_metrics(tasks: Iterable[Task], metrics: str | MetricsSpec | TaskMetrics | None) -> TaskMetrics | None:
    """``"auto"`` → :func:`default_metrics`; a mapping → those metrics; a :class:`TaskMetrics` → itself; None → None."""
    if metrics is None or isinstance(metrics, TaskMetrics):
        return metrics
    if isinstance(metrics, str):
        if metrics != "auto":
            raise ValueError(
                f"mtlfast: metrics must be 'auto', None or a mapping task → {{name: Metric}}, got {metrics!r}"
            )
        tasks = list(tasks)
        return TaskMetrics(tasks, default_metrics(tasks))
    return TaskMetrics(tasks, metrics)


__all__ = ["MISSING_LABEL", "MetricsSpec", "TaskMetrics", "build_task_metrics", "default_metrics", "metric_inputs"]
