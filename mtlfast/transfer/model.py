"""TransferModel: a pretrained backbone serving new tasks through fused multi-task heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtlfast.functional import Targets
from mtlfast.nn import MultiTaskHeads, MultiTaskOutput
from mtlfast.tasks import Task
from mtlfast.transfer._modes import evaluating, floating_device_dtype
from mtlfast.transfer.classifier import replace_classifier
from mtlfast.transfer.pooling import Pool, check_pool, pool, select_output

Inputs = torch.Tensor | Mapping[str, Any]


class TransferModel(nn.Module):
    """A pretrained backbone, its old classifier removed, pooled into :class:`mtlfast.MultiTaskHeads`.

    Args:
        backbone: any ``nn.Module``: a torchvision / timm CNN returning (N, C, H, W) or (N, F); a Hugging Face-style
            encoder returning an object or dict with ``last_hidden_state`` (N, L, H); the user's own module. It is
            used (and its classifier replaced) in place.
        tasks_or_heads: the task specs, or ready :class:`~mtlfast.MultiTaskHeads` (their sizes are then used).
        in_features: D (or input name → D); inferred when omitted, in this order: a dry run on ``example_input``,
            the stripped classifier's ``in_features``, the backbone's ``num_features`` (timm) or
            ``config.hidden_size`` (Hugging Face).
        pool: how backbone states become the heads' input (see :func:`mtlfast.transfer.pool`): ``"auto"``,
            ``"mean"`` (masked by ``attention_mask``), ``"cls"``, ``"none"`` (keep (N, L, H) token states for
            token-level tasks), or a callable / ``nn.Module`` (registered, so it trains). When tasks read several
            inputs (``Classification("ner", 9, input="tokens")``), a mapping input name → pool.
        feature_key: which field of a returned object / dict, or index of a returned tuple, holds the states
            (default: ``last_hidden_state``, the only tensor field, or the first tuple element).
        strip_classifier: ``"auto"`` (replace a classifier found by name, if any — see
            :func:`~mtlfast.transfer.replace_classifier`), True (one must be found), False, or a submodule path.
        example_input: an input batch for the dry run that infers ``in_features``.
        dropout: dropout probability on the pooled features before the heads.
        bias, chunk_rows: passed to :class:`~mtlfast.MultiTaskHeads` when built from tasks.

    Inputs ``x``: a tensor (``backbone(x)``) or a mapping of keyword arguments (``backbone(**x)``, e.g. a tokenizer's
    ``input_ids`` / ``attention_mask``; the ``attention_mask`` also masks the mean over tokens).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks_or_heads: Sequence[Task] | MultiTaskHeads,
        *,
        in_features: int | Mapping[str, int] | None = None,
        pool: Pool | Mapping[str, Pool] = "auto",
        feature_key: str | int | None = None,
        strip_classifier: bool | str = "auto",
        example_input: Inputs | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        chunk_rows: int | str | None = "auto",
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"mtlfast: backbone must be an nn.Module, got {type(backbone).__name__}")
        stripped = _strip(backbone, strip_classifier)
        self.backbone = backbone
        self.stripped_classifier: str | None = None if stripped is None else stripped.path
        self.feature_key = feature_key
        if isinstance(tasks_or_heads, MultiTaskHeads):
            heads = tasks_or_heads
        else:
            tasks = list(tasks_or_heads)
            if not tasks or not all(isinstance(t, Task) for t in tasks):
                raise TypeError("mtlfast: tasks_or_heads must be MultiTaskHeads or a non-empty sequence of mtlfast tasks")
            heads = None
        inputs = heads.inputs if heads is not None else tuple(dict.fromkeys(t.input for t in tasks))
        self._pools = _pools_by_input(pool, inputs)
        self.poolers = nn.ModuleDict({name: spec for name, spec in self._pools.items() if isinstance(spec, nn.Module)})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if heads is None:
            sizes = in_features if in_features is not None else self._infer_in_features(inputs, example_input, stripped)
            device, dtype = floating_device_dtype(backbone)
            heads = MultiTaskHeads(sizes, tasks, bias=bias, chunk_rows=chunk_rows, device=device, dtype=dtype)
        self.heads = heads

    # -- what users read -----------------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.heads.tasks

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.heads.task_names

    # -- forward -------------------------------------------------------------------------------------------------
    def features(self, x: Inputs) -> torch.Tensor | dict[str, torch.Tensor]:
        """The heads' input: (N, D) pooled features (or (N, L, H) token states with ``pool="none"``); a mapping input
        name → tensor when tasks read several inputs."""
        if isinstance(x, Mapping):
            output, mask = self.backbone(**x), x.get("attention_mask")
        else:
            output, mask = self.backbone(x), None
        states = select_output(output, self.feature_key)
        pooled = {name: self.dropout(pool(states, self.poolers[name] if name in self.poolers else how, mask))
                  for name, how in self._pools.items()}
        return next(iter(pooled.values())) if len(pooled) == 1 else pooled

    def forward(
        self,
        x: Inputs,
        targets: Targets | None = None,
        *,
        per_task_input_grads: bool = False,
        return_logits: bool = False,
    ) -> MultiTaskOutput | dict[str, torch.Tensor]:
        """With ``targets`` (task name → tensor; absent tasks skipped): a :class:`~mtlfast.MultiTaskOutput` (``loss``
        = Σ λ_t L_t, per-task ``losses``, optional ``logits`` / per-task gradients w.r.t. the features). Without:
        task name → logits ((N, C), or (N,) for Binary / Regression(dim=1))."""
        h = self.features(x)
        if targets is None:
            if per_task_input_grads or return_logits:
                raise ValueError("mtlfast: per_task_input_grads / return_logits need targets; without targets forward returns the logits")
            return self.heads.logits(h)
        return self.heads(h, targets, return_logits=return_logits, per_task_input_grads=per_task_input_grads)

    def predict(self, x: Inputs) -> dict[str, torch.Tensor]:
        """Task name → logits in inference mode (eval mode and no autograd for the call; every layer's mode is
        restored afterwards)."""
        with evaluating(self):
            return self.heads.logits(self.features(x))

    # -- construction helpers ------------------------------------------------------------------------------------
    def _infer_in_features(self, inputs, example_input, stripped) -> dict[str, int]:
        if example_input is not None:
            with evaluating(self):
                h = self.features(example_input)
            h = h if isinstance(h, Mapping) else {inputs[0]: h}
            return {name: int(h[name].shape[-1]) for name in inputs}
        custom = any(callable(how) for how in self._pools.values())
        width = None if custom else _known_width(self.backbone, stripped)
        if width is None:
            raise ValueError(
                "mtlfast: cannot infer the backbone's feature width; pass in_features= or example_input= "
                "(an input batch for a dry run)"
            )
        return {name: width for name in inputs}

    def extra_repr(self) -> str:
        pools = ", ".join(f"{name}: {getattr(how, '__name__', type(how).__name__) if callable(how) else how}"
                          for name, how in self._pools.items())
        return f"pool=({pools}), stripped_classifier={self.stripped_classifier!r}"


