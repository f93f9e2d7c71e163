"""BatchNorm when transferring: what happens to the running statistics of a pretrained backbone.

``requires_grad=False`` stops the optimiser from moving BN's affine parameters but not BN's running mean and
variance: in ``train()`` mode every forward pass still replaces them with statistics of the new data (and
normalises with batch statistics). Three policies:

* ``"train"``: ordinary PyTorch behaviour (statistics follow ``train()`` / ``eval()``);
* ``"frozen"``: the layer stays in eval mode even when the model is put in ``train()`` — it normalises with, and
  keeps, the pretrained statistics; its affine parameters stay trainable unless frozen separately;
* ``"frozen_bn"``: the layer is replaced by :class:`FrozenBatchNorm2d`, a fixed affine map whose scale, shift and
  statistics are buffers (nothing to train, nothing to update; the layer detection models of torchvision use).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BNPolicy = Literal["train", "frozen", "frozen_bn"]
BN_POLICIES: tuple[str, ...] = ("train", "frozen", "frozen_bn")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers: ``y = x·s + t`` per channel with
    ``s = weight / sqrt(running_var + eps)`` and ``t = bias − running_mean·s``.

    Input ``(N, C, *)`` of any rank ≥ 2, so it also replaces BatchNorm1d / BatchNorm3d layers. Computes in the
    buffers' dtype and returns the input's dtype. ``state_dict`` keys are BatchNorm's (``weight``, ``bias``,
    ``running_mean``, ``running_var``); a BatchNorm checkpoint loads into it (its ``num_batches_tracked`` is dropped).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> FrozenBatchNorm2d:
        """A frozen copy of ``bn``'s current statistics and affine parameters (same device and dtype)."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"mtlfast: cannot freeze {type(bn).__name__}({bn.num_features}): it has no running statistics "
                "(track_running_stats=False); use the 'train' BatchNorm policy for it"
            )
        frozen = cls(bn.num_features, bn.eps, device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"mtlfast: FrozenBatchNorm2d({self.num_features}) needs (N, {self.num_features}, *) input, got {tuple(x.shape)}")
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class _EvalPinned:
    """Mixin for a BatchNorm class whose instances ignore ``train(True)``: they normalise with, and never update,
    their running statistics. Instances get it by a class swap (as ``torch.nn.utils.parametrize`` does), so the
    layer keeps its identity, parameters, state_dict and ``isinstance`` relations."""

    def train(self, mode: bool = True):
        return super().train(False)  # type: ignore[misc]


_PINNED_CLASSES: dict[type, type] = {}


def _pinned_class(cls: type) -> type:
    if issubclass(cls, _EvalPinned):
        return cls
    pinned = _PINNED_CLASSES.get(cls)
    if pinned is None:
        name = f"EvalPinned{cls.__name__}"
        pinned = type(name, (_EvalPinned, cls), {"__module__": __name__, "__qualname__": name})
        _PINNED_CLASSES[cls] = pinned
        globals().setdefault(name, pinned)  # importable by name, so a pickled model loads again
    return pinned


def _unpinned_class(cls: type) -> type:
    if not issubclass(cls, _EvalPinned):
        return cls
    return next(base for base in cls.__mro__[1:] if not issubclass(base, _EvalPinned) and issubclass(base, _BatchNorm))


# The standard layers' pinned classes exist from import on, so pickles of models using them load in a new process.
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    _pinned_class(_cls)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (any of torch's BatchNorm classes, pinned or not)."""
    return isinstance(module, _BatchNorm)


def set_batchnorm_policy(module: nn.Module, policy: BNPolicy, *, only: set[int] | None = None) -> nn.Module:
    """Apply a BatchNorm policy to every BatchNorm layer inside ``module`` (``module`` included).

    Args:
        module: any module.
        policy: ``"train"``, ``"frozen"`` or ``"frozen_bn"`` (module docstring). ``"train"`` undoes ``"frozen"``;
            a layer already converted to :class:`FrozenBatchNorm2d` stays frozen.
        only: restrict to the BatchNorm layers whose ``id`` is in this set.

    Returns:
        ``module`` — or its replacement when ``module`` itself is a BatchNorm layer converted by ``"frozen_bn"``.
        ``"frozen_bn"`` replaces layers in their parent modules, so an optimiser built before still holds the old
        (now unused) BN parameters: apply it before building the optimiser.
    """
    if policy not in BN_POLICIES:
        raise ValueError(f"mtlfast: BatchNorm policy must be one of {BN_POLICIES}, got {policy!r}")
    selected = (lambda layer: id(layer) in only) if only is not None else (lambda layer: True)
    if policy == "frozen_bn":
        return _convert_to_frozen(module, selected)
    training = module.training  # an unpinned layer takes the mode of the module it was given with
    for layer in module.modules():
        if not is_batchnorm(layer) or not selected(layer):
            continue
        if policy == "frozen":
            layer.__class__ = _pinned_class(type(layer))
            nn.Module.train(layer, False)
        else:
            layer.__class__ = _unpinned_class(type(layer))
            layer.train(training)
    return module


def _convert_to_frozen(root: nn.Module, selected) -> nn.Module:
    if is_batchnorm(root) and selected(root):
        return FrozenBatchNorm2d.from_batchnorm(root)
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if is_batchnorm(child) and selected(child):
                setattr(parent, name, FrozenBatchNorm2d.from_batchnorm(child))
    return root


__all__ = ["BNPolicy", "BN_POLICIES", "FrozenBatchNorm2d", "is_batchnorm", "set_batchnorm_policy"]
