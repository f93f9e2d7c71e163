"""Loss-based weighting methods (mtlfast.weighting: EW, Static, Uncertainty, DWA, RLW, GLS).

Every method is checked against numbers written out by hand or computed with plain Python floats (math.*), never
against itself; then invariants, gradients, state_dict round trips, errors, use on real MultiTaskHeads output, and
torch.compile(fullgraph=True) with the default (inductor) backend against eager."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mtlfast as mf
from mtlfast import weighting
from mtlfast.weighting import DWA, GLS, RLW, EqualWeighting, StaticWeighting, UncertaintyWeighting

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _losses(values, dtype=torch.float64, requires_grad=True) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def _grad_of(total: torch.Tensor, losses: torch.Tensor) -> list[float]:
    (grad,) = torch.autograd.grad(total, losses)
    return grad.tolist()


def _close(actual, expected, tol=1e-12):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, rel=tol, abs=tol), (actual, expected)


# --------------------------------------------------------------------------------------------------------------
# Equal and static weighting


def test_equal_weighting_is_the_plain_sum():
    losses = _losses([0.5, 2.0, 3.25])
    method = EqualWeighting(3)
    total = method(losses)
    assert total.dim() == 0 and total.dtype == torch.float64
    assert total.item() == 5.75
    assert _grad_of(total, losses) == [1.0, 1.0, 1.0]
    assert method.task_weights.tolist() == [1.0, 1.0, 1.0]


def test_static_weighting_hand_computed():
    losses = _losses([1.5, 0.25, 7.0])
    method = StaticWeighting([0.5, 2.0, 0.0])
    total = method(losses)
    assert total.item() == pytest.approx(0.5 * 1.5 + 2.0 * 0.25 + 0.0 * 7.0)
    _close(_grad_of(total, losses), [0.5, 2.0, 0.0])
    assert method.task_weights.tolist() == [0.5, 2.0, 0.0]
    assert method.num_tasks == 3


def test_static_weights_are_a_saved_buffer_that_follows_to():
    method = StaticWeighting(torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert method.fixed_weights.dtype == torch.float64  # a float64 tensor keeps its exact values
    assert "fixed_weights" in method.state_dict()
    other = StaticWeighting([1.0, 1.0]).double()
    other.load_state_dict(method.state_dict())
    assert other.fixed_weights.tolist() == [0.3, 0.7]
    assert StaticWeighting([1, 2]).to(torch.float64).fixed_weights.dtype == torch.float64
    # float32 weights applied to float64 losses: the result stays float64
    total = StaticWeighting([0.5, 0.25])(_losses([2.0, 4.0]))
    assert total.dtype == torch.float64 and total.item() == 2.0


@pytest.mark.parametrize("weights, error, message", [
    ([1.0, -0.5], ValueError, "non-negative"),
    ([1.0, float("nan")], ValueError, "finite"),
    ([float("inf"), 1.0], ValueError, "finite"),
    ([], ValueError, "non-empty"),
    (torch.ones(2, 2), ValueError, "1-D"),
    ("ab", TypeError, "sequence"),
    ([1.0, "a"], TypeError, "numbers"),
    ([True, 1.0], TypeError, "numbers"),
    (torch.tensor([1 + 1j, 2]), TypeError, "real"),
])
def test_static_weighting_rejects_bad_weights(weights, error, message):
    with pytest.raises(error, match=f"mtlfast:.*{message}"):
        StaticWeighting(weights)


def test_static_weighting_checks_num_tasks():
    with pytest.raises(ValueError, match="mtlfast: StaticWeighting got 2 weights for 3 tasks"):
        StaticWeighting([1.0, 2.0], num_tasks=3)
    assert StaticWeighting([1.0, 2.0], num_tasks=2).num_tasks == 2


# --------------------------------------------------------------------------------------------------------------
# Uncertainty weighting


def test_uncertainty_hand_computed_value_and_gradients():
    s = [0.0, math.log(2.0), -1.0]
    l = [1.0, 3.0, 0.5]
    method = UncertaintyWeighting(3, init_log_variance=torch.tensor(s, dtype=torch.float64))
    assert method.log_variance.dtype == torch.float64
    losses = _losses(l)
    total = method(losses)
    expected = sum(math.exp(-s_t) * l_t + s_t for s_t, l_t in zip(s, l))  # = 1 + 1.5 + log 2 + e/2 - 1
    assert total.item() == pytest.approx(expected, rel=1e-14)
    total.backward()
    _close(losses.grad.tolist(), [math.exp(-s_t) for s_t in s])
    _close(method.log_variance.grad.tolist(), [1.0 - math.exp(-s_t) * l_t for s_t, l_t in zip(s, l)])
    _close(method.task_weights.tolist(), [math.exp(-s_t) for s_t in s], tol=1e-6)  # task_weights is float32


def test_uncertainty_default_start_is_the_plain_sum_and_s_is_a_parameter():
    method = UncertaintyWeighting(2)
    assert [name for name, _ in method.named_parameters()] == ["log_variance"]
    assert method.log_variance.tolist() == [0.0, 0.0]
    assert method(_losses([2.0, 3.0], dtype=torch.float32)).item() == 5.0


def test_uncertainty_learns_s_equal_to_log_loss():
    # For a fixed loss, exp(-s)·L + s is minimised at s = log L; gradient descent on s must get there.
    method = UncertaintyWeighting(2).double()
    losses = torch.tensor([0.25, 4.0], dtype=torch.float64)
    for _ in range(60):
        method.log_variance.grad = None
        method(losses).backward()
        with torch.no_grad():
            method.log_variance -= 0.5 * method.log_variance.grad
    _close(method.log_variance.tolist(), [math.log(0.25), math.log(4.0)], tol=1e-6)


def test_uncertainty_leaves_absent_tasks_out():
    method = UncertaintyWeighting(3, init_log_variance=0.5).double()
    losses = _losses([0.0, 2.0, 0.0])
    total = method(losses)
    assert total.item() == pytest.approx(math.exp(-0.5) * 2.0 + 0.5)
    total.backward()
    _close(method.log_variance.grad.tolist(), [0.0, 1.0 - math.exp(-0.5) * 2.0, 0.0])
    assert torch.isfinite(losses.grad).all()


def test_uncertainty_rejects_bad_init():
    with pytest.raises(ValueError, match="mtlfast: UncertaintyWeighting init_log_variance has 2 entries for 3"):
        UncertaintyWeighting(3, init_log_variance=[0.0, 1.0])
    with pytest.raises(ValueError, match="mtlfast:.*finite"):
        UncertaintyWeighting(2, init_log_variance=float("nan"))


# --------------------------------------------------------------------------------------------------------------
# DWA


def _dwa_reference(epoch_means: list[list[float]], temperature: float, num_tasks: int) -> list[float]:
    """Plain-Python DWA weights for the epoch after ``epoch_means`` (a list of per-epoch mean-loss lists)."""
    if len(epoch_means) < 2:
        return [1.0] * num_tasks
    ratios = [last / before for last, before in zip(epoch_means[-1], epoch_means[-2])]
    exps = [math.exp(r / temperature) for r in ratios]
    return [num_tasks * e / sum(exps) for e in exps]


def test_dwa_over_several_simulated_epochs():
    # 4 epochs × 3 steps × 3 tasks; the losses decrease at different speeds per task.
    epochs = [
        [[2.0, 1.0, 4.0], [1.8, 1.1, 3.9], [1.6, 0.9, 4.1]],
        [[1.4, 0.9, 3.5], [1.2, 0.8, 3.4], [1.0, 0.7, 3.6]],
        [[0.9, 0.7, 3.0], [0.8, 0.65, 3.1], [0.7, 0.6, 2.9]],
        [[0.6, 0.6, 2.8], [0.5, 0.55, 2.7], [0.45, 0.5, 2.6]],
    ]
    method = DWA(3, temperature=2.0).double()
    means_so_far: list[list[float]] = []
    for epoch in epochs:
        expected_weights = _dwa_reference(means_so_far, 2.0, 3)
        for step in epoch:
            losses = _losses(step)
            total = method(losses)
            assert total.item() == pytest.approx(sum(w * l for w, l in zip(expected_weights, step)), rel=1e-12)
            _close(_grad_of(total, losses), expected_weights)
            _close(method.task_weights.tolist(), expected_weights, tol=1e-6)
        means_so_far.append([sum(step[t] for step in epoch) / len(epoch) for t in range(3)])
        method.end_epoch()
    assert method.epochs_completed.item() == 4
    _close(method.epoch_means[1].tolist(), means_so_far[-1])
    _close(method.epoch_means[0].tolist(), means_so_far[-2])
    # after the last epoch, the weights for epoch 4 follow epochs 2 and 3
    _close(method.weights(_losses([1.0, 1.0, 1.0])).tolist(), _dwa_reference(means_so_far, 2.0, 3))


def test_dwa_ratio_hand_computed():
    # epoch means (1, 1) then (0.5, 1): r = (0.5, 1), τ = 1 → w = 2·softmax(0.5, 1)
    method = DWA(2, temperature=1.0).double()
    method(_losses([1.0, 1.0]))
    method.end_epoch()
    method(_losses([0.5, 1.0]))
    method.end_epoch()
    e1, e2 = math.exp(0.5), math.exp(1.0)
    _close(method.weights(_losses([1.0, 1.0])).tolist(), [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


def test_dwa_weights_positive_and_sum_to_num_tasks():
    generator = torch.Generator().manual_seed(1)
    for temperature in (0.5, 2.0, 10.0):
        method = DWA(5, temperature=temperature).double()
        for _ in range(4):
            for _ in range(3):
                method(torch.rand(5, generator=generator, dtype=torch.float64) * 10)
            method.end_epoch()
            w = method.weights(torch.ones(5, dtype=torch.float64))
            assert (w > 0).all()
            assert w.sum().item() == pytest.approx(5.0, rel=1e-12)


def test_dwa_skips_absent_and_non_finite_losses_and_eval_calls():
    method = DWA(2).double()
    method(_losses([2.0, 0.0]))            # task 1 absent
    method(_losses([4.0, 3.0]))
    method(_losses([float("inf"), 1.0]))   # an overflowing step: task 0 left out of the mean
    method(_losses([float("nan"), 5.0]))
    method.eval()
    method(_losses([100.0, 100.0]))        # validation: not accumulated
    method.train()
    _close(method.epoch_loss_count.tolist(), [2.0, 3.0])
    method.end_epoch()
    _close(method.epoch_means[1].tolist(), [3.0, 3.0])
    assert method.epoch_loss_sum.tolist() == [0.0, 0.0] and method.epoch_loss_count.tolist() == [0.0, 0.0]


def test_dwa_task_missing_for_a_whole_epoch_gets_ratio_one():
    method = DWA(2, temperature=1.0).double()
    method(_losses([1.0, 2.0]))
    method.end_epoch()
    method(_losses([0.5, 0.0]))  # task 1 never seen in epoch 1: its mean is unknown
    method.end_epoch()
    e1, e2 = math.exp(0.5), math.exp(1.0)
    _close(method.weights(_losses([1.0, 1.0])).tolist(), [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


def test_dwa_state_dict_round_trip():
    generator = torch.Generator().manual_seed(2)
    batches = [torch.rand(3, generator=generator, dtype=torch.float64) + 0.1 for _ in range(12)]
    reference = DWA(3).double()
    for i, batch in enumerate(batches[:7]):
        reference(batch)
        if i % 3 == 2:
            reference.end_epoch()
    state = copy.deepcopy(reference.state_dict())
    assert set(state) == {"epoch_loss_sum", "epoch_loss_count", "epoch_means", "epochs_completed"}
    restored = DWA(3).double()
    restored.load_state_dict(state)
    for i, batch in enumerate(batches[7:], start=7):
        assert restored(batch).item() == reference(batch).item()
        if i % 3 == 2:
            reference.end_epoch()
            restored.end_epoch()
    assert torch.equal(restored.epoch_means, reference.epoch_means)


def test_dwa_end_epoch_averages_over_ranks(monkeypatch):
    # Simulate a second rank whose sums and counts are given; mean_over_ranks must see both tensors.
    other_rank = {"sum": torch.tensor([6.0, 0.0], dtype=torch.float64), "count": torch.tensor([2.0, 0.0],
                                                                                              dtype=torch.float64)}
    seen = []

    def fake_mean_over_ranks(tensor):
        key = "sum" if not seen else "count"
        seen.append(key)
        return (tensor + other_rank[key]) / 2

    monkeypatch.setattr(weighting._distributed, "mean_over_ranks", fake_mean_over_ranks)
    method = DWA(2).double()
    method(_losses([1.0, 2.0]))
    method(_losses([2.0, 4.0]))
    method.end_epoch()
    assert seen == ["sum", "count"]
    # pooled over both ranks: task 0 (1 + 2 + 6) / 4 calls, task 1 (2 + 4) / 2 calls
    _close(method.epoch_means[1].tolist(), [9.0 / 4.0, 3.0])


def test_dwa_rejects_bad_temperature():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="mtlfast: DWA temperature"):
            DWA(2, temperature=bad)
    with pytest.raises(TypeError, match="mtlfast: DWA temperature"):
        DWA(2, temperature="2")


# --------------------------------------------------------------------------------------------------------------
# RLW


def _rlw_sequence(method: RLW, steps: int, num_tasks: int) -> torch.Tensor:
    ones = torch.ones(num_tasks, dtype=torch.float64)
    rows = []
    for _ in range(steps):
        method(ones)
        rows.append(method.task_weights.clone())
    return torch.stack(rows)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet", "one_hot"])
def test_rlw_weights_on_the_simplex_and_reproducible(distribution):
    first = _rlw_sequence(RLW(4, distribution, seed=7), 50, 4)
    second = _rlw_sequence(RLW(4, distribution, seed=7), 50, 4)
    other_seed = _rlw_sequence(RLW(4, distribution, seed=8), 50, 4)
    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)
    assert len({tuple(row.tolist()) for row in first}) > 1  # new weights at (almost) every step
    assert torch.allclose(first.sum(1), torch.ones(50), atol=1e-6)
    if distribution == "one_hot":
        assert ((first == 0) | (first == 1)).all()
    else:
        assert (first > 0).all()


def test_rlw_total_is_the_weighted_sum_with_the_drawn_weights():
    method = RLW(3, seed=3)
    predicted = method.weights(_losses([1.0, 1.0, 1.0]))  # the next step's weights (drawing does not advance)
    l = [0.5, 2.0, 4.0]
    losses = _losses(l)
    total = method(losses)
    w = method.task_weights.tolist()
    assert predicted.tolist() == w
    assert total.item() == pytest.approx(sum(w_t * l_t for w_t, l_t in zip(w, l)), rel=1e-12)
    _close(_grad_of(total, losses), w, tol=1e-7)


@pytest.mark.parametrize("distribution, statistic, mean, variance", [
    # T = 2: softmax(z)_0 = sigmoid(z_0 - z_1), so logit(w_0) = z_0 - z_1
    ("normal", "logit", 0.0, 2.0),              # N(0, 1) - N(0, 1) ~ N(0, 2)
    ("uniform", "logit", 0.0, 1.0 / 6.0),       # U(0, 1) - U(0, 1): triangular, variance 2/12
    ("dirichlet", "weight", 0.5, 1.0 / 12.0),   # Dir(1, 1)_0 ~ Beta(1, 1) = U(0, 1)
    ("one_hot", "weight", 0.5, 0.25),           # Bernoulli(1/2)
])
def test_rlw_draws_follow_the_distribution(distribution, statistic, mean, variance):
    steps = 1000
    w0 = _rlw_sequence(RLW(2, distribution, seed=11), steps, 2)[:, 0].double()
    values = torch.log(w0 / (1 - w0)) if statistic == "logit" else w0
    standard_error = math.sqrt(variance / steps)
    assert abs(values.mean().item() - mean) < 4 * standard_error
    assert values.var().item() == pytest.approx(variance, rel=0.15)


def test_rlw_state_dict_round_trip_and_eval_does_not_advance():
    method = RLW(3, "normal", seed=5)
    _rlw_sequence(method, 5, 3)
    state = copy.deepcopy(method.state_dict())
    assert set(state) == {"rng_key", "rng_step"} and state["rng_step"].item() == 5
    expected = _rlw_sequence(method, 3, 3)
    restored = RLW(3, "normal", seed=123)  # the key in the state replaces the constructor's seed
    restored.load_state_dict(state)
    restored.eval()
    restored(torch.ones(3))
    assert restored.rng_step.item() == 5
    assert torch.equal(restored.task_weights, expected[0])
    restored.train()
    assert torch.equal(_rlw_sequence(restored, 3, 3), expected)


def test_rlw_draw_op_passes_opcheck():
    step, key = torch.tensor(3), torch.tensor(12345)
    for distribution in ("normal", "uniform", "dirichlet", "one_hot"):
        torch.library.opcheck(torch.ops.mtlfast.rlw_draw.default, (step, key, 4, distribution))


def test_rlw_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mtlfast: RLW distribution"):
        RLW(2, distribution="gamma")
    with pytest.raises(TypeError, match="mtlfast: RLW seed"):
        RLW(2, seed=1.5)


# --------------------------------------------------------------------------------------------------------------
# GLS


def test_gls_hand_computed_value_and_gradients():
    method = GLS(2)
    losses = _losses([2.0, 8.0])
    total = method(losses)
    assert total.item() == pytest.approx(4.0, rel=1e-14)  # sqrt(2·8)
    # ∂/∂L_t (L_1 L_2)^{1/2} = total / (2 L_t)
    _close(_grad_of(total, losses), [4.0 / 4.0, 4.0 / 16.0])
    _close(method.task_weights.tolist(), [1.0, 0.25], tol=1e-7)
    assert GLS(3)(_losses([1.0, 2.0, 4.0])).item() == pytest.approx(2.0, rel=1e-14)  # (1·2·4)^{1/3}


def test_gls_absent_tasks_leave_the_product_with_finite_gradients():
    method = GLS(3)
    losses = _losses([0.0, 2.0, 8.0])
    total = method(losses)
    assert total.item() == pytest.approx(4.0, rel=1e-14)
    _close(_grad_of(total, losses), [0.0, 1.0, 0.25])
    _close(method.task_weights.tolist(), [0.0, 1.0, 0.25], tol=1e-7)
    losses = _losses([0.0, 0.0, 0.0])
    total = method(losses)
    assert total.item() == 0.0
    assert _grad_of(total, losses) == [0.0, 0.0, 0.0]


def test_gls_is_stable_where_the_product_overflows():
    losses = _losses([1e-30, 1e30, 1e-30, 1e30], dtype=torch.float32)
    assert torch.isinf(losses[1] * losses[3])  # the naive product overflows in float32 …
    total = GLS(4)(losses)
    assert total.item() == pytest.approx(1.0, rel=1e-5)  # … the geometric mean is 1
    assert torch.isfinite(torch.autograd.grad(total, losses)[0]).all()


def test_gls_negative_loss_gives_nan():
    assert torch.isnan(GLS(2)(_losses([-1.0, 2.0])))


# --------------------------------------------------------------------------------------------------------------
# Shared behaviour


def _all_methods(num_tasks: int):
    return [
        EqualWeighting(num_tasks),
        StaticWeighting([0.5 + t for t in range(num_tasks)]),
        UncertaintyWeighting(num_tasks, init_log_variance=0.3),
        DWA(num_tasks),
        RLW(num_tasks, seed=1),
        GLS(num_tasks),
    ]


@pytest.mark.parametrize("method", _all_methods(3), ids=lambda m: type(m).__name__)
def test_errors_on_wrong_input(method):
    with pytest.raises(ValueError, match=f"mtlfast: {type(method).__name__} was built for 3 tasks, got 2 losses"):
        method(_losses([1.0, 2.0]))
    with pytest.raises(TypeError, match="mtlfast: a weighting method takes a"):
        method(torch.ones(3, 1))
    with pytest.raises(TypeError, match="mtlfast: a weighting method takes a"):
        method([1.0, 2.0, 3.0])


@pytest.mark.parametrize("method", _all_methods(3), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_out_in_the_losses_dtype(method, dtype):
    total = method(_losses([0.5, 1.5, 2.5], dtype=dtype))
    assert total.shape == () and total.dtype == dtype and torch.isfinite(total)


def test_num_tasks_must_be_positive():
    with pytest.raises(ValueError, match="mtlfast: a weighting method needs at least one task"):
        EqualWeighting(0)


def _heads_and_batch(n=6, seed=0):
    torch.manual_seed(seed)
    tasks = [mf.Classification("topic", num_classes=3), mf.Binary("spam"), mf.Regression("score")]
    heads = mf.MultiTaskHeads(4, tasks).double()
    h = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    targets = {"topic": torch.randint(0, 3, (n,)), "spam": torch.rand(n, dtype=torch.float64).round(),
               "score": torch.randn(n, dtype=torch.float64)}
    return heads, h, targets


@pytest.mark.parametrize("make", [
    lambda: EqualWeighting(3), lambda: StaticWeighting([0.2, 1.0, 3.0]),
    lambda: UncertaintyWeighting(3, init_log_variance=[0.1, -0.2, 0.4]), lambda: DWA(3), lambda: RLW(3, seed=4),
    lambda: GLS(3),
], ids=["EW", "Static", "Uncertainty", "DWA", "RLW", "GLS"])
@pytest.mark.parametrize("absent", [None, "spam"])
def test_with_multi_task_heads(make, absent):
    """MultiTaskHeads output → method → backward: the gradients are those of Σ_t (∂total/∂L_t)·L_t, computed
    independently from the per-task losses and autograd (float64)."""
    heads, h, targets = _heads_and_batch()
    if absent is not None:
        del targets[absent]
    method = make().double()
    if isinstance(method, DWA):  # get past the first two epochs so the weights are not all 1
        for means in ([1.0, 2.0, 3.0], [0.5, 2.5, 1.0]):
            method(torch.tensor(means, dtype=torch.float64))
            method.end_epoch()
    reference_method = copy.deepcopy(method)

    out = heads(h, targets)
    total = method(out)
    total.backward()

    # independent: total from the loss vector, differentiated w.r.t. the losses, then chained by hand
    loss_vector = out.loss_vector.detach().clone().requires_grad_(True)
    expected_total = reference_method(loss_vector)
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-12)
    (dtotal_dl,) = torch.autograd.grad(expected_total, loss_vector)
    heads_again, h_again, _ = _heads_and_batch()
    expected_h_grad = torch.autograd.grad((dtotal_dl * heads_again(h_again, targets).loss_vector).sum(), h_again)[0]
    assert torch.isfinite(h.grad).all()
    torch.testing.assert_close(h.grad, expected_h_grad, rtol=1e-10, atol=1e-12)
    if absent is not None and isinstance(method, (UncertaintyWeighting, GLS)):
        assert dtotal_dl[heads.task_names.index(absent)].item() == 0.0  # left out, not merely multiplied by 0
    for parameter in heads.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    if isinstance(method, UncertaintyWeighting):
        assert torch.isfinite(method.log_variance.grad).all()
        if absent is not None:
            assert method.log_variance.grad[heads.task_names.index(absent)].item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
#
# Each method compiled on its own with "aot_eager_decomp_partition": Dynamo (fullgraph: no graph break), AOTAutograd
# and the same min-cut partitioner as inductor (what decides what the backward recomputes — the part that matters
# for in-graph state updates, see mtlfast.weighting.rlw._draw), without generating C++. Then all methods in one
# module compiled with the default inductor backend: one forward and one backward C++ build instead of one pair per
# method (each build takes many seconds on this 2-core machine).

_STEPS = [[1.0, 2.0, 3.0], [0.8, 1.5, 3.5], [0.6, 1.4, 2.0], [0.5, 0.0, 2.5], [0.4, 1.0, 2.2], [0.3, 0.9, 2.1]]


def _compile_cases():
    return [
        EqualWeighting(3),
        StaticWeighting([0.2, 1.0, 3.0]),
        UncertaintyWeighting(3, init_log_variance=[0.1, -0.2, 0.4]),
        DWA(3),
        GLS(3),
        RLW(3, seed=9),
    ]


class _AllMethods(torch.nn.Module):
    """Every method on its own loss vector, so each one's loss gradient can be read separately."""

    def __init__(self):
        super().__init__()
        self.methods = torch.nn.ModuleList(_compile_cases())

    def forward(self, loss_vectors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([method(losses) for method, losses in zip(self.methods, loss_vectors)])

    def end_epoch(self) -> None:
        for method in self.methods:
            if hasattr(method, "end_epoch"):
                method.end_epoch()


def _run_steps(module, copies: int):
    """Totals, loss gradients, recorded weights and parameter gradients of a short run; epochs end every 2 steps."""
    results = []
    for i, values in enumerate(_STEPS):
        loss_vectors = [_losses(values, dtype=torch.float32) for _ in range(copies)]
        total = module(loss_vectors[0] if copies == 1 else loss_vectors)
        total.sum().backward()
        parameter_grads = [p.grad.clone() for p in module.parameters()]
        for p in module.parameters():
            p.grad = None
        weights = [b.clone() for name, b in module.named_buffers() if name.endswith("task_weights")]
        results.append((total.detach(), [v.grad.clone() for v in loss_vectors], weights, parameter_grads))
        if hasattr(module, "end_epoch") and i % 2 == 1:
            module.end_epoch()
    return results


def _assert_same_run(compiled_module, eager_module, copies: int):
    actual, expected = _run_steps(compiled_module, copies), _run_steps(eager_module, copies)
    for step, (got, want) in enumerate(zip(actual, expected)):
        for got_part, want_part in zip(got, want):
            torch.testing.assert_close(got_part, want_part, msg=lambda m: f"step {step}: {m}")
    # the state moved exactly as in eager (buffers mutated inside the graph)
    for (name, buffer), (_, e_buffer) in zip(compiled_module.named_buffers(), eager_module.named_buffers()):
        torch.testing.assert_close(buffer, e_buffer, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("index", range(6), ids=["EW", "Static", "Uncertainty", "DWA", "GLS", "RLW"])
def test_compile_fullgraph_each_method(index):
    eager, to_compile = _compile_cases()[index], _compile_cases()[index]
    compiled = torch.compile(to_compile, fullgraph=True, backend="aot_eager_decomp_partition")
    _assert_same_run(compiled, eager, copies=1)


def test_compile_fullgraph_inductor_all_methods():
    eager, to_compile = _AllMethods(), _AllMethods()
    compiled = torch.compile(to_compile, fullgraph=True)  # default backend: inductor
    _assert_same_run(compiled, eager, copies=6)
