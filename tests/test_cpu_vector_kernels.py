"""The CPU loss pass at the shapes where its AVX2 kernels (csrc/cpu/vectorized_losses.cpp) change strategy:
cross-entropy on both sides of the class-major limit (32 classes), BCE tasks of any width next to each other,
row counts around a vector (8 floats / 4 doubles) and batches of several row blocks. Against the float64 oracle,
here (the vector kernels on a CPU with AVX2) and in a subprocess with ATEN_CPU_CAPABILITY=default (the scalar
formulas, which CPUs without AVX2 run and which would otherwise go untested on such CI machines). Runs of
consecutive Binary tasks, which the loss pass takes as one block, with and without an absent task inside."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mtlfast as mf
from mtl_helpers import assert_results_close, fused_result, make_case, reference_result, requires_c

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def boundary_tasks() -> list[mf.Task]:
    return [
        mf.Classification("ce31", num_classes=31, label_smoothing=0.1, class_weights=[1 + i % 3 for i in range(31)]),
        mf.Classification("ce32", num_classes=32, ignore_index=1),
        mf.Classification("ce33", num_classes=33, label_smoothing=0.2),
        mf.Classification("ce70", num_classes=70, class_weights=[0.5 + (i % 5) / 4 for i in range(70)]),
        mf.Binary("bin_a"),
        mf.Binary("bin_b", pos_weight=2.5),
        mf.Binary("bin_c"),
        mf.MultiLabel("labels13", num_labels=13, pos_weight=[0.3 + i / 5 for i in range(13)]),
        mf.MultiLabel("labels8", num_labels=8, pos_weight=1.5),
        mf.Classification("ce3", num_classes=3),
        mf.Regression("reg"),
    ]


@requires_c
@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 9, 300])
def test_vector_kernel_boundaries(rows, dtype, chunk_rows):
    case = make_case(rows, boundary_tasks(), batch_shape=(rows,), features=5, logit_scale=4.0)
    actual = fused_result(case, dtype=dtype, chunk_rows=chunk_rows)
    assert_results_close(actual, reference_result(case), dtype)


def binary_run_tasks() -> list[mf.Task]:
    # 11 Binary heads in a row (the loss pass takes such runs as one block: more than a vector of floats, so the
    # masked tail runs too), a regression, then a run of 3 (below the length that is taken as a block).
    run = [mf.Binary(f"run{i}", pos_weight=None if i % 3 else 0.5 + i / 4) for i in range(11)]
    return [*run, mf.Regression("between"), *[mf.Binary(f"short{i}") for i in range(3)]]


@requires_c
@pytest.mark.parametrize("absent", [(), ("run4",)], ids=["all", "one-absent"])
@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 9, 300])
def test_runs_of_binary_tasks(rows, dtype, chunk_rows, absent):
    case = make_case(rows, binary_run_tasks(), batch_shape=(rows,), features=5, logit_scale=4.0, absent=absent)
    actual = fused_result(case, dtype=dtype, chunk_rows=chunk_rows)
    assert_results_close(actual, reference_result(case), dtype)


SCALAR_PATH_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import mtlfast as mf
    from mtl_helpers import assert_results_close, fused_result, make_case, reference_result
    from test_cpu_vector_kernels import boundary_tasks

    assert mf.HAS_C and torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    checked = 0
    for rows in (1, 9, 300):
        case = make_case(rows, boundary_tasks(), batch_shape=(rows,), features=5, logit_scale=4.0)
        expected = reference_result(case)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for chunk_rows in (None, 5):
                assert_results_close(fused_result(case, dtype=dtype, chunk_rows=chunk_rows), expected, dtype)
                checked += 1
    print("SCALAR-OK", checked)
    """
)


@requires_c
def test_scalar_loss_pass_in_subprocess():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", SCALAR_PATH_SCRIPT, TESTS_DIR],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"scalar-path subprocess failed (rc={result.returncode}):\n{result.stdout}\n{result.stderr}")
    assert "SCALAR-OK 18" in result.stdout, result.stdout
