"""Counter-based random numbers for weighting methods (RLW's weights, PCGrad's task orders).

A draw is a pure function of (seed key, step counter) computed with int64 tensor ops on the consumer's device: the
same on every DDP rank and device, no host↔device copy, nothing Dynamo cannot trace (a ``torch.Generator`` is), and
the state is two integer buffers, so ``state_dict()`` resumes a stream exactly.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x·constant mod 2³²`` for int64 tensors holding values in [0, 2³²), without ever leaving the int64 range
    (a plain 32×32-bit product can reach 2⁶⁴ and signed overflow is not something to rely on across backends)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with strong avalanche ("lowbias32", C. Wellons' hash-prospector).
    Inputs and outputs are int64 tensors in [0, 2³²), so every right shift is a logical one."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key_of(seed: int) -> int:
    """The 32-bit stream key of a seed (any Python int), computed once at construction."""
    seed &= (1 << 64) - 1
    low = torch.tensor(seed & _MASK32, dtype=torch.long)
    high = torch.tensor(seed >> 32, dtype=torch.long)
    return int(_hash32(_hash32(high) ^ low ^ 0x5BD1E995))
