"""Optimiser helpers for fine-tuning: discriminative / layer-wise-decayed learning rates, and the two-phase
heads-then-everything schedule.

Discriminative fine-tuning (Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", ACL 2018)
gives lower layers, whose features are more general, smaller learning rates; layer-wise LR decay (Clark et al.,
"ELECTRA", ICLR 2020; Bao et al., "BEiT", ICLR 2022) sets them geometrically: ``lr_k = base_lr · decay^(depth of
group k from the top)``. Gradual unfreezing (also ULMFiT) trains the new heads alone before the backbone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from mtlfast.transfer.batchnorm import BNPolicy
from mtlfast.transfer.freeze import _require_backbone, feature_extractor, full_fine_tuning
from mtlfast.transfer.groups import GroupSpec, backbone_of, layer_groups, new_parameters

_NORM_LAYERS: tuple[type, ...] = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def discriminative_param_groups(
    model: nn.Module,
    base_lr: float,
    *,
    decay: float = 1.0,
    head_lr: float | None = None,
    lrs: Sequence[float] | None = None,
    groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None = None,
    weight_decay: float | None = None,
    exclude_bias_and_norm: bool = False,
) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups with a learning rate per backbone layer group.

    Args:
        model: a model with a ``backbone`` (a :class:`~mtlfast.transfer.TransferModel`; every parameter outside the
            backbone — the heads — forms the ``"heads"`` group), or a bare backbone.
        base_lr: learning rate of the top backbone group.
        decay: layer-wise decay: with K groups (bottom k = 0 … top k = K−1), ``lr_k = base_lr · decay^(K−1−k)``.
        head_lr: learning rate of the heads (default ``base_lr``).
        lrs: explicit learning rates, one per backbone group bottom to top (instead of ``base_lr`` / ``decay``).
        groups: explicit layer groups (see :func:`~mtlfast.transfer.layer_groups`).
        weight_decay: the ``weight_decay`` of each group (default: the optimiser's).
        exclude_bias_and_norm: split each group so that biases, other 0-/1-D parameters and normalisation-layer
            parameters get ``weight_decay=0`` (the usual AdamW practice).

    Returns:
        A list of dicts (``params``, ``lr``, ``name``, ``weight_decay`` when set), backbone bottom to top, then the
        heads. Parameters with ``requires_grad=False`` are left out, as are groups left empty; no parameter is in
        two groups.
    """
    if not base_lr >= 0:
        raise ValueError(f"mtlfast: base_lr must be non-negative, got {base_lr}")
    if not decay > 0:
        raise ValueError(f"mtlfast: decay must be positive, got {decay}")
    found = layer_groups(backbone_of(model), groups)
    if lrs is not None:
        lrs = [float(lr) for lr in lrs]
        if len(lrs) != len(found):
            raise ValueError(f"mtlfast: lrs has {len(lrs)} entries for {len(found)} layer groups {[g.name for g in found]}")
    else:
        top = len(found) - 1
        lrs = [base_lr * decay ** (top - k) for k in range(len(found))]
    no_decay = _no_decay_ids(model) if exclude_bias_and_norm else set()
    result: list[dict[str, Any]] = []
    for group, lr in zip(found, lrs):
        result += _split(group.name, [p for _, p in group.parameters], lr, weight_decay, no_decay)
    heads = [p for _, p in new_parameters(model)]
    result += _split("heads", heads, base_lr if head_lr is None else head_lr, weight_decay, no_decay)
    return result


def _split(name: str, params: list[nn.Parameter], lr: float, weight_decay: float | None, no_decay: set[int]) -> list[dict]:
    trainable = [p for p in params if p.requires_grad]
    decayed = [p for p in trainable if id(p) not in no_decay]
    exempt = [p for p in trainable if id(p) in no_decay]
    out = []
    if decayed:
        entry: dict[str, Any] = {"params": decayed, "lr": float(lr), "name": name}
        if weight_decay is not None:
            entry["weight_decay"] = float(weight_decay)
        out.append(entry)
    if exempt:
        out.append({"params": exempt, "lr": float(lr), "name": f"{name}/no_decay", "weight_decay": 0.0})
    return out


def _no_decay_ids(model: nn.Module) -> set[int]:
    exempt = {id(p) for p in model.parameters() if p.dim() <= 1}
    for module in model.modules():
        if isinstance(module, _NORM_LAYERS):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    return exempt


