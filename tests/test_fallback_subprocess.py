"""The pure-PyTorch fallback, exercised in a subprocess with MTLFAST_DISABLE_EXTENSION=1, so that a CI run with
the compiled extension still covers it (the whole suite can also be run that way: see DESIGN.md §5)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)

SCRIPT = textwrap.dedent(
    """
    import random, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import mtlfast as mf
    from mtlfast import _extension
    from mtl_helpers import assert_close, assert_results_close, fused_result, make_case, random_tasks, reference_result

    assert mf.HAS_C is False, "the extension was loaded although MTLFAST_DISABLE_EXTENSION=1"
    assert "MTLFAST_DISABLE_EXTENSION" in _extension.FALLBACK_REASON
    assert mf.backend_for(torch.device("cpu")) == "fallback"
    assert torch.ops.mtlfast.multi_task_loss.default is not None  # the fallback defined the ops

    checked = 0
    for seed in range(4):
        rng = random.Random(seed)
        case = make_case(seed, random_tasks(rng, count=5), batch_shape=rng.choice([(1,), (9,), (2, 5)]),
                         features=rng.choice([1, 4]), empty=[], absent=[])
        expected = reference_result(case, input_grads=True)
        for via in ("functional", "heads"):
            for chunk_rows in (None, 3):
                actual = fused_result(case, via=via, chunk_rows=chunk_rows, per_task_input_grads=True)
                assert_results_close(actual, expected)
                assert_close(actual.input_grads, expected.input_grads, what="per-task input grads")
                checked += 1
    # Zero-valid and absent tasks.
    tasks = [mf.Classification("c", num_classes=3), mf.Binary("b"), mf.Regression("r", dim=2, loss="huber")]
    case = make_case(9, tasks, empty=["c"], absent=["r"])
    for chunk_rows in (None, 2):
        actual = fused_result(case, chunk_rows=chunk_rows)
        assert float(actual.losses[0]) == 0.0 and float(actual.losses[2]) == 0.0
        assert_results_close(actual, reference_result(case))
        checked += 1
    # Out-of-range class index is raised by the fallback op itself, naming the task.
    try:
        mf.functional.multi_task_loss(case.h, case.weight, case.bias, {"c": torch.full((13,), 3)}, tasks)
    except IndexError as error:
        assert "'c'" in str(error), error
    else:
        raise AssertionError("no IndexError for a class index out of range")
    print("FALLBACK-OK", checked)
    """
)


def test_fallback_in_subprocess_matches_reference():
    env = dict(os.environ)
    env["MTLFAST_DISABLE_EXTENSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, TESTS_DIR], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        pytest.fail(f"fallback subprocess failed (rc={result.returncode}):\n{result.stdout}\n{result.stderr}")
    assert "FALLBACK-OK 18" in result.stdout, result.stdout


def test_layers_above_the_op_on_the_fallback():
    """Weighting methods (their solvers then run as PyTorch ops), the training loop and the plain twins with the
    extension disabled: the same test files, in a subprocess (compile tests are covered with the extension)."""
    env = dict(os.environ)
    env["MTLFAST_DISABLE_EXTENSION"] = "1"
    files = ["tests/test_weighting_grad.py", "tests/test_fit.py", "tests/test_plain_models.py"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-k", "not compile"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    tail = "\n".join(result.stdout.splitlines()[-15:])
    assert result.returncode == 0, f"fallback run failed (rc={result.returncode}):\n{tail}\n{result.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail, tail
