"""L2-SP: regularise fine-tuning toward the pretrained weights.

Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018:

    R(w) = α/2 · ||w_S − w_S⁰||²  +  β/2 · ||w_S̄||²

where w_S are the parameters that exist in the source (pretrained) model, w_S⁰ their pretrained values, and w_S̄ the
new parameters (the task heads), which get plain L2. The total loss is L = Σ_t λ_t L_t + R.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mtlfast.transfer.groups import backbone_of


class _HalfSquaredDistance(torch.autograd.Function):
    """scale/2 · Σ_i ||p_i − r_i||² over same-dtype tensor lists, with gradient scale · (p_i − r_i).

    Computed with ``torch._foreach_*`` kernels (a few launches for the whole model, not one per tensor) and nothing
    saved but the inputs: the differences are recomputed in the backward instead of kept alive between the two.
    """

    @staticmethod
    def forward(ctx, scale: float, count: int, *tensors: torch.Tensor) -> torch.Tensor:
        params, refs = tensors[:count], tensors[count:]
        diffs = torch._foreach_sub(params, refs) if refs else params
        norms = torch.stack(torch._foreach_norm(diffs))
        acc = torch.float64 if norms.dtype == torch.float64 else torch.float32
        ctx.scale, ctx.count = scale, count
        ctx.save_for_backward(*tensors)
        return norms.to(acc).square().sum() * (scale / 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        tensors = ctx.saved_tensors
        params, refs = tensors[: ctx.count], tensors[ctx.count:]
        diffs = torch._foreach_sub(params, refs) if refs else [p.clone() for p in params]
        torch._foreach_mul_(diffs, (grad * ctx.scale).to(params[0].dtype))
        return (None, None, *diffs, *([None] * len(refs)))


class L2SP(nn.Module):
    """The L2-SP regulariser as a module: ``l2sp()`` returns the scalar R (differentiable w.r.t. the model's
    parameters); add it to the task loss.

    Args:
        model_or_backbone: a model with a ``backbone`` (its backbone's parameters are the source, every other
            parameter — the heads — is new), or a bare backbone (all parameters source, no β term).
        alpha: α, the weight of the pull toward the pretrained weights (the paper uses 0.1 for its classification
            transfers; tune it).
        beta: β, the weight of plain L2 on the new parameters (the paper uses 0.01).
        source_state: pretrained values (a backbone ``state_dict``; keys relative to the backbone, or to the model
            with the ``backbone.`` prefix). Default: the parameters' values now, when L2SP is built — build it right
            after loading the pretrained weights. A backbone parameter absent from ``source_state`` or of another
            shape counts as new.

    The pretrained values are copied into buffers (``source_0`` …), so they follow ``.to()`` and are saved in the
    state_dict. Every source parameter is included whether trainable or not (a frozen one contributes 0), so
    unfreezing during training needs no rebuild. R is float32 (float64 for float64 parameters) on the parameters'
    device; nothing is read on the host.
    """

    def __init__(self, model_or_backbone: nn.Module, alpha: float = 0.1, beta: float = 0.01,
                 source_state: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        if not alpha >= 0 or not beta >= 0:
            raise ValueError(f"mtlfast: L2SP alpha and beta must be non-negative, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        model = model_or_backbone
        backbone = backbone_of(model)
        source_ids: dict[int, torch.Tensor] = {}
        for name, p in backbone.named_parameters():
            ref = p.detach() if source_state is None else _lookup(source_state, name)
            if ref is not None and tuple(ref.shape) == tuple(p.shape):
                source_ids[id(p)] = ref
        # Plain lists, not submodules: the regulariser must not own (or move, or save) the model's parameters.
        self._source: list[nn.Parameter] = []
        self._new: list[nn.Parameter] = []
        self.source_names: list[str] = []
        self.new_names: list[str] = []
        for name, p in model.named_parameters():
            if id(p) in source_ids:
                self.register_buffer(f"source_{len(self._source)}", source_ids[id(p)].to(device=p.device, dtype=p.dtype, copy=True))
                self._source.append(p)
                self.source_names.append(name)
            else:
                self._new.append(p)
                self.new_names.append(name)
        if not self._source and not self._new:
            raise ValueError("mtlfast: L2SP found no parameters in the model")
        # foreach kernels take one dtype and device per list: parameters are bucketed once, here.
        self._source_buckets = _buckets(self._source)
        self._new_buckets = _buckets(self._new)

    def source_values(self) -> list[torch.Tensor]:
        """The pretrained values w_S⁰, in ``source_names`` order."""
        return list(self._buffers.values())  # registered only as source_0, source_1, … in that order

    def forward(self) -> torch.Tensor:
        """R = α/2 · ||w_S − w_S⁰||² + β/2 · ||w_new||², a scalar."""
        refs = self.source_values()
        terms = [
            _HalfSquaredDistance.apply(self.alpha, len(indices), *[self._source[i] for i in indices], *[refs[i] for i in indices])
            for indices in self._source_buckets
        ]
        terms += [_HalfSquaredDistance.apply(self.beta, len(indices), *[self._new[i] for i in indices])
                  for indices in self._new_buckets]
        total = terms[0]
        for term in terms[1:]:
            total = total + term.to(total.device)
        return total

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, source={len(self._source)} tensors, new={len(self._new)} tensors"


def _buckets(params: list[nn.Parameter]) -> list[list[int]]:
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.dtype, p.device), []).append(i)
    return list(buckets.values())


def _lookup(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    for key in (name, f"backbone.{name}"):
        if key in state:
            value = state[key]
            return value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return None


__all__ = ["L2SP"]
