"""Task heads where each task reads its own tower's output, still computed by one call of the fused op.

The fused op takes one representation h for every head. Task t's head reads its tower output z_t (N, H) instead,
so the heads are handed to the op as

    h_cat = [z_0 | z_1 | … | z_{T-1}]        (N, T·H)
    W_bd[s] = W[s] in block task(s), 0 elsewhere      (S, T·H), block-diagonal by task

which gives logits ``h_cat @ W_bd.T + b`` = ``z_t @ W_t.T + b_t`` for every task t: one GEMM, every loss, one
backward. W_bd is rebuilt from the packed (S, H) weight by a mask multiply at each step, so autograd carries its
gradient back to the packed weight. The head GEMM does T times the necessary work (heads are small next to the
experts and towers feeding them); in exchange every head and loss stays in the single fused pass.
"""

from __future__ import annotations


import torch
from torch import nn

from mtlfast.functional import multi_task_loss
from mtlfast.nn.heads import MultiTaskHeads, MultiTaskOutput, _split_columns


class TowerHeads(MultiTaskHeads):
    """:class:`MultiTaskHeads` over per-task inputs: ``z`` is (T, ..., H), task t's head reads ``z[t]``.

    Same parameters, buffers and ``state_dict`` keys (``"<task>.weight"`` (C_t, H), ``"<task>.bias"``) as
    ``MultiTaskHeads(H, tasks)``, i.e. as a ``ModuleDict`` of ``nn.Linear(H, C_t)``; ``task_weights`` is the λ buffer.
    """

    def __init__(self, in_features: int, tasks, *, bias: bool = True, chunk_rows: int | str | None = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, tasks, bias=bias, chunk_rows=chunk_rows, device=device, dtype=dtype)
        if len(self.packed) != 1:
            raise ValueError(
                "mtlfast: every task head of this model reads its own tower, so tasks cannot name different inputs; "
                f"got inputs {list(self.inputs)}"
            )
        group = self._group
        # (S, T) True where column s belongs to task t: the block structure of W_bd.
        block_mask = nn.functional.one_hot(group.col_task, len(self.tasks)).bool()
        self.register_buffer("block_mask", block_mask, persistent=False)

    @property
    def _group(self):
        return self.packed[self.inputs[0]]

    def _concatenated(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_cat (..., T·H), W_bd (S, T·H)) for tower outputs ``z`` (T, ..., H)."""
        num_tasks, features = len(self.tasks), self._group.in_features
        if z.dim() < 3 or z.shape[0] != num_tasks or z.shape[-1] != features:
            raise ValueError(
                f"mtlfast: task heads expect tower outputs of shape ({num_tasks}, ..., {features}), "
                f"got {tuple(z.shape)}"
            )
        h_cat = z.movedim(0, -2).reshape(*z.shape[1:-1], num_tasks * features)
        weight = self._group.weight
        block_diagonal = (weight.unsqueeze(1) * self.block_mask.unsqueeze(2)).reshape(weight.shape[0], -1)
        return h_cat, block_diagonal

    def forward(self, z: torch.Tensor, targets, *, return_logits: bool = False,
                per_task_input_grads: bool = False) -> MultiTaskOutput:
        """Losses of the tasks with a target in ``targets`` (mapping task name → target; absent tasks skipped)."""
        if per_task_input_grads:
            raise ValueError("mtlfast: per-task tower heads have no shared input to take per-task gradients against")
        given, present = self._present_tasks(targets)
        h_cat, block_diagonal = self._concatenated(z)
        group = self._group
        out = multi_task_loss(
            h_cat, block_diagonal, group.bias, given, group.layout,
            self.task_weights, return_logits=return_logits, chunk_rows=self.chunk_rows,
            _tables=(group.col_task, group.col_weight),
        )
        logits = _split_columns(out.logits, group.layout) if return_logits else None
        return MultiTaskOutput(out.total, out.losses, self.task_names, present, logits=logits)

    def logits(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable logits of every head, name → (..., C_t) ((...) for Binary and Regression(dim=1))."""
        h_cat, block_diagonal = self._concatenated(z)
        packed = nn.functional.linear(h_cat, block_diagonal, self._group.bias)
        return _split_columns(packed, self._group.layout)
