"""What :func:`mtlfast.training.fit` returns: one record per epoch, as rows for a DataFrame/CSV, and a loss plot."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EpochRecord:
    """One epoch of training (host values, read once at the epoch end).

    Attributes:
        epoch: 1-based epoch number.
        train_loss: task → mean of its per-batch loss over the steps whose batch had a target for it (NaN if none).
            Under DistributedDataParallel: the mean over every rank's batches.
        train_total: mean over steps of the objective that was backpropagated (the weighting's total; Σ λ_t L_t
            without one).
        val_metrics: task → metric → value on the validation loader (empty without one).
        delta_m: Δm in percent over the single-task baselines (None without them).
        task_weights: task → the weight the weighting method applied at the epoch's last step (None without one).
        lr: learning rate of the optimiser's first parameter group at the epoch end (after the scheduler step).
        steps: optimiser steps in the epoch.
        epoch_time_s: wall time of the whole epoch (training, evaluation, callbacks).
        steps_per_s: training steps per second (training part only).
    """

    epoch: int
    train_loss: dict[str, float]
    train_total: float
    val_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    delta_m: float | None = None
    task_weights: dict[str, float] | None = None
    lr: float | None = None
    steps: int = 0
    epoch_time_s: float = 0.0
    steps_per_s: float = 0.0

    def as_row(self) -> dict[str, Any]:
        """A flat dict: ``epoch``, ``train_loss/<task>``, ``train_total``, ``val/<task>/<metric>``, ``delta_m``,
        ``task_weight/<task>``, ``lr``, ``steps``, ``epoch_time_s``, ``steps_per_s``."""
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update({f"train_loss/{task}": value for task, value in self.train_loss.items()})
        row["train_total"] = self.train_total
        for task, metrics in self.val_metrics.items():
            row.update({f"val/{task}/{name}": value for name, value in metrics.items()})
        if self.delta_m is not None:
            row["delta_m"] = self.delta_m
        if self.task_weights is not None:
            row.update({f"task_weight/{task}": value for task, value in self.task_weights.items()})
        row.update(lr=self.lr, steps=self.steps, epoch_time_s=self.epoch_time_s, steps_per_s=self.steps_per_s)
        return row


class History:
    """The per-epoch records of a :func:`~mtlfast.training.fit` run, in order (index, iterate, ``len``)."""

    def __init__(self, task_names: Sequence[str]):
        self.task_names: tuple[str, ...] = tuple(task_names)
        self.records: list[EpochRecord] = []

    def append(self, record: EpochRecord) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EpochRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[EpochRecord]:
        return iter(self.records)

    def as_rows(self) -> list[dict[str, Any]]:
        """One flat dict per epoch (see :meth:`EpochRecord.as_row`), e.g. for ``pandas.DataFrame(...)``."""
        return [record.as_row() for record in self.records]

    def plot(self, path: str | os.PathLike[str], *, log_scale: bool = True) -> str:
        """Draw every task's mean training loss per epoch into an image file (format from the suffix); returns the
        path. Needs matplotlib (drawn on a standalone Figure: no pyplot state, no display needed)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError("mtlfast: History.plot needs matplotlib (pip install matplotlib)") from error
        if not self.records:
            raise ValueError("mtlfast: History.plot: no epoch recorded yet")
        figure = Figure(figsize=(7.0, 4.5), layout="constrained")
        axes = figure.subplots()
        epochs = [record.epoch for record in self.records]
        all_positive = True
        for task in self.task_names:
            values = [record.train_loss.get(task, math.nan) for record in self.records]
            all_positive &= all(not value <= 0 for value in values)
            axes.plot(epochs, values, marker="o", label=task)
        axes.set_xlabel("epoch")
        axes.set_ylabel("mean training loss")
        if log_scale and all_positive:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small", ncols=max(1, len(self.task_names) // 12))
        figure.savefig(path)
        return os.fspath(path)

    def __repr__(self) -> str:
        return f"History(epochs={len(self.records)}, tasks={list(self.task_names)})"


__all__ = ["EpochRecord", "History"]
