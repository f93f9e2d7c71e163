"""Equal weighting: the plain sum of the task losses."""

from __future__ import annotations

import torch

from mtlfast.weighting.base import LossWeighting


class EqualWeighting(LossWeighting):
    """Equal weighting (EW), the baseline every multi-task method is compared against
    (e.g. Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022, Table 1 and §2).

    ``total = Σ_t w_t·L_t`` with ``w_t = 1`` for every task t, i.e. ``total = Σ_t L_t``.

    Args:
        num_tasks: T, the length of the loss vector.

    Input: a (T,) loss vector (or a ``MultiTaskOutput``); output: a scalar in the losses' dtype and device.
    """

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(T,) ones in the losses' dtype and device."""
        return torch.ones_like(losses)
