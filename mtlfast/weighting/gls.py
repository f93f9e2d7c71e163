"""Geometric loss strategy: the geometric mean of the task losses."""

from __future__ import annotations

import torch

from mtlfast.weighting.base import LossWeighting


class GLS(LossWeighting):
    """Geometric loss strategy (Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature
    Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019).

        ``total = (Π_t L_t)^{1/T} = exp( (1/T)·Σ_t log L_t )``

    computed as the exponential of the mean log (a product of T small or large losses under/overflows; the mean
    of logs does not). Its gradient ``∂total/∂L_t = total / (T·L_t)`` weights each task by the inverse of its own
    loss, which makes the step invariant to a rescaling of any single loss.

    Losses that are exactly 0 (a task absent from the batch: ``MultiTaskOutput.loss_vector`` holds 0 there) are
    left out: the product and T run over the tasks with ``L_t ≠ 0`` only, chosen by tensor masking (no host
    sync). Kept in, a single 0 would make the total 0 for every task and ``log 0`` would give inf/NaN gradients;
    left out, the gradients stay finite and absent tasks get exactly 0. When every loss is 0 the total is 0 with a
    zero gradient. Negative or NaN losses are not masked: the geometric mean is undefined there and the total is
    NaN, so the problem shows.

    ``task_weights`` records the effective weights ``∂total/∂L_t`` (0 for absent tasks).

    Args:
        num_tasks: T.

    Input: a (T,) loss vector (or a ``MultiTaskOutput``); output: a scalar in the losses' dtype and device.
    """

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        present = losses != 0
        ones = torch.ones_like(losses)
        # log(1) = 0 for absent tasks, and the where() sends them no gradient, so they can't produce inf/NaN.
        safe_losses = torch.where(present, losses, ones)
        count = present.sum().to(losses.dtype)
        mean_log = torch.log(safe_losses).sum() / count.clamp_min(1)
        total = torch.where(count > 0, torch.exp(mean_log), torch.zeros_like(mean_log))
        with torch.no_grad():
            self._record(torch.where(present, total / (count.clamp_min(1) * safe_losses), torch.zeros_like(losses)))
        return total
