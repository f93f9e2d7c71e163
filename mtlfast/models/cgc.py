"""Customized Gate Control: single-level PLE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtlfast.models.ple import PLE
from mtlfast.tasks import Task


class CGC(PLE):
    """CGC (Tang et al., "Progressive Layered Extraction (PLE)", RecSys 2020, §4.2): each task owns
    ``num_task_experts`` experts, ``num_shared_experts`` are shared, and task t's gate mixes its own and the shared
    experts for its tower and head. It is :class:`PLE` with ``num_levels=1`` (no shared gate); same arguments,
    speed notes and state-dict keys (``levels.0.*``, ``towers.*``, ``heads.<task>.*``).
    """

    def __init__(self, in_features: int, tasks: Sequence[Task], *, num_shared_experts: int, num_task_experts: int,
                 expert_hidden: Sequence[int], tower_hidden: Sequence[int] = (), **kwargs: Any):
        super().__init__(in_features, tasks, num_levels=1, num_shared_experts=num_shared_experts,
                         num_task_experts=num_task_experts, expert_hidden=expert_hidden, tower_hidden=tower_hidden,
                         **kwargs)
