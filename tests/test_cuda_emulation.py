"""The CUDA backend's code on machines without a GPU: the op-level test files run in a subprocess with
MTLFAST_TEST_CUDA_EMULATION=1, where mtlfast._cuda_emulation (the CUDA glue and the csrc/cuda/*.cu kernels, built by
the host compiler against the CPU emulator in csrc/cuda/emulation) serves the CPU tensors instead of the CPU
kernels: the oracle, gradient, opcheck, torch.compile and error tests, tests/test_cuda.py's CUDA-specific ones
(NaN for a bad class index, low-precision error bars, chunking) and the emulator's own (tests/test_emulator.py).

A subprocess because the emulated kernels replace the CPU ones for the whole process. The emulation is a check
of the kernels' logic (indexing, reductions, barriers, per-dtype paths), not of the device: tests/test_cuda.py on
a GPU remains the real test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
EMULATED_FILES = [
    "test_emulator.py",
    "test_cuda.py",
    "test_oracle.py",
    "test_distillation.py",
    "test_errors.py",
    "test_eager_entry.py",
    "test_gram_solvers.py",
    "test_heads.py",
    "test_compile.py",
    "test_ops.py",
    "test_recompute.py",
]

BUILT = importlib.util.find_spec("mtlfast._cuda_emulation") is not None
# scripts/setup.sh builds the module (MTLFAST_CUDA_EMULATION=ON) for `make test` and CI, so there a missing module
# is a failure, not a skip.
REQUIRED = os.environ.get("MTLFAST_CUDA_EMULATION", "").upper() == "ON"


@pytest.mark.skipif(not BUILT and not REQUIRED, reason="mtlfast._cuda_emulation is not built (MTLFAST_CUDA_EMULATION=ON)")
@pytest.mark.parametrize("test_file", EMULATED_FILES)
def test_file_passes_on_the_emulated_cuda_backend(test_file):
    assert BUILT, "mtlfast._cuda_emulation was not built although MTLFAST_CUDA_EMULATION=ON"
    env = {**os.environ, "MTLFAST_TEST_CUDA_EMULATION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(TESTS / test_file)],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{test_file} under the CUDA emulation:\n{output[-6000:]}"
    assert " passed" in output and "emulated CUDA backend" in output, output[-3000:]
