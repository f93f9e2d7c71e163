"""Compute a frozen backbone's features once, optionally cache them on disk, and train heads on them.

With the backbone frozen, every epoch of head training would recompute the same features; computing them once makes
linear probing of many tasks nearly free (the heads' fused op is all that remains per step):

>>> train = extract_features(backbone, train_loader, cache_dir="~/.cache/my-features")
>>> heads = mf.MultiTaskHeads(train.feature_dim, tasks)
>>> fit_heads(heads, train, epochs=20, lr=1e-2)              # mtlfast.transfer.fit_heads

The on-disk cache file is named by a key hashing the backbone's state_dict tensors, the pooling and a fingerprint of
the data: its length and a hash of 8 evenly spaced items (first and last included) — or a key you give. Change the
weights or the data and the key changes; a second call with the same backbone and data loads instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from mtlfast.training._batches import to_device  # the same nested move fit uses
from mtlfast.transfer._modes import evaluating, floating_device_dtype
from mtlfast.transfer.pooling import Pool, check_pool, describe_pool, pool, select_output

CACHE_FORMAT = 1
_FINGERPRINT_ITEMS = 8

Features = torch.Tensor | dict[str, torch.Tensor]
TargetsLike = torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...] | None


class FeatureDataset(Dataset):
    """Precomputed features and their targets, TensorDataset-like.

    Attributes:
        features: (N, D) — or (N, L, H) token states, or input name → tensor for a multi-input TransferModel.
        targets: what the loader's batches carried: task name → (N, …) tensor, a tensor, a tuple of tensors, or None.
        key: the cache key the features were stored under (None when not cached).

    ``dataset[i]`` (an int, slice or index tensor) gives ``(features[i], targets[i])``; :meth:`batches` iterates
    mini-batches by indexing (no DataLoader needed).
    """

    def __init__(self, features: Features, targets: TargetsLike = None, *, key: str | None = None):
        self.features = features
        self.targets = targets
        self.key = key
        sizes = {t.shape[0] for t in _tensors(features)} | {t.shape[0] for t in _tensors(targets)}
        if len(sizes) != 1:
            raise ValueError(f"mtlfast: features and targets have different numbers of rows: {sorted(sizes)}")
        self._length = sizes.pop()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> tuple[Features, TargetsLike]:
        return _index(self.features, index), _index(self.targets, index)

    @property
    def feature_dim(self) -> int | dict[str, int]:
        """D, the last dimension of the features (per input for a mapping)."""
        if isinstance(self.features, Mapping):
            return {name: int(t.shape[-1]) for name, t in self.features.items()}
        return int(self.features.shape[-1])

    def to(self, device: torch.device | str) -> FeatureDataset:
        """A copy on ``device`` (features and targets), e.g. to train heads on the GPU without per-batch copies."""
        return FeatureDataset(_apply(self.features, lambda t: t.to(device)), _apply(self.targets, lambda t: t.to(device)),
                              key=self.key)

    def batches(self, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[Features, TargetsLike]]:
        """Mini-batches ``(features, targets)`` by index selection on the stored tensors' device."""
        if batch_size < 1:
            raise ValueError(f"mtlfast: batch_size must be >= 1, got {batch_size}")
        device = next(iter(_tensors(self.features))).device
        order = torch.randperm(len(self), generator=generator).to(device) if shuffle else torch.arange(len(self), device=device)
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self[order[start:start + batch_size]]

    def __repr__(self) -> str:
        return f"FeatureDataset(rows={len(self)}, feature_dim={self.feature_dim}, cached={self.key is not None})"


