"""Fixtures shared by the test suite; the helper functions live in tests/mtl_helpers.py (importable here and in a
subprocess alike)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import mtlfast  # noqa: E402
import mtlfast.functional  # noqa: E402

from mtl_helpers import CUDA_EMULATION  # noqa: E402

# The emulator's own tests run only in the emulated subprocess of test_cuda_emulation.py.
collect_ignore = [] if CUDA_EMULATION else ["test_emulator.py"]

if CUDA_EMULATION:  # the CUDA backend, emulated, replaces the CPU kernels (see mtl_helpers.CUDA_EMULATION)
    if os.environ.get("MTLFAST_CUDA_EMULATION_MODULE"):  # another build of it (scripts/check_cuda_emulation_asan.sh)
        import importlib.util

        _spec = importlib.util.spec_from_file_location(
            "mtlfast._cuda_emulation", os.environ["MTLFAST_CUDA_EMULATION_MODULE"]
        )
        sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[_spec.name])
    import mtlfast._cuda_emulation  # noqa: E402, F401
    import mtlfast.functional  # noqa: E402

    # CPU tensors take CUDA's defaults too: large heads recompute their logits in the backward.
    mtlfast.functional.RECOMPUTE_DEVICE_TYPES = mtlfast.functional.RECOMPUTE_DEVICE_TYPES | {"cpu"}


def pytest_report_header(config):
    from mtlfast import _extension

    backend = "compiled extension (mtlfast._C)" if mtlfast.HAS_C else f"pure-PyTorch fallback ({_extension.FALLBACK_REASON})"
    if CUDA_EMULATION:
        backend += "; CPU tensors served by the emulated CUDA backend (mtlfast._cuda_emulation)"
    return [f"mtlfast backend: {backend}; torch {torch.__version__}; cuda available: {torch.cuda.is_available()}"]


def pytest_collection_modifyitems(config, items):
    if not CUDA_EMULATION:
        return
    skip = pytest.mark.skip(reason="checks an error only the CPU kernels raise; the CUDA backend gives a NaN loss")
    for item in items:
        if item.get_closest_marker("cpu_kernel_semantics") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Every test starts from the same global RNG state and cannot leak autocast / grad-mode changes."""
    torch.manual_seed(0)
    grad_enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(grad_enabled)


class OpSpy:
    """Wraps the fused-op entry points used by mtlfast.functional (``mtlfast.ops``) and records which op ran with
    which arguments. The C++ eager entry point counts as the op it runs (``multi_task_loss``) when it ran, and is
    not recorded when it handed the call back (returned None)."""

    EAGER_ENTRY_POINTS = {"multi_task_loss_eager": "multi_task_loss"}

    def __init__(self, real):
        self._real = real
        self.calls: list[tuple[str, tuple]] = []
        self.eager_calls = 0

    def __getattr__(self, name):
        op = getattr(self._real, name)

        def call(*args, **kwargs):
            result = op(*args, **kwargs)
            if name not in self.EAGER_ENTRY_POINTS:
                self.calls.append((name, args))
            elif result is not None:
                self.calls.append((self.EAGER_ENTRY_POINTS[name], args))
                self.eager_calls += 1
            return result

        return call

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def op_spy(monkeypatch) -> OpSpy:
    spy = OpSpy(mtlfast.ops)
    monkeypatch.setattr(mtlfast.functional, "_fused", spy)
    return spy

