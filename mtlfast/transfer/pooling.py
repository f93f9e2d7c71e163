"""From whatever a backbone returns to the representation task heads read.

Backbones return a tensor (a CNN's (N, C, H, W) map or (N, F) vector), a tuple, or an object / dict such as a
Hugging Face ``BaseModelOutput`` with ``last_hidden_state`` (N, L, H). :func:`select_output` picks the tensor;
:func:`pool` reduces it to the (N, D) vector a head reads (or keeps per-token states for token-level tasks).

Layout conventions (the ones torchvision, timm and Hugging Face follow):

* rank 2 ``(N, F)``: already a feature vector;
* rank 3 ``(N, L, H)``: token states, features last (transformers; timm ``forward_features`` of a ViT);
* rank >= 4 ``(N, C, *spatial)``: channels first (CNN feature maps).

A 1-D CNN's ``(N, C, L)`` output is therefore read as tokens; pass a callable ``pool`` for such layouts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

import torch

PoolName = Literal["auto", "mean", "cls", "none"]
PoolFn = Callable[..., torch.Tensor]
Pool = Union[PoolName, PoolFn]
POOL_NAMES: tuple[str, ...] = ("auto", "mean", "cls", "none")

# Field names tried, in order, when a backbone returns an object or mapping and no feature_key is given.
_DEFAULT_FIELDS = ("last_hidden_state",)


def select_output(output: Any, feature_key: str | int | None = None) -> torch.Tensor:
    """The tensor to pool out of a backbone's return value.

    ``feature_key`` names a field (``"pooler_output"``, ``"hidden_states"``…) of a returned mapping or object, or an
    index into a returned tuple. Without it: a tensor is used as is, a tuple gives its first element, a mapping or
    object gives ``last_hidden_state`` when it has one, else its only tensor field.
    """
    if isinstance(output, torch.Tensor):
        if feature_key is not None:
            raise ValueError(f"mtlfast: feature_key={feature_key!r} given but the backbone returned a plain tensor")
        return output
    if isinstance(output, (tuple, list)) and not hasattr(output, "keys"):
        index = 0 if feature_key is None else feature_key
        if not isinstance(index, int):
            raise ValueError(f"mtlfast: the backbone returned a {type(output).__name__}; feature_key must be an int index, got {index!r}")
        if not -len(output) <= index < len(output):
            raise ValueError(f"mtlfast: feature_key={index} is out of range for the backbone's {len(output)} outputs")
        return _check_tensor(output[index], f"output[{index}]")
    fields = _fields(output)
    if feature_key is not None:
        if feature_key not in fields:
            raise ValueError(
                f"mtlfast: the backbone output ({type(output).__name__}) has no field {feature_key!r}; "
                f"fields: {sorted(str(k) for k in fields)}"
            )
        return _check_tensor(fields[feature_key], repr(feature_key))
    for name in _DEFAULT_FIELDS:
        if isinstance(fields.get(name), torch.Tensor):
            return fields[name]
    tensors = [name for name, value in fields.items() if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:
        return fields[tensors[0]]
    raise ValueError(
        f"mtlfast: cannot tell which output of the backbone ({type(output).__name__}) holds the features; "
        f"pass feature_key= (one of {sorted(str(k) for k in tensors)})"
    )


def _fields(output: Any) -> dict:
    if isinstance(output, Mapping):
        return dict(output)
    if hasattr(output, "__dict__"):
        return {k: v for k, v in vars(output).items() if not k.startswith("_")}
    raise TypeError(f"mtlfast: cannot read features from a backbone output of type {type(output).__name__}")


def _check_tensor(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"mtlfast: backbone output {where} is a {type(value).__name__}, not a tensor")
    return value


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of token states over the tokens the mask keeps: (N, L, H), (N, L) → (N, H).

    The sentence-embedding pooling of Sentence-BERT (Reimers & Gurevych, EMNLP 2019). A row whose mask is all zero
    gives a zero vector (never NaN). ``attention_mask`` may be bool, int or float (1 = real token, 0 = padding).
    """
    if attention_mask is None:
        return states.mean(dim=1)
    if attention_mask.shape != states.shape[:2]:
        raise ValueError(
            f"mtlfast: attention_mask must be (N, L) = {tuple(states.shape[:2])} to match token states "
            f"{tuple(states.shape)}, got {tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(states.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp_min(1.0)
    return (states * weights).sum(dim=1) / counts


def pool(states: torch.Tensor, how: Pool = "auto", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce backbone states to the representation the heads read.

    Args:
        states: (N, F), (N, L, H) token states, or (N, C, *spatial) feature maps (see the module docstring).
        how: ``"auto"`` (rank 2 as is; tokens: masked mean; maps: mean over spatial dims), ``"mean"`` (the same but
            refusing rank 2), ``"cls"`` (the first token, (N, L, H) → (N, H), as BERT's classifier reads),
            ``"none"`` (states unchanged: per-token heads, targets (N, L)), or a callable ``f(states)`` or
            ``f(states, attention_mask)``.
        attention_mask: (N, L), used by the mean over tokens.

    Returns:
        (N, D) — or the states unchanged for ``"none"``.
    """
    if callable(how):
        return how(states, attention_mask) if _takes_mask(how) else how(states)
    if how == "none":
        return states
    rank = states.dim()
    if how == "cls":
        if rank != 3:
            raise ValueError(f"mtlfast: pool='cls' needs (N, L, H) token states, got shape {tuple(states.shape)}")
        return states[:, 0]
    if how not in ("auto", "mean"):
        raise ValueError(f"mtlfast: pool must be one of {POOL_NAMES} or a callable, got {how!r}")
    if rank == 2 and how == "auto":
        return states
    if rank == 3:
        return masked_mean(states, attention_mask)
    if rank >= 4:
        return states.mean(dim=tuple(range(2, rank)))
    raise ValueError(f"mtlfast: pool={how!r} cannot reduce states of shape {tuple(states.shape)}")


def _takes_mask(fn: Callable) -> bool:
    """Whether a user pooling function accepts a second positional argument (the attention mask)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn  # a Module's __call__ takes *args
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call with the states only
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def check_pool(how: Pool) -> None:
    """Raise the library's error for a pooling spec that :func:`pool` would not accept."""
    if not callable(how) and how not in POOL_NAMES:
        raise ValueError(f"mtlfast: pool must be one of {POOL_NAMES} or a callable, got {how!r}")


def describe_pool(how: Pool) -> str:
    """A stable text for a pooling spec (part of feature-cache keys)."""
    if callable(how):
        return f"callable:{getattr(how, '__module__', '')}.{getattr(how, '__qualname__', type(how).__qualname__)}"
    return str(how)


__all__ = ["Pool", "PoolName", "POOL_NAMES", "check_pool", "describe_pool", "masked_mean", "pool", "select_output"]
