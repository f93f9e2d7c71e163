"""MultiFashion: two overlapping Fashion-MNIST items per image, one task per item.

The MultiMNIST recipe of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 §5,
applied to Fashion-MNIST (Xiao et al., 2017) as in Lin et al., "Pareto Multi-Task Learning", NeurIPS 2019: each
image is placed at the top-left of a 36 × 36 canvas, a second image of the same split at the bottom-right (shifted
8 pixels down and right), the two are combined by a pixel-wise maximum, and the canvas is resized to 28 × 28
(bilinear, antialiased) — or kept at 36 × 36 with ``image_size=36``. Task ``top_left`` predicts the first item's
class and ``bottom_right`` the second's (two 10-class :class:`~mtlfast.Classification` tasks).

Files: the four IDX files (``train-images-idx3-ubyte`` …, gzipped or not) from the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or any folder passed as ``root``.

Splits: the 60,000 training images are split 54,000 / 6,000 into train / val at random (seeded); test uses the
10,000 test images. Each image appears once as the top-left item of its split; its partner is another image of
the same split drawn uniformly (seeded), so the splits never share an item. Pixels are scaled to [0, 1], no other
normalisation.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtlfast.data._common import MissingDatasetError, MultiTaskDataset, Split, missing_asset, split_rows
from mtlfast.tasks import Classification

INSTALL = "apt-get install -y dataset-fashion-mnist"
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
SHIFT = 8  # the second item's offset; canvas side = item side + SHIFT (28 + 8 = 36)
_CHUNK = 8192  # images resized per interpolate call, to bound the float canvas memory

# IDX type codes (the byte after the two zero bytes of the magic number); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file (LeCun's MNIST format, gzipped or not: detected from the content) as a tensor of its shape."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"mtlfast: {path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape)) if ndim else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(f"mtlfast: {path}: header says shape {shape} ({count * dtype.itemsize} bytes of data), "
                         f"file holds {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _files(root: str | os.PathLike | None) -> dict[str, Path]:
    folder = DEBIAN_ROOT if root is None else Path(root)
    found: dict[str, Path] = {}
    for key, stem in FILES.items():
        path = _find(folder, stem)
        if path is not None:
            found[key] = path
    missing = [stem for key, stem in FILES.items() if key not in found]
    if missing:
        raise missing_asset("MultiFashion", f"the Fashion-MNIST IDX files {missing} in {folder}", INSTALL,
                            note="(a Debian/Ubuntu package: run it as root or with sudo) ")
    return found


def is_available(root: str | os.PathLike | None = None) -> bool:
    try:
        _files(root)
    except MissingDatasetError:
        return False
    return True


def resize_matrix(source: int, size: int) -> torch.Tensor:
    """(size, source) float32 matrix A of PyTorch's antialiased bilinear resize along one axis.

    That resize is separable and linear, so resizing a batch of (source, source) images X is A @ X @ Aᵀ: one
    batched matmul, many times faster on CPU than ``F.interpolate(..., antialias=True)`` on the batch. A's column k
    is the resize of a unit impulse at position k along the width (the height kept at 1, where the resize is the
    identity; a (N, 1, H, 1) input instead is read wrongly by the antialias kernel as of torch 2.14).
    """
    impulses = torch.eye(source, dtype=torch.float64).reshape(source, 1, 1, source)
    response = F.interpolate(impulses, size=(1, size), mode="bilinear", antialias=True, align_corners=False)
    return response[:, 0, 0, :].T.to(torch.float32).contiguous()


def overlay_pairs(top_left: torch.Tensor, bottom_right: torch.Tensor, image_size: int = 28,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Overlaid pairs: (N, H, W) uint8 items → (N, 1, image_size, image_size) ``dtype`` in [0, 1].

    The items sit at offsets (0, 0) and (SHIFT, SHIFT) of an (H + SHIFT, W + SHIFT) canvas, combined by a
    pixel-wise max, then resized like ``F.interpolate(mode="bilinear", antialias=True)`` when ``image_size``
    differs from the canvas side (square items only, then).
    """
    if top_left.shape != bottom_right.shape or top_left.dim() != 3:
        raise ValueError(f"mtlfast: overlay_pairs needs two (N, H, W) tensors of one shape, got "
                         f"{tuple(top_left.shape)} and {tuple(bottom_right.shape)}")
    count, height, width = top_left.shape
    side = (height + SHIFT, width + SHIFT)
    resize = side != (image_size, image_size)
    if resize and height != width:
        raise ValueError(f"mtlfast: resizing needs square items, got {height} x {width}")
    matrix = resize_matrix(side[0], image_size) if resize else None
    out = torch.empty(count, 1, image_size, image_size, dtype=dtype)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        canvas = torch.zeros(stop - start, *side, dtype=top_left.dtype)
        canvas[:, :height, :width] = top_left[start:stop]
        corner = canvas[:, SHIFT:, SHIFT:]
        torch.maximum(corner, bottom_right[start:stop], out=corner)
        pixels = canvas.to(torch.float32) / 255.0
        if matrix is not None:
            pixels = (matrix @ pixels @ matrix.T).clamp_(0.0, 1.0)
        out[start:stop, 0] = pixels.to(dtype)
    return out


