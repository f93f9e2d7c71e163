"""mtlfast.training: the fit loop, per-task metrics (vs direct computations on the same predictions), missing-label
masking, Δm (hand-computed), weighting methods and callbacks plugged in, no host read inside a training step,
History rows and plot, and bad-argument errors."""

from __future__ import annotations

import math
import os
import sys
import warnings

import pytest
import torch
import torchmetrics
from torch import nn

import mtlfast as mf
from mtlfast import training
from mtlfast.training import History, TaskMetrics, delta_m, fit
from mtlfast.training.history import EpochRecord
from mtlfast.weighting import DWA, EqualWeighting, PCGrad, UncertaintyWeighting
from mtlfast.weighting.base import GradientWeighting, LossWeighting

IN_FEATURES, HIDDEN = 6, 16
TASKS = (
    mf.Classification("topic", num_classes=4),
    mf.Binary("spam"),
    mf.MultiLabel("tags", num_labels=3),
    mf.Regression("score"),
)
NAMES = tuple(task.name for task in TASKS)


class TinyMultiTaskModel(nn.Module):
    """A small encoder + fused heads, following the model contract fit relies on."""

    def __init__(self, tasks=TASKS, dtype=torch.float64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN, dtype=dtype), nn.Tanh())
        self.heads = mf.MultiTaskHeads(HIDDEN, tasks, dtype=dtype)
        self.tasks, self.task_names = self.heads.tasks, self.heads.task_names

    def forward(self, x, targets, *, per_task_input_grads=False):
        return self.heads(self.encoder(x), targets, per_task_input_grads=per_task_input_grads)

    def predict(self, x):
        return self.heads.predict(self.encoder(x))


def make_data(rows, seed, *, p_missing=0.0, dtype=torch.float64):
    """Inputs and learnable targets for TASKS (a fixed random teacher); a fraction p_missing of labels missing."""
    teacher = torch.Generator().manual_seed(1234)
    a = torch.randn(IN_FEATURES, 4, generator=teacher, dtype=dtype)
    b = torch.randn(IN_FEATURES, generator=teacher, dtype=dtype)
    c = torch.randn(IN_FEATURES, 3, generator=teacher, dtype=dtype)
    d = torch.randn(IN_FEATURES, generator=teacher, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN_FEATURES, generator=gen, dtype=dtype)
    targets = {
        "topic": (x @ a).argmax(-1),
        "spam": (x @ b > 0).to(dtype),
        "tags": (x @ c > 0).to(dtype),
        "score": x @ d + 0.1 * torch.randn(rows, generator=gen, dtype=dtype),
    }
    if p_missing:
        targets["topic"] = torch.where(torch.rand(rows, generator=gen) < p_missing, -100, targets["topic"])
        for name in ("spam", "tags", "score"):
            y = targets[name]
            targets[name] = torch.where(torch.rand(y.shape, generator=gen) < p_missing, math.nan, y)
    return x, targets


def batches_of(x, targets, batch_size):
    return [(x[i:i + batch_size], {k: v[i:i + batch_size] for k, v in targets.items()})
            for i in range(0, x.shape[0], batch_size)]


def train_batches(rows=192, batch_size=32, seed=1, p_missing=0.0):
    return batches_of(*make_data(rows, seed, p_missing=p_missing), batch_size)


