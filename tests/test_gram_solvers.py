"""The compiled Gram solvers of gradient methods (torch.ops.mtlfast.pcgrad_weights / min_norm_weights) against the
PyTorch implementations of the same algorithms in mtlfast.weighting, plus opcheck and input checks."""

from __future__ import annotations

import pytest
import torch

import mtlfast
from mtlfast.weighting.mgda import min_norm_weights
from mtlfast.weighting.pcgrad import pcgrad_task_orders, pcgrad_weights

pytestmark = pytest.mark.skipif(not mtlfast.HAS_C, reason="the compiled extension is not loaded")


def _gram(tasks: int, rank: int, dtype: torch.dtype, inactive: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.randn(tasks, rank, dtype=dtype)
    g[list(inactive)] = 0
    return g @ g.T


CASES = [(1, 3, ()), (2, 5, ()), (5, 12, (2,)), (8, 4, ()), (13, 40, (0, 7)), (32, 64, (5,)), (4, 9, (0, 1, 2, 3))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tasks,rank,inactive", CASES)
def test_pcgrad_kernel_matches_pytorch(tasks, rank, inactive, dtype):
    gram = _gram(tasks, rank, dtype, inactive)
    orders = pcgrad_task_orders(1234, 17, tasks)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(torch.ops.mtlfast.pcgrad_weights(gram, orders), pcgrad_weights(gram, orders), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tasks,rank,inactive", CASES)
def test_min_norm_kernel_matches_pytorch(tasks, rank, inactive, dtype):
    gram = _gram(tasks, rank, dtype, inactive)
    ours, theirs = torch.ops.mtlfast.min_norm_weights(gram, 100), min_norm_weights(gram, 100)
    if rank >= tasks:  # unique minimiser: the same point
        torch.testing.assert_close(ours, theirs, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12)
    # rank < T: 0 lies in the hull and a whole face minimises; rounding picks the face's points differently, but
    # the norms found agree
    scale = torch.diagonal(gram).max().clamp_min(1e-30)
    torch.testing.assert_close(ours @ gram @ ours / scale, theirs @ gram @ theirs / scale,
                               rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-9)
    active = torch.diagonal(gram) > 0
    if active.any():
        assert ours[~active].eq(0).all() and ours.min() >= 0
        torch.testing.assert_close(ours.sum(), torch.ones((), dtype=dtype))
    else:
        assert ours.eq(0).all()


def test_min_norm_two_tasks_closed_form():
    """Two gradients: α₁ = clip(<g2 − g1, g2> / ||g1 − g2||², 0, 1) (Sener & Koltun, Algorithm 1)."""
    g = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
    gram = g @ g.T
    alpha1 = ((g[1] - g[0]) @ g[1] / (g[0] - g[1]).square().sum()).clamp(0, 1)
    torch.testing.assert_close(torch.ops.mtlfast.min_norm_weights(gram, 10), torch.stack([alpha1, 1 - alpha1]))


@pytest.mark.parametrize("op", ["pcgrad_weights", "min_norm_weights"])
def test_opcheck(op):
    gram = _gram(6, 10, torch.float64, (3,))
    args = (gram, pcgrad_task_orders(5, 0, 6)) if op == "pcgrad_weights" else (gram, 50)
    torch.library.opcheck(getattr(torch.ops.mtlfast, op), args)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="mtlfast: pcgrad_weights: the Gram matrix must be"):
        torch.ops.mtlfast.pcgrad_weights(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="mtlfast: pcgrad_weights: orders must be int64"):
        torch.ops.mtlfast.pcgrad_weights(torch.eye(3), torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.mtlfast.min_norm_weights(torch.eye(3, dtype=torch.bfloat16), 5)
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        torch.ops.mtlfast.min_norm_weights(torch.eye(3), -1)
