"""torch.compile(fullgraph=True) of models and functions using the fused op: no graph break, same numbers as eager.

Inductor compiles take ~15-25 s each on a 2-core machine, so only a few tests use it; the others use the
"aot_eager" backend, which still traces the op through Dynamo + AOTAutograd (fake kernels, autograd formula)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import mtlfast as mf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

D_IN, D = 4, 6


def _tasks():
    return [
        mf.Classification("topic", num_classes=5, label_smoothing=0.1, class_weights=[1, 2, 1, 0.5, 1]),
        mf.Binary("spam", weight=0.5, pos_weight=2.0),
        mf.MultiLabel("tags", num_labels=3),
        mf.Regression("score", dim=2, loss="huber", delta=0.5),
    ]


class Model(nn.Module):
    def __init__(self, chunk_rows="auto", recompute_logits=None):
        super().__init__()
        self.encoder = nn.Linear(D_IN, D)
        self.heads = mf.MultiTaskHeads(D, _tasks(), chunk_rows=chunk_rows, recompute_logits=recompute_logits)

    def forward(self, x, targets):
        out = self.heads(torch.tanh(self.encoder(x)), targets)
        return out.loss, out.loss_vector


def _batch(n=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen, dtype=dtype)
    y = {
        "topic": torch.randint(0, 5, (n,), generator=gen),
        "spam": torch.rand(n, generator=gen, dtype=dtype),
        "tags": torch.rand(n, 3, generator=gen, dtype=dtype).round(),
        "score": torch.randn(n, 2, generator=gen, dtype=dtype),
    }
    y["topic"][1] = -100
    y["tags"][2, 1] = float("nan")
    return x, y


def _model(chunk_rows="auto", recompute_logits=None):
    torch.manual_seed(0)
    return Model(chunk_rows, recompute_logits).double()


# (chunk_rows, recompute_logits): the small-head op, the chunked op, the recompute op.
PATHS = [pytest.param(None, None, id="small"), pytest.param(3, False, id="chunked"),
         pytest.param(3, True, id="recompute")]


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _assert_same(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("chunk_rows, recompute_logits", PATHS)
def test_compiled_model_inductor_backward_outside(chunk_rows, recompute_logits):
    eager = _model(chunk_rows, recompute_logits)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="inductor")
    for seed in range(2):  # the second call reuses the compiled graph
        x, y = _batch(seed=seed)
        loss_e, vec_e = eager(x, y)
        loss_c, vec_c = compiled(x, y)
        _assert_same(loss_c, loss_e, "loss")
        _assert_same(vec_c, vec_e, "loss vector")
        (loss_e + vec_e.square().sum()).backward()
        (loss_c + vec_c.square().sum()).backward()
        for name, g in _grads(eager).items():
            _assert_same(_grads(compiled_model)[name], g, f"grad {name}")


@pytest.mark.parametrize("chunk_rows, recompute_logits", PATHS)
def test_compiled_train_step_backward_inside(chunk_rows, recompute_logits):
    eager = _model(chunk_rows, recompute_logits)
    compiled_model = copy.deepcopy(eager)

    def step(model, x, y):
        loss, _ = model(x, y)
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
        x, y = _batch(seed=3)
        loss_c = compiled_step(compiled_model, x, y)
    loss_e = step(eager, x, y)
    _assert_same(loss_c, loss_e, "loss")
    for name, g in _grads(eager).items():
        _assert_same(_grads(compiled_model)[name], g, f"grad {name}")


def _functional(h, weight, bias, lam, targets, tasks, chunk_rows, extras):
    out = mf.functional.multi_task_loss(
        h, weight, bias, targets, tasks, lam,
        chunk_rows=chunk_rows, return_logits=extras, per_task_input_grads=extras,
    )
    result = out.total + (out.losses.exp()).sum()
    if extras:
        result = result + 0.1 * out.logits.square().sum()
        return result, out.input_grads
    return result, None


def _functional_inputs(seed=0, n=7, layout=True):
    """Inputs of _functional; ``layout``: pass a TaskLayout (as a module would keep) instead of the task list."""
    gen = torch.Generator().manual_seed(seed)
    tasks = mf.TaskLayout(_tasks()) if layout else _tasks()
    S = sum(t.num_outputs for t in _tasks())
    h = torch.randn(n, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(S, D, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(S, generator=gen, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(len(_tasks()), generator=gen, dtype=torch.float64, requires_grad=True)
    _, y = _batch(n, seed)
    return (h, w, b, lam), y, tasks


def _run(fn, inputs, y, tasks, chunk_rows, extras):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    value, input_grads = fn(*inputs, y, tasks, chunk_rows, extras)
    grads = torch.autograd.grad(value, inputs)
    return value, input_grads, grads


@pytest.mark.slow
def test_compiled_functional_inductor():
    inputs, y, tasks = _functional_inputs()
    compiled = torch.compile(_functional, fullgraph=True, backend="inductor")
    expected = _run(_functional, inputs, y, tasks, None, True)
    actual = _run(compiled, inputs, y, tasks, None, True)
    _assert_same(actual[0], expected[0], "value")
    _assert_same(actual[1], expected[1], "per-task input grads")
    for name, a, e in zip(("h", "weight", "bias", "lam"), actual[2], expected[2]):
        _assert_same(a, e, f"grad {name}")


@pytest.mark.parametrize("chunk_rows, extras", [(None, False), (None, True), (3, False), (3, True)], ids=str)
def test_compiled_functional_aot_eager(chunk_rows, extras):
    inputs, y, tasks = _functional_inputs(1)
    compiled = torch.compile(_functional, fullgraph=True, backend="aot_eager")
    expected = _run(_functional, inputs, y, tasks, chunk_rows, extras)
    actual = _run(compiled, inputs, y, tasks, chunk_rows, extras)
    _assert_same(actual[0], expected[0], "value")
    if extras:
        _assert_same(actual[1], expected[1], "per-task input grads")
    for name, a, e in zip(("h", "weight", "bias", "lam"), actual[2], expected[2]):
        _assert_same(a, e, f"grad {name}")


def test_compiled_functional_with_a_task_list():
    """The documented call with a plain list of tasks (a fresh TaskLayout is built inside the compiled region)."""
    inputs, y, tasks = _functional_inputs(5, layout=False)
    assert isinstance(tasks, list)
    compiled = torch.compile(_functional, fullgraph=True, backend="aot_eager")
    actual = _run(compiled, inputs, y, tasks, None, False)
    expected = _run(_functional, inputs, y, tasks, None, False)
    _assert_same(actual[0], expected[0], "value")
    for name, a, e in zip(("h", "weight", "bias", "lam"), actual[2], expected[2]):
        _assert_same(a, e, f"grad {name}")


def test_new_task_weights_values_do_not_recompile():
    inputs, y, tasks = _functional_inputs(2)
    h, w, b, _ = (t.detach() for t in inputs)
    compiled = torch.compile(
        lambda lam: mf.functional.multi_task_loss(h, w, b, y, tasks, lam).total, fullgraph=True, backend="aot_eager"
    )
    mf.functional.multi_task_loss(h, w, b, y, tasks)  # eager first: the layout's caches exist before tracing
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.5, 1.0, 2.0):
            lam = torch.full((tasks.num_tasks,), value, dtype=torch.float64)
            expected = mf.functional.multi_task_loss(h, w, b, y, tasks, lam).total
            _assert_same(compiled(lam), expected, f"total with λ={value}")


@pytest.mark.parametrize("chunk_rows, recompute_logits", PATHS)
def test_compiled_dynamic_batch_size(chunk_rows, recompute_logits):
    model = _model(chunk_rows, recompute_logits)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (8, 5, 11):
        x, y = _batch(n, seed=n)
        loss_c, vec_c = compiled(x, y)
        loss_e, vec_e = model(x, y)
        _assert_same(loss_c, loss_e, f"loss n={n}")
        _assert_same(vec_c, vec_e, f"loss vector n={n}")
        (loss_c + vec_c.square().sum()).backward()
        (loss_e + vec_e.square().sum()).backward()
        for name, g in _grads(model).items():
            _assert_same(_grads(compiled_model)[name], g, f"grad {name} n={n}")


def test_compiled_with_absent_task():
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y = _batch(seed=4)
    del y["tags"]
    _assert_same(compiled(x, y)[0], model(x, y)[0], "loss")
