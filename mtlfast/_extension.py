"""Loads the compiled extension ``mtlfast._C`` if it can; never makes ``import mtlfast`` fail.

When the fast path is not taken, :data:`FALLBACK_REASON` says why (``python -m mtlfast info`` prints it) and the
same ops are defined in pure PyTorch by :mod:`mtlfast._fallback`.
"""

from __future__ import annotations

import os

import torch

HAS_C: bool = False
HAS_CUDA_KERNELS: bool = False
FALLBACK_REASON: str | None = None
BUILD_INFO: dict[str, object] = {}


def _load() -> None:
    global HAS_C, HAS_CUDA_KERNELS, FALLBACK_REASON
    if os.environ.get("MTLFAST_DISABLE_EXTENSION", "0") not in ("", "0"):
        FALLBACK_REASON = "disabled by MTLFAST_DISABLE_EXTENSION"
        return
    try:
        from mtlfast import _C  # noqa: PLC0415  (registers torch.ops.mtlfast.* as a side effect)
    except ImportError as error:
        text = str(error)
        if "undefined symbol" in text:
            FALLBACK_REASON = (
                f"mtlfast._C was built against another torch than the installed {torch.__version__}; "
                f"rebuild with `pip install --no-build-isolation -e .` ({text})"
            )
        else:
            FALLBACK_REASON = f"mtlfast._C is not built ({text}); build it with `pip install --no-build-isolation -e .`"
        return
    built_against = str(_C.torch_version)
    BUILD_INFO.update(
        version=_C.__version__,
        torch_version=built_against,
        with_cuda=bool(_C.with_cuda),
        cuda_archs=str(_C.cuda_archs),
        with_openmp=bool(_C.with_openmp),
    )
    if built_against.split("+")[0] != torch.__version__.split("+")[0]:
        # It loaded (the ABI matched well enough to resolve every symbol) and its ops are registered, so it is
        # used; info still shows the mismatch because a rebuild is the supported setup.
        BUILD_INFO["warning"] = f"built against torch {built_against}, running with torch {torch.__version__}"
    HAS_C = True
    HAS_CUDA_KERNELS = bool(_C.with_cuda)


_load()


def backend_for(device: torch.device) -> str:
    """Which implementation runs the fused op for tensors on ``device``: 'cpu', 'cuda' or 'fallback'."""
    return "fallback" if why_not_fast(device) is not None else device.type


def why_not_fast(device: torch.device) -> str | None:
    """``None`` when the compiled kernels serve ``device``; otherwise the reason they do not."""
    if not HAS_C:
        return FALLBACK_REASON
    if device.type == "cuda" and not HAS_CUDA_KERNELS:
        return "mtlfast._C was built without CUDA kernels (no nvcc or a CPU build of torch at build time)"
    if device.type not in ("cpu", "cuda"):
        return f"no mtlfast kernels for device type {device.type!r}"
    return None
