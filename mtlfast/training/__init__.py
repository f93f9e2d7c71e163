"""A thin, optional training loop for multi-task models: :func:`fit`, per-task metrics, Δm and the history.

Nothing here is needed to use mtlfast's heads, models or weighting methods in your own loop. torchmetrics (metrics),
tqdm (progress bar) and matplotlib (``History.plot``) are imported only when used.
"""

from mtlfast.training.delta_m import HIGHER_IS_BETTER, delta_m
from mtlfast.training.evaluate import evaluate
from mtlfast.training.fit import fit
from mtlfast.training.history import EpochRecord, History
from mtlfast.training.metrics import MISSING_LABEL, TaskMetrics, default_metrics, metric_inputs

__all__ = [
    "EpochRecord",
    "HIGHER_IS_BETTER",
    "History",
    "MISSING_LABEL",
    "TaskMetrics",
    "default_metrics",
    "delta_m",
    "evaluate",
    "fit",
    "metric_inputs",
]
