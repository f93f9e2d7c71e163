"""DistributedDataParallel with fit: two gloo processes on CPU, each given its half of every batch, end with the same
parameters, weighting state and history on both ranks — and the same (float64, tight tolerance) as one process
training on the whole batches. Covers EW, DWA (3 epochs, so its loss history drives the weights), and PCGrad and
MGDA-UB on the representation (the Gram matrix is reduced across ranks). Validation metrics are gathered across ranks
by torchmetrics, so they equal the single process's on the whole validation set."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mtlfast as mf
from mtlfast.training import fit
from mtlfast.weighting import DWA, MGDAUB, PCGrad

WORLD = 2
ROWS_PER_RANK = 8
STEPS_PER_EPOCH = 3
EPOCHS = 3
IN_FEATURES, HIDDEN = 5, 8
TASKS = (
    mf.Classification("topic", num_classes=3),
    mf.Binary("spam"),
    mf.MultiLabel("tags", num_labels=2),
    mf.Regression("score"),
)
METHODS = ("ew", "dwa", "pcgrad", "mgda")


class EncoderWithHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN, dtype=torch.float64), nn.Tanh())
        self.heads = mf.MultiTaskHeads(HIDDEN, TASKS, dtype=torch.float64)
        self.tasks, self.task_names = self.heads.tasks, self.heads.task_names

    def forward(self, x, targets, *, per_task_input_grads=False):
        return self.heads(self.encoder(x), targets, per_task_input_grads=per_task_input_grads)

    def predict(self, x):
        return self.heads.predict(self.encoder(x))


def make_batches(count, rows, seed, p_missing=0.0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(rows, IN_FEATURES, generator=gen, dtype=torch.float64)
        targets = {
            "topic": torch.randint(0, 3, (rows,), generator=gen),
            "spam": (torch.rand(rows, generator=gen, dtype=torch.float64) < 0.5).double(),
            "tags": (torch.rand(rows, 2, generator=gen, dtype=torch.float64) < 0.5).double(),
            "score": torch.randn(rows, generator=gen, dtype=torch.float64),
        }
        if p_missing:
            targets["topic"] = torch.where(torch.rand(rows, generator=gen) < p_missing, -100, targets["topic"])
            targets["score"] = torch.where(torch.rand(rows, generator=gen) < p_missing, math.nan, targets["score"])
        batches.append((x, targets))
    return batches


def shard(batches, rank):
    """Rank r's half of every batch: rows [r·B, (r+1)·B)."""
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return [(x[rows], {name: y[rows] for name, y in targets.items()}) for x, targets in batches]


def make_weighting(method):
    if method == "ew":
        return None
    if method == "dwa":
        return DWA(len(TASKS)).double()  # float64 loss history, as the rest of this test
    return {"pcgrad": PCGrad, "mgda": MGDAUB}[method](len(TASKS), mode="representation")


def train(method, train_batches, val_batches, distributed):
    """fit from a fixed initialisation; returns everything that must agree across ranks and with one process."""
    torch.manual_seed(7)
    model = EncoderWithHeads()
    weighting = make_weighting(method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    trained = DistributedDataParallel(model) if distributed else model
    history = fit(trained, train_batches, optimizer, epochs=EPOCHS, weighting=weighting, val_loader=val_batches,
                  progress=False)
    timing = ("epoch_time_s", "steps_per_s")
    return {
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "weighting": {} if weighting is None else {name: t.detach().clone() for name, t in weighting.named_buffers()},
        "history": [{k: v for k, v in row.items() if k not in timing} for row in history.as_rows()],
    }


def _worker(rank, init_file, train_batches, val_batches, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {method: train(method, shard(train_batches, rank), shard(val_batches, rank), distributed=True)
                   for method in METHODS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data():
    return (make_batches(STEPS_PER_EPOCH, WORLD * ROWS_PER_RANK, seed=1),
            make_batches(1, WORLD * ROWS_PER_RANK, seed=2, p_missing=0.25))


@pytest.fixture(scope="module")
def single_results(data):
    return {method: train(method, *data, distributed=False) for method in METHODS}


@pytest.fixture(scope="module")
def rank_results(data, single_results, tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build of torch")
    out_dir = tmp_path_factory.mktemp("ddp")
    # spawn, not fork: forking a process whose autograd engine threads have already run (any earlier test in the
    # session) is refused by torch.
    start_method = "spawn"
    mp.start_processes(_worker, args=(str(out_dir / "init"), *data, str(out_dir)), nprocs=WORLD, join=True,
                       start_method=start_method)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def assert_tensors_close(actual, expected, what, rtol=1e-10, atol=1e-12):
    assert actual.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} {name}: {m}")


def assert_rows_close(actual, expected, what):
    assert len(actual) == len(expected), what
    for epoch, (got, want) in enumerate(zip(actual, expected), 1):
        assert got.keys() == want.keys(), what
        for key in want:
            tolerance = 1e-6 if key.startswith("val/") else 1e-9  # torchmetrics keeps float32 states
            assert got[key] == pytest.approx(want[key], rel=tolerance, abs=1e-12), f"{what} epoch {epoch} {key}"


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_match_each_other_and_one_process_on_the_whole_batches(method, single_results, rank_results):
    first, second = (results[method] for results in rank_results)
    # Every rank ends in the same state: DDP averages the model's gradients, the method reduces its own inputs.
    assert_tensors_close(second["parameters"], first["parameters"], "rank 1 vs rank 0 parameters", rtol=0, atol=0)
    assert_tensors_close(second["weighting"], first["weighting"], "rank 1 vs rank 0 weighting state", rtol=0, atol=0)
    assert_rows_close(second["history"], first["history"], "rank 1 vs rank 0 history")

    single = single_results[method]
    assert_tensors_close(first["parameters"], single["parameters"], "DDP vs one process parameters")
    assert_tensors_close(first["weighting"], single["weighting"], "DDP vs one process weighting state")
    assert_rows_close(first["history"], single["history"], "DDP vs one process history")
    if method == "dwa":  # its weights were live in epoch 3
        weights = torch.tensor([single["history"][-1][f"task_weight/{task.name}"] for task in TASKS])
        assert not torch.allclose(weights, torch.ones_like(weights))
    if method in ("pcgrad", "mgda"):
        weights = torch.tensor([single["history"][-1][f"task_weight/{task.name}"] for task in TASKS])
        assert not torch.allclose(weights, weights[0].expand_as(weights))
