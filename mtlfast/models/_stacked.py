"""Many small layers of one shape computed as one batched GEMM: the experts of a mixture, the towers of the tasks.

Members are stacked along a leading dimension M. Activations keep the member-major layout (M, N, F) so every layer
after the first is one ``baddbmm``; a first layer that every member reads from the same (N, F) input is one GEMM
against the (F, M·F_out) view of the stacked weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


class StackedLinear(nn.Module):
    """M independent ``nn.Linear(in_features, out_features)`` layers, stored stacked and applied as one GEMM.

    Parameters: ``weight`` (M, in_features, out_features) — member m computes ``x @ weight[m] + bias[m]``, so
    ``weight[m]`` is the transpose of the equivalent ``nn.Linear`` weight — and ``bias`` (M, out_features).

    Input: (N, in_features), read by every member, or (M, N, in_features), member m reading slice m.
    Output: (M, N, out_features).
    """

    def __init__(self, members: int, in_features: int, out_features: int, *, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if members < 1 or in_features < 1 or out_features < 1:
            raise ValueError(
                f"mtlfast: a stacked layer needs positive sizes, got members={members}, in_features={in_features}, "
                f"out_features={out_features}"
            )
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(members, out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each member drawn exactly as ``nn.Linear(in, out)`` draws its weight then its bias (kaiming-uniform,
        a=√5, and U(±1/√in)), member after member: a seeded model starts where its loop version would."""
        bound = 1.0 / math.sqrt(self.in_features)
        for member in range(self.members):
            linear_weight = torch.empty(self.out_features, self.in_features, device=self.weight.device,
                                        dtype=self.weight.dtype)
            nn.init.kaiming_uniform_(linear_weight, a=math.sqrt(5))
            self.weight[member].copy_(linear_weight.T)
            if self.bias is not None:
                self.bias[member].uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # Shared input: one (N, in) × (in, M·out) GEMM (bias fused) instead of M thin ones. The result is
            # returned as an (M, N, out) view of the (N, M·out) product; bmm consumes that layout without a copy.
            members_last = self.weight.permute(1, 0, 2).reshape(self.in_features, -1)
            if self.bias is None:
                flat = torch.mm(x, members_last)
            else:
                flat = torch.addmm(self.bias.reshape(-1), x, members_last)
            return flat.view(x.shape[0], self.members, self.out_features).transpose(0, 1)
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def extra_repr(self) -> str:
        return (f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class StackedMLP(nn.Module):
    """M independent MLPs of one shape: ``Linear → activation → dropout`` per hidden size, every member at once.

    Input (N, in_features) shared by all members, or (M, N, in_features); output (M, N, hidden[-1]), or the input
    unchanged when ``hidden`` is empty (then ``out_features == in_features``).
    """

    def __init__(self, members: int, in_features: int, hidden: Sequence[int], *,
                 activation: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        sizes = [int(in_features), *(int(h) for h in hidden)]
        self.members = members
        self.out_features = sizes[-1]
        self.layers = nn.ModuleList(
            StackedLinear(members, fan_in, fan_out, device=device, dtype=dtype)
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
        )
        self.activations = nn.ModuleList(activation() for _ in self.layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, activation in zip(self.layers, self.activations):
            x = activation(layer(x))
            if self.dropout is not None:
                x = self.dropout(x)
        return x
