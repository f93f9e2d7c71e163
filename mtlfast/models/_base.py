"""The contract every model of ``mtlfast.models`` shares with the training loop and the weighting methods."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtlfast.nn.heads import MultiTaskHeads, MultiTaskOutput
from mtlfast.tasks import Task


class MultiTaskModel(nn.Module):
    """Base class: a network computing what the heads read (:meth:`representation`) plus fused task heads
    (``self.heads``, a :class:`~mtlfast.MultiTaskHeads`).

    Attributes:
        tasks, task_names: the task specs and their names, in head order.
        task_weights: the (T,) λ of the heads (``heads.task_weights``); assigning ``model.task_weights`` (e.g. an
            ``nn.Parameter`` for learnable weights) replaces the heads' tensor.
    """

    heads: MultiTaskHeads
    #: Whether the heads read one representation shared by every task (needed for per-task input gradients).
    shares_representation: bool = True

    def __init__(self, tasks: Sequence[Task]):
        super().__init__()
        tasks = tuple(tasks)
        if not tasks or not all(isinstance(task, Task) for task in tasks):
            raise TypeError("mtlfast: tasks must be a non-empty sequence of mtlfast task specs (mf.Classification, …)")
        self.tasks: tuple[Task, ...] = tasks
        self.task_names: tuple[str, ...] = tuple(task.name for task in tasks)

    @property
    def task_weights(self) -> torch.Tensor:
        return self.heads.task_weights

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "task_weights":  # λ lives in the heads, which are what uses it
            setattr(self.heads, name, value)
            return
        super().__setattr__(name, value)

    def representation(self, x: torch.Tensor) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """What the heads read for input ``x``; shapes are given by each subclass."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        targets: Mapping[str, torch.Tensor | None] | None = None,
        *,
        per_task_input_grads: bool = False,
        return_logits: bool = False,
    ) -> MultiTaskOutput | dict[str, torch.Tensor]:
        """With ``targets`` (task name → target; absent tasks are skipped): a :class:`~mtlfast.MultiTaskOutput`
        (``loss`` = Σ λ_t·L_t, ``loss_vector``, ``losses``, optionally ``logits`` and ``input_grads``).
        Without: the differentiable logits, name → (..., C_t) ((...) for Binary and Regression(dim=1))."""
        if per_task_input_grads and not self.shares_representation:
            raise ValueError(
                f"mtlfast: {type(self).__name__} has no representation shared by all tasks (each task reads its own "
                "gated mixture of experts and tower), so per_task_input_grads is unavailable; use the gradient "
                "weighting method with mode='parameters' and shared_parameters=list(model.expert_parameters())"
            )
        representation = self.representation(x)
        if targets is None:
            if per_task_input_grads or return_logits:
                raise ValueError("mtlfast: per_task_input_grads / return_logits need targets; without targets the "
                                 "model already returns the logits")
            return self.heads.logits(representation)
        return self.heads(representation, targets, return_logits=return_logits,
                          per_task_input_grads=per_task_input_grads)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """name → logits without gradient tracking (as :meth:`MultiTaskHeads.predict`)."""
        return self.heads.logits(self.representation(x))


def check_features(x: torch.Tensor, in_features: int, model: str) -> None:
    """Raise a clear error unless ``x`` is a floating (..., in_features) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mtlfast: {model} input must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"mtlfast: {model} expects input of shape (..., {in_features}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"mtlfast: {model} input must be floating point, got {x.dtype}")


def check_positive(model: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"mtlfast: {model} {name} must be a positive int, got {value!r}")


def check_hidden(model: str, name: str, hidden: Sequence[int], *, allow_empty: bool) -> tuple[int, ...]:
    sizes = tuple(hidden)
    if not sizes and not allow_empty:
        raise ValueError(f"mtlfast: {model} {name} needs at least one layer size")
    if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1 for h in sizes):
        raise ValueError(f"mtlfast: {model} {name} must be positive ints, got {list(sizes)}")
    return tuple(int(h) for h in sizes)


def check_dropout(model: str, dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mtlfast: {model} dropout must be in [0, 1), got {dropout}")
    return float(dropout)
