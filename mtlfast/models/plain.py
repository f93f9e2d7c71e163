"""The same models written the plain-PyTorch way, for comparison: ``nn.Linear`` heads in a ``ModuleDict``, a Python
loop of ``torch.nn.functional`` losses, MMoE as loops over experts, gates and towers.

:func:`plain_twin` builds one from an mtlfast model with identical weights, so a demo or benchmark can train both
from the same initialisation and compare step time and quality. The plain twin follows the same contract
(``forward(x, targets)`` → :class:`~mtlfast.MultiTaskOutput`, ``predict``, ``tasks``), so ``mtlfast.fit`` and the
loss-based weighting methods drive it unchanged. Its losses handle missing labels as a careful user would
(``ignore_index``; NaN-masked means), without host syncs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlfast._reference import elementwise_loss
from mtlfast.models.hard_sharing import HardSharing
from mtlfast.models.mmoe import MMoE
from mtlfast.nn.heads import MultiTaskOutput
from mtlfast.tasks import LossKind, Task


def plain_task_loss(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One task's mean loss over its valid entries; ``logits`` (N, C), ``target`` as mtlfast takes it."""
    kind = task.kind
    if kind == LossKind.CROSS_ENTROPY:
        weight = task.column_weights()
        return F.cross_entropy(logits, target, ignore_index=task.ignored_class, label_smoothing=task.param,
                               weight=None if weight is None else weight.to(logits))
    if not task.target_has_class_dim:
        logits = logits.squeeze(-1)
    valid = ~torch.isnan(target)
    elements = elementwise_loss(task, logits, torch.where(valid, target, torch.zeros_like(target)))
    return (elements * valid).sum() / valid.sum().clamp_min(1)


class PlainMultiTaskModel(nn.Module):
    """Base of the plain twins: subclasses give :meth:`task_inputs` (what each task's head reads)."""

    def __init__(self, tasks: Sequence[Task], heads: nn.ModuleDict, task_weights: torch.Tensor):
        super().__init__()
        self.tasks = tuple(tasks)
        self.task_names = tuple(task.name for task in self.tasks)
        self.heads = heads
        self.register_buffer("task_weights", task_weights.detach().clone(), persistent=False)

    def task_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        result = {}
        for task, rep in zip(self.tasks, self.task_inputs(x)):
            out = self.heads[task.name](rep)
            result[task.name] = out if task.target_has_class_dim or task.target_is_index else out.squeeze(-1)
        return result

    def forward(self, x: torch.Tensor, targets: Mapping[str, torch.Tensor | None] | None = None,
                **_unused) -> MultiTaskOutput | dict[str, torch.Tensor]:
        if targets is None:
            return self.logits(x)
        losses = []
        reps = self.task_inputs(x)
        acc = torch.float64 if reps[0].dtype == torch.float64 else torch.float32  # mtlfast's loss dtype
        for task, rep in zip(self.tasks, reps):
            target = targets.get(task.name)
            if target is None:
                losses.append(rep.new_zeros((), dtype=acc))
                continue
            logits = self.heads[task.name](rep)
            losses.append(plain_task_loss(task, logits, target).to(acc))
        loss_vector = torch.stack(losses)
        total = (self.task_weights.to(loss_vector.dtype) * loss_vector).sum()
        present = [targets.get(name) is not None for name in self.task_names]
        return MultiTaskOutput(total, loss_vector, self.task_names, present)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.logits(x)


class PlainHardSharing(PlainMultiTaskModel):
    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], heads: nn.ModuleDict, task_weights: torch.Tensor):
        super().__init__(tasks, heads, task_weights)
        self.encoder = encoder

    def task_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.encoder(x)
        return [h] * len(self.tasks)


class PlainMMoE(PlainMultiTaskModel):
    """MMoE (Ma et al. 2018) as loops: one ``nn.Sequential`` per expert and per tower, one gate per task."""

    def __init__(self, experts: nn.ModuleList, gates: nn.ModuleList, towers: nn.ModuleList, tasks: Sequence[Task],
                 heads: nn.ModuleDict, task_weights: torch.Tensor):
        super().__init__(tasks, heads, task_weights)
        self.experts, self.gates, self.towers = experts, gates, towers

    def task_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        experts = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (N, E, H)
        reps = []
        for gate, tower in zip(self.gates, self.towers):
            mixture = (gate(x).softmax(-1).unsqueeze(-1) * experts).sum(-2)
            reps.append(tower(mixture))
        return reps


def _linear_heads(model) -> nn.ModuleDict:
    state = model.heads.state_dict()
    heads = nn.ModuleDict()
    for task in model.tasks:
        weight = state[f"{task.name}.weight"]
        bias = state.get(f"{task.name}.bias")
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
        layer.load_state_dict({"weight": weight} | ({} if bias is None else {"bias": bias}))
        heads[task.name] = layer
    return heads


def _unstack(stacked, member: int) -> nn.Sequential:
    """Member ``member`` of a StackedMLP as Linear/activation/dropout layers with the same weights."""
    layers: list[nn.Module] = []
    for layer, activation in zip(stacked.layers, stacked.activations):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(layer.weight[member].T)  # stacked weights are stored (in, out)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias[member])
        layers += [linear, type(activation)()]
        if stacked.dropout is not None:
            layers.append(nn.Dropout(stacked.dropout.p))
    return nn.Sequential(*layers)


def plain_twin(model: nn.Module) -> PlainMultiTaskModel:
    """A plain-PyTorch copy of ``model`` (``HardSharing`` or ``MMoE``) with identical weights and λ."""
    import copy

    if isinstance(model, HardSharing):
        return PlainHardSharing(copy.deepcopy(model.encoder), model.tasks, _linear_heads(model), model.task_weights)
    if isinstance(model, MMoE):
        experts = nn.ModuleList(_unstack(model.experts, e) for e in range(model.num_experts))
        towers = nn.ModuleList(_unstack(model.towers, t) for t in range(len(model.tasks)))
        gates = nn.ModuleList()
        for t in range(len(model.tasks)):
            gate = nn.Linear(model.in_features, model.num_experts, device=model.gates.weight.device,
                             dtype=model.gates.weight.dtype)
            rows = slice(t * model.num_experts, (t + 1) * model.num_experts)
            with torch.no_grad():
                gate.weight.copy_(model.gates.weight[rows])
                gate.bias.copy_(model.gates.bias[rows])
            gates.append(gate)
        return PlainMMoE(experts, gates, towers, model.tasks, _linear_heads(model), model.task_weights)
    raise TypeError(f"mtlfast: no plain-PyTorch twin for {type(model).__name__} (HardSharing and MMoE have one)")


__all__ = ["PlainHardSharing", "PlainMMoE", "PlainMultiTaskModel", "plain_task_loss", "plain_twin"]
