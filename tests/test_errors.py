"""Bad input raises a Python exception (ValueError / TypeError / IndexError / KeyError) naming the task and the
problem, before any kernel runs — through MultiTaskHeads, the functional API and the raw op."""

from __future__ import annotations

import pytest
import torch

import mtlfast as mf
from mtl_helpers import cpu_kernel_semantics, make_case, op_arg_tuple, op_args, requires_gpu

ops = torch.ops.mtlfast

B, D = 4, 3


def _tasks():
    return [
        mf.Classification("topic", num_classes=5, label_smoothing=0.1),
        mf.Binary("spam"),
        mf.MultiLabel("tags", num_labels=3),
        mf.Regression("score"),
        mf.Regression("box", dim=2),
    ]


def _good_targets(batch=(B,)):
    return {
        "topic": torch.randint(0, 5, batch),
        "spam": torch.rand(batch),
        "tags": torch.rand(*batch, 3).round(),
        "score": torch.randn(batch),
        "box": torch.randn(*batch, 2),
    }


@pytest.fixture
def heads():
    return mf.MultiTaskHeads(D, _tasks())


def test_good_inputs_work(heads):
    out = heads(torch.randn(B, D), _good_targets())
    out.loss.backward()
    assert torch.isfinite(out.loss)


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize(
    "task, bad_shape",
    [
        ("topic", (B, 1)),
        ("topic", (B + 1,)),
        ("topic", (B, 5)),
        ("spam", (B, 1)),
        ("spam", (B - 1,)),
        ("tags", (B,)),
        ("tags", (B, 4)),
        ("score", (B, 2)),
        ("box", (B,)),
        ("box", (B, 3)),
    ],
    ids=str,
)
def test_wrong_target_shape(heads, task, bad_shape):
    targets = _good_targets()
    targets[task] = torch.zeros(bad_shape, dtype=targets[task].dtype)
    _raises(ValueError, f"'{task}'.*shape", heads, torch.randn(B, D), targets)


def test_target_shape_must_follow_leading_dims(heads):
    targets = _good_targets((2, 3))
    targets["spam"] = targets["spam"].reshape(3, 2)
    _raises(ValueError, "'spam'", heads, torch.randn(2, 3, D), targets)


@cpu_kernel_semantics
@pytest.mark.parametrize("bad", [5, 6, 1000, -1, -2, -99])
def test_class_index_out_of_range(heads, bad):
    targets = _good_targets()
    targets["topic"][2] = bad
    for chunk_rows in (None, 2):
        heads.chunk_rows = chunk_rows
        info = _raises(IndexError, "'topic'", heads, torch.randn(B, D), targets)
        assert str(bad) in str(info.value)


@cpu_kernel_semantics
def test_custom_ignore_index_is_not_out_of_range():
    heads = mf.MultiTaskHeads(D, [mf.Classification("c", num_classes=3, ignore_index=-1)])
    heads(torch.randn(B, D), {"c": torch.tensor([0, -1, 2, -1])})
    _raises(IndexError, "'c'", heads, torch.randn(B, D), {"c": torch.tensor([0, -100, 2, 1])})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool], ids=str)
def test_non_integer_class_targets(heads, dtype):
    targets = _good_targets()
    targets["topic"] = targets["topic"].to(dtype)
    _raises(TypeError, "'topic'", heads, torch.randn(B, D), targets)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float16], ids=str)
