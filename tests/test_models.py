"""mtlfast.models (HardSharing, MMoE, CGC, PLE) against naive per-expert / per-gate / per-task references.

The references below read the models' own parameters but compute everything the obvious way: a Python loop over
experts with ``F.linear``, one softmax per gate, one tower and one ``F.linear`` head per task, one
``torch.nn.functional`` loss per task (``mtlfast._reference.task_loss``). They fix the documented parameter
conventions (stacked ``weight[m]`` is ``x @ weight[m]``, gate row blocks, expert order [task experts…, shared]).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlfast as mf
from mtl_helpers import random_target
from mtlfast._reference import task_loss
from mtlfast.models import CGC, MMoE, PLE, HardSharing
from mtlfast.models._stacked import StackedLinear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

D_IN = 5
TASK_MIXES = {
    "mixed": lambda: [
        mf.Classification("topic", num_classes=4, label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5, 1.0]),
        mf.Binary("spam", weight=0.5, pos_weight=2.0),
        mf.MultiLabel("tags", num_labels=3, weight=1.5),
        mf.Regression("box", dim=3, loss="huber", delta=0.7),
        mf.Regression("score", loss="l1", weight=0.3),
    ],
    "multilabel_regression": lambda: [mf.MultiLabel("tags", num_labels=4), mf.Regression("xy", dim=2)],
    "single_task": lambda: [mf.Classification("topic", num_classes=3)],
}

# name → (factory(tasks, **factory_kwargs), reference architecture)
ARCHITECTURES = {
    "hard_sharing": lambda tasks, **kw: HardSharing.mlp(D_IN, [7, 6], tasks, **kw),
    "hard_sharing_linear": lambda tasks, **kw: HardSharing.mlp(D_IN, [], tasks, **kw),
    "mmoe": lambda tasks, **kw: MMoE(D_IN, tasks, num_experts=3, expert_hidden=[7, 6], tower_hidden=[4], **kw),
    "mmoe_no_towers": lambda tasks, **kw: MMoE(D_IN, tasks, num_experts=2, expert_hidden=[6], **kw),
    "cgc": lambda tasks, **kw: CGC(D_IN, tasks, num_shared_experts=2, num_task_experts=1, expert_hidden=[6],
                                   tower_hidden=[4, 3], **kw),
    "cgc_shared_only": lambda tasks, **kw: CGC(D_IN, tasks, num_shared_experts=3, num_task_experts=0,
                                               expert_hidden=[6], **kw),
    "ple": lambda tasks, **kw: PLE(D_IN, tasks, num_levels=3, num_shared_experts=1, num_task_experts=2,
                                   expert_hidden=[7, 6], tower_hidden=[4], **kw),
    "ple_no_shared": lambda tasks, **kw: PLE(D_IN, tasks, num_levels=2, num_shared_experts=0, num_task_experts=2,
                                             expert_hidden=[6], **kw),
}
MAIN_ARCHITECTURES = ["hard_sharing", "mmoe", "cgc", "ple"]


def build(arch: str, mix: str = "mixed", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch](TASK_MIXES[mix](), dtype=torch.float64, **kwargs)


def batch(tasks, batch_shape=(9,), seed=0, absent=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, D_IN, generator=gen, dtype=torch.float64)
    targets = {task.name: random_target(task, batch_shape, gen, p_missing=0.15) for task in tasks}
    return x, {name: y for name, y in targets.items() if name not in absent}


# ---------------------------------------------------------------------------------------------------------------
# The naive references


def _mlp(layers, member: int, h: torch.Tensor, act) -> torch.Tensor:
    for layer in layers:
        h = act(F.linear(h, layer.weight[member].T, layer.bias[member]))
    return h


def _mix(probs: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    return sum(probs[:, j : j + 1] * out for j, out in enumerate(outputs))


def _task_representations(model, x: torch.Tensor, act) -> list[torch.Tensor]:
    """What each task's head reads, computed per expert / gate / tower."""
    if isinstance(model, HardSharing):
        h = model.encoder(x)
        return [h] * len(model.tasks)
    num_tasks = len(model.tasks)
    if isinstance(model, MMoE):
        experts = [_mlp(model.experts.layers, e, x, act) for e in range(model.num_experts)]
        E = model.num_experts
        mixtures = []
        for t in range(num_tasks):
            gate = F.linear(x, model.gates.weight[t * E : (t + 1) * E], model.gates.bias[t * E : (t + 1) * E])
            mixtures.append(_mix(torch.softmax(gate, -1), experts))
    else:
        inputs = [x] * (num_tasks + 1)  # per task, then the shared input
        for depth, level in enumerate(model.levels):
            own, shared = level.num_task_experts, level.num_shared_experts
            experts = [_mlp(level.experts.layers, e, inputs[e // own if e < num_tasks * own else num_tasks], act)
                       for e in range(num_tasks * own + shared)]
            k = own + shared
            mixtures = []
            for t in range(num_tasks):
                if depth == 0:
                    gate = F.linear(x, level.gates.weight[t * k : (t + 1) * k], level.gates.bias[t * k : (t + 1) * k])
                else:
                    gate = F.linear(inputs[t], level.task_gates.weight[t].T, level.task_gates.bias[t])
                chosen = [experts[t * own + j] for j in range(own)]
                chosen += [experts[num_tasks * own + j] for j in range(shared)]
                mixtures.append(_mix(torch.softmax(gate, -1), chosen))
            if depth < len(model.levels) - 1:
                if depth == 0:
                    gate = F.linear(x, level.gates.weight[num_tasks * k :], level.gates.bias[num_tasks * k :])
                else:
                    gate = F.linear(inputs[num_tasks], level.shared_gate.weight, level.shared_gate.bias)
                inputs = mixtures + [_mix(torch.softmax(gate, -1), experts)]
    return [_mlp(model.towers.layers, t, mixtures[t], act) for t in range(num_tasks)]


def reference(model, x: torch.Tensor, targets: dict, act=torch.relu):
    """(total, (T,) losses, name → logits (N, C_t)) the naive way; absent tasks have loss 0."""
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    reps = _task_representations(model, x2, act)
    losses, logits = [], {}
    for task, rep in zip(model.tasks, reps):
        out = F.linear(rep, model.heads.head_weight(task.name), model.heads.head_bias(task.name))
        logits[task.name] = out
        y = targets.get(task.name)
        if y is None:
            losses.append(out.sum() * 0.0)
            continue
        y = y.reshape(-1) if task.target_is_index else y.reshape(-1, task.num_outputs).to(out.dtype)
        losses.append(task_loss(task, out, y))
    losses = torch.stack(losses)
    logits = {name: v.reshape(*batch_shape, -1) for name, v in logits.items()}
    return (model.task_weights.to(losses.dtype) * losses).sum(), losses, logits


def _user_shape(task, logits: torch.Tensor) -> torch.Tensor:
    return logits if task.target_has_class_dim or task.target_is_index else logits.squeeze(-1)


def _param_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}


def _objective(total: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    # A non-linear function of the per-task losses too, so each task's gradient coefficient is checked.
    return total + 0.3 * losses.square().sum()


def assert_matches_reference(model, x, targets, act=torch.relu, rtol=1e-10, atol=1e-10):
    twin = copy.deepcopy(model)
    x_model, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = model(x_model, targets, return_logits=True)
    total, losses, logits = reference(twin, x_ref, targets, act)
    close = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(out.loss_vector, losses, **close, msg=lambda m: f"losses: {m}")
    torch.testing.assert_close(out.loss, total, **close, msg=lambda m: f"total: {m}")
    assert list(out.losses) == [t.name for t in model.tasks if t.name in targets]
    for task in model.tasks:
        torch.testing.assert_close(out.logits[task.name], _user_shape(task, logits[task.name]), **close,
                                   msg=lambda m: f"logits {task.name}: {m}")
    _objective(out.loss, out.loss_vector).backward()
    _objective(total, losses).backward()
    expected = _param_grads(twin)
    for name, grad in _param_grads(model).items():
        torch.testing.assert_close(grad, expected[name], **close, msg=lambda m: f"grad of {name}: {m}")
    torch.testing.assert_close(x_model.grad, x_ref.grad, **close, msg=lambda m: f"grad of x: {m}")
    assert any(g.abs().sum() > 0 for g in expected.values())


# ---------------------------------------------------------------------------------------------------------------
# Equality with the references (float64: forward losses, logits and every parameter gradient)


@pytest.mark.parametrize("mix", list(TASK_MIXES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_matches_naive_reference(arch, mix):
    model = build(arch, mix)
    x, y = batch(model.tasks, seed=1)
    assert_matches_reference(model, x, y)


@pytest.mark.parametrize("arch", MAIN_ARCHITECTURES)
def test_matches_reference_with_absent_tasks(arch):
    model = build(arch)
    x, y = batch(model.tasks, seed=2, absent=("spam", "box"))
    assert_matches_reference(model, x, y)
    out = model(x, y)
    assert list(out.losses) == ["topic", "tags", "score"]
    assert float(out.loss_vector[1]) == 0.0 and float(out.loss_vector[3]) == 0.0


@pytest.mark.parametrize("arch", ["mmoe", "cgc", "ple"])
def test_matches_reference_with_another_activation(arch):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch](TASK_MIXES["mixed"](), dtype=torch.float64, activation=nn.Tanh)
    x, y = batch(model.tasks, seed=3)
    assert_matches_reference(model, x, y, act=torch.tanh)


def test_matches_reference_with_leading_batch_dims():
    model = build("ple")
    x, y = batch(model.tasks, batch_shape=(2, 4), seed=4)
    assert_matches_reference(model, x, y)


# ---------------------------------------------------------------------------------------------------------------
# Shapes and the forward contract


@pytest.mark.parametrize("mix", list(TASK_MIXES))
@pytest.mark.parametrize("arch", MAIN_ARCHITECTURES)
@pytest.mark.parametrize("batch_shape", [(6,), (2, 3)], ids=str)
def test_shapes(arch, mix, batch_shape):
    model = build(arch, mix)
    x, y = batch(model.tasks, batch_shape=batch_shape)
    expected = {
        t.name: tuple(batch_shape) + ((t.num_outputs,) if t.target_has_class_dim or t.target_is_index else ())
        for t in model.tasks
    }
    predicted = model.predict(x)
    assert list(predicted) == list(model.task_names)
    assert {name: tuple(v.shape) for name, v in predicted.items()} == expected
    assert all(not v.requires_grad for v in predicted.values())
    logits = model(x)
    assert {name: tuple(v.shape) for name, v in logits.items()} == expected
    assert all(v.requires_grad for v in logits.values())
    out = model(x, y, return_logits=True)
    assert isinstance(out, mf.MultiTaskOutput)
    assert out.loss.shape == () and out.loss_vector.shape == (len(model.tasks),)
    assert {name: tuple(v.shape) for name, v in out.logits.items()} == expected
    assert model.task_names == tuple(t.name for t in model.tasks)
    assert model.task_weights.shape == (len(model.tasks),)
    assert model.task_weights is model.heads.task_weights


def test_learnable_task_weights_through_the_model():
    model = build("mmoe")
    model.task_weights = nn.Parameter(torch.tensor([0.5, 1.0, 2.0, 1.5, 0.1], dtype=torch.float64))
    assert isinstance(model.heads.task_weights, nn.Parameter) and model.task_weights is model.heads.task_weights
    x, y = batch(model.tasks)
    out = model(x, y)
    out.loss.backward()
    torch.testing.assert_close(model.task_weights.grad, out.loss_vector.detach())
    torch.testing.assert_close(out.loss, (model.task_weights * out.loss_vector).sum())


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = MMoE(D_IN, TASK_MIXES["single_task"](), num_experts=2, expert_hidden=[16], tower_hidden=[8], dropout=0.5,
                 dtype=torch.float64)
    x, _ = batch(model.tasks)
    train_a, train_b = model(x)["topic"], model(x)["topic"]
    assert not torch.equal(train_a, train_b)
    model.eval()
    torch.testing.assert_close(model(x)["topic"], model.predict(x)["topic"])
    torch.testing.assert_close(model(x)["topic"], model(x)["topic"])


def test_float32_default_and_module_conversion():
    torch.manual_seed(0)
    model = PLE(D_IN, TASK_MIXES["mixed"](), num_levels=2, num_shared_experts=1, num_task_experts=1, expert_hidden=[6])
    x, y = batch(model.tasks)
    assert model(x.float(), y).loss.dtype == torch.float32
    model.double()
    assert_matches_reference(model, x, y)


# ---------------------------------------------------------------------------------------------------------------
# HardSharing specifics: shared-representation gradients, encoders


def test_hard_sharing_per_task_input_grads_equal_autograd():
    model = build("hard_sharing")
    x, y = batch(model.tasks, seed=5, absent=("tags",))
    out = model(x, y, per_task_input_grads=True)
    h_ref = model.encoder(x).detach().requires_grad_()
    twin = copy.deepcopy(model)
    twin.encoder = nn.Identity()
    _, losses, _ = reference(twin, h_ref, y)
    expected = []
    for t, name in enumerate(model.task_names):
        (grad,) = torch.autograd.grad(losses[t], h_ref, retain_graph=True, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(out.input_grads[name], grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
        expected.append(grad.flatten())
    assert out.input_grads["tags"].abs().sum() == 0  # absent task: zero gradient
    stacked = torch.stack(expected)
    torch.testing.assert_close(out.input_gram(), stacked @ stacked.T, rtol=1e-10, atol=1e-12)


def test_hard_sharing_infers_in_features_and_accepts_any_encoder():
    tasks = TASK_MIXES["mixed"]()
    encoder = nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Linear(8, 6), nn.LayerNorm(6))
    model = HardSharing(encoder, tasks)
    assert model.heads.head_weight("topic").shape == (4, 6)
    assert list(model.state_dict())[:6] == ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
                                            "encoder.3.weight", "encoder.3.bias"]
    with pytest.raises(ValueError, match="mtlfast: cannot tell the output size"):
        HardSharing(nn.Tanh(), tasks)
    model = HardSharing(nn.Tanh(), tasks, in_features=D_IN, bias=False)
    assert model.heads.head_bias("topic") is None
    x, y = batch(tasks)
    assert model(x.float(), {"topic": y["topic"]}).loss.shape == ()


def test_hard_sharing_mlp_layers_and_seeded_init():
    torch.manual_seed(7)
    model = HardSharing.mlp(D_IN, [8, 6], TASK_MIXES["mixed"](), dropout=0.2)
    assert [type(m) for m in model.encoder] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout]
    torch.manual_seed(7)
    first, second = nn.Linear(D_IN, 8), nn.Linear(8, 6)
    torch.testing.assert_close(model.encoder[0].weight, first.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.encoder[3].bias, second.bias, rtol=0, atol=0)


def test_tower_models_refuse_per_task_input_grads():
    for arch in ("mmoe", "cgc", "ple"):
        model = build(arch)
        x, y = batch(model.tasks)
        with pytest.raises(ValueError, match=r"mtlfast: .*no representation shared.*mode='parameters'"):
            model(x, y, per_task_input_grads=True)
        expert_params = list(model.expert_parameters())
        assert expert_params and all(any(p is q for q in model.parameters()) for p in expert_params)
        names = {name for name, p in model.named_parameters() if any(p is q for q in expert_params)}
        assert names and all(".experts." in f".{name}" for name in names)


@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_expert_parameter_gram_equals_reference_task_gradients(arch):
    """The path the ValueError recommends: per-task gradients w.r.t. the experts (weighting mode="parameters")."""
    from mtlfast.weighting.base import parameter_gram

    model = build(arch)
    twin = copy.deepcopy(model)
    x, y = batch(model.tasks, seed=10, absent=("score",))
    gram = parameter_gram(model(x, y).loss_vector, list(model.expert_parameters()))
    _, losses, _ = reference(twin, x, y)
    params = list(twin.expert_parameters())
    rows = []
    for loss in losses.unbind(0):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    jacobian = torch.stack(rows)
    torch.testing.assert_close(gram, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)
    assert gram[4].abs().sum() == 0 and gram[0, 0] > 0  # the absent task has no gradient


@pytest.mark.parametrize("arch", MAIN_ARCHITECTURES)
def test_all_heads_and_losses_are_one_fused_op_call(arch, op_spy):
    model = build(arch)
    x, y = batch(model.tasks, seed=11)
    model(x, y).loss.backward()
    assert op_spy.names == ["multi_task_loss"]


# ---------------------------------------------------------------------------------------------------------------
# Parameters: initialisation, state_dict


def test_stacked_linear_is_initialised_like_a_sequence_of_linear_layers():
    torch.manual_seed(3)
    stacked = StackedLinear(4, 5, 3)
    torch.manual_seed(3)
    layers = [nn.Linear(5, 3) for _ in range(4)]
    for m, layer in enumerate(layers):
        torch.testing.assert_close(stacked.weight[m], layer.weight.T, rtol=0, atol=0)
        torch.testing.assert_close(stacked.bias[m], layer.bias, rtol=0, atol=0)


def test_expert_weights_have_linear_bounds():
    torch.manual_seed(0)
    model = MMoE(64, TASK_MIXES["mixed"](), num_experts=4, expert_hidden=[32, 16], tower_hidden=[8])
    first, second = model.experts.layers
    assert first.weight.shape == (4, 64, 32) and second.weight.shape == (4, 32, 16)
    for layer, fan_in in ((first, 64), (second, 32)):
        bound = 1 / math.sqrt(fan_in)
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert layer.bias.abs().max() <= bound
    # No two experts start equal (each is drawn independently).
    assert not torch.equal(first.weight[0], first.weight[1])


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_state_dict_round_trip_into_a_fresh_model(arch):
    source = build(arch, seed=0)
    fresh = build(arch, seed=1)
    state = source.state_dict()
    for task in source.tasks:
        assert state[f"heads.{task.name}.weight"].shape[0] == task.num_outputs
        assert f"heads.{task.name}.bias" in state
    assert not any(".packed." in key for key in state)
    assert not torch.equal(state["heads.topic.weight"], fresh.state_dict()["heads.topic.weight"])
    fresh.load_state_dict(state)
    assert list(fresh.state_dict()) == list(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    x, y = batch(source.tasks, seed=6)
    for name, logits in source.predict(x).items():
        assert torch.equal(fresh.predict(x)[name], logits)
    assert torch.equal(fresh(x, y).loss_vector, source(x, y).loss_vector)


def test_state_dict_keys_are_documented_names():
    keys = set(build("mmoe").state_dict())
    assert {"experts.layers.0.weight", "experts.layers.1.bias", "gates.weight", "towers.layers.0.weight",
            "heads.topic.weight", "heads.score.bias"} <= keys
    model = build("ple")
    state = model.state_dict()
    T, k, E = 5, 3, 11  # 5 tasks, 2 own + 1 shared expert per gate, 5·2 + 1 experts
    assert state["levels.0.experts.layers.0.weight"].shape == (E, D_IN, 7)
    assert state["levels.0.gates.weight"].shape == (T * k + E, D_IN)
    assert state["levels.1.task_gates.weight"].shape == (T, 6, k)
    assert state["levels.1.shared_gate.weight"].shape == (E, 6)
    assert state["levels.2.task_gates.weight"].shape == (T, 6, k)
    assert "levels.2.shared_gate.weight" not in state  # the last level has no shared gate
    assert state["towers.layers.0.weight"].shape == (T, 6, 4)
    assert state["heads.box.weight"].shape == (3, 4)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.mark.parametrize("arch", ["hard_sharing", "mmoe", "ple"])  # CGC is PLE's code with one level
def test_compiled_fullgraph_equals_eager(arch, fresh_dynamo):
    """The whole model under torch.compile(fullgraph=True) — Dynamo + AOTAutograd through the fused op (the
    "aot_eager" backend: Inductor compiles take ~20 s each here and are covered for the op by test_compile.py)."""
    eager = build(arch)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, y = batch(eager.tasks, seed=7, absent=("tags",))
    out_c, out_e = compiled(x, y, return_logits=True), eager(x, y, return_logits=True)
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_c.loss_vector, out_e.loss_vector, rtol=1e-12, atol=1e-12)
    for name, logits in out_e.logits.items():
        torch.testing.assert_close(out_c.logits[name], logits, rtol=1e-12, atol=1e-12)
    _objective(out_c.loss, out_c.loss_vector).backward()
    _objective(out_e.loss, out_e.loss_vector).backward()
    expected = _param_grads(eager)
    for name, grad in _param_grads(compiled_model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    model = build("ple")
    x, y = batch(model.tasks)
    with pytest.raises(ValueError, match=r"mtlfast: PLE expects input of shape \(\.\.\., 5\)"):
        model(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="mtlfast: PLE input must be floating point"):
        model(torch.ones(3, D_IN, dtype=torch.int64))
    with pytest.raises(KeyError, match="unknown tasks"):
        model(x, {"nope": y["topic"]})
    with pytest.raises(ValueError, match="no targets given"):
        model(x, {})
    with pytest.raises(TypeError, match="mapping"):
        model(x, [y["topic"]])
    with pytest.raises(ValueError, match="need targets"):
        build("hard_sharing")(x, per_task_input_grads=True)


@pytest.mark.parametrize("make, message", [
    (lambda t: MMoE(D_IN, t, num_experts=0, expert_hidden=[4]), "num_experts must be a positive int"),
    (lambda t: MMoE(D_IN, t, num_experts=2, expert_hidden=[]), "expert_hidden needs at least one layer"),
    (lambda t: MMoE(D_IN, t, num_experts=2, expert_hidden=[4, 0]), "expert_hidden must be positive ints"),
    (lambda t: MMoE(D_IN, t, num_experts=2, expert_hidden=[4], dropout=1.0), "dropout must be in"),
    (lambda t: CGC(D_IN, t, num_shared_experts=0, num_task_experts=0, expert_hidden=[4]), "at least one expert"),
    (lambda t: PLE(D_IN, t, num_levels=0, num_shared_experts=1, num_task_experts=1, expert_hidden=[4]),
     "num_levels must be a positive int"),
    (lambda t: PLE(D_IN, t, num_levels=2, num_shared_experts=-1, num_task_experts=1, expert_hidden=[4]),
     "num_shared_experts must be a non-negative int"),
    (lambda t: HardSharing.mlp(0, [4], t), "in_features must be a positive int"),
    (lambda t: MMoE(D_IN, [], num_experts=2, expert_hidden=[4]), "tasks must be a non-empty sequence"),
    (lambda t: MMoE(D_IN, [mf.Binary("a", input="u"), mf.Binary("b", input="v")], num_experts=2, expert_hidden=[4]),
     "cannot name different inputs"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_construction_raises(make, message):
    with pytest.raises((ValueError, TypeError), match=f"mtlfast: .*{message}"):
        make(TASK_MIXES["mixed"]())


# ---------------------------------------------------------------------------------------------------------------
# The pure-PyTorch fallback (the models on the op's fallback path), in a subprocess

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import mtlfast as mf
    import test_models as tm

    assert mf.HAS_C is False, "the extension was loaded although MTLFAST_DISABLE_EXTENSION=1"
    checked = 0
    for arch in ("hard_sharing", "ple"):  # the two ways a model calls the op: shared h, per-task towers
        model = tm.build(arch)
        x, y = tm.batch(model.tasks, seed=9, absent=("spam",))
        tm.assert_matches_reference(model, x, y)
        checked += 1
    print("MODELS-FALLBACK-OK", checked)
    """
)


def test_models_on_the_fallback_path_in_a_subprocess():
    env = dict(os.environ)
    env["MTLFAST_DISABLE_EXTENSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, TESTS_DIR], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"fallback subprocess failed (rc={result.returncode}):\n{result.stdout}\n{result.stderr}")
    assert "MODELS-FALLBACK-OK 2" in result.stdout, result.stdout