def extract_features(
    backbone: nn.Module,
    loader: Iterable[Any],
    *,
    pool: Pool = "auto",
    feature_key: str | int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    split_batch: Callable[[Any], tuple[Any, Any]] | None = None,
    storage_device: torch.device | str = "cpu",
) -> FeatureDataset:
    """Run the backbone once over ``loader`` (eval mode, no autograd, batch by batch) and keep pooled features.

    Args:
        backbone: a backbone (pooled with ``pool`` / ``feature_key``, see :func:`mtlfast.transfer.pool`) or a
            :class:`~mtlfast.transfer.TransferModel` (its own ``features``: pooling, classifier stripped; heads unused).
        loader: an iterable of batches, e.g. a DataLoader. A batch is ``(inputs, targets)``, ``(inputs,)``,
            ``(inputs, t1, t2, …)`` or bare inputs; inputs are a tensor (``backbone(x)``) or a mapping of keyword
            arguments (``backbone(**x)``, its ``attention_mask`` masking the token mean); targets a tensor or a
            mapping task name → tensor. ``split_batch(batch) -> (inputs, targets)`` handles other layouts.
        device: where to run the backbone (default: its parameters' device); inputs are moved there.
        progress: show a tqdm progress bar.
        cache_dir: a directory for the on-disk cache; None disables it.
        cache_key: identifies the data instead of the automatic fingerprint (needed for an IterableDataset).
        storage_device: where the returned features live (default CPU).

    Returns:
        A :class:`FeatureDataset` in loader order. Features keep the backbone's output dtype.
    """
    check_pool(pool)
    key = path = None
    if cache_dir is not None:
        key = cache_key_for(backbone, loader, pool=pool, feature_key=feature_key, data_key=cache_key)
        path = Path(cache_dir).expanduser() / f"features-{key[:40]}.pt"
        if path.exists():
            stored = torch.load(path, map_location=storage_device, weights_only=True)
            if stored.get("format") == CACHE_FORMAT and stored.get("key") == key:
                return FeatureDataset(stored["features"], stored["targets"], key=key)
    run_device = torch.device(device) if device is not None else floating_device_dtype(backbone)[0]
    represent = _representation_fn(backbone, pool, feature_key)
    split = split_batch or _split_batch
    features: list[Features] = []
    targets: list[TargetsLike] = []
    with evaluating(backbone):
        for batch in _progress(loader, progress):
            inputs, batch_targets = split(batch)
            out = represent(to_device(inputs, run_device))
            features.append(_apply(out, lambda t: t.detach().to(storage_device)))
            targets.append(_apply(_as_tensors(batch_targets), lambda t: t.to(storage_device)))
    if not features:
        raise ValueError("mtlfast: the loader gave no batches")
    dataset = FeatureDataset(_concat(features, "features"), _concat(targets, "targets"), key=key)
    if path is not None:
        _atomic_save({"format": CACHE_FORMAT, "key": key, "features": dataset.features, "targets": dataset.targets}, path)
    return dataset


def cache_key_for(backbone: nn.Module, loader: Iterable[Any], *, pool: Pool = "auto", feature_key: str | int | None = None,
                  data_key: str | None = None) -> str:
    """The cache key :func:`extract_features` uses: sha256 over the backbone fingerprint, the pooling and the data
    fingerprint (or ``data_key``)."""
    parts = {
        "format": CACHE_FORMAT,
        "backbone": module_fingerprint(backbone),
        "pool": _pooling_description(backbone, pool, feature_key),
        "data": f"user:{data_key}" if data_key is not None else data_fingerprint(loader),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of the module's class and state_dict (names, dtypes, shapes and bytes of every tensor). For a
    TransferModel only what makes features counts (its heads are left out)."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    state = module.state_dict()
    if _is_transfer_model(module):
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    for name, tensor in state.items():
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            _hash_tensor(digest, tensor)
        else:
            digest.update(repr(tensor).encode())
    return digest.hexdigest()


def data_fingerprint(loader: Iterable[Any]) -> str:
    """sha256 of the dataset's length and of 8 evenly spaced items (first and last included).

    Reads ``loader.dataset`` (or ``loader`` itself when it is a sized, indexable collection). An item that changes
    from call to call (random augmentation) makes the fingerprint change too: such data is not worth caching.
    """
    dataset = getattr(loader, "dataset", loader)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"mtlfast: cannot fingerprint the data of a {type(dataset).__name__} (not a sized, indexable dataset); "
            "pass cache_key= to name it"
        )
    length = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__qualname__}:{length}".encode())
    if length:
        picks = sorted({round(i * (length - 1) / (_FINGERPRINT_ITEMS - 1)) for i in range(_FINGERPRINT_ITEMS)})
        for index in picks:
            _hash_object(digest, dataset[index])
    return digest.hexdigest()


