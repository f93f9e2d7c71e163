"""Run a module in eval mode for a moment and put every submodule's mode back exactly as it was."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` under ``torch.no_grad()`` for the ``with`` block; afterwards each submodule gets back its own
    ``training`` flag (not ``module.train(previous)``, which would overwrite per-layer choices such as pinned
    BatchNorm layers or a frozen part kept in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            yield module
    finally:
        for m, training in modes:
            m.training = training


def floating_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the module's first floating-point parameter or buffer (CPU / default dtype if none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()