def test_binary_targets_of_other_dtypes_are_converted(dtype):
    tasks = [mf.Binary("spam"), mf.MultiLabel("tags", num_labels=3)]
    heads = mf.MultiTaskHeads(D, tasks)
    h = torch.randn(B, D)
    ints = {"spam": torch.tensor([0, 1, 1, 0]), "tags": torch.tensor([[1, 0, 1]] * B)}
    converted = heads(h, {k: v.to(dtype) for k, v in ints.items()})
    floats = heads(h, {k: v.float() for k, v in ints.items()})
    torch.testing.assert_close(converted.loss_vector, floats.loss_vector, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_class_targets_of_other_integer_dtypes_are_converted(dtype):
    heads = mf.MultiTaskHeads(D, [mf.Classification("c", num_classes=3)])
    h = torch.randn(B, D)
    y = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(heads(h, {"c": y.to(dtype)}).loss, heads(h, {"c": y}).loss, rtol=0, atol=0)


def test_complex_targets(heads):
    targets = _good_targets()
    targets["score"] = targets["score"].to(torch.complex64)
    _raises(TypeError, "'score'", heads, torch.randn(B, D), targets)


def test_non_tensor_target(heads):
    targets = _good_targets()
    targets["score"] = [0.0] * B
    _raises(TypeError, "'score'", heads, torch.randn(B, D), targets)


def test_target_on_another_device_meta(heads):
    targets = _good_targets()
    targets["spam"] = targets["spam"].to("meta")
    _raises(ValueError, "'spam'.*device|'spam'.* is on", heads, torch.randn(B, D), targets)


@requires_gpu
def test_target_on_another_device_cuda(heads):
    targets = _good_targets()
    targets["topic"] = targets["topic"].cuda()
    _raises(ValueError, "'topic'", heads, torch.randn(B, D), targets)


@requires_gpu
def test_heads_on_another_device_than_h(heads):
    _raises(ValueError, "cuda|cpu", heads.cuda(), torch.randn(B, D), {k: v.cuda() for k, v in _good_targets().items()})


def test_unknown_task_name(heads):
    targets = _good_targets()
    targets["topics"] = targets.pop("topic")
    info = _raises(KeyError, "topics", heads, torch.randn(B, D), targets)
    assert "topic" in str(info.value)


def test_no_targets_at_all(heads):
    _raises(ValueError, "target", heads, torch.randn(B, D), {})


def test_only_none_targets(heads):
    _raises(ValueError, "target", heads, torch.randn(B, D), {name: None for name in heads.task_names})


def test_targets_must_be_a_mapping_for_heads(heads):
    _raises(TypeError, "mapping", heads, torch.randn(B, D), list(_good_targets().values()))


# ---------------------------------------------------------------------------------------------------------------
# h


def test_h_dtype_differs_from_heads():
    heads = mf.MultiTaskHeads(D, _tasks(), dtype=torch.float64)
    _raises(TypeError, "dtype", heads, torch.randn(B, D, dtype=torch.float32), _good_targets())


def test_integer_h(heads):
    _raises(TypeError, "floating", heads, torch.ones(B, D, dtype=torch.int64), _good_targets())


def test_empty_batch(heads):
    targets = {k: v[:0] for k, v in _good_targets().items()}
    _raises(ValueError, "empty", heads, torch.randn(0, D), targets)


def test_empty_leading_dim(heads):
    targets = {k: v[:0].unsqueeze(0) for k, v in _good_targets().items()}
    _raises(ValueError, "empty", heads, torch.randn(1, 0, D), targets)


@pytest.mark.parametrize("features", [D - 1, D + 1, 1])
def test_h_with_wrong_feature_size(heads, features):
    _raises(ValueError, f"D = {D}", heads, torch.randn(B, features), _good_targets())


def test_zero_dim_h(heads):
    _raises(ValueError, "h", heads, torch.tensor(1.0), _good_targets())


def test_multi_input_heads_need_a_dict():
    tasks = [mf.Classification("ner", num_classes=3, input="tokens"), mf.Binary("spam")]
    heads = mf.MultiTaskHeads({"tokens": 4, "default": 5}, tasks)
    _raises(ValueError, "dict", heads, torch.randn(2, 5), {"spam": torch.rand(2)})
    _raises(KeyError, "tokens", heads, {"default": torch.randn(2, 5)}, {"spam": torch.rand(2)})


def test_multi_input_heads_need_every_in_features():
    tasks = [mf.Classification("ner", num_classes=3, input="tokens"), mf.Binary("spam")]
    _raises(ValueError, "tokens", mf.MultiTaskHeads, {"default": 5}, tasks)


# ---------------------------------------------------------------------------------------------------------------
# Functional API specifics


def test_functional_weight_rows_mismatch():
    tasks = _tasks()
    _raises(
        ValueError, "rows", mf.functional.multi_task_loss,
        torch.randn(B, D), torch.randn(5, D), None, _good_targets(), tasks,
    )


def test_functional_target_list_length():
    tasks = _tasks()
    _raises(
        ValueError, "targets", mf.functional.multi_task_loss,
        torch.randn(B, D), torch.randn(12, D), None, list(_good_targets().values())[:-1], tasks,
    )


def test_functional_no_targets():
    _raises(
        ValueError, "no targets", mf.functional.multi_task_loss,
        torch.randn(B, D), torch.randn(12, D), None, [None] * 5, _tasks(),
    )


def test_functional_bias_dtype_mismatch():
    _raises(
        TypeError, "dtype", mf.functional.multi_task_loss,
        torch.randn(B, D), torch.randn(12, D), torch.randn(12, dtype=torch.float64), _good_targets(), _tasks(),
    )


# ---------------------------------------------------------------------------------------------------------------
# Task specifications


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: mf.Classification("c1", num_classes=1), "c1"),
        (lambda: mf.Classification("c0", num_classes=0), "c0"),
        (lambda: mf.Classification("ls", num_classes=3, label_smoothing=1.5), "ls"),
        (lambda: mf.Classification("lsneg", num_classes=3, label_smoothing=-0.1), "lsneg"),
        (lambda: mf.Classification("cw", num_classes=3, class_weights=[1.0, 2.0]), "cw"),
        (lambda: mf.Classification("cwneg", num_classes=3, class_weights=[1.0, -2.0, 1.0]), "cwneg"),
        (lambda: mf.Classification("cwnan", num_classes=2, class_weights=[1.0, float("nan")]), "cwnan"),
        (lambda: mf.Binary("pw", pos_weight=-1.0), "pw"),
        (lambda: mf.Binary("pwnan", pos_weight=float("nan")), "pwnan"),
        (lambda: mf.MultiLabel("ml0", num_labels=0), "ml0"),
        (lambda: mf.MultiLabel("mlpw", num_labels=3, pos_weight=[1.0, -1.0, 1.0]), "mlpw"),
        (lambda: mf.MultiLabel("mlpwlen", num_labels=3, pos_weight=[1.0, 1.0]), "mlpwlen"),
        (lambda: mf.Regression("loss", loss="hinge"), "loss"),
        (lambda: mf.Regression("dim0", dim=0), "dim0"),
        (lambda: mf.Regression("delta", loss="huber", delta=0.0), "delta"),
        (lambda: mf.Regression("deltaneg", loss="huber", delta=-1.0), "deltaneg"),
        (lambda: mf.Binary("a.b"), "a.b"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_invalid_task_spec(make, name):
    with pytest.raises(ValueError) as info:
        make()
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["", None, 3])
def test_invalid_task_name(name):
    with pytest.raises((ValueError, TypeError)):
        mf.Binary(name)


