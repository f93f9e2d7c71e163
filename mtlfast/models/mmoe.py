"""Multi-gate Mixture-of-Experts."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from mtlfast.models._base import MultiTaskModel, check_dropout, check_features, check_hidden, check_positive
from mtlfast.models._stacked import StackedMLP
from mtlfast.models._tower_heads import TowerHeads
from mtlfast.tasks import Task


class MMoE(MultiTaskModel):
    """MMoE (Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
    KDD 2018): E expert MLPs shared by all tasks; task t mixes them with its own softmax gate
    g_t(x) = softmax(W_t x + b_t) ∈ Δ^E, then its tower and head read f_t(x) = Σ_e g_t(x)_e · expert_e(x).

    Args:
        in_features: D_in of the (..., D_in) input.
        tasks: the task specs (one gate, tower and head each).
        num_experts: E.
        expert_hidden: the hidden sizes of each expert MLP (every layer followed by ``activation`` and dropout);
            the experts output ``expert_hidden[-1]`` features.
        tower_hidden: the hidden sizes of each task tower; empty: the heads read the mixtures directly.
        activation: a factory of the activation module; dropout: the rate after each expert and tower layer.
        bias, chunk_rows: of the task heads (see :class:`~mtlfast.MultiTaskHeads`); device, dtype: of all parameters.

    Speed: the E experts are one batched GEMM per layer over stacked weights, the T gates one ``nn.Linear``
    (D_in → T·E) with a per-gate softmax, the T towers one batched GEMM per layer, and all heads and losses one
    fused op call (see ``mtlfast/models/_tower_heads.py``).

    State dict: ``experts.layers.<i>.weight`` (E, fan_in, fan_out) / ``.bias`` (E, fan_out);
    ``gates.weight`` (T·E, D_in) with rows ``[t·E, (t+1)·E)`` for task t, ``gates.bias``;
    ``towers.layers.<i>.weight`` (T, fan_in, fan_out) / ``.bias``; ``heads.<task>.weight`` (C_t, H) / ``.bias``.
    """

    shares_representation = False

    def __init__(self, in_features: int, tasks: Sequence[Task], *, num_experts: int, expert_hidden: Sequence[int],
                 tower_hidden: Sequence[int] = (), activation: Callable[[], nn.Module] = nn.ReLU,
                 dropout: float = 0.0, bias: bool = True, chunk_rows: int | str | None = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(tasks)
        check_positive("MMoE", in_features=in_features, num_experts=num_experts)
        expert_hidden = check_hidden("MMoE", "expert_hidden", expert_hidden, allow_empty=False)
        tower_hidden = check_hidden("MMoE", "tower_hidden", tower_hidden, allow_empty=True)
        dropout = check_dropout("MMoE", dropout)
        self.in_features, self.num_experts = int(in_features), int(num_experts)
        num_tasks = len(self.tasks)
        factory = {"device": device, "dtype": dtype}
        self.experts = StackedMLP(self.num_experts, self.in_features, expert_hidden, activation=activation,
                                  dropout=dropout, **factory)
        self.gates = nn.Linear(self.in_features, num_tasks * self.num_experts, **factory)
        self.towers = StackedMLP(num_tasks, expert_hidden[-1], tower_hidden, activation=activation, dropout=dropout,
                                 **factory)
        self.heads = TowerHeads(self.towers.out_features, self.tasks, bias=bias, chunk_rows=chunk_rows, **factory)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The task towers' outputs, (T, ..., H): what task t's head reads is ``[t]``."""
        check_features(x, self.in_features, "MMoE")
        batch_shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        experts = self.experts(x)  # (E, N, H)
        gates = self.gates(x).unflatten(-1, (len(self.tasks), self.num_experts)).softmax(-1)  # (N, T, E)
        mixtures = torch.einsum("nte,enh->tnh", gates, experts)
        towers = self.towers(mixtures)  # (T, N, H_tower)
        return towers.reshape(towers.shape[0], *batch_shape, towers.shape[-1])

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The experts' parameters: what every task's gradient flows through (for ``mode="parameters"``)."""
        return self.experts.parameters()
