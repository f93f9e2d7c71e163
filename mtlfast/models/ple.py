"""Progressive Layered Extraction."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from mtlfast.models._base import MultiTaskModel, check_dropout, check_features, check_hidden, check_positive
from mtlfast.models._extraction import ExtractionLayer
from mtlfast.models._stacked import StackedMLP
from mtlfast.models._tower_heads import TowerHeads
from mtlfast.tasks import Task


class PLE(MultiTaskModel):
    """PLE (Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
    Personalized Recommendations", RecSys 2020): ``num_levels`` stacked CGC extraction layers. At every level each
    task owns ``num_task_experts`` experts and ``num_shared_experts`` are shared; task t's gate mixes its own and the
    shared experts. Below the last level a shared gate mixes all experts into the shared input of the next level,
    whose task-t experts and gate read task t's mixture. Task t's tower and head read its last-level mixture.

    Args:
        in_features: D_in of the (..., D_in) input.
        tasks: the task specs.
        num_levels: number of extraction layers (1 = :class:`CGC`).
        num_shared_experts, num_task_experts: experts per level (each ≥ 0, with at least one expert per gate).
        expert_hidden: hidden sizes of every expert MLP (each layer followed by ``activation`` and dropout); all
            levels use the same sizes, so levels after the first read ``expert_hidden[-1]`` features.
        tower_hidden: hidden sizes of each task tower; empty: the heads read the mixtures directly.
        activation, dropout: as in :class:`MMoE`; bias, chunk_rows: of the task heads; device, dtype: of all
            parameters.

    Speed: per level, all experts are one batched GEMM per layer, the first level's gates one ``nn.Linear``, later
    levels' task gates one batched GEMM; the towers one batched GEMM per layer; every head and loss one fused op.

    State dict: ``levels.<l>.experts.layers.<i>.weight`` (E, fan_in, fan_out) with experts ordered [task 0's, …,
    task T-1's, shared]; ``levels.0.gates.weight`` (T·k [+ E], D_in) (see ``ExtractionLayer``);
    ``levels.<l>.task_gates.weight`` (T, H, k) and ``levels.<l>.shared_gate.weight`` for l > 0;
    ``towers.layers.<i>.weight`` (T, fan_in, fan_out); ``heads.<task>.weight`` (C_t, H) / ``.bias``.
    """

    shares_representation = False

    def __init__(self, in_features: int, tasks: Sequence[Task], *, num_levels: int, num_shared_experts: int,
                 num_task_experts: int, expert_hidden: Sequence[int], tower_hidden: Sequence[int] = (),
                 activation: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0, bias: bool = True,
                 chunk_rows: int | str | None = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(tasks)
        name = type(self).__name__
        check_positive(name, in_features=in_features, num_levels=num_levels)
        _check_expert_counts(name, num_shared_experts, num_task_experts)
        expert_hidden = check_hidden(name, "expert_hidden", expert_hidden, allow_empty=False)
        tower_hidden = check_hidden(name, "tower_hidden", tower_hidden, allow_empty=True)
        dropout = check_dropout(name, dropout)
        self.in_features = int(in_features)
        num_tasks = len(self.tasks)
        factory = {"device": device, "dtype": dtype}
        self.levels = nn.ModuleList(
            ExtractionLayer(
                self.in_features if level == 0 else expert_hidden[-1], num_tasks,
                num_task_experts=int(num_task_experts), num_shared_experts=int(num_shared_experts),
                expert_hidden=expert_hidden, shared_input=level == 0, shared_gate=level < num_levels - 1,
                activation=activation, dropout=dropout, **factory,
            )
            for level in range(int(num_levels))
        )
        self.towers = StackedMLP(num_tasks, expert_hidden[-1], tower_hidden, activation=activation, dropout=dropout,
                                 **factory)
        self.heads = TowerHeads(self.towers.out_features, self.tasks, bias=bias, chunk_rows=chunk_rows, **factory)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The task towers' outputs, (T, ..., H): what task t's head reads is ``[t]``."""
        check_features(x, self.in_features, type(self).__name__)
        batch_shape = x.shape[:-1]
        mixtures = x.reshape(-1, self.in_features)
        for level in self.levels:
            mixtures = level(mixtures)  # (T+1, N, H) between levels, (T, N, H) after the last
        towers = self.towers(mixtures)
        return towers.reshape(towers.shape[0], *batch_shape, towers.shape[-1])

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of every level's experts (task-specific experts included: their rows of the stacked
        weights receive gradient from their own task only). For ``mode="parameters"`` gradient weighting."""
        for level in self.levels:
            yield from level.experts.parameters()


def _check_expert_counts(model: str, num_shared_experts: int, num_task_experts: int) -> None:
    for label, count in (("num_shared_experts", num_shared_experts), ("num_task_experts", num_task_experts)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"mtlfast: {model} {label} must be a non-negative int, got {count!r}")
    if num_shared_experts + num_task_experts < 1:
        raise ValueError(
            f"mtlfast: {model} needs at least one expert per gate (num_shared_experts + num_task_experts ≥ 1)"
        )