# -- helpers ---------------------------------------------------------------------------------------------------------
def _is_transfer_model(module: nn.Module) -> bool:
    from mtlfast.transfer.model import TransferModel

    return isinstance(module, TransferModel)


def _representation_fn(backbone: nn.Module, how: Pool, feature_key: str | int | None) -> Callable[[Any], Features]:
    if _is_transfer_model(backbone):
        return backbone.features

    def represent(x: Any) -> torch.Tensor:
        if isinstance(x, Mapping):
            output, mask = backbone(**x), x.get("attention_mask")
        else:
            output, mask = backbone(x), None
        return pool(select_output(output, feature_key), how, mask)

    return represent


def _pooling_description(backbone: nn.Module, how: Pool, feature_key: str | int | None) -> str:
    if _is_transfer_model(backbone):
        pools = {name: describe_pool(spec) for name, spec in backbone._pools.items()}
        return json.dumps({"transfer_model": pools, "feature_key": repr(backbone.feature_key)}, sort_keys=True)
    return json.dumps({"pool": describe_pool(how), "feature_key": repr(feature_key)})


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("mtlfast: empty batch")
        if len(batch) == 1:
            return batch[0], None
        return (batch[0], batch[1]) if len(batch) == 2 else (batch[0], tuple(batch[1:]))
    return batch, None


def _as_tensors(targets: Any) -> TargetsLike:
    if targets is None or isinstance(targets, torch.Tensor):
        return targets
    if isinstance(targets, Mapping):
        return {name: _as_tensor(value, name) for name, value in targets.items()}
    if isinstance(targets, tuple):
        return tuple(_as_tensor(value, str(i)) for i, value in enumerate(targets))
    return _as_tensor(targets, "targets")


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"mtlfast: target {name!r} of type {type(value).__name__} cannot be stored as a tensor") from None


def _apply(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: fn(v) for k, v in value.items()}
    return tuple(fn(v) for v in value)


def _tensors(value: Any) -> list[torch.Tensor]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    return list(value.values()) if isinstance(value, Mapping) else list(value)


def _index(value: Any, index: Any) -> Any:
    return _apply(value, lambda t: t[index])


def _concat(parts: list[Any], what: str) -> Any:
    first = parts[0]
    if first is None:
        if any(p is not None for p in parts):
            raise ValueError(f"mtlfast: some batches carry {what} and others do not")
        return None
    try:
        if isinstance(first, torch.Tensor):
            return torch.cat(parts)
        if isinstance(first, Mapping):
            return {k: torch.cat([p[k] for p in parts]) for k in first}
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    except (RuntimeError, KeyError, TypeError, IndexError) as error:
        raise ValueError(
            f"mtlfast: cannot stack the {what} of different batches ({error}); token states of varying length need "
            "padding to one length, or a pooling that gives (N, D)"
        ) from None


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    flat = tensor.to("cpu").contiguous().reshape(-1)
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def _hash_object(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        _hash_tensor(digest, obj)
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            digest.update(str(key).encode())
            _hash_object(digest, obj[key])
    elif isinstance(obj, (tuple, list)):
        digest.update(f"seq{len(obj)}".encode())
        for item in obj:
            _hash_object(digest, item)
    elif hasattr(obj, "tobytes"):  # numpy arrays, PIL images
        digest.update(repr(getattr(obj, "shape", getattr(obj, "size", ""))).encode())
        digest.update(obj.tobytes())
    else:
        digest.update(repr(obj).encode())


def _progress(loader: Iterable[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar rather than no features
        return loader

    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc="mtlfast: extracting features", unit="batch")


def _atomic_save(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a reader never sees a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = ["FeatureDataset", "cache_key_for", "data_fingerprint", "extract_features", "module_fingerprint"]
