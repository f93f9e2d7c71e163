"""Route the small T x T solvers of gradient methods to the compiled kernels when they exist.

The same algorithm as a few hundred tiny PyTorch ops costs milliseconds per step (MGDA's Frank-Wolfe: ~20 ops x 100
iterations; PCGrad: T rounds); ``torch.ops.mtlfast.min_norm_weights`` / ``pcgrad_weights`` (csrc/cpu,
csrc/cuda, math in csrc/include/mtlfast/gram_solvers.h) do it in one call. Where no kernel exists for the device
(extension not built, a CPU-only build with CUDA tensors, another device type) the PyTorch version runs: same
arithmetic, same result up to floating-point ties.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtlfast import _extension


def _compiled_kernel(gram: torch.Tensor) -> bool:
    return _extension.why_not_fast(gram.device) is None and gram.dtype in (torch.float32, torch.float64)


def pcgrad_weights(gram: torch.Tensor, orders: torch.Tensor, reference: Callable[..., torch.Tensor]) -> torch.Tensor:
    if _compiled_kernel(gram):
        return torch.ops.mtlfast.pcgrad_weights(gram, orders.to(device=gram.device, dtype=torch.long))
    return reference(gram, orders)


def min_norm_weights(gram: torch.Tensor, iterations: int, reference: Callable[..., torch.Tensor]) -> torch.Tensor:
    if _compiled_kernel(gram):
        return torch.ops.mtlfast.min_norm_weights(gram, iterations)
    return reference(gram, iterations)
