"""The C++ eager entry point of the small-head op (``mtlfast._C.multi_task_loss_eager``).

In eager mode ``MultiTaskHeads`` and ``mf.functional.multi_task_loss`` hand their targets to it; it runs the op and
its backward in C++ with the autograd formula registered in ``mtlfast.ops`` (which torch.compile and opcheck use).
The oracle tests run through it; these check that it is taken, that it agrees exactly with the registered formula,
and that every call it declines goes to the general path with the general path's behaviour and errors.
"""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch
from mtl_helpers import assert_results_close, fused_result, make_case, random_tasks, reference_result, requires_c
from torch.overrides import TorchFunctionMode

import mtlfast as mf
import mtlfast.ops

pytestmark = requires_c


def _general_path_only(monkeypatch):
    monkeypatch.setattr(mtlfast.ops, "multi_task_loss_eager", lambda *args: None)


def _case(seed: int, absent_tasks: tuple[int, ...] = (), **kwargs):
    """A random mix of at least 3 tasks; the tasks at ``absent_tasks`` get no target."""
    rng = random.Random(seed)
    tasks = random_tasks(rng, rng.randint(3, 6))
    defaults = dict(batch_shape=rng.choice([(1,), (13,), (3, 5)]), features=rng.choice([1, 4]), p_missing=0.2)
    defaults.update(kwargs)
    return make_case(seed, tasks, absent=[tasks[i].name for i in absent_tasks], **defaults)


@pytest.mark.parametrize("via", ["functional", "heads"])
def test_eager_calls_take_the_entry_point(via, op_spy):
    case = _case(1)
    fused_result(case, via=via, chunk_rows=None)
    assert op_spy.names == ["multi_task_loss"] and op_spy.eager_calls == 1


@pytest.mark.parametrize("recompute_logits, op", [(False, "multi_task_loss_chunked"), (True, "multi_task_loss_recompute")])
def test_compiled_and_chunked_calls_do_not(recompute_logits, op, op_spy):
    case = _case(2)
    fused_result(case, via="heads", chunk_rows=3, recompute_logits=recompute_logits)
    assert op_spy.names == [op] and op_spy.eager_calls == 0


def _objective(total, losses, logits):
    # Every output used: the total, a non-linear function of the losses, and the logits.
    return total + (losses**2).sum() + 0.1 * logits.sin().sum()


@pytest.mark.parametrize("via", ["functional", "heads"])
@pytest.mark.parametrize("seed", range(6))
def test_same_results_as_the_registered_autograd(seed, via, monkeypatch):
    rng = random.Random(seed)
    case = _case(seed, bias=rng.random() < 0.6, lam=rng.random() < 0.6, absent_tasks=() if seed % 2 else (0,))
    objective = _objective if seed % 3 == 0 else None
    kwargs = dict(via=via, chunk_rows=None, objective=objective, return_logits=objective is not None,
                  targets_as="list" if seed % 2 and via == "functional" else "dict")
    fast = fused_result(case, **kwargs)
    with monkeypatch.context() as patch:
        _general_path_only(patch)
        general = fused_result(case, **kwargs)
    # The same kernels run on the same inputs: equal up to the order of floating-point sums.
    assert_results_close(fast, general)
    assert_results_close(fast, reference_result(case, objective))


def test_learnable_task_weights_without_bias_get_the_losses_as_gradient():
    # The entry point finds λ's gradient slot by counting tensor inputs, which differs with and without a bias.
    for bias in (True, False):
        case = _case(7, bias=bias, lam=True, p_missing=0.0)
        heads = mf.MultiTaskHeads(case.h.shape[-1], case.tasks, bias=bias, dtype=torch.float64)
        heads.task_weights = torch.nn.Parameter(case.lam.clone())
        out = heads(case.h, case.targets)
        out.loss.backward()
        torch.testing.assert_close(heads.task_weights.grad, out.loss_vector.detach())


def test_absent_tasks_are_reported_present_false():
    case = _case(3, absent_tasks=(1,))
    heads = mf.MultiTaskHeads(case.h.shape[-1], case.tasks, dtype=torch.float64)
    targets = dict(case.targets)
    targets[case.names[2]] = None  # None also marks an absent task
    out = heads(case.h, targets)
    assert set(out.losses) == set(case.names) - {case.names[1], case.names[2]}
    assert out.loss_vector.detach()[1:3].eq(0).all()