class FineTuneSchedule:
    """Heads only for ``heads_only_epochs`` epochs, then the whole model at a lower learning rate.

    At construction the backbone is frozen (:func:`~mtlfast.transfer.feature_extractor`, BatchNorm per
    ``bn_while_frozen``); build ``optimizer`` over the trainable parameters (or all of them) before or after. After
    the ``heads_only_epochs``-th call of :meth:`end_epoch` (immediately when it is 0) the backbone is unfrozen
    (BatchNorm back to ``"train"``) and, with ``base = unfreeze_lr_factor × the heads' learning rate`` at that
    moment:

    * every existing parameter group's learning rate is multiplied by ``unfreeze_lr_factor``;
    * backbone parameters not yet in the optimiser are added as new groups, layer group k of K at
      ``base · decay^(K−1−k)`` (``decay=1``: all at ``base``; see :func:`discriminative_param_groups`).

    ``mtlfast.fit`` calls :meth:`end_epoch` on its callbacks; in your own loop call it after each epoch. Build an LR
    scheduler after the unfreeze (or re-create it then): schedulers capture the groups they were built with.

    Args:
        model: a model with a ``backbone`` (e.g. :class:`~mtlfast.transfer.TransferModel`).
        optimizer: a ``torch.optim.Optimizer`` holding at least the heads' parameters.
        heads_only_epochs: k, the number of heads-only epochs.
        unfreeze_lr_factor: the learning-rate multiplier applied at the unfreeze (typically 0.01–0.1).
        decay, groups: layer-wise LR decay of the added backbone groups and their layer groups.
        bn_while_frozen: BatchNorm policy of the frozen backbone (``"frozen"`` keeps the pretrained statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        heads_only_epochs: int = 1,
        unfreeze_lr_factor: float = 0.1,
        decay: float = 1.0,
        groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None = None,
        bn_while_frozen: BNPolicy = "frozen",
    ):
        _require_backbone(model, "FineTuneSchedule")
        if not isinstance(heads_only_epochs, int) or heads_only_epochs < 0:
            raise ValueError(f"mtlfast: heads_only_epochs must be a non-negative int, got {heads_only_epochs!r}")
        if not unfreeze_lr_factor > 0:
            raise ValueError(f"mtlfast: unfreeze_lr_factor must be positive, got {unfreeze_lr_factor}")
        if not decay > 0:
            raise ValueError(f"mtlfast: decay must be positive, got {decay}")
        self.model = model
        self.optimizer = optimizer
        self.heads_only_epochs = heads_only_epochs
        self.unfreeze_lr_factor = float(unfreeze_lr_factor)
        self.decay = float(decay)
        self.groups = groups
        self.epoch = 0
        self.unfrozen = False
        if heads_only_epochs == 0:
            self._unfreeze()
        else:
            feature_extractor(model, bn=bn_while_frozen)

    @property
    def phase(self) -> str:
        """``"heads"`` before the unfreeze, ``"full"`` after."""
        return "full" if self.unfrozen else "heads"

    def end_epoch(self, *args: Any, **kwargs: Any) -> None:
        """Count one finished epoch; unfreeze when the heads-only phase is over. Arguments a training loop passes
        (epoch index, metrics) are accepted and ignored."""
        self.epoch += 1
        if not self.unfrozen and self.epoch >= self.heads_only_epochs:
            self._unfreeze()

    def _unfreeze(self) -> None:
        full_fine_tuning(self.model, bn="train")
        base = self._heads_lr() * self.unfreeze_lr_factor
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * self.unfreeze_lr_factor
        present = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        found = layer_groups(backbone_of(self.model), self.groups)
        top = len(found) - 1
        for k, group in enumerate(found):
            missing = [p for _, p in group.parameters if id(p) not in present]
            if missing:
                self.optimizer.add_param_group({"params": missing, "lr": base * self.decay ** (top - k), "name": group.name})
        self.unfrozen = True

    def _heads_lr(self) -> float:
        heads = {id(p) for _, p in new_parameters(self.model)}
        for group in self.optimizer.param_groups:
            if any(id(p) in heads for p in group["params"]):
                return float(group["lr"])
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "unfrozen": self.unfrozen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restores the epoch count and, if the saved run had unfrozen, unfreezes now (adding the backbone
        groups) — load this before the optimiser's own state_dict, which then finds its groups."""
        self.epoch = int(state["epoch"])
        if bool(state["unfrozen"]) and not self.unfrozen:
            self._unfreeze()

    def __repr__(self) -> str:
        return (f"FineTuneSchedule(epoch={self.epoch}, phase={self.phase!r}, heads_only_epochs={self.heads_only_epochs}, "
                f"unfreeze_lr_factor={self.unfreeze_lr_factor}, decay={self.decay})")


__all__ = ["FineTuneSchedule", "discriminative_param_groups"]
