"""Task specifications: what each head predicts and which loss trains it.

A task is a small frozen description; :class:`mtlfast.MultiTaskHeads` packs any mix of them into one fused op.
``weight`` is the task's λ in the total Σ λ_t·L_t; ``input`` names the representation the head reads when the
model feeds several (e.g. ``"tokens"`` and ``"sentence"``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_INPUT = "default"


class LossKind(enum.IntEnum):
    """Integer codes shared with the C++/CUDA kernels (csrc/include/mtlfast/loss_math.h)."""

    NONE = 0  # task absent from the batch
    CROSS_ENTROPY = 1
    BCE = 2
    MSE = 3
    L1 = 4
    HUBER = 5
    DISTILL = 6  # knowledge distillation, targets = teacher logits (soft targets softmax(teacher / τ))
    DISTILL_PROBS = 7  # knowledge distillation, targets = the teacher's probabilities themselves


# The encoding of a distillation task's target form, in one place: its kind code (param = temperature τ).
DISTILLATION_KINDS = {"logits": LossKind.DISTILL, "probs": LossKind.DISTILL_PROBS}


@dataclass(frozen=True)
class Task:
    """Base class. ``num_outputs`` head columns, trained by ``kind`` with the scalar ``param``."""

    name: str
    weight: float = field(default=1.0, kw_only=True)
    input: str = field(default=DEFAULT_INPUT, kw_only=True)

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    @property
    def kind(self) -> LossKind:
        raise NotImplementedError

    @property
    def param(self) -> float:
        """Label smoothing (cross-entropy), delta (Huber), temperature (distillation); 0 otherwise."""
        return 0.0

    @property
    def ignored_class(self) -> int:
        """The class index that marks a missing label (cross-entropy only)."""
        return -100

    def column_weights(self) -> torch.Tensor | None:
        """Per-column weights: class weights (cross-entropy) or pos_weight (BCE); None when uniform."""
        return None

    @property
    def target_is_index(self) -> bool:
        return self.kind == LossKind.CROSS_ENTROPY

    @property
    def target_has_class_dim(self) -> bool:
        """Whether targets carry a trailing (num_outputs,) dimension after the batch dimensions."""
        return not self.target_is_index and self.num_outputs > 1

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if "." in self.name:
            raise ValueError(f"task {self.name!r}: names cannot contain '.' (they become state_dict keys)")


def _as_weight_tensor(values: Sequence[float] | torch.Tensor | float | None, size: int, what: str, task: str):
    if values is None:
        return None
    tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    if tensor.numel() == 1 and size > 1:
        tensor = tensor.expand(size)
    if tensor.numel() != size:
        raise ValueError(f"task {task!r}: {what} must have {size} entries, got {tensor.numel()}")
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(f"task {task!r}: {what} must be finite and non-negative")
    return tensor.clone()


@dataclass(frozen=True)
class Classification(Task):
    """Multiclass classification with cross-entropy. Targets: int class indices, shape ``(...)``.

    Matches ``F.cross_entropy(logits, y, weight=class_weights, ignore_index=..., label_smoothing=...)``, except
    that a batch where every target is ignored gives a loss of 0 (and zero gradient) instead of NaN.
    """

    num_classes: int = 2
    label_smoothing: float = 0.0
    ignore_index: int = field(default=-100, kw_only=True)
    class_weights: Sequence[float] | torch.Tensor | None = field(default=None, kw_only=True, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"task {self.name!r}: label_smoothing must be in [0, 1], got {self.label_smoothing}")
        weights = _as_weight_tensor(self.class_weights, self.num_classes, "class_weights", self.name)
        object.__setattr__(self, "class_weights", weights)

    num_outputs = property(lambda self: self.num_classes)
    kind = property(lambda self: LossKind.CROSS_ENTROPY)
    param = property(lambda self: float(self.label_smoothing))
    ignored_class = property(lambda self: int(self.ignore_index))

    def column_weights(self) -> torch.Tensor | None:
        return self.class_weights


@dataclass(frozen=True)
class Binary(Task):
    """Binary classification with BCE-with-logits. Targets: floats in [0, 1], shape ``(...)``; NaN = missing."""

    pos_weight: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pos_weight is not None and not self.pos_weight >= 0:
            raise ValueError(f"task {self.name!r}: pos_weight must be non-negative, got {self.pos_weight}")

    num_outputs = property(lambda self: 1)
    kind = property(lambda self: LossKind.BCE)

    def column_weights(self) -> torch.Tensor | None:
        return None if self.pos_weight is None else torch.tensor([float(self.pos_weight)], dtype=torch.float64)


@dataclass(frozen=True)
class MultiLabel(Task):
    """Multi-label classification: one BCE-with-logits per label. Targets ``(..., num_labels)``; NaN = missing."""

    num_labels: int = 2
    pos_weight: Sequence[float] | torch.Tensor | float | None = field(default=None, kw_only=True, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: num_labels must be >= 1, got {self.num_labels}")
        weights = _as_weight_tensor(self.pos_weight, self.num_labels, "pos_weight", self.name)
        object.__setattr__(self, "pos_weight", weights)

    num_outputs = property(lambda self: self.num_labels)
    kind = property(lambda self: LossKind.BCE)
    target_has_class_dim = property(lambda self: True)

    def column_weights(self) -> torch.Tensor | None:
        return self.pos_weight


_REGRESSION_LOSSES = {"mse": LossKind.MSE, "l1": LossKind.L1, "huber": LossKind.HUBER}


@dataclass(frozen=True)
class Regression(Task):
    """Regression. Targets ``(...)`` for ``dim=1``, else ``(..., dim)``; NaN = missing.

    ``loss`` is ``"mse"``, ``"l1"`` or ``"huber"`` (with ``delta``), each averaged over the valid elements.
    """

    dim: int = 1
    loss: str = "mse"
    delta: float = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim < 1:
            raise ValueError(f"task {self.name!r}: dim must be >= 1, got {self.dim}")
        if self.loss not in _REGRESSION_LOSSES:
            raise ValueError(f"task {self.name!r}: loss must be one of {sorted(_REGRESSION_LOSSES)}, got {self.loss!r}")
        if self.loss == "huber" and not self.delta > 0:
            raise ValueError(f"task {self.name!r}: huber delta must be positive, got {self.delta}")

    num_outputs = property(lambda self: self.dim)
    kind = property(lambda self: _REGRESSION_LOSSES[self.loss])
    param = property(lambda self: float(self.delta) if self.loss == "huber" else 0.0)


@dataclass(frozen=True)
class Distillation(Task):
    """Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    The head's ``num_classes`` logits z (the student) are trained toward a teacher's distribution p, both softened
    by the temperature τ. Targets ``(..., num_classes)`` floats:

    * ``targets="logits"``: the teacher's logits t; p = softmax(t / τ);
    * ``targets="probs"``: the probabilities p themselves, each row non-negative (summing to 1).

    A row whose target contains a NaN is missing. Per valid row the loss is
    τ²·KL(p ‖ softmax(z / τ)) = τ²·Σ_c p_c·(log p_c − log q_c) with 0·log 0 = 0 (the τ² keeps the gradient
    τ·(q − p) on the scale of a cross-entropy's as τ changes); the task's loss is the mean over valid rows,
    ``τ² · F.kl_div(log_softmax(z / τ), p, reduction="batchmean")`` on the valid rows.

    Probability rows are used as given: their sum is not checked (on CUDA that would need a host sync). For a row
    that does not sum to 1 the loss is still Σ_c p_c·(log p_c − log q_c) (as ``F.kl_div`` computes it) with its
    exact gradient τ·(q·Σ_c p_c − p). Negative or infinite probabilities raise a ValueError on the CPU; on CUDA they
    make the task's loss NaN instead.
    """

    num_classes: int = 2
    temperature: float = 1.0
    targets: str = field(default="logits", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2:
            raise ValueError(f"mtlfast: task {self.name!r}: num_classes must be >= 2, got {self.num_classes}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"mtlfast: task {self.name!r}: temperature must be positive and finite, got {self.temperature}")
        if self.targets not in DISTILLATION_KINDS:
            raise ValueError(
                f"mtlfast: task {self.name!r}: targets must be one of {sorted(DISTILLATION_KINDS)}, got {self.targets!r}"
            )

    num_outputs = property(lambda self: self.num_classes)
    kind = property(lambda self: DISTILLATION_KINDS[self.targets])
    param = property(lambda self: float(self.temperature))
    target_has_class_dim = property(lambda self: True)


def is_distillation(kind: int) -> bool:
    """Whether a kind code is one of the distillation kinds (either target form)."""
    return kind in _DISTILLATION_KIND_CODES


_DISTILLATION_KIND_CODES = frozenset(int(kind) for kind in DISTILLATION_KINDS.values())


__all__ = [
    "Task",
    "Classification",
    "Binary",
    "MultiLabel",
    "Regression",
    "Distillation",
    "LossKind",
    "DISTILLATION_KINDS",
    "DEFAULT_INPUT",
]
