"""One Customized Gate Control (CGC) layer: the building block of CGC and of every level of PLE."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mtlfast.models._stacked import StackedLinear, StackedMLP


class ExtractionLayer(nn.Module):
    """A CGC layer / one extraction network of PLE (Tang et al., "Progressive Layered Extraction (PLE): A Novel
    Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020, §4.2–4.3).

    Each of the T tasks owns ``num_task_experts`` experts; ``num_shared_experts`` experts are shared. Task t's gate
    mixes its own experts and the shared ones; the optional shared gate (every PLE level but the last) mixes all.

    Experts are stacked in the order [task 0's experts, …, task T-1's experts, shared experts] (E in all), so the
    whole layer's experts are one batched GEMM per expert layer. Gates:

    * first level (``shared_input=True``): every expert and gate reads the same (N, D) input, and all gates are one
      ``nn.Linear`` ``gates`` (D → T·k [+ E]): rows ``[t·k, (t+1)·k)`` are task t's gate over its k = m_t + m_s
      experts (own experts first, then shared), the last E rows (if any) the shared gate;
    * later levels read (T+1, N, D): task t's experts and gate read slice t, the shared experts and gate slice T.
      The task gates are one batched GEMM ``task_gates`` (T, D, k), the shared gate an ``nn.Linear(D, E)``.

    Output: (T, N, H) mixtures, plus the shared gate's mixture at index T when there is a shared gate
    (H = ``expert_hidden[-1]``).
    """

    def __init__(self, in_features: int, num_tasks: int, *, num_task_experts: int, num_shared_experts: int,
                 expert_hidden: Sequence[int], shared_input: bool, shared_gate: bool,
                 activation: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        own, shared = num_task_experts, num_shared_experts
        self.num_tasks, self.num_task_experts, self.num_shared_experts = num_tasks, own, shared
        self.num_experts = num_tasks * own + shared
        self.gate_size = own + shared
        self.shared_input = shared_input
        self.has_shared_gate = shared_gate
        factory = {"device": device, "dtype": dtype}
        self.experts = StackedMLP(self.num_experts, in_features, expert_hidden, activation=activation,
                                  dropout=dropout, **factory)
        shared_gate_size = self.num_experts if shared_gate else 0
        if shared_input:
            self.gates = nn.Linear(in_features, num_tasks * self.gate_size + shared_gate_size, **factory)
        else:
            self.task_gates = StackedLinear(num_tasks, in_features, self.gate_size, **factory)
            self.shared_gate = nn.Linear(in_features, shared_gate_size, **factory) if shared_gate else None
        # Expert ids each task gate weighs, in gate order: the task's own experts, then the shared experts.
        gate_experts = [[t * own + j for j in range(own)] + [num_tasks * own + j for j in range(shared)]
                        for t in range(num_tasks)]
        self.register_buffer("task_gate_experts", torch.tensor(gate_experts, device=device).reshape(num_tasks, -1),
                             persistent=False)
        # With no task-specific experts every task gate weighs all experts in order: no scatter needed.
        self._gates_cover_all_experts = own == 0
        # Which slice of a (T+1, N, D) input each expert reads (later levels).
        sources = [t for t in range(num_tasks) for _ in range(own)] + [num_tasks] * shared
        self.register_buffer("expert_source", torch.tensor(sources, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tasks, k = self.num_tasks, self.gate_size
        shared_probs = None
        if self.shared_input:
            experts = self.experts(x)  # (E, N, H)
            gate_logits = self.gates(x)
            task_logits = gate_logits[:, : num_tasks * k].unflatten(-1, (num_tasks, k))  # (N, T, k)
            if self.has_shared_gate:
                shared_probs = gate_logits[:, num_tasks * k:].softmax(-1)
        else:
            experts = self.experts(x.index_select(0, self.expert_source))
            task_logits = self.task_gates(x[:num_tasks]).transpose(0, 1)  # (N, T, k)
            if self.shared_gate is not None:
                shared_probs = self.shared_gate(x[num_tasks]).softmax(-1)
        task_probs = task_logits.softmax(-1)
        if self._gates_cover_all_experts:
            mixing = task_probs
        else:
            # Each task gate's weights placed at its experts' positions in a dense (N, T, E) mixing matrix, so one
            # batched GEMM mixes every gate; its zeros add work of order (T+1)/D of the first expert GEMM.
            rows = task_probs.shape[0]
            index = self.task_gate_experts.expand(rows, num_tasks, k)
            mixing = task_probs.new_zeros(rows, num_tasks, self.num_experts).scatter(2, index, task_probs)
        if shared_probs is not None:
            mixing = torch.cat([mixing, shared_probs.unsqueeze(1)], dim=1)  # (N, T+1, E)
        return torch.einsum("nge,enh->gnh", mixing, experts)