def test_duplicate_task_names():
    tasks = [mf.Binary("dup"), mf.Regression("x"), mf.Classification("dup", num_classes=3)]
    _raises(ValueError, "dup", mf.MultiTaskHeads, D, tasks)
    _raises(ValueError, "dup", mf.functional.multi_task_loss, torch.randn(B, D), torch.randn(5, D), None, {}, tasks)


def test_duplicate_task_names_across_inputs():
    tasks = [mf.Binary("dup"), mf.Binary("dup", input="tokens")]
    _raises(ValueError, "dup", mf.MultiTaskHeads, {"default": D, "tokens": D}, tasks)


def test_no_tasks():
    _raises(ValueError, "task", mf.MultiTaskHeads, D, [])


# ---------------------------------------------------------------------------------------------------------------
# The raw op (targets as the user holds them): the kernels check their inputs themselves


def _raw_case():
    return make_case(0, _tasks(), batch_shape=(B,), features=D)


@cpu_kernel_semantics
@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
@pytest.mark.parametrize("bad", [5, -1, 77])
def test_raw_op_class_index_out_of_range(op, bad):
    args = op_args(_raw_case())
    args["targets"][0] = args["targets"][0].clone()
    args["targets"][0][1] = bad
    last = False if op == "multi_task_loss" else 2
    info = _raises(IndexError, "'topic'", getattr(ops, op), *op_arg_tuple(args, last))
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_float_class_targets(op):
    args = op_args(_raw_case())
    args["targets"][0] = args["targets"][0].double()
    last = False if op == "multi_task_loss" else 2
    _raises(TypeError, "'topic'", getattr(ops, op), *op_arg_tuple(args, last))


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
@pytest.mark.parametrize(
    "task, shape", [(0, (B + 1,)), (0, (B, 1)), (1, (B, 1)), (2, (B, 2)), (2, (B,)), (3, (B, 1)), (4, (B - 1, 2))],
    ids=str,
)
def test_raw_op_target_shape(op, task, shape):
    args = op_args(_raw_case())
    args["targets"][task] = torch.zeros(shape, dtype=args["targets"][task].dtype)
    last = False if op == "multi_task_loss" else 2
    _raises(ValueError, f"'{args['task_names'][task]}'", getattr(ops, op), *op_arg_tuple(args, last))


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_dense_target_dtype(op):
    args = op_args(_raw_case())
    args["targets"][3] = args["targets"][3].to(torch.complex128)  # real dtypes are converted; complex is an error
    last = False if op == "multi_task_loss" else 2
    _raises(TypeError, "'score'", getattr(ops, op), *op_arg_tuple(args, last))


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_converts_real_targets_to_the_accumulation_dtype(op):
    args = op_args(_raw_case())
    last = False if op == "multi_task_loss" else 2
    expected = getattr(ops, op)(*op_arg_tuple(args, last))
    args["targets"][3] = args["targets"][3].float()  # float64 inputs: converted to float64 by the op
    args["targets"][0] = args["targets"][0].int()  # class indices: any integer dtype
    converted = getattr(ops, op)(*op_arg_tuple(args, last))
    for a, b in zip(converted, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_list_lengths_disagree(op):
    args = op_args(_raw_case())
    args["params"] = args["params"][:-1]
    last = False if op == "multi_task_loss" else 2
    _raises(ValueError, "tasks", getattr(ops, op), *op_arg_tuple(args, last))


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_empty_batch(op):
    case = _raw_case()
    args = op_args(case)
    args["h"] = args["h"][:0]
    args["targets"] = [t[:0] for t in args["targets"]]
    last = False if op == "multi_task_loss" else 2
    _raises(ValueError, "empty", getattr(ops, op), *op_arg_tuple(args, last))


@pytest.mark.parametrize("op", ["multi_task_loss", "multi_task_loss_chunked", "multi_task_loss_recompute"])
def test_raw_op_weight_dtype(op):
    args = op_args(_raw_case())
    args["weight"] = args["weight"].float()
    last = False if op == "multi_task_loss" else 2
    _raises(TypeError, "dtype", getattr(ops, op), *op_arg_tuple(args, last))


@pytest.mark.parametrize("chunk_rows", [0, -3])
def test_raw_op_nonpositive_chunk_rows(chunk_rows):
    args = op_args(_raw_case())
    _raises(ValueError, "chunk_rows", ops.multi_task_loss_chunked, *op_arg_tuple(args, chunk_rows))


def test_second_backward_through_the_chunked_path_is_refused(monkeypatch):
    # A large head's chunked path rescales its saved weight gradient in place; a second backward must say so,
    # not silently return a doubly-scaled gradient.
    monkeypatch.setattr(mf.ops, "INPLACE_BACKWARD_MIN_ELEMENTS", 0)
    heads = mf.MultiTaskHeads(D, _tasks(), chunk_rows=2, recompute_logits=False)
    out = heads(torch.randn(B, D), _good_targets())
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="chunk_rows=None"):
        out.loss.backward()