def _strip(backbone: nn.Module, strip: bool | str):
    if strip is False:
        return None
    if isinstance(strip, str) and strip != "auto":
        return replace_classifier(backbone, strip)
    stripped = replace_classifier(backbone)
    if stripped is None and strip is True:
        raise ValueError(f"mtlfast: no classifier found to strip in {type(backbone).__name__}; pass its path as strip_classifier=")
    return stripped


def _pools_by_input(spec: Pool | Mapping[str, Pool], inputs: Sequence[str]) -> dict[str, Pool]:
    if isinstance(spec, Mapping):
        missing = [name for name in inputs if name not in spec]
        unknown = [name for name in spec if name not in inputs]
        if missing or unknown:
            raise ValueError(f"mtlfast: pool must name exactly the tasks' inputs {list(inputs)}; missing {missing}, unknown {unknown}")
        pools = {name: spec[name] for name in inputs}
    elif len(inputs) > 1:
        raise ValueError(f"mtlfast: tasks read several inputs {list(inputs)}; pass pool as a mapping input name → pool")
    else:
        pools = {inputs[0]: spec}
    for how in pools.values():
        check_pool(how)
    return pools


def _known_width(backbone: nn.Module, stripped) -> int | None:
    if stripped is not None and stripped.in_features is not None:
        return stripped.in_features
    width = getattr(backbone, "num_features", None)
    if isinstance(width, int):
        return width
    hidden = getattr(getattr(backbone, "config", None), "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


__all__ = ["TransferModel"]