def params_of(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_same_params(a, b, atol=1e-12):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------------------------
# Direct metric computations (independent of torchmetrics)


def direct_accuracy(predicted, labels):
    return (predicted == labels).double().mean().item()


def direct_f1(predicted, labels, positive):
    tp = ((predicted == positive) & (labels == positive)).sum().item()
    fp = ((predicted == positive) & (labels != positive)).sum().item()
    fn = ((predicted != positive) & (labels == positive)).sum().item()
    return tp, fp, fn, (2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)


def direct_auroc(scores, labels):
    """Probability that a random positive scores above a random negative (ties count half): the Mann-Whitney U."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def direct_metrics(logits, targets):
    """The auto metrics of TASKS computed by hand from logits and targets with missing labels."""
    result = {}
    y = targets["topic"]
    keep = y != -100
    predicted, labels = logits["topic"][keep].argmax(-1), y[keep]
    # torchmetrics' multi-class macro average skips classes absent from both predictions and targets.
    f1s = [f1 for tp, fp, fn, f1 in (direct_f1(predicted, labels, c) for c in range(4)) if tp + fp + fn]
    result["topic"] = {"accuracy": direct_accuracy(predicted, labels), "macro_f1": sum(f1s) / len(f1s)}
    y = targets["spam"]
    keep = ~torch.isnan(y)
    scores, labels = logits["spam"][keep], y[keep]
    result["spam"] = {"accuracy": direct_accuracy((scores > 0).double(), labels), "auroc": direct_auroc(scores, labels)}
    y = targets["tags"]
    f1s, aurocs = [], []
    for k in range(3):
        keep = ~torch.isnan(y[:, k])
        scores, labels = logits["tags"][keep, k], y[keep, k]
        f1s.append(direct_f1((scores > 0).double(), labels, 1.0)[3])
        aurocs.append(direct_auroc(scores, labels))
    result["tags"] = {"macro_f1": sum(f1s) / 3, "auroc": sum(aurocs) / 3}
    y = targets["score"]
    keep = ~torch.isnan(y)
    error = logits["score"][keep] - y[keep]
    result["score"] = {"rmse": error.pow(2).mean().sqrt().item(), "mae": error.abs().mean().item()}
    return result


def assert_metrics_close(actual, expected, tol=1e-6):  # torchmetrics states are float32
    assert actual.keys() == expected.keys()
    for task in expected:
        assert actual[task].keys() == expected[task].keys(), task
        for name in expected[task]:
            assert actual[task][name] == pytest.approx(expected[task][name], rel=tol, abs=tol), f"{task}/{name}"


# ------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def test_fit_learns_and_val_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    val_x, val_targets = make_data(160, seed=2, p_missing=0.2)
    history = fit(model, train_batches(rows=256, p_missing=0.1), torch.optim.Adam(model.parameters(), lr=0.03),
                  epochs=6, val_loader=batches_of(val_x, val_targets, 48), progress=False)
    assert isinstance(history, History) and len(history) == 6
    first, last = history[0], history[-1]
    for name in NAMES:
        assert last.train_loss[name] < 0.7 * first.train_loss[name], name
    assert last.train_total < 0.7 * first.train_total
    assert last.val_metrics["topic"]["accuracy"] > 0.6 and last.val_metrics["score"]["rmse"] < 1.0
    assert last.steps == 8 and last.steps_per_s > 0 and last.epoch_time_s > 0
    assert [record.epoch for record in history] == list(range(1, 7))
    # The last evaluation ran on the final parameters: the same predictions scored by hand.
    assert model.training
    assert_metrics_close(last.val_metrics, direct_metrics(model.predict(val_x), val_targets))


def test_recorded_train_losses_are_means_over_the_batches_that_have_each_task():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    batches = train_batches(rows=160, p_missing=0.1)
    for i in (1, 3):  # these batches carry no "score" and no "tags" target
        batches[i] = (batches[i][0], {k: v for k, v in batches[i][1].items() if k not in ("score", "tags")})
    history = fit(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), epochs=2, progress=False)
    with torch.no_grad():
        outs = [model(x, targets) for x, targets in batches]
    for name in NAMES:
        per_batch = [out.losses[name] for out in outs if name in out.losses]
        expected = torch.stack(per_batch).mean().item()
        assert len(per_batch) == (3 if name in ("score", "tags") else 5)
        for record in history:
            assert record.train_loss[name] == pytest.approx(expected, rel=1e-12)
    expected_total = torch.stack([out.loss for out in outs]).mean().item()
    assert history[1].train_total == pytest.approx(expected_total, rel=1e-12)


def manual_training(model, batches, optimizer, weighting, epochs, *, per_task_input_grads=False, grad_clip=None):
    """The loop fit should be equivalent to, written out."""
    for _ in range(epochs):
        for x, targets in batches:
            optimizer.zero_grad()
            out = model(x, targets, per_task_input_grads=per_task_input_grads)
            total = out.loss if weighting is None else weighting(out)
            total.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if hasattr(weighting, "end_epoch"):
            weighting.end_epoch()


def test_equal_weighting_is_the_default_objective():
    batches = train_batches()
    torch.manual_seed(0)
    default = TinyMultiTaskModel()
    torch.manual_seed(0)
    weighted = TinyMultiTaskModel()
    fit(default, batches, torch.optim.SGD(default.parameters(), lr=0.1), epochs=2, progress=False)
    history = fit(weighted, batches, torch.optim.SGD(weighted.parameters(), lr=0.1), epochs=2,
                  weighting=EqualWeighting(len(TASKS)), progress=False)
    assert_same_params(params_of(default), params_of(weighted))
    assert history[-1].task_weights == {name: 1.0 for name in NAMES}


def test_pcgrad_in_representation_mode_gets_input_grads_and_matches_a_manual_loop():
    batches = train_batches(p_missing=0.1)
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    torch.manual_seed(0)
    reference = TinyMultiTaskModel()
    calls = []
    original_forward = model.forward

    def spy(x, targets, **kwargs):
        calls.append(kwargs)
        return original_forward(x, targets, **kwargs)

    model.forward = spy
    fit(model, batches, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=2,
        weighting=PCGrad(len(TASKS)), progress=False)
    assert calls == [{"per_task_input_grads": True}] * (2 * len(batches))
    manual_training(reference, batches, torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9),
                    PCGrad(len(TASKS)), 2, per_task_input_grads=True)
    assert_same_params(params_of(model), params_of(reference))


def test_dwa_end_epoch_runs_every_epoch_and_its_weights_follow_the_recorded_losses():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    weighting = DWA(len(TASKS), temperature=2.0).double()
    history = fit(model, train_batches(), torch.optim.SGD(model.parameters(), lr=0.1), epochs=3,
                  weighting=weighting, progress=False)
    assert int(weighting.epochs_completed) == 3
    assert history[0].task_weights == history[1].task_weights == {name: 1.0 for name in NAMES}
    # Epoch 3 uses r_t = L̄_t(2) / L̄_t(1) from the two recorded epochs: w = T·softmax(r / τ).
    ratio = torch.tensor([history[1].train_loss[n] / history[0].train_loss[n] for n in NAMES], dtype=torch.float64)
    expected = len(TASKS) * torch.softmax(ratio / 2.0, dim=0)
    actual = torch.tensor([history[2].task_weights[n] for n in NAMES], dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0)
    assert not torch.allclose(actual, torch.ones_like(actual))


class CountingStaticWeighting(LossWeighting):
    """A test weighting (fixed weights) that records when its end_epoch runs."""

    def __init__(self, weights, log):
        super().__init__(len(weights))
        self.register_buffer("fixed", torch.tensor(weights, dtype=torch.float64))
        self.log = log

    def weights(self, losses):
        return self.fixed.to(losses.dtype)

    def end_epoch(self):
        self.log.append("weighting")


class EpochLog:
    def __init__(self, log, model):
        self.log, self.model = log, model

    def end_epoch(self):
        self.log.append(("callback", self.model.training))


def test_custom_weighting_and_callbacks_run_after_every_epoch_in_order():
    log = []
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    weighting = CountingStaticWeighting([0.5, 2.0, 1.0, 0.25], log)
    batches = train_batches()
    history = fit(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3, weighting=weighting,
                  callbacks=[EpochLog(log, model)], val_loader=batches[:2], progress=False)
    assert log == ["weighting", ("callback", True)] * 3
    assert history[-1].task_weights == dict(zip(NAMES, [0.5, 2.0, 1.0, 0.25]))
    torch.manual_seed(0)
    reference = TinyMultiTaskModel()
    manual_training(reference, batches, torch.optim.SGD(reference.parameters(), lr=0.1),
                    CountingStaticWeighting([0.5, 2.0, 1.0, 0.25], []), 3)
    assert_same_params(params_of(model), params_of(reference))


class GramRecorder(GradientWeighting):
    """A test gradient method: equal weights, but it keeps the Gram matrix it was given."""

    def weights_from_gram(self, gram, losses):
        self.seen = gram.clone()
        return torch.ones_like(losses)


def test_gradient_weighting_subclass_receives_the_representation_gram():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    weighting = GramRecorder(len(TASKS))
    batches = train_batches(rows=32)
    fit(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), weighting=weighting, progress=False)
    x, targets = batches[0]
    h = model.encoder(x).detach().requires_grad_()
    losses = model.heads(h, targets).loss_vector
    grads = torch.stack([torch.autograd.grad(loss, h, retain_graph=True)[0].flatten() for loss in losses])
    torch.testing.assert_close(weighting.seen, grads @ grads.T, rtol=1e-10, atol=1e-14)


def test_learnable_weighting_parameters_are_added_to_the_optimizer_with_a_warning():
    batches = train_batches()
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    weighting = UncertaintyWeighting(len(TASKS)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with pytest.warns(UserWarning, match="mtlfast: fit added UncertaintyWeighting's 1 learnable parameter"):
        history = fit(model, batches, optimizer, epochs=2, weighting=weighting, progress=False)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"][0] is weighting.log_variance
    # Same as building the optimizer with a second group (the optimizer's defaults) from the start.
    torch.manual_seed(0)
    reference = TinyMultiTaskModel()
    ref_weighting = UncertaintyWeighting(len(TASKS)).double()
    manual_training(reference, batches, torch.optim.SGD(
        [{"params": list(reference.parameters())}, {"params": [ref_weighting.log_variance]}], lr=0.1, momentum=0.5),
        ref_weighting, 2)
    assert_same_params(params_of(model), params_of(reference))
    assert_same_params(params_of(weighting), params_of(ref_weighting))
    assert not torch.equal(weighting.log_variance.detach(), torch.zeros(len(TASKS), dtype=torch.float64))
    # The record holds the precisions exp(−s) applied at the epoch's last step.
    assert list(history[-1].task_weights.values()) == pytest.approx(ref_weighting.task_weights.tolist(), rel=1e-12)

    # Already in the optimizer: no warning, no new group.
    optimizer = torch.optim.SGD([*model.parameters(), *weighting.parameters()], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, train_batches(), optimizer, weighting=weighting, progress=False)
    assert len(optimizer.param_groups) == 1

    # With a scheduler built without them: an error rather than an unscheduled group.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(ValueError, match="mtlfast: UncertaintyWeighting has 1 learnable parameter"):
        fit(model, train_batches(), optimizer, weighting=UncertaintyWeighting(len(TASKS)), scheduler=scheduler,
            progress=False)


TRAINING_DIR = os.path.dirname(training.__file__) + os.sep
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


class PositionLoader:
    """Batches, remembering how many were handed out (None once the epoch's iteration has finished)."""

    def __init__(self, batches):
        self.batches, self.position = batches, None

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for index, batch in enumerate(self.batches, 1):
            self.position = index
            yield batch
        self.position = None


@pytest.mark.parametrize("weighting", [None, "dwa", "pcgrad"])
def test_no_host_read_inside_a_training_step(monkeypatch, weighting, capsys):
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    loader = PositionLoader(train_batches(rows=224))  # 7 steps per epoch
    reads = []

    def recording(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(TRAINING_DIR):
                reads.append((loader.position, name, os.path.basename(caller.f_code.co_filename)))
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    method = {None: None, "dwa": DWA(len(TASKS)), "pcgrad": PCGrad(len(TASKS))}[weighting]
    fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.05), epochs=2, weighting=method, log_every=3,
        progress=True)
    monkeypatch.undo()
    assert reads, "the test must see the log-point and epoch-end reads"
    positions = [position for position, _, _ in reads]
    # Reads happen at the log points (steps 3 and 6 of each epoch) and after the epoch's last batch, never else.
    assert set(positions) <= {3, 6, None}, reads
    assert positions.count(3) == positions.count(6) == 2, reads
    epoch_end_reads = 2 if weighting is None else 4  # the losses (+ the method's task weights) once per epoch
    assert positions.count(None) == epoch_end_reads, reads
    assert "epoch 2/2" in capsys.readouterr().err  # the tqdm bar ran, with its postfix


def test_grad_clip_and_step_scheduler_match_a_manual_loop():
    batches = train_batches(rows=96)
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    torch.manual_seed(0)
    reference = TinyMultiTaskModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    history = fit(model, batches, optimizer, epochs=2, grad_clip=0.05, scheduler=scheduler,
                  scheduler_interval="step", progress=False)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(2):
        for x, targets in batches:
            ref_optimizer.zero_grad()
            reference(x, targets).loss.backward()
            nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
            ref_optimizer.step()
            ref_scheduler.step()
    assert_same_params(params_of(model), params_of(reference))
    assert history[-1].lr == pytest.approx(0.5 / 7)


def test_epoch_scheduler_steps_once_per_epoch_and_plateau_gets_the_train_loss():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fit(model, train_batches(rows=64), optimizer, epochs=3, progress=False,
                  scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
    assert [record.lr for record in history] == pytest.approx([0.05, 0.025, 0.0125])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=5)
    history = fit(model, train_batches(rows=64), optimizer, epochs=3, progress=False, scheduler=plateau)
    assert plateau.last_epoch == 3
    assert plateau.best == min(record.train_total for record in history)


def test_bfloat16_autocast_trains():
    torch.manual_seed(0)
    model = TinyMultiTaskModel(dtype=torch.float32)
    x, targets = make_data(128, seed=1, dtype=torch.float32)
    history = fit(model, batches_of(x, targets, 32), torch.optim.Adam(model.parameters(), lr=0.03), epochs=3,
                  amp_dtype=torch.bfloat16, val_loader=batches_of(x, targets, 64), progress=False)
    assert all(math.isfinite(v) for record in history for v in record.train_loss.values())
    assert history[-1].train_total < history[0].train_total
    assert 0 <= history[-1].val_metrics["topic"]["accuracy"] <= 1


def test_fit_accepts_dict_inputs_and_a_model_from_mtlfast_models():
    torch.manual_seed(0)
    model = mf.models.HardSharing.mlp(IN_FEATURES, [HIDDEN], TASKS, dtype=torch.float64)
    history = fit(model, train_batches(rows=64), torch.optim.SGD(model.parameters(), lr=0.1), epochs=2,
                  val_loader=train_batches(rows=64), progress=False)
    assert history[-1].val_metrics.keys() == set(NAMES)

    class DictInput(TinyMultiTaskModel):
        def forward(self, x, targets, *, per_task_input_grads=False):
            return super().forward(x["features"], targets, per_task_input_grads=per_task_input_grads)

        def predict(self, x):
            return super().predict(x["features"])

    model = DictInput()
    batches = [({"features": x}, targets) for x, targets in train_batches(rows=64)]
    history = fit(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), val_loader=batches, progress=False)
    assert history[-1].val_metrics["score"]["rmse"] > 0


