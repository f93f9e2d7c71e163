"""Random loss weighting: fresh random task weights at every step."""

from __future__ import annotations

from typing import Literal

import torch

from mtlfast.weighting._counter_rng import _MASK32, _hash32, _key_of
from mtlfast.weighting.base import LossWeighting

Distribution = Literal["normal", "uniform", "dirichlet", "one_hot"]
_DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "one_hot")

def _uniforms(step: torch.Tensor, key: torch.Tensor, streams: int, num_tasks: int) -> torch.Tensor:
    """(streams, num_tasks) float32 uniforms in (0, 1) for counter ``step`` (int64 scalar tensors in, device kept)."""
    task = torch.arange(num_tasks, device=step.device, dtype=torch.long)
    stream = torch.arange(streams, device=step.device, dtype=torch.long).unsqueeze(1)
    # counter_high is a bijection of the step (for steps below 2^32: of its low word), and the stream/task index
    # then separates the draws within a step.
    counter_low = _hash32((step & _MASK32) ^ key)
    counter_high = _hash32(((step >> 32) & _MASK32) ^ counter_low)
    bits = _hash32(_hash32(counter_high ^ (stream * num_tasks + task)) ^ key)
    return ((bits >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


@torch.library.custom_op("mtlfast::rlw_draw", mutates_args=())
def _draw(step: torch.Tensor, key: torch.Tensor, num_tasks: int, distribution: str) -> torch.Tensor:
    """(num_tasks,) float32 random weights on the simplex for counter ``step``.

    An opaque custom op on purpose: RLW advances its counter in place in the same compiled graph, and AOTAutograd's
    min-cut partitioner (torch 2.14) may otherwise recompute the weights in the backward from the counter buffer,
    reading it after the increment — silently wrong gradients (pytorch/pytorch PR #197039). Custom ops are never
    recomputed, so the weights themselves are saved for the backward.
    """
    if distribution == "normal":
        u = _uniforms(step, key, 2, num_tasks)
        z = torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos((2.0 * torch.pi) * u[1])  # Box–Muller
        return torch.softmax(z, dim=0)
    if distribution == "uniform":
        return torch.softmax(_uniforms(step, key, 1, num_tasks)[0], dim=0)
    if distribution == "dirichlet":
        exponential = -torch.log(_uniforms(step, key, 1, num_tasks)[0])
        return exponential / exponential.sum()
    chosen = (_uniforms(step, key, 1, num_tasks)[0, 0] * num_tasks).long().clamp_max(num_tasks - 1)
    return torch.nn.functional.one_hot(chosen, num_tasks).to(torch.float32)


@_draw.register_fake
def _(step: torch.Tensor, key: torch.Tensor, num_tasks: int, distribution: str) -> torch.Tensor:
    return step.new_empty((num_tasks,), dtype=torch.float32)


class RLW(LossWeighting):
    """Random loss weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", TMLR 2022).

    At every step a new weight vector is drawn and ``total = Σ_t w_t·L_t``:

    * ``"normal"`` (the paper's default): ``w = softmax(z)``, ``z ~ N(0, I_T)``;
    * ``"uniform"``: ``w = softmax(z)``, ``z ~ U(0, 1)^T``;
    * ``"dirichlet"``: ``w ~ Dir(1, …, 1)`` (drawn as ``e / Σ e`` with ``e_t ~ Exp(1)``);
    * ``"one_hot"`` (the paper's constrained Bernoulli): ``w = e_j`` with j uniform over the tasks.

    The weights are positive (one_hot: non-negative) and sum to 1.

    Where the randomness comes from: a counter-based generator, not ``torch.Generator``. The draw for step n is a
    pure function of (seed, n), computed with integer tensor ops on the module's device: ``bits = hash(key, n,
    task)`` (a 32-bit integer hash) → uniforms in (0, 1) → the distribution above (Box–Muller for the normal).
    Compared with a CPU ``torch.Generator`` whose samples are copied to the GPU this gives

    * the same weights on every DDP rank for a given seed and step count (and on every device type, up to the last
      bit of float rounding in log/cos);
    * no host↔device copy in the step (a blocking copy to the GPU would wait for the stream) and no graph break
      (Dynamo cannot trace a ``Generator`` argument): ``torch.compile(fullgraph=True)`` works. The draw is the
      custom op ``torch.ops.mtlfast.rlw_draw``, which keeps the compiled backward correct (see ``_draw``);
    * state that is one integer: the step counter ``rng_step`` and the ``rng_key`` are persistent buffers, so
      ``state_dict()`` round-trips the stream exactly (resuming draws what the uninterrupted run would have).

    Samples have float32 resolution (24 random bits per uniform), ample for loss weights. The counter advances by
    one per call in training mode; in eval mode (``weighting.eval()``) a call draws the weights of the next
    training step without consuming them, so evaluation never desynchronises ranks or runs.

    Args:
        num_tasks: T.
        distribution: one of ``"normal"``, ``"uniform"``, ``"dirichlet"``, ``"one_hot"``.
        seed: any int; two instances with the same seed draw the same weights step by step.

    Input: a (T,) loss vector (or a ``MultiTaskOutput``); output: a scalar in the losses' dtype and device.
    ``task_weights`` records the weights drawn for the step.
    """

    rng_key: torch.Tensor
    rng_step: torch.Tensor

    def __init__(self, num_tasks: int, distribution: Distribution = "normal", seed: int = 0):
        super().__init__(num_tasks)
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"mtlfast: RLW distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"mtlfast: RLW seed must be an int, got {type(seed).__name__}")
        self.distribution = distribution
        self.seed = seed
        self.register_buffer("rng_key", torch.tensor(_key_of(seed), dtype=torch.long))
        self.register_buffer("rng_step", torch.zeros((), dtype=torch.long))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(T,) float32 random weights of the current step, on the module's device (drawing does not advance)."""
        return _draw(self.rng_step, self.rng_key, self.num_tasks, self.distribution)

    def combine(self, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        weights = self.weights(losses)
        if self.training:
            with torch.no_grad():
                self.rng_step.add_(1)
        self._record(weights)
        return (weights.to(device=losses.device, dtype=losses.dtype) * losses).sum()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, distribution={self.distribution!r}, seed={self.seed}"
