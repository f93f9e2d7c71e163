"""Freezing policies: which parameters train, and what BatchNorm statistics do meanwhile.

Freezing sets ``requires_grad=False`` — the optimiser then never moves the parameter (it has no gradient; every
``torch.optim`` optimiser skips such parameters, weight decay and momentum included) — and, by default, also pins
the BatchNorm layers it covers in eval mode, since ``requires_grad=False`` alone leaves their running statistics
updating on every training-mode forward (see :mod:`mtlfast.transfer.batchnorm`).

The two transfer methods of Yosinski et al., "How transferable are features in deep neural networks?" (NeurIPS 2014):
:func:`feature_extractor` (the pretrained backbone fixed, only the new heads train) and :func:`full_fine_tuning`
(everything trains, starting from the pretrained weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from mtlfast.transfer.batchnorm import BNPolicy, is_batchnorm, set_batchnorm_policy
from mtlfast.transfer.groups import GroupSpec, backbone_of, layer_groups, new_parameters


def freeze(module: nn.Module, *, bn: BNPolicy | None = "frozen") -> nn.Module:
    """Stop ``module`` from training: every parameter gets ``requires_grad=False``.

    Args:
        module: the module to freeze (e.g. ``model.backbone``).
        bn: BatchNorm policy for the BatchNorm layers inside it: ``"frozen"`` (default: they stay in eval mode, their
            statistics fixed), ``"frozen_bn"`` (converted to FrozenBatchNorm2d), ``"train"`` (statistics keep
            updating in train mode), or None (left as they are).

    Returns:
        ``module`` (its replacement if it is itself a BatchNorm layer converted by ``"frozen_bn"``).
    """
    module.requires_grad_(False)
    return module if bn is None else set_batchnorm_policy(module, bn)


def unfreeze(module: nn.Module, *, bn: BNPolicy | None = "train") -> nn.Module:
    """Let ``module`` train again: every parameter gets ``requires_grad=True`` and, with ``bn="train"`` (default),
    its BatchNorm layers follow ``train()`` / ``eval()`` again. Layers already converted to FrozenBatchNorm2d stay
    frozen (they hold no parameters). An optimiser built while the module was frozen without its parameters does not
    train them: add them (``optimizer.add_param_group``) or use :class:`~mtlfast.transfer.FineTuneSchedule`."""
    module.requires_grad_(True)
    return module if bn is None else set_batchnorm_policy(module, bn)


def freeze_to(
    model: nn.Module,
    n: int,
    *,
    groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None = None,
    bn: BNPolicy = "frozen",
) -> nn.Module:
    """Freeze the backbone's first ``n`` layer groups (bottom up) and unfreeze the others.

    Args:
        model: a backbone, or a model with a ``backbone`` (its heads and other new parameters always stay trainable).
        n: how many groups to freeze, counted from the input side; negative counts from the top as in slicing
            (``-1``: everything but the top group); 0 unfreezes the whole backbone; ``len(groups)`` freezes it all.
        groups: explicit layer groups (see :func:`~mtlfast.transfer.layer_groups`).
        bn: BatchNorm policy of the frozen groups; the BatchNorm layers of trainable groups are set to ``"train"``.

    Returns:
        ``model``.
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"mtlfast: freeze_to needs an int number of groups, got {type(n).__name__}")
    backbone = backbone_of(model)
    found = layer_groups(backbone, groups)
    frozen, trainable = found[:n], found[n:]
    for group in trainable:
        for _, p in group.parameters:
            p.requires_grad_(True)
    for group in frozen:
        for _, p in group.parameters:
            p.requires_grad_(False)
    set_batchnorm_policy(backbone, "train", only=_batchnorm_ids(trainable))
    set_batchnorm_policy(backbone, bn, only=_batchnorm_ids(frozen))
    for _, p in new_parameters(model):
        p.requires_grad_(True)
    return model


def _batchnorm_ids(groups) -> set[int]:
    return {id(layer) for group in groups for module in group.modules for layer in module.modules() if is_batchnorm(layer)}


def feature_extractor(model: nn.Module, *, bn: BNPolicy = "frozen") -> nn.Module:
    """The pretrained backbone as a fixed feature extractor: backbone frozen (BatchNorm per ``bn``), every
    parameter outside it (the task heads) trainable. ``model`` must have a ``backbone`` attribute."""
    backbone = _require_backbone(model, "feature_extractor")
    model.requires_grad_(True)
    frozen = freeze(backbone, bn=bn)
    if frozen is not backbone:  # the backbone itself was a BatchNorm layer converted to FrozenBatchNorm2d
        model.backbone = frozen
    return model


def full_fine_tuning(model: nn.Module, *, bn: BNPolicy = "train") -> nn.Module:
    """Fine-tune everything from the pretrained weights: all parameters trainable, BatchNorm per ``bn``
    (default ``"train"``: statistics adapt to the new data)."""
    return unfreeze(model, bn=bn)


def _require_backbone(model: nn.Module, what: str) -> nn.Module:
    backbone = backbone_of(model)
    if backbone is model:
        raise TypeError(
            f"mtlfast: {what} needs a model with a .backbone (e.g. mtlfast.transfer.TransferModel); "
            f"to freeze a bare module call freeze(module)"
        )
    return backbone


__all__ = ["feature_extractor", "freeze", "freeze_to", "full_fine_tuning", "unfreeze"]
