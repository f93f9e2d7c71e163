"""Hard parameter sharing: one shared encoder, one fused set of task heads on its output."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtlfast.models._base import MultiTaskModel, check_dropout, check_hidden, check_positive
from mtlfast.nn.heads import MultiTaskHeads
from mtlfast.tasks import Task


class HardSharing(MultiTaskModel):
    """Hard parameter sharing (Caruana, "Multitask Learning", Machine Learning 28, 1997): every task reads the
    output of one shared ``encoder`` through its own linear head; all heads and losses run in the fused op.

    Args:
        encoder: any module mapping the input to the shared representation h (..., D) (or to a mapping
            input name → representation, with tasks naming their ``input`` and ``in_features`` a mapping).
        tasks: the task specs.
        in_features: D. When None it is read from the encoder: its ``out_features`` attribute, else that of the
            last submodule having one (e.g. the final ``nn.Linear`` of an ``nn.Sequential``).
        **heads_kwargs: passed to :class:`~mtlfast.MultiTaskHeads` (``bias``, ``chunk_rows``, ``device``, ``dtype``).

    ``forward(x, targets, per_task_input_grads=True)`` gives ``input_grads[name]`` = dL_t/dh, the task gradients
    w.r.t. the shared representation, as gradient weighting methods consume in ``mode="representation"``.
    State dict: ``encoder.*`` and ``heads.<task>.weight`` (C_t, D) / ``heads.<task>.bias``.
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], in_features: int | Mapping[str, int] | None = None,
                 **heads_kwargs: Any):
        super().__init__(tasks)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"mtlfast: HardSharing encoder must be an nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder
        if in_features is None:
            in_features = _encoder_out_features(encoder)
        self.heads = MultiTaskHeads(in_features, self.tasks, **heads_kwargs)

    @classmethod
    def mlp(cls, in_features: int, hidden: Sequence[int], tasks: Sequence[Task], *,
            activation: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0, **heads_kwargs: Any) -> HardSharing:
        """A shared MLP encoder ``(Linear → activation → dropout) × len(hidden)`` on (..., in_features) inputs; with
        ``hidden=()`` the heads read the input directly. ``device`` / ``dtype`` in ``heads_kwargs`` apply to the
        encoder too."""
        check_positive("HardSharing.mlp", in_features=in_features)
        sizes = [int(in_features), *check_hidden("HardSharing.mlp", "hidden", hidden, allow_empty=True)]
        dropout = check_dropout("HardSharing.mlp", dropout)
        factory = {key: heads_kwargs[key] for key in ("device", "dtype") if key in heads_kwargs}
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out, **factory), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        encoder = nn.Sequential(*layers) if layers else nn.Identity()
        return cls(encoder, tasks, sizes[-1], **heads_kwargs)

    def representation(self, x: torch.Tensor) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """The shared representation h = encoder(x), (..., D)."""
        return self.encoder(x)


def _encoder_out_features(encoder: nn.Module) -> int:
    for module in (encoder, *reversed(list(encoder.modules()))):
        size = getattr(module, "out_features", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    raise ValueError(
        f"mtlfast: cannot tell the output size of encoder {type(encoder).__name__} (no module with out_features); "
        "pass in_features="
    )
