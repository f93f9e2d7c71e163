"""Strip a pretrained model's own classifier so its forward returns features.

Found by name, as the common model zoos call it: torchvision's ``fc`` (ResNet), ``classifier`` (VGG, EfficientNet,
MobileNet, ConvNeXt), ``heads`` (ViT); timm's ``head`` / ``fc`` / ``classifier`` (or its ``reset_classifier``);
Cadene's ``last_linear``. A plain ``nn.Linear`` is replaced by ``nn.Identity``; a container (``Sequential(Dropout,
Linear)``, ConvNeXt's ``Sequential(LayerNorm2d, Flatten, Linear)``) keeps everything but its last Linear, so the
features keep the normalisation and flattening the classifier applied to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

CLASSIFIER_NAMES: tuple[str, ...] = ("fc", "classifier", "head", "heads", "last_linear")


@dataclass(frozen=True)
class StrippedClassifier:
    """What :func:`replace_classifier` removed.

    Attributes:
        path: submodule path of the replaced layer (``"fc"``, ``"classifier.6"``), or ``"reset_classifier"`` for a
            timm model.
        in_features: the width of the features it read (the new heads' D), when known.
        module: the removed layer (no longer part of the model).
    """

    path: str
    in_features: int | None
    module: nn.Module | None


def find_classifier(model: nn.Module) -> str | None:
    """Path of the layer :func:`replace_classifier` would replace, or None when the model has no such layer."""
    for name in CLASSIFIER_NAMES:
        child = getattr(model, name, None)
        if not isinstance(child, nn.Module) or child is model:
            continue
        if isinstance(child, nn.Linear):
            return name
        linears = [path for path, sub in child.named_modules() if isinstance(sub, nn.Linear)]
        if linears:
            return f"{name}.{linears[-1]}"
    return None


def replace_classifier(model: nn.Module, path: str | None = None, *, replacement: nn.Module | None = None) -> StrippedClassifier | None:
    """Replace ``model``'s classifier (in place) so that its forward returns the features the classifier read.

    Args:
        model: a pretrained network.
        path: submodule path of the layer to replace (replaced whole, whatever it is); default: found by name
            (module docstring), or by timm's ``reset_classifier(0)`` when the model has it.
        replacement: what to put in its place (default ``nn.Identity()``).

    Returns:
        What was removed, or None when ``path`` is None and no classifier was found (nothing changed).
    """
    if path is None and callable(getattr(model, "reset_classifier", None)) and isinstance(getattr(model, "num_features", None), int):
        getter = getattr(model, "get_classifier", None)
        old = getter() if callable(getter) else None
        model.reset_classifier(0)
        return StrippedClassifier("reset_classifier", int(model.num_features), old)
    if path is None:
        path = find_classifier(model)
        if path is None:
            return None
    try:
        old = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"mtlfast: the model has no submodule {path!r} to replace") from None
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, replacement if replacement is not None else nn.Identity())
    return StrippedClassifier(path, _input_width(old), old)


def _input_width(layer: nn.Module) -> int | None:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    first = next((m for m in layer.modules() if isinstance(m, nn.Linear)), None)
    return None if first is None else first.in_features


__all__ = ["CLASSIFIER_NAMES", "StrippedClassifier", "find_classifier", "replace_classifier"]