def _partners(count: int, generator: torch.Generator) -> torch.Tensor:
    # i + k (mod n) with k uniform in [1, n) is uniform over the other n - 1 items and never i itself.
    if count < 2:
        raise ValueError("mtlfast: MultiFashion needs at least 2 images per split to pair them")
    return (torch.arange(count) + torch.randint(1, count, (count,), generator=generator)) % count


def load_multi_fashion(root: str | os.PathLike | None = None, *, image_size: int = 28, val_fraction: float = 0.1,
                       max_examples: int | None = None, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> MultiTaskDataset:
    """MultiFashion (see the module docstring); deterministic given ``seed``.

    Args:
        root: folder with the four Fashion-MNIST IDX files; default ``/usr/share/datasets/fashion-mnist``
            (Debian package ``dataset-fashion-mnist``). Raises :class:`MissingDatasetError` naming the apt line.
        image_size: output side: 28 (the MultiMNIST convention, resized from the 36 × 36 canvas) or 36 (the
            canvas itself) or any other positive size.
        val_fraction: share of the 60,000 training images held out for val.
        max_examples: keep at most this many examples per split (for quick runs).
        seed: seeds the train/val split and the choice of partners.

    Returns:
        inputs ``(N, 1, image_size, image_size)`` of ``dtype`` in [0, 1]; targets ``top_left`` and
        ``bottom_right``, ``(N,)`` int64 class indices (``info["class_names"]``).
    """
    if image_size < 1:
        raise ValueError(f"mtlfast: image_size must be positive, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"mtlfast: val_fraction must be in (0, 1), got {val_fraction}")
    if max_examples is not None and max_examples < 2:
        raise ValueError(f"mtlfast: max_examples must be >= 2, got {max_examples}")
    files = _files(root)
    images = {part: read_idx(files[f"{part}_images"]) for part in ("train", "test")}
    labels = {part: read_idx(files[f"{part}_labels"]).to(torch.int64) for part in ("train", "test")}
    for part in ("train", "test"):
        if images[part].dim() != 3 or images[part].dtype != torch.uint8 or \
                labels[part].shape != images[part].shape[:1]:
            raise ValueError(f"mtlfast: {part} IDX files must hold (N, H, W) uint8 images and (N,) labels, got "
                             f"{tuple(images[part].shape)} {images[part].dtype} and {tuple(labels[part].shape)}")
        if bool((labels[part] < 0).any()) or bool((labels[part] >= len(CLASS_NAMES)).any()):
            raise ValueError(f"mtlfast: {part} labels must be class indices in [0, {len(CLASS_NAMES)})")

    train_index, val_index = split_rows(images["train"].shape[0], (1.0 - val_fraction, val_fraction), seed)
    rows = {"train": ("train", train_index), "val": ("train", val_index),
            "test": ("test", torch.arange(images["test"].shape[0]))}
    generator = torch.Generator().manual_seed(seed + 1)  # a different stream from the split permutation
    splits = {}
    for name, (source, index) in rows.items():
        index = index[:max_examples] if max_examples is not None else index
        partner = index[_partners(index.numel(), generator)]
        inputs = overlay_pairs(images[source][index], images[source][partner], image_size, dtype)
        splits[name] = Split(inputs, {"top_left": labels[source][index], "bottom_right": labels[source][partner]})

    info = {"source": str(files["train_images"].parent), "class_names": CLASS_NAMES, "image_size": image_size,
            "canvas": images["train"].shape[1] + SHIFT, "shift": SHIFT, "seed": seed}
    tasks = (Classification("top_left", 10), Classification("bottom_right", 10))
    return MultiTaskDataset("multi_fashion", tasks, **splits, info=info)