class _Tagged(torch.Tensor):
    """A tensor subclass: the entry point leaves it to the general path."""


class _Recording(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        return func(*args, **(kwargs or {}))


def test_subclass_targets_and_torch_function_modes_take_the_general_path(op_spy):
    case = _case(4, p_missing=0.0)
    heads = mf.MultiTaskHeads(case.h.shape[-1], case.tasks, dtype=torch.float64)
    expected = heads(case.h, case.targets).loss
    assert op_spy.eager_calls == 1
    tagged = {name: y.as_subclass(_Tagged) for name, y in case.targets.items()}
    torch.testing.assert_close(heads(case.h, tagged).loss.as_subclass(torch.Tensor), expected)
    assert op_spy.eager_calls == 1
    mode = _Recording()
    with mode:
        torch.testing.assert_close(heads(case.h, case.targets).loss, expected)
    assert op_spy.eager_calls == 1 and mode.seen > 0


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda t, names: {**t, "nope": t[names[0]]}, KeyError, "unknown tasks \\['nope'\\]"),
        (lambda t, names: {**t, names[0]: [0.0, 1.0]}, TypeError, "target must be a tensor, got list"),
        (lambda t, names: {name: None for name in names}, ValueError, "no targets given for any task"),
        (lambda t, names: {}, ValueError, "no targets given for any task"),
    ],
    ids=["unknown-name", "not-a-tensor", "all-none", "empty"],
)
def test_declined_targets_raise_the_general_errors(mutate, error, message, op_spy):
    case = _case(5, p_missing=0.0)
    heads = mf.MultiTaskHeads(case.h.shape[-1], case.tasks, dtype=torch.float64)
    with pytest.raises(error, match=message):
        heads(case.h, mutate(case.targets, case.names))
    layout = mf._layout.TaskLayout(case.tasks)
    with pytest.raises(error, match=message):
        mf.functional.multi_task_loss(case.h, heads.packed["default"].weight, None, mutate(case.targets, case.names), layout)
    assert op_spy.eager_calls == 0


def test_target_list_of_the_wrong_length_raises():
    case = _case(6, p_missing=0.0)
    weight = torch.randn(sum(t.num_outputs for t in case.tasks), case.h.shape[-1], dtype=torch.float64)
    targets = [case.targets[name] for name in case.names]
    with pytest.raises(ValueError, match=f"{len(targets) - 1} targets for {len(targets)} tasks"):
        mf.functional.multi_task_loss(case.h, weight, None, targets[:-1], case.tasks)


def test_layouts_copy_and_pickle_without_the_compiled_spec():
    case = _case(8, p_missing=0.0)
    heads = mf.MultiTaskHeads(case.h.shape[-1], case.tasks, dtype=torch.float64)
    expected = heads(case.h, case.targets).loss  # makes the spec
    for clone in (copy.deepcopy(heads), pickle.loads(pickle.dumps(heads))):
        torch.testing.assert_close(clone(case.h, case.targets).loss, expected)


def test_no_output_requires_grad_under_no_grad_on_several_threads():
    # Worker threads of the CPU kernel start with grad mode on; the logits they produce must not come out
    # flagged as requiring grad.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = make_case(9, [mf.Binary(f"b{i}") for i in range(16)], batch_shape=(512,), features=32, p_missing=0.0)
        heads = mf.MultiTaskHeads(32, case.tasks, dtype=torch.float64)
        h = case.h.clone().requires_grad_(True)
        group = heads.packed["default"]
        layout = group.layout
        args = (h, group.weight, group.bias, [case.targets[n] for n in layout.names], heads.task_weights,
                group.col_weight, group.col_task, layout.kinds, layout.col_offsets, layout.class_dims,
                layout.ignore_index, layout.params, layout.names, True)
        with torch.no_grad():
            outputs = torch.ops.mtlfast.multi_task_loss(*args)
            out = heads(h, case.targets, return_logits=True)
        assert not any(o.requires_grad for o in outputs)
        assert not out.loss.requires_grad and not any(v.requires_grad for v in out.logits.values())
    finally:
        torch.set_num_threads(threads)
