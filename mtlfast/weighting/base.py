"""What every weighting method is: per-task losses (and, for gradient methods, task gradients) in, the scalar
loss to backpropagate out.

Two families share one interface, ``total = method(out)`` then ``total.backward()``:

* loss-based methods (:class:`LossWeighting`) look only at the (T,) loss vector;
* gradient-based methods (:class:`GradientWeighting`) look at the task gradients through their Gram matrix
  ``K[s, t] = <g_s, g_t>``. Every method implemented here (PCGrad, MGDA-UB, CAGrad, IMTL-G, GradNorm, Nash-MTL)
  returns an update that is a combination ``Σ_t w_t g_t`` of the task gradients, with ``w`` a function of ``K``
  and the losses only. So a method computes ``w`` from the small T×T matrix and the step is one backward of
  ``Σ_t w_t L_t`` with ``w`` detached: no T backward passes, and the shared parameters receive exactly the method's
  combined gradient.

Where the task gradients come from (``mode``):

* ``"representation"`` (default, fast): gradients w.r.t. the shared representation ``h`` that the fused op returns
  from its forward pass (``heads(h, targets, per_task_input_grads=True)``); ``K`` is one (T, N·D) GEMM.
* ``"parameters"``: gradients w.r.t. the shared parameters given to the method, by one ``autograd.grad`` per task
  (T backward passes, as the papers define it for parameters).

No method reads a tensor value on the host (no ``.item()``), so a training step never syncs with the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from torch import nn

from mtlfast.weighting import _distributed

GradientMode = Literal["representation", "parameters"]


def _loss_vector(losses) -> torch.Tensor:
    vector = getattr(losses, "loss_vector", losses)
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise TypeError("mtlfast: a weighting method takes a (T,) loss tensor or a MultiTaskOutput")
    return vector


class Weighting(nn.Module):
    """Base class. Subclasses implement :meth:`combine`; call the module on a ``MultiTaskOutput`` or a (T,) loss
    vector and backpropagate what it returns.

    ``task_weights`` (a (T,) buffer) holds the weights the last call applied, for logging; reading it on the host is
    the caller's choice, never the method's.
    """

    requires_grads: ClassVar[bool] = False

    def __init__(self, num_tasks: int):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"mtlfast: a weighting method needs at least one task, got {num_tasks}")
        self.num_tasks = int(num_tasks)
        self.register_buffer("task_weights", torch.ones(self.num_tasks), persistent=False)

    def forward(self, out, gram: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a ``MultiTaskOutput`` (or a (T,) loss tensor); ``gram``: the (T, T) task-gradient Gram matrix,
        taken from ``out`` when it carries per-task input gradients and the method needs it."""
        losses = _loss_vector(out)
        if losses.shape[0] != self.num_tasks:
            raise ValueError(f"mtlfast: {type(self).__name__} was built for {self.num_tasks} tasks, got {losses.shape[0]} losses")
        if self.requires_grads and gram is None:
            gram = self.task_gram(out)
        return self.combine(losses, gram)

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def task_gram(self, out) -> torch.Tensor:
        raise NotImplementedError

    def _record(self, weights: torch.Tensor) -> None:
        with torch.no_grad():
            self.task_weights.copy_(weights.detach().to(self.task_weights.dtype))

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"


class LossWeighting(Weighting):
    """A method that weights the losses: ``total = Σ_t w_t L_t`` with ``w = self.weights(losses)``.

    Methods whose total is not of that form (uncertainty weighting, GLS) override :meth:`combine` instead.
    """

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        weights = self.weights(losses)
        self._record(weights)
        return (weights.to(losses.dtype) * losses).sum()


class GradientWeighting(Weighting):
    """A method that combines task gradients: subclasses implement :meth:`weights_from_gram`.

    Args:
        num_tasks: T.
        mode: ``"representation"`` (task gradients w.r.t. the shared representation, from the fused op) or
            ``"parameters"`` (w.r.t. ``shared_parameters``, one backward pass per task).
        shared_parameters: the shared parameters, required in ``"parameters"`` mode.

    Tasks whose gradient is exactly zero in a batch (absent from the batch, or no valid label) are inactive: they get
    weight 0 and do not enter the method's optimisation problem.
    """

    requires_grads: ClassVar[bool] = True
    supported_modes: ClassVar[tuple[str, ...]] = ("representation", "parameters")

    def __init__(self, num_tasks: int, *, mode: GradientMode = "representation",
                 shared_parameters: Iterable[nn.Parameter] | None = None):
        super().__init__(num_tasks)
        if mode not in self.supported_modes:
            raise ValueError(f"mtlfast: {type(self).__name__} supports modes {self.supported_modes}, got {mode!r}")
        self.mode = mode
        self._shared: list[nn.Parameter] = [] if shared_parameters is None else list(shared_parameters)
        if mode == "parameters" and not self._shared:
            raise ValueError(f"mtlfast: {type(self).__name__}(mode='parameters') needs shared_parameters")

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) combination weights from the (T, T) Gram matrix (float32/64) and the detached losses."""
        raise NotImplementedError

    def task_gram(self, out) -> torch.Tensor:
        if self.mode == "parameters":
            return parameter_gram(_loss_vector(out), self._shared)
        gram_of = getattr(out, "input_gram", None)
        if gram_of is None:
            raise TypeError(f"mtlfast: {type(self).__name__} needs task gradients: pass a MultiTaskOutput computed "
                            "with per_task_input_grads=True, or gram=")
        return _distributed.representation_gram_over_ranks(gram_of())

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        if gram is None or gram.shape != (self.num_tasks, self.num_tasks):
            raise ValueError(f"mtlfast: {type(self).__name__} needs a ({self.num_tasks}, {self.num_tasks}) Gram matrix")
        dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
        weights = self.weights_from_gram(gram.detach().to(dtype), losses.detach().to(dtype))
        self._record(weights)
        return (weights.detach().to(losses.dtype) * losses).sum()


def parameter_gram(losses: torch.Tensor, parameters: list[nn.Parameter]) -> torch.Tensor:
    """(T, T) Gram matrix of the per-task gradients w.r.t. ``parameters`` (one autograd.grad per task)."""
    rows = []
    for loss in losses.unbind(0):
        if not loss.requires_grad:
            rows.append(torch.cat([torch.zeros_like(p).flatten() for p in parameters]))
            continue
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(parameters, grads)]))
    jacobian = torch.stack(rows)
    jacobian = _distributed.mean_over_ranks(jacobian if jacobian.dtype == torch.float64 else jacobian.float())
    return jacobian @ jacobian.T