def test_second_backward_through_the_recompute_path_works():
    # The recompute path's backward only reads what the forward saved.
    heads = mf.MultiTaskHeads(D, _tasks(), chunk_rows=2, recompute_logits=True)
    out = heads(torch.randn(B, D), _good_targets())
    out.loss.backward(retain_graph=True)
    first = heads.packed["default"].weight.grad.clone()
    out.loss.backward()
    torch.testing.assert_close(heads.packed["default"].weight.grad, 2 * first)


def test_second_backward_through_the_small_head_path_works():
    heads = mf.MultiTaskHeads(D, _tasks(), chunk_rows=None)
    out = heads(torch.randn(B, D), _good_targets())
    out.loss.backward(retain_graph=True)
    first = heads.packed["default"].weight.grad.clone()
    out.loss.backward()
    torch.testing.assert_close(heads.packed["default"].weight.grad, 2 * first)


def test_second_backward_through_a_small_chunked_head_works():
    heads = mf.MultiTaskHeads(D, _tasks(), chunk_rows=2)
    out = heads(torch.randn(B, D), _good_targets())
    out.loss.backward(retain_graph=True)
    first = heads.packed["default"].weight.grad.clone()
    out.loss.backward()
    torch.testing.assert_close(heads.packed["default"].weight.grad, 2 * first)
