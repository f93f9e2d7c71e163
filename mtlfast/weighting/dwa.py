"""Dynamic weight average: weights from how fast each task's loss went down over the last two epochs."""

from __future__ import annotations

import torch

from mtlfast.weighting import _distributed
from mtlfast.weighting.base import LossWeighting


class DWA(LossWeighting):
    """Dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

    With ``L̄_t(k)`` the mean loss of task t over epoch k (epochs counted from 0),

        ``r_t = L̄_t(k−1) / L̄_t(k−2)``,   ``w_t = T·softmax(r / τ)_t = T·exp(r_t/τ) / Σ_s exp(r_s/τ)``

    for epoch k ≥ 2, and ``w_t = 1`` in epochs 0 and 1. A task whose loss falls slowly (r near 1 or above) gets
    more weight; the weights are positive and sum to T. ``total = Σ_t w_t·L_t``.

    State and the epoch contract: every call in training mode adds the detached losses to a running per-task sum
    (``epoch_loss_sum``) and counts the calls in which the task was present (``epoch_loss_count``) — tensor ops on
    the losses' device, no host sync. :meth:`end_epoch` (called by ``mtlfast.fit``, or by your loop, once at the
    end of every training epoch, on every rank) turns them into the epoch means and shifts the two-epoch history
    (``epoch_means[0] = L̄(k−2)``, ``epoch_means[1] = L̄(k−1)``). The first-two-epochs rule is a ``torch.where`` on
    the ``epochs_completed`` counter, so the step has no Python branch on tensor values and compiles with
    ``fullgraph=True``. All of it is in persistent buffers: ``state_dict()`` saves and restores the history.

    Choices the paper leaves open:

    * a loss that is exactly 0 (task absent from the batch) or not finite (e.g. an overflowing step that a grad
      scaler skips) is left out of the epoch mean rather than dragging it down or poisoning every later epoch;
    * a task with no recorded loss in one of the two epochs (or a mean of 0) gets ``r_t = 1``;
    * in eval mode (``weighting.eval()``) nothing is accumulated, so validation losses never enter the history.

    Under DistributedDataParallel :meth:`end_epoch` averages the sums and counts over ranks, so every rank holds the
    same epoch means (with equal per-rank batch sizes: the means of the whole batch) and applies the same weights.

    Args:
        num_tasks: T.
        temperature: τ > 0 (the paper uses 2); larger τ gives weights closer to 1.

    Input: a (T,) loss vector (or a ``MultiTaskOutput``); output: a scalar in the losses' dtype and device.
    The buffers are float32 (``.double()`` makes them float64); move the module to the losses' device.
    """

    epoch_loss_sum: torch.Tensor
    epoch_loss_count: torch.Tensor
    epoch_means: torch.Tensor
    epochs_completed: torch.Tensor

    def __init__(self, num_tasks: int, temperature: float = 2.0):
        super().__init__(num_tasks)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"mtlfast: DWA temperature must be a number, got {type(temperature).__name__}")
        if not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"mtlfast: DWA temperature must be finite and > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("epoch_loss_sum", torch.zeros(self.num_tasks))
        self.register_buffer("epoch_loss_count", torch.zeros(self.num_tasks))
        self.register_buffer("epoch_means", torch.zeros(2, self.num_tasks))
        self.register_buffer("epochs_completed", torch.zeros((), dtype=torch.long))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(T,) weights for the current epoch, from the stored history (the losses only give device/shape)."""
        before_last, last = self.epoch_means[0], self.epoch_means[1]
        known = (before_last > 0) & (last > 0)
        ratio = torch.where(known, last / torch.where(known, before_last, torch.ones_like(before_last)),
                            torch.ones_like(last))
        dynamic = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        return torch.where(self.epochs_completed >= 2, dynamic, torch.ones_like(dynamic))

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                observed = losses.detach().to(self.epoch_loss_sum.dtype)
                counted = (observed != 0) & torch.isfinite(observed)
                self.epoch_loss_sum.add_(torch.where(counted, observed, torch.zeros_like(observed)))
                self.epoch_loss_count.add_(counted.to(self.epoch_loss_count.dtype))
        return super().combine(losses, gram)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Close the current epoch: its mean losses (averaged over DDP ranks) become ``L̄(k−1)``, the previous
        ones ``L̄(k−2)``, and the running sums restart. Call it once per epoch on every rank (a collective)."""
        sums = _distributed.mean_over_ranks(self.epoch_loss_sum)
        counts = _distributed.mean_over_ranks(self.epoch_loss_count)
        means = torch.where(counts > 0, sums / counts.clamp_min(1e-12), torch.zeros_like(sums))
        self.epoch_means[0].copy_(self.epoch_means[1])
        self.epoch_means[1].copy_(means)
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()
        self.epochs_completed.add_(1)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}"
