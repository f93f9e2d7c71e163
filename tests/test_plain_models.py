"""The plain-PyTorch twins (mtlfast.models.plain) compute what the fused models compute, from the same weights."""

from __future__ import annotations

import pytest
import torch

import mtlfast as mf
from mtlfast.models.plain import plain_twin

TASKS = [mf.Classification("topic", 5, label_smoothing=0.1), mf.Binary("spam", weight=0.5),
         mf.MultiLabel("tags", 3), mf.Regression("score", loss="huber"), mf.Regression("xy", dim=2, loss="l1")]


def _targets(n: int) -> dict[str, torch.Tensor]:
    targets = {
        "topic": torch.randint(0, 5, (n,)),
        "spam": torch.randint(0, 2, (n,)).double(),
        "tags": torch.randint(0, 2, (n, 3)).double(),
        "score": torch.randn(n, dtype=torch.float64),
        "xy": torch.randn(n, 2, dtype=torch.float64),
    }
    targets["topic"][::4] = -100  # missing labels, both conventions
    targets["tags"][1::3, 1] = float("nan")
    targets["score"][::5] = float("nan")
    return targets


def _models():
    yield mf.models.HardSharing.mlp(7, (16, 8), TASKS, dtype=torch.float64)
    yield mf.models.MMoE(7, TASKS, num_experts=3, expert_hidden=(12, 8), tower_hidden=(6,), dtype=torch.float64)
    yield mf.models.MMoE(7, TASKS, num_experts=2, expert_hidden=(8,), dtype=torch.float64)


@pytest.mark.parametrize("index", range(3))
def test_plain_twin_matches_losses_logits_and_gradients(index):
    model = list(_models())[index]
    twin = plain_twin(model)
    x = torch.randn(11, 7, dtype=torch.float64)
    targets = _targets(11)
    del targets["xy"]  # an absent task
    ours, theirs = model(x, targets), twin(x, targets)
    torch.testing.assert_close(ours.loss_vector.double(), theirs.loss_vector.double(), rtol=1e-10, atol=1e-12)
    ours.loss.backward()
    theirs.loss.backward()
    theirs_grads = dict(twin.named_parameters())
    group = next(iter(model.heads.packed.values()))  # one input: heads packed in task order
    for kind in ("weight", "bias"):
        packed = getattr(group, kind).grad
        twin_heads = [theirs_grads[f"heads.{name}.{kind}"] for name in model.task_names]
        expected = torch.cat([_grad(p) for p in twin_heads])
        torch.testing.assert_close(packed, expected)
    body = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    twin_body = [p for n, p in twin.named_parameters() if not n.startswith("heads.")]
    # same number of body parameters (experts / gates / towers unstacked) and the same total gradient mass
    assert sum(p.numel() for p in body) == sum(p.numel() for p in twin_body)
    torch.testing.assert_close(sum(_grad(p).abs().sum() for p in body), sum(_grad(p).abs().sum() for p in twin_body))
    torch.testing.assert_close(sum(_grad(p).sum() for p in body), sum(_grad(p).sum() for p in twin_body))
    logits_ours, logits_theirs = model.predict(x), twin.predict(x)
    for name in model.task_names:
        torch.testing.assert_close(logits_ours[name], logits_theirs[name])


def _grad(p: torch.Tensor) -> torch.Tensor:
    """The twin leaves .grad None where an absent task's head or tower got no gradient; mtlfast has zeros there."""
    return torch.zeros_like(p) if p.grad is None else p.grad


def test_plain_twin_rejects_unknown_models():
    with pytest.raises(TypeError, match="mtlfast: no plain-PyTorch twin"):
        plain_twin(mf.models.CGC(4, TASKS[:2], num_shared_experts=1, num_task_experts=1, expert_hidden=(4,)))
