"""MultiTaskHeads as a drop-in nn.Module: state_dict compatibility with nn.ModuleDict of nn.Linear, from_linear,
seeded initialisation, predict, several inputs, absent tasks, learnable task weights, dtype conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlfast as mf
from mtl_helpers import assert_close, make_case, random_target, reference_result

D = 6


def _tasks():
    return [
        mf.Classification("topic", num_classes=5, label_smoothing=0.1, weight=0.7),
        mf.Binary("spam", weight=0.5, pos_weight=2.0),
        mf.MultiLabel("tags", num_labels=12),
        mf.Regression("score", loss="huber"),
        mf.Regression("box", dim=4, loss="l1", weight=1.5),
    ]


def _module_dict(tasks, features=D, bias=True, dtype=None):
    return nn.ModuleDict(
        {t.name: nn.Linear(features if isinstance(features, int) else features[t.input], t.num_outputs, bias=bias, dtype=dtype)
         for t in tasks}
    )


def _targets(tasks, batch_shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {t.name: random_target(t, batch_shape, gen).float() if not t.target_is_index else random_target(t, batch_shape, gen)
            for t in tasks}


def _eager_loss(module_dict, tasks, h, targets):
    """What a user writes without mtlfast: one Linear and one loss per task (the oracle), in float64."""
    total = 0.0
    losses = {}
    from mtlfast._reference import task_loss

    for task in tasks:
        layer = module_dict[task.name]
        x = h[task.input] if isinstance(h, dict) else h
        logits = layer(x).reshape(-1, task.num_outputs)
        y = targets[task.name]
        y = y.reshape(-1) if task.target_is_index else y.reshape(-1, task.num_outputs).to(logits.dtype)
        losses[task.name] = task_loss(task, logits, y)
        total = total + task.weight * losses[task.name]
    return total, losses


# ---------------------------------------------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_has_the_module_dict_keys_and_shapes(bias):
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks, bias=bias)
    reference = _module_dict(tasks, bias=bias).state_dict()
    state = heads.state_dict()
    assert list(state) == list(reference)
    for key in reference:
        assert state[key].shape == reference[key].shape, key


def test_load_state_dict_from_module_dict_gives_identical_logits():
    tasks = _tasks()
    linear = _module_dict(tasks)
    heads = mf.MultiTaskHeads(D, tasks)
    result = heads.load_state_dict(linear.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    h = torch.randn(3, 4, D)
    predicted = heads.predict(h)
    for task in tasks:
        expected = linear[task.name](h)
        expected = expected if task.target_has_class_dim or task.target_is_index else expected.squeeze(-1)
        # One packed GEMM vs one GEMM per head: equal up to float32 summation order.
        torch.testing.assert_close(predicted[task.name], expected, rtol=1e-6, atol=1e-6, msg=task.name)


def test_state_dict_round_trip_both_ways():
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    linear = _module_dict(tasks)
    linear.load_state_dict(heads.state_dict())
    for task in tasks:
        assert torch.equal(linear[task.name].weight, heads.head_weight(task.name))
        assert torch.equal(linear[task.name].bias, heads.head_bias(task.name))
    other = mf.MultiTaskHeads(D, tasks)
    other.load_state_dict(heads.state_dict())
    for key, value in heads.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_state_dict_inside_a_parent_module():
    tasks = _tasks()

    class Model(nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.encoder = nn.Linear(4, D)
            self.heads = heads

    fused, eager = Model(mf.MultiTaskHeads(D, tasks)), Model(_module_dict(tasks))
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(5, 4)
    logits = fused.heads.predict(fused.encoder(x))
    torch.testing.assert_close(logits["tags"], eager.heads["tags"](eager.encoder(x)), rtol=0, atol=0)


def test_load_state_dict_strict_reports_missing_keys_by_their_public_name():
    tasks = _tasks()
    state = _module_dict(tasks).state_dict()
    del state["spam.weight"]
    with pytest.raises(RuntimeError) as info:
        mf.MultiTaskHeads(D, tasks).load_state_dict(state)
    assert "spam.weight" in str(info.value)
    assert "packed." not in str(info.value)  # internal names mean nothing to the user


def test_load_partial_state_dict_non_strict():
    """Transfer learning: load the heads a checkpoint has (strict=False), keep the others as initialised."""
    tasks = _tasks()
    linear = _module_dict(tasks)
    state = linear.state_dict()
    del state["spam.weight"], state["spam.bias"]
    heads = mf.MultiTaskHeads(D, tasks)
    spam_before = heads.head_weight("spam").detach().clone()
    result = heads.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["spam.bias", "spam.weight"]
    assert not result.unexpected_keys
    for task in tasks:
        if task.name != "spam":
            assert torch.equal(heads.head_weight(task.name), linear[task.name].weight), task.name
            assert torch.equal(heads.head_bias(task.name), linear[task.name].bias), task.name
    assert torch.equal(heads.head_weight("spam"), spam_before)


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear(bias):
    tasks = _tasks()
    linear = _module_dict(tasks, bias=bias)
    heads = mf.MultiTaskHeads.from_linear(linear, tasks)
    assert (heads.head_bias("topic") is not None) == bias
    h = torch.randn(7, D)
    for name, logits in heads.predict(h).items():
        torch.testing.assert_close(logits.reshape(7, -1), linear[name](h), rtol=1e-6, atol=1e-6, msg=name)
    # The loss equals the per-head eager loop's.
    targets = _targets(tasks, (7,))
    out = heads(h, targets)
    total, losses = _eager_loss(linear, tasks, h, targets)
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    for name in losses:
        torch.testing.assert_close(out.losses[name], losses[name], rtol=1e-5, atol=1e-6)


def test_from_linear_float64_matches_eager_gradients():
    tasks = _tasks()
    linear = _module_dict(tasks, dtype=torch.float64)
    heads = mf.MultiTaskHeads.from_linear(linear, tasks)
    assert heads.head_weight("topic").dtype == torch.float64
    h = torch.randn(9, D, dtype=torch.float64)
    targets = {k: v.double() if v.is_floating_point() else v for k, v in _targets(tasks, (9,)).items()}
    heads(h, targets).loss.backward()
    total, _ = _eager_loss(linear, tasks, h, targets)
    total.backward()
    for task in tasks:
        group = heads.packed["default"]
        rows = group.layout.columns(group.layout.index[task.name])
        torch.testing.assert_close(group.weight.grad[rows], linear[task.name].weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(group.bias.grad[rows], linear[task.name].bias.grad, rtol=1e-10, atol=1e-12)


def test_from_linear_rejects_mismatched_heads():
    tasks = _tasks()
    linear = _module_dict(tasks)
    linear["topic"] = nn.Linear(D, 4)
    with pytest.raises(ValueError, match="topic"):
        mf.MultiTaskHeads.from_linear(linear, tasks)
    del linear["topic"]
    with pytest.raises(KeyError, match="topic"):
        mf.MultiTaskHeads.from_linear(linear, tasks)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize("bias", [True, False])
def test_seeded_init_equals_seeded_module_dict(bias):
    tasks = _tasks()
    torch.manual_seed(1234)
    linear = _module_dict(tasks, bias=bias)
    torch.manual_seed(1234)
    heads = mf.MultiTaskHeads(D, tasks, bias=bias)
    for key, value in linear.state_dict().items():
        assert torch.equal(heads.state_dict()[key], value), key


def _interleaved_multi_input_tasks():
    return [
        mf.Classification("topic", num_classes=5),
        mf.Classification("ner", num_classes=9, input="tokens"),
        mf.Binary("spam"),
        mf.MultiLabel("pos", num_labels=3, input="tokens"),
    ]


def test_multi_input_keeps_the_task_order():
    """Task order (task_names, loss_vector, task_weights, state_dict) is the order the user gave, even when tasks
    of different inputs are interleaved."""
    tasks = _interleaved_multi_input_tasks()
    heads = mf.MultiTaskHeads({"default": 4, "tokens": 3}, tasks)
    assert heads.task_names == tuple(t.name for t in tasks)
    assert list(heads.state_dict()) == list(_module_dict(tasks, {"default": 4, "tokens": 3}).state_dict())


def test_seeded_init_equals_seeded_module_dict_multi_input():
    tasks = _interleaved_multi_input_tasks()
    sizes = {"default": 4, "tokens": 3}
    torch.manual_seed(99)
    linear = _module_dict(tasks, sizes)
    torch.manual_seed(99)
    heads = mf.MultiTaskHeads(sizes, tasks)
    for key, value in linear.state_dict().items():
        assert torch.equal(heads.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------------------
# predict / logits


def test_predict_shapes():
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    for batch in [(8,), (2, 3), (1,)]:
        predicted = heads.predict(torch.randn(*batch, D))
        assert list(predicted) == [t.name for t in tasks]
        assert predicted["topic"].shape == (*batch, 5)
        assert predicted["spam"].shape == batch
        assert predicted["tags"].shape == (*batch, 12)
        assert predicted["score"].shape == batch
        assert predicted["box"].shape == (*batch, 4)
        assert not any(p.requires_grad for p in predicted.values())


def test_predict_multilabel_with_one_label_keeps_its_dim():
    heads = mf.MultiTaskHeads(D, [mf.MultiLabel("m", num_labels=1), mf.Regression("r", dim=1)])
    predicted = heads.predict(torch.randn(5, D))
    assert predicted["m"].shape == (5, 1)  # targets of MultiLabel are (..., num_labels)
    assert predicted["r"].shape == (5,)


def test_logits_are_differentiable():
    heads = mf.MultiTaskHeads(D, _tasks())
    logits = heads.logits(torch.randn(3, D))
    sum(v.sum() for v in logits.values()).backward()
    assert heads.packed["default"].weight.grad is not None


def test_return_logits_and_input_grads_from_forward():
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    h = torch.randn(2, 3, D)
    out = heads(h, _targets(tasks, (2, 3)), return_logits=True, per_task_input_grads=True)
    predicted = heads.predict(h)
    for task in tasks:
        torch.testing.assert_close(out.logits[task.name], predicted[task.name])
        assert out.input_grads[task.name].shape == h.shape


# ---------------------------------------------------------------------------------------------------------------
# Several inputs


def _multi_input_case(seed=0):
    tasks = [
        mf.Classification("ner", num_classes=9, input="tokens", label_smoothing=0.05),
        mf.MultiLabel("pos", num_labels=3, input="tokens"),
        mf.Classification("topic", num_classes=5, weight=0.5),
        mf.Binary("spam"),
    ]
    gen = torch.Generator().manual_seed(seed)
    B, L, D1, D2 = 3, 7, 5, 4
    h = {
        "tokens": torch.randn(B, L, D1, generator=gen, dtype=torch.float64),
        "default": torch.randn(B, D2, generator=gen, dtype=torch.float64),
    }
    targets = {
        "ner": random_target(tasks[0], (B, L), gen, p_missing=0.3),
        "pos": random_target(tasks[1], (B, L), gen),
        "topic": random_target(tasks[2], (B,), gen),
        "spam": random_target(tasks[3], (B,), gen),
    }
    return tasks, h, targets, {"tokens": D1, "default": D2}


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_multi_input_matches_reference(chunk_rows):
    tasks, h, targets, sizes = _multi_input_case()
    heads = mf.MultiTaskHeads(sizes, tasks, dtype=torch.float64, chunk_rows=chunk_rows)
    heads.task_weights = heads.task_weights.double()  # exact λ for the float64 comparison
    h = {k: v.requires_grad_() for k, v in h.items()}
    out = heads(h, targets, per_task_input_grads=True)
    out.loss.backward()
    for input_name, group in heads.packed.items():
        group_tasks = list(group.layout.tasks)
        case = make_case(0, group_tasks)
        case.h, case.batch_shape = h[input_name].detach(), tuple(h[input_name].shape[:-1])
        case.weight, case.bias = group.weight.detach(), group.bias.detach()
        case.lam = torch.tensor([t.weight for t in group_tasks], dtype=torch.float64)
        case.targets = {t.name: targets[t.name] for t in group_tasks}
        expected = reference_result(case, input_grads=True)
        for t, task in enumerate(group_tasks):
            assert_close(out.losses[task.name], expected.losses[t], what=f"loss {task.name}")
            assert_close(out.input_grads[task.name], expected.input_grads[t], what=f"input grad {task.name}")
        assert_close(group.weight.grad, expected.grads["weight"], what=f"{input_name} weight grad")
        assert_close(group.bias.grad, expected.grads["bias"], what=f"{input_name} bias grad")
        assert_close(h[input_name].grad, expected.grads["h"], what=f"{input_name} h grad")
    expected_total = sum(t.weight * out.losses[t.name] for t in tasks)
    assert_close(out.loss, expected_total, what="total")


def test_multi_input_predict_shapes():
    tasks, h, _, sizes = _multi_input_case()
    heads = mf.MultiTaskHeads(sizes, tasks, dtype=torch.float64)
    predicted = heads.predict(h)
    assert predicted["ner"].shape == (3, 7, 9)
    assert predicted["pos"].shape == (3, 7, 3)
    assert predicted["topic"].shape == (3, 5)
    assert predicted["spam"].shape == (3,)


def test_multi_input_with_one_input_absent():
    tasks, h, targets, sizes = _multi_input_case()
    heads = mf.MultiTaskHeads(sizes, tasks, dtype=torch.float64)
    h = {k: v.requires_grad_() for k, v in h.items()}
    out = heads(h, {"topic": targets["topic"]})
    out.loss.backward()
    assert set(out.losses) == {"topic"}
    assert out.loss_vector.shape == (4,)
    assert h["tokens"].grad is None or torch.equal(h["tokens"].grad, torch.zeros_like(h["tokens"]))
    assert heads.packed["tokens"].weight.grad is None or not heads.packed["tokens"].weight.grad.any()


# ---------------------------------------------------------------------------------------------------------------
# Absent tasks, task weights, dtype


def test_task_missing_from_targets_is_skipped():
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    targets = _targets(tasks, (6,))
    del targets["tags"], targets["spam"]
    out = heads(torch.randn(6, D), targets)
    out.loss.backward()
    assert set(out.losses) == {"topic", "score", "box"}
    names = list(heads.task_names)
    for name in ("tags", "spam"):
        assert float(out.loss_vector.detach()[names.index(name)]) == 0.0
    for name in ("topic", "score", "box"):  # each name maps to its own loss
        assert torch.equal(out.losses[name], out.loss_vector[names.index(name)]), name
        assert out.losses[name].detach().item() > 0
    for name in ("tags", "spam"):
        group = heads.packed["default"]
        rows = group.layout.columns(group.layout.index[name])
        assert not group.weight.grad[rows].any(), name
        assert not group.bias.grad[rows].any(), name
    for name in ("topic", "box"):
        rows = heads.packed["default"].layout.columns(heads.packed["default"].layout.index[name])
        assert heads.packed["default"].weight.grad[rows].any(), name


def test_none_target_is_the_same_as_a_missing_one():
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    targets = _targets(tasks, (6,))
    h = torch.randn(6, D)
    with_none = heads(h, {**targets, "tags": None})
    del targets["tags"]
    without = heads(h, targets)
    assert torch.equal(with_none.loss_vector, without.loss_vector)
    assert set(with_none.losses) == set(without.losses)


def test_task_weights_buffer():
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    assert "task_weights" in dict(heads.named_buffers())
    assert "task_weights" not in heads.state_dict()
    torch.testing.assert_close(heads.task_weights, torch.tensor([t.weight for t in tasks]))
    out = heads(torch.randn(4, D), _targets(tasks, (4,)))
    torch.testing.assert_close(out.loss, (heads.task_weights * out.loss_vector).sum())
    # Changing λ in place changes the total.
    heads.task_weights.fill_(2.0)
    out2 = heads(torch.randn(4, D), _targets(tasks, (4,)))
    torch.testing.assert_close(out2.loss, 2.0 * out2.loss_vector.sum())


def test_task_weights_exact_in_float64():
    """λ = 0.3 must be 0.3 in a float64 model, not 0.30000001192 (a float32 buffer)."""
    tasks = [mf.Classification("a", num_classes=3, weight=0.3), mf.Binary("b", weight=0.1)]
    heads = mf.MultiTaskHeads(D, tasks, dtype=torch.float64)
    out = heads(torch.randn(5, D, dtype=torch.float64), _targets(tasks, (5,)))
    expected = 0.3 * out.loss_vector[0] + 0.1 * out.loss_vector[1]
    torch.testing.assert_close(out.loss, expected, rtol=1e-14, atol=0)


def test_learnable_task_weights():
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    heads.task_weights = nn.Parameter(torch.tensor([0.5, 1.0, 2.0, 0.1, 1.5]))
    assert "task_weights" in dict(heads.named_parameters())
    targets = _targets(tasks, (6,))
    del targets["spam"]
    out = heads(torch.randn(6, D), targets)
    out.loss.backward()
    torch.testing.assert_close(heads.task_weights.grad, out.loss_vector.detach())
    assert float(heads.task_weights.grad[1]) == 0.0
    # An optimiser step on λ changes the next total.
    with torch.no_grad():
        heads.task_weights -= 0.1 * heads.task_weights.grad
    h = torch.randn(6, D)
    out2 = heads(h, targets)
    torch.testing.assert_close(out2.loss, (heads.task_weights.detach() * out2.loss_vector.detach()).sum())


@pytest.mark.parametrize("convert", ["double", "to_float64", "to_bfloat16"])
def test_module_dtype_conversion(convert):
    tasks = _tasks()
    heads = mf.MultiTaskHeads(D, tasks)
    if convert == "double":
        heads = heads.double()
        dtype = torch.float64
    elif convert == "to_float64":
        heads = heads.to(torch.float64)
        dtype = torch.float64
    else:
        heads = heads.to(torch.bfloat16)
        dtype = torch.bfloat16
    group = heads.packed["default"]
    assert group.weight.dtype == dtype and group.bias.dtype == dtype
    targets = _targets(tasks, (6,))
    h = torch.randn(6, D).to(dtype).requires_grad_()
    out = heads(h, targets)
    out.loss.backward()
    assert group.weight.grad.dtype == dtype
    assert out.loss_vector.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Against the float64 oracle on the same (converted) parameter values.
    case = make_case(0, tasks, batch_shape=(6,), features=D)
    case.h, case.weight, case.bias = h.detach().double(), group.weight.detach().double(), group.bias.detach().double()
    case.targets = {k: v.double() if v.is_floating_point() else v for k, v in targets.items()}
    case.lam = heads.task_weights.detach().double()  # the converted buffer (its exactness is tested elsewhere)
    expected = reference_result(case)
    tol_dtype = torch.float64 if dtype == torch.float64 else dtype
    assert_close(out.loss_vector, expected.losses, tol_dtype, "losses")
    assert_close(group.weight.grad, expected.grads["weight"], tol_dtype, "weight grad")
    assert_close(h.grad, expected.grads["h"], tol_dtype, "h grad")


def test_extra_repr_and_output_repr():
    heads = mf.MultiTaskHeads(D, _tasks())
    text = repr(heads)
    assert "topic" in text and "tags" in text
    out = heads(torch.randn(2, D), _targets(_tasks(), (2,)))
    assert "topic" in repr(out)


def test_head_weight_is_a_view_of_the_packed_parameter():
    heads = mf.MultiTaskHeads(D, _tasks())
    with torch.no_grad():
        heads.head_weight("spam").fill_(3.0)
    assert torch.equal(heads.state_dict()["spam.weight"], torch.full((1, D), 3.0))
    with pytest.raises(KeyError, match="nope"):
        heads.head_weight("nope")