# ------------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_mask_missing_labels_hand_computed():
    tasks = [mf.Classification("topic", num_classes=3, ignore_index=-1), mf.Binary("spam"),
             mf.MultiLabel("tags", num_labels=2), mf.Regression("box", dim=2)]
    metrics = TaskMetrics(tasks, training.default_metrics(tasks))
    logits = {
        "topic": torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]),
        "spam": torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0]),
        "tags": torch.tensor([[1.0, -1.0], [-2.0, 2.0], [3.0, 1.0], [-1.0, -2.0]]),
        "box": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
    }
    nan = math.nan
    targets = {
        "topic": torch.tensor([0, -1, 1, 1]),  # row 1 ignored; predictions 0, 2, 1 vs labels 0, 1, 1
        "spam": torch.tensor([1.0, nan, 0.0, 0.0, 1.0]),  # row 1 missing; probabilities > 0.5 for rows 0, 2, 4
        "tags": torch.tensor([[1.0, nan], [0.0, 1.0], [nan, 0.0], [1.0, 0.0]]),
        "box": torch.tensor([[2.0, nan], [3.0, 1.0], [nan, nan]]),
    }
    metrics.update(logits, targets)
    values = {task: {name: value.item() for name, value in named.items()} for task, named in metrics.compute().items()}
    # topic: 2 of 3 correct; per class F1: c0 = 1, c1 = 2/3 (tp 1, fn 1), c2 = 0 (fp 1) → macro (1 + 2/3 + 0) / 3.
    assert values["topic"]["accuracy"] == pytest.approx(2 / 3)
    assert values["topic"]["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # spam: valid rows 0, 2, 3, 4 with labels 1, 0, 0, 1, predicted 1, 1, 0, 1 → 3/4; AUROC: positives (2, 1) vs
    # negatives (0.5, -3): every pair ordered → 1.
    assert values["spam"]["accuracy"] == pytest.approx(3 / 4)
    assert values["spam"]["auroc"] == pytest.approx(1.0)
    # tags label 0: rows 0, 1, 3 labels 1, 0, 1, predicted 1, 0, 0 → F1 = 2/3; AUROC: pos (1, -1) vs neg (-2) → 1.
    # tags label 1: rows 1, 2, 3 labels 1, 0, 0, predicted 1, 1, 0 → F1 = 2/3; AUROC: pos (2) vs neg (1, -2) → 1.
    assert values["tags"]["macro_f1"] == pytest.approx(2 / 3)
    assert values["tags"]["auroc"] == pytest.approx(1.0)
    # box: valid elements (1 vs 2), (3 vs 3), (4 vs 1) → errors -1, 0, 3.
    assert values["box"]["rmse"] == pytest.approx(math.sqrt((1 + 0 + 9) / 3))
    assert values["box"]["mae"] == pytest.approx(4 / 3)


def test_metrics_skip_absent_tasks_and_report_nan_without_labels():
    tasks = [mf.Binary("spam"), mf.Regression("score")]
    metrics = TaskMetrics(tasks, training.default_metrics(tasks))
    metrics.update({"spam": torch.tensor([1.0, -1.0]), "score": torch.tensor([0.0, 1.0])},
                   {"spam": torch.tensor([math.nan, math.nan]), "score": torch.tensor([1.0, 3.0])})
    values = metrics.compute()
    assert math.isnan(values["spam"]["accuracy"].item()) and math.isnan(values["spam"]["auroc"].item())
    assert values["score"]["mae"].item() == pytest.approx(1.5)
    metrics.reset()
    metrics.update({"spam": torch.tensor([1.0, -1.0]), "score": torch.tensor([0.0, 0.0])},
                   {"spam": torch.tensor([1.0, 0.0])})
    values = metrics.compute()
    assert values["spam"]["accuracy"].item() == 1.0 and math.isnan(values["score"]["rmse"].item())


def test_user_metrics_replace_the_defaults():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    val_x, val_targets = make_data(64, seed=3, p_missing=0.25)
    user = {"score": {"mse": torchmetrics.MeanSquaredError()},
            "tags": {"micro_f1": torchmetrics.classification.MultilabelF1Score(
                num_labels=3, average="micro", ignore_index=training.MISSING_LABEL)}}
    history = fit(model, train_batches(rows=64), torch.optim.SGD(model.parameters(), lr=0.1),
                  val_loader=batches_of(val_x, val_targets, 20), metrics=user, progress=False)
    logits = model.predict(val_x)
    keep = ~torch.isnan(val_targets["score"])
    expected_mse = (logits["score"][keep] - val_targets["score"][keep]).pow(2).mean().item()
    valid = ~torch.isnan(val_targets["tags"])
    tp, fp, fn, micro_f1 = direct_f1((logits["tags"][valid] > 0).double(), val_targets["tags"][valid], 1.0)
    assert history[-1].val_metrics == {"score": {"mse": pytest.approx(expected_mse, rel=1e-6)},
                                       "tags": {"micro_f1": pytest.approx(micro_f1, rel=1e-6)}}


def test_evaluate_restores_every_module_mode():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    model.encoder.eval()  # a per-layer choice (as a pinned BatchNorm would be) that evaluate must not overwrite
    seen = []
    model.encoder.register_forward_hook(
        lambda module, args, out: seen.append((module.training, torch.is_grad_enabled())))
    val_x, val_targets = make_data(64, seed=4, p_missing=0.1)
    values = training.evaluate(model, batches_of(val_x, val_targets, 16))
    assert seen == [(False, False)] * 4
    assert model.training and model.heads.training and not model.encoder.training
    model.eval()
    direct = direct_metrics(model.predict(val_x), val_targets)
    assert_metrics_close({t: {m: v.item() for m, v in named.items()} for t, named in values.items()}, direct)


# ------------------------------------------------------------------------------------------------------------------
# Δm


def test_delta_m_hand_computed():
    results = {"seg": {"accuracy": 0.8}, "depth": {"rmse": 0.9, "mae": 1.2}}
    baselines = {"seg": {"accuracy": 0.75}, "depth": {"rmse": 1.0, "mae": 1.0}}
    # seg: +(0.8 − 0.75)/0.75 = +1/15; depth: rmse −(0.9 − 1)/1 = +0.1, mae −(1.2 − 1)/1 = −0.2.
    assert delta_m(results, baselines) == pytest.approx(100 * (1 / 15 + (0.1 - 0.2) / 2) / 2)
    assert delta_m(results, baselines, average="metrics") == pytest.approx(100 * (1 / 15 + 0.1 - 0.2) / 3)
    # The single-metric-per-task case is exactly the papers' (1/T) Σ_t form; a gain is positive.
    assert delta_m({"a": {"auroc": torch.tensor(0.9)}, "b": {"mae": 0.5}},
                   {"a": {"auroc": 0.8}, "b": {"mae": 1.0}}) == pytest.approx(100 * (0.125 + 0.5) / 2)
    # Directions given explicitly win over the name table.
    assert delta_m({"a": {"accuracy": 0.5}}, {"a": {"accuracy": 1.0}}, {"a": {"accuracy": False}}) == pytest.approx(50)


def test_delta_m_errors():
    with pytest.raises(ValueError, match="mtlfast: Δm: baseline a/mae is 0"):
        delta_m({"a": {"mae": 1.0}}, {"a": {"mae": 0.0}})
    with pytest.raises(ValueError, match="mtlfast: Δm: no result for task 'b'"):
        delta_m({"a": {"mae": 1.0}}, {"b": {"mae": 1.0}})
    with pytest.raises(ValueError, match="mtlfast: Δm: task 'a' has no result for metric 'rmse'"):
        delta_m({"a": {"mae": 1.0}}, {"a": {"rmse": 1.0}})
    with pytest.raises(ValueError, match="mtlfast: Δm needs to know whether higher is better for metric 'iou'"):
        delta_m({"a": {"iou": 1.0}}, {"a": {"iou": 2.0}})
    with pytest.raises(ValueError, match="average"):
        delta_m({"a": {"mae": 1.0}}, {"a": {"mae": 2.0}}, average="mean")


def test_fit_reports_delta_m_against_the_baselines():
    torch.manual_seed(0)
    model = TinyMultiTaskModel()
    val = train_batches(rows=96, seed=5, p_missing=0.1)
    baselines = {"topic": {"accuracy": 0.5, "macro_f1": 0.4}, "score": {"rmse": 2.0}}
    history = fit(model, train_batches(), torch.optim.Adam(model.parameters(), lr=0.03), epochs=2, val_loader=val,
                  single_task_baselines=baselines, progress=False)
    for record in history:
        topic, score = record.val_metrics["topic"], record.val_metrics["score"]
        expected = 100 * (((topic["accuracy"] - 0.5) / 0.5 + (topic["macro_f1"] - 0.4) / 0.4) / 2
                          - (score["rmse"] - 2.0) / 2.0) / 2
        assert record.delta_m == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="mtlfast: single_task_baselines names metric 'rmse' of task 'topic'"):
        fit(model, val, torch.optim.SGD(model.parameters(), lr=0.1), val_loader=val,
            single_task_baselines={"topic": {"rmse": 1.0}}, progress=False)
    with pytest.raises(ValueError, match="mtlfast: single_task_baselines names task 'nope'"):
        fit(model, val, torch.optim.SGD(model.parameters(), lr=0.1), val_loader=val,
            single_task_baselines={"nope": {"rmse": 1.0}}, progress=False)
    with pytest.raises(ValueError, match="mtlfast: single_task_baselines needs a val_loader"):
        fit(model, val, torch.optim.SGD(model.parameters(), lr=0.1), single_task_baselines=baselines, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# History


def _two_epoch_history():
    history = History(["a", "b"])
    history.append(EpochRecord(epoch=1, train_loss={"a": 2.0, "b": 1.0}, train_total=3.0,
                               val_metrics={"a": {"accuracy": 0.5}}, delta_m=-1.0, task_weights={"a": 1.0, "b": 1.0},
                               lr=0.1, steps=4, epoch_time_s=0.5, steps_per_s=10.0))
    history.append(EpochRecord(epoch=2, train_loss={"a": 1.0, "b": 0.5}, train_total=1.5, lr=0.1, steps=4))
    return history


def test_history_rows():
    rows = _two_epoch_history().as_rows()
    assert rows[0] == {"epoch": 1, "train_loss/a": 2.0, "train_loss/b": 1.0, "train_total": 3.0,
                       "val/a/accuracy": 0.5, "delta_m": -1.0, "task_weight/a": 1.0, "task_weight/b": 1.0,
                       "lr": 0.1, "steps": 4, "epoch_time_s": 0.5, "steps_per_s": 10.0}
    assert rows[1]["train_loss/b"] == 0.5 and "delta_m" not in rows[1] and "val/a/accuracy" not in rows[1]


def test_history_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib", reason="History.plot needs matplotlib (an optional dependency)")
    path = _two_epoch_history().plot(tmp_path / "losses.png")
    with open(path, "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="mtlfast: History.plot: no epoch"):
        History(["a"]).plot(tmp_path / "empty.png")


def test_history_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="mtlfast: History.plot needs matplotlib"):
        _two_epoch_history().plot(tmp_path / "again.png")


# ------------------------------------------------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments_raise_clear_errors():
    model = TinyMultiTaskModel()
    batches = train_batches(rows=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"mtlfast: fit expects batches \(inputs, targets_dict\)"):
        fit(model, [batches[0][0]], optimizer, progress=False)
    with pytest.raises(TypeError, match="mtlfast: a batch's targets must be a mapping"):
        fit(model, [(batches[0][0], [1, 2])], optimizer, progress=False)
    with pytest.raises(ValueError, match="mtlfast: log_every must be a positive integer"):
        fit(model, batches, optimizer, log_every=0)
    with pytest.raises(ValueError, match="mtlfast: epochs must be a positive integer"):
        fit(model, batches, optimizer, epochs=0)
    with pytest.raises(ValueError, match="mtlfast: the weighting method was built for 3 tasks, the model has 4"):
        fit(model, batches, optimizer, weighting=EqualWeighting(3))
    with pytest.raises(TypeError, match="has no end_epoch"):
        fit(model, batches, optimizer, callbacks=[object()])
    with pytest.raises(ValueError, match="mtlfast: metrics must be 'auto'"):
        fit(model, batches, optimizer, val_loader=batches, metrics="all")
    with pytest.raises(ValueError, match="mtlfast: metrics given for unknown tasks"):
        fit(model, batches, optimizer, val_loader=batches, metrics={"nope": {}})
    with pytest.raises(ValueError, match="mtlfast: amp_dtype"):
        fit(model, batches, optimizer, amp_dtype=torch.float64)
    with pytest.raises(ValueError, match="mtlfast: train_loader yielded no batch"):
        fit(model, [], optimizer, progress=False)
    with pytest.raises(TypeError, match="mtlfast: fit needs a multi-task model"):
        fit(nn.Linear(2, 2), batches, optimizer)
