"""Which parameters are the pretrained backbone, which are new, and how the backbone splits into layer groups.

Freezing by depth (``freeze_to``), discriminative learning rates and layer-wise LR decay all read the backbone as an
ordered list of layer groups, bottom (input side) to top. :func:`layer_groups` derives them from the module tree —
the backbone's children in order, with stacks of blocks (an ``nn.ModuleList`` such as a transformer's layers,
also behind a wrapper like BERT's ``encoder.layer``) split into one group per block — or takes them from the user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

from torch import nn

GroupSpec = Union[nn.Module, str, Sequence[Union[nn.Module, str]]]


def backbone_of(model: nn.Module) -> nn.Module:
    """``model.backbone`` (e.g. a :class:`~mtlfast.transfer.TransferModel`) when the model has one, else the model.

    Everything outside the backbone — task heads, new layers — is "new" for freezing, learning rates and L2-SP.
    """
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def new_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter of ``model`` outside its backbone, in ``named_parameters`` order."""
    backbone = backbone_of(model)
    if backbone is model:
        return []
    inside = {id(p) for p in backbone.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in inside]


@dataclass(frozen=True)
class LayerGroup:
    """One layer group of a backbone.

    Attributes:
        name: the submodule path (``"layer3"``, ``"encoder.layer.5"``) or the name given by the user.
        modules: the modules making up the group (their BatchNorm layers follow the group's freezing).
        parameters: (name relative to the backbone, parameter) for every parameter of the group.
    """

    name: str
    modules: tuple[nn.Module, ...]
    parameters: tuple[tuple[str, nn.Parameter], ...]

    def __repr__(self) -> str:
        count = sum(p.numel() for _, p in self.parameters)
        return f"LayerGroup({self.name!r}, {len(self.parameters)} tensors, {count} parameters)"


def layer_groups(model: nn.Module, groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None = None) -> list[LayerGroup]:
    """The backbone's layer groups, bottom to top.

    Args:
        model: a backbone, or a model with a ``backbone`` attribute (its backbone is split; heads are not a group).
        groups: explicit groups instead of the derived ones, bottom to top: each a submodule, a submodule path
            (``"layer4"``), or a list of those; a mapping gives the groups names. Together they must cover every
            backbone parameter exactly once.

    Derived groups: the backbone's children that hold parameters or buffers, in order; an ``nn.ModuleList`` child
    (and a wrapper holding nothing but one) is split into its items; parameters registered on the backbone itself
    (a ViT's class token) join the first group.
    """
    backbone = backbone_of(model)
    names = {id(p): name for name, p in backbone.named_parameters()}
    if groups is None:
        entries = _derived_entries(backbone)
    else:
        items = groups.items() if isinstance(groups, Mapping) else ((None, spec) for spec in groups)
        entries = [(name, _resolve(backbone, spec)) for name, spec in items]
        entries = [(name if name is not None else "+".join(path for path, _ in mods), tuple(m for _, m in mods))
                   for name, mods in entries]
    result: list[LayerGroup] = []
    owner: dict[int, str] = {}
    for group_name, modules in entries:
        params = []
        for module in modules:
            for p in module.parameters():
                if id(p) not in names:
                    raise ValueError(f"mtlfast: layer group {group_name!r} holds parameters outside the backbone")
                if id(p) in owner:
                    if owner[id(p)] == group_name:
                        continue  # tied weights inside one group
                    raise ValueError(
                        f"mtlfast: parameter {names[id(p)]!r} is in two layer groups ({owner[id(p)]!r} and {group_name!r})"
                    )
                owner[id(p)] = group_name
                params.append((names[id(p)], p))
        result.append(LayerGroup(group_name, tuple(modules), tuple(params)))
    loose = [(name, p) for name, p in backbone.named_parameters() if id(p) not in owner]
    if loose and groups is not None:
        raise ValueError(f"mtlfast: layer groups leave backbone parameters ungrouped: {[name for name, _ in loose]}")
    if loose:
        if not result:
            return [LayerGroup(type(backbone).__name__, (backbone,), tuple(loose))]
        first = result[0]
        result[0] = LayerGroup(first.name, first.modules, tuple(loose) + first.parameters)
    if not result:
        raise ValueError(f"mtlfast: the backbone ({type(backbone).__name__}) has no parameters to group")
    return result


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _stateful_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, child) for name, child in module.named_children() if _has_state(child)]


def _wraps_block_stack(module: nn.Module) -> bool:
    """A wrapper with no state of its own around exactly one stack of blocks (BERT's ``encoder`` → ``layer``)."""
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return False
    children = _stateful_children(module)
    if len(children) != 1:
        return False
    only = children[0][1]
    return isinstance(only, nn.ModuleList) or _wraps_block_stack(only)


def _derived_entries(backbone: nn.Module) -> list[tuple[str, tuple[nn.Module, ...]]]:
    entries: list[tuple[str, tuple[nn.Module, ...]]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in _stateful_children(module):
            path = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                entries.extend((f"{path}.{i}", (block,)) for i, block in _stateful_children(child))
            elif _wraps_block_stack(child):
                visit(path + ".", child)
            else:
                entries.append((path, (child,)))

    visit("", backbone)
    return entries


def _resolve(backbone: nn.Module, spec: GroupSpec) -> list[tuple[str, nn.Module]]:
    if isinstance(spec, (nn.Module, str)):
        spec = [spec]
    resolved = []
    paths = {id(m): path for path, m in backbone.named_modules()}
    for item in spec:
        if isinstance(item, str):
            try:
                resolved.append((item, backbone.get_submodule(item)))
            except AttributeError:
                raise ValueError(f"mtlfast: the backbone has no submodule {item!r}") from None
        elif isinstance(item, nn.Module):
            if id(item) not in paths:
                raise ValueError(f"mtlfast: a layer group's module ({type(item).__name__}) is not part of the backbone")
            resolved.append((paths[id(item)] or type(item).__name__, item))
        else:
            raise TypeError(f"mtlfast: a layer group is a module, a submodule path or a list of those, got {type(item).__name__}")
    return resolved


__all__ = ["GroupSpec", "LayerGroup", "backbone_of", "layer_groups", "new_parameters"]
