"""Running per-task training losses kept on the device, read on the host only when asked.

A training step adds its (T,) loss vector with two in-place device ops; nothing is copied to the host until
:meth:`LossMeter.running_means` (at a logging step) or :meth:`LossMeter.epoch_means` (at the epoch end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mtlfast.training import _ranks


class LossMeter:
    """Sums of each task's batch loss and of the backpropagated total, plus how many steps had each task.

    ``counts`` are host integers (whether a batch has a target for a task is known on the host without a sync).
    """

    def __init__(self, task_names: Sequence[str]):
        self.task_names = tuple(task_names)
        self.counts = [0] * len(self.task_names)
        self.steps = 0
        self._sums: torch.Tensor | None = None  # (T + 1,): per-task sums, then the total's sum

    @torch.no_grad()
    def add(self, loss_vector: torch.Tensor, total: torch.Tensor, present: Sequence[bool]) -> None:
        """``loss_vector`` (T,) in task order (0 for absent tasks), ``total`` the scalar that was backpropagated,
        ``present[t]`` whether the batch had a target for task t."""
        num_tasks = len(self.task_names)
        if self._sums is None:
            dtype = torch.promote_types(loss_vector.dtype, torch.float32)
            self._sums = torch.zeros(num_tasks + 1, dtype=dtype, device=loss_vector.device)
        self._sums[:num_tasks].add_(loss_vector.detach())
        self._sums[num_tasks:].add_(total.detach().reshape(1))
        for t, here in enumerate(present):
            self.counts[t] += here
        self.steps += 1

    def _means(self, sums: list[float], counts: Sequence[float], steps: float) -> tuple[dict[str, float], float]:
        per_task = {name: (s / c if c else math.nan) for name, s, c in zip(self.task_names, sums, counts)}
        return per_task, (sums[-1] / steps if steps else math.nan)

    def running_means(self) -> tuple[dict[str, float], float]:
        """This process's means so far: (task → mean loss, mean total). One device → host copy."""
        if self._sums is None:
            return {name: math.nan for name in self.task_names}, math.nan
        return self._means(self._sums.tolist(), self.counts, self.steps)

    def epoch_means(self) -> tuple[dict[str, float], float]:
        """Means over every rank's steps (sums and counts are summed across ranks first): (task → mean, total)."""
        num_tasks = len(self.task_names)
        if self._sums is None:
            sums = torch.zeros(num_tasks + 1, dtype=torch.float64)
        else:
            sums = self._sums
        counts = torch.tensor([*self.counts, self.steps], dtype=sums.dtype, device=sums.device)
        reduced = _ranks.sum_over_ranks(torch.cat([sums, counts])).tolist()
        return self._means(reduced[: num_tasks + 1], reduced[num_tasks + 1: -1], reduced[-1])


__all__ = ["LossMeter"]
