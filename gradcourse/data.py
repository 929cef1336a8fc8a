"""Datasets of the course, as tensors in memory, plus label noise and class-balanced subsets.

    ds = gc.data.gaussian_mixture(n_train=100, num_classes=2, seed=0)   # Sagun et al. 2017
    ds = gc.data.mnist1d()                                              # generated offline, cached
    ds = gc.data.digits()                                               # bundled with scikit-learn
    ds = gc.data.fashion_mnist(n_train=1_000)                           # real images, offline
    ds = gc.data.cifar10(n_train=5_000)                                 # torchvision, files on disk
    x, y = gc.data.full_batch(ds, device="cuda")

Every generator returns a :class:`Dataset` (float inputs, int64 labels), standardised with
statistics of its training split only (MNIST-1D keeps its package's own scaling), and is
deterministic under ``seed`` without touching the global random state. Files live under :func:`default_data_root` (``$GRADCOURSE_DATA`` or
``<repo>/data``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import random
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data import TensorDataset as _TensorDataset

from .checks import check_int as _check_int
from .checks import check_positive as _check_positive
from .losses import LossFn, one_hot, targets_for
from .paths import data_root, write_atomic

__all__ = [
    "Dataset",
    "DatasetUnavailable",
    "balanced_subset_indices",
    "block_images",
    "block_mask",
    "cifar10",
    "default_data_root",
    "digits",
    "fashion_mnist",
    "fashion_mnist_files",
    "full_batch",
    "gaussian_mixture",
    "label_noise",
    "mnist",
    "mnist1d",
    "null_patch",
    "one_hot",
    "read_idx",
    "standardize",
]

SPLITS: tuple[str, ...] = ("train", "test")


class DatasetUnavailable(RuntimeError):
    """A dataset's files are not on disk (or could not be downloaded); the message says where
    to put which files."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------------------------
# The dataset container


@dataclass(eq=False)
class Dataset:
    """Train and test tensors of a classification dataset; labels are int64 class indices."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str
    classes: tuple[str, ...] | None = None  # class names, where the dataset has them
    source: str | None = None  # the folder its files were read from, for datasets on disk

    def __post_init__(self) -> None:
        for split in SPLITS:
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(f"x_{split} has {len(x)} rows but y_{split} has {len(y)}")
            if y.dtype != torch.int64:
                raise ValueError(f"y_{split} must hold int64 class indices, got {y.dtype}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def split(self, split: str = "train") -> tuple[Tensor, Tensor]:
        """``(x, y)`` of the ``"train"`` or ``"test"`` split."""
        _check_split(split)
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Dataset:
        """This dataset on ``device``; ``dtype`` applies to the inputs only (labels stay int64).
        Returns a new ``Dataset``; tensors that need no change are shared, as ``Tensor.to``."""
        move_x = dict(device=device, dtype=dtype)
        return replace(
            self,
            x_train=self.x_train.to(**move_x),
            x_test=self.x_test.to(**move_x),
            y_train=self.y_train.to(device=device),
            y_test=self.y_test.to(device=device),
        )

    def subset(self, n_train: int, *, balanced: bool = True, seed: int = 0) -> Dataset:
        """A smaller training split of ``n_train`` examples, classes as equal as possible
        (``balanced``) or drawn uniformly at random, under ``seed``; the test split is kept."""
        _check_int("n_train", n_train, 1, self.n_train)
        if balanced:
            idx = balanced_subset_indices(self.y_train, n_train, seed=seed)
        else:
            perm = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(seed))
            idx = perm[:n_train].sort().values
        idx = idx.to(self.y_train.device)
        return replace(
            self,
            x_train=self.x_train[idx],
            y_train=self.y_train[idx],
            name=f"{self.name}-n{n_train}",
        )

    def loader(
        self,
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """Mini-batches ``(x, y)``; the order is fixed by ``seed`` (each epoch draws a new order
        from the loader's own generator). Each batch is one indexing op, not a per-item collate."""
        x, y = self.split(split)
        _check_int("batch_size", batch_size, 1)
        tensors = _TensorDataset(x, y)
        if shuffle:
            order = RandomSampler(tensors, generator=torch.Generator().manual_seed(seed))
        else:
            order = SequentialSampler(tensors)
        batches = BatchSampler(order, batch_size=batch_size, drop_last=drop_last)
        return DataLoader(tensors, sampler=batches, batch_size=None)

    def targets(self, loss: str | LossFn, split: str = "train") -> Tensor:
        """Targets for ``loss``: one-hot floats (dtype of x) for ``"mse"``, labels for ``"ce"``."""
        x, y = self.split(split)
        return targets_for(loss, y, self.num_classes, dtype=x.dtype)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.n_train}, test={self.n_test}, "
            f"input_shape={self.input_shape}, classes={self.num_classes}, "
            f"dtype={self.x_train.dtype}, device={self.x_train.device})"
        )


def full_batch(
    ds: Dataset, split: str = "train", device: str | torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """The whole ``split`` as ``(x, y)`` tensors on ``device`` (unchanged when ``None``)."""
    x, y = ds.split(split)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------
# Preprocessing helpers


def standardize(
    x_train: Tensor, x_test: Tensor, *, dims: int | tuple[int, ...] = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Subtract the training mean and divide by the training std (population std) along ``dims``
    (``0``: per feature; ``(0, 2, 3)``: per channel of images). Features that are constant in the
    training split (std at rounding level) are only centred. Returns ``(x_train, x_test, mean,
    std)``."""
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, correction=0, keepdim=True)
    rounding = 100 * torch.finfo(x_train.dtype).eps * (1 + mean.abs())
    std = torch.where(std > rounding, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std, mean, std


_standardize = standardize  # the generators' ``standardize`` flag shadows the function's name


def balanced_subset_indices(labels: Tensor, n: int, *, seed: int = 0) -> Tensor:
    """Sorted indices of ``n`` examples with every class present in ``labels`` as equal as
    possible: ``n // k`` each, one more for ``n % k`` classes chosen in a seeded order."""
    _check_int("n", n, 1, len(labels))
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    classes = torch.unique(labels)
    per_class = torch.full((len(classes),), n // len(classes))
    per_class[torch.randperm(len(classes), generator=gen)[: n % len(classes)]] += 1
    chosen = []
    for c, count in zip(classes.tolist(), per_class.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < count:
            raise ValueError(
                f"n={n} needs {count} examples of class {c}, but labels hold only {len(members)}"
            )
        chosen.append(members[torch.randperm(len(members), generator=gen)[:count]])
    return torch.cat(chosen).sort().values


def label_noise(
    labels: Tensor, fraction: float, num_classes: int, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Flip exactly ``round(fraction * n)`` labels, chosen at random, each to a different class
    drawn uniformly from the other ``num_classes - 1``. Returns ``(noisy_labels, flipped)``,
    where ``flipped`` is the boolean mask of the changed labels (so ``noisy != labels`` there)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    _check_int("num_classes", num_classes, 2)
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise ValueError("labels must be a 1-D tensor of integer class indices")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}")
    gen = torch.Generator().manual_seed(seed)
    n_flip = round(fraction * len(labels))
    flip = torch.randperm(len(labels), generator=gen)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=gen)  # never 0: always a change
    noisy = labels.clone().cpu()
    noisy[flip] = (noisy[flip] + shift) % num_classes
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[flip] = True
    return noisy.to(labels.device), flipped.to(labels.device)


def _to_dataset(
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    num_classes: int,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
) -> Dataset:
    x_train, y_train, x_test, y_test = arrays
    return Dataset(
        x_train=torch.as_tensor(x_train, dtype=dtype, device=device),
        y_train=torch.as_tensor(y_train, dtype=torch.int64, device=device),
        x_test=torch.as_tensor(x_test, dtype=dtype, device=device),
        y_test=torch.as_tensor(y_test, dtype=torch.int64, device=device),
        num_classes=num_classes,
        name=name,
    )


# ----------------------------------------------------------------------------------------------
# Synthetic and bundled data


def gaussian_mixture(
    n_train: int = 100,
    n_test: int = 100,
    *,
    num_classes: int = 2,
    dim: int = 2,
    spread: float = 1.0,
    center_box: tuple[float, float] = (-10.0, 10.0),
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Isotropic Gaussian blobs, one per class, as in Sagun et al. 2017 (arXiv 1706.04454):
    ``sklearn.datasets.make_blobs(centers=num_classes, cluster_std=spread, n_features=dim)``,
    centres uniform in ``center_box``. One pool of ``n_train + n_test`` points is drawn and split,
    then standardised per feature with the training split's mean and std. The centres depend on
    ``seed`` only, so ``spread`` alone sets how much the classes overlap."""
    from sklearn.datasets import make_blobs

    _check_int("n_train", n_train, 1)
    _check_int("n_test", n_test, 0)
    _check_int("num_classes", num_classes, 2)
    _check_int("dim", dim, 1)
    _check_int("seed", seed, 0, 2**32 - 1)
    _check_positive("spread", spread)
    low, high = center_box
    if not low < high:
        raise ValueError(f"center_box must be (low, high) with low < high, got {center_box}")
    x, y = make_blobs(
        n_samples=n_train + n_test,
        n_features=dim,
        centers=num_classes,
        cluster_std=spread,
        center_box=(low, high),
        shuffle=True,
        random_state=seed,  # its own RandomState: the global one is untouched
    )
    x_train, x_test = torch.as_tensor(x[:n_train]), torch.as_tensor(x[n_train:])
    if standardize:
        x_train, x_test, _, _ = _standardize(x_train, x_test, dims=0)
    arrays = (x_train.numpy(), y[:n_train], x_test.numpy(), y[n_train:])
    return _to_dataset(
        arrays, num_classes, f"gaussian_mixture-k{num_classes}-d{dim}", device, dtype
    )


def digits(
    n_test: int = 297,
    *,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 64 features, 10 classes),
    shuffled under ``seed`` and split; standardised per feature with training statistics
    (always-blank pixels are only centred), else pixel values scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    n_total = len(bunch.target)
    _check_int("n_test", n_test, 0, n_total - 1)
    _check_int("seed", seed, 0)
    order = np.random.default_rng(seed).permutation(n_total)
    x = torch.as_tensor(bunch.data[order], dtype=torch.float64) / 16.0
    y = bunch.target[order]
    n_train = n_total - n_test
    x_train, x_test = x[:n_train], x[n_train:]
    if standardize:
        x_train, x_test, _, _ = _standardize(x_train, x_test, dims=0)
    arrays = (x_train.numpy(), y[:n_train], x_test.numpy(), y[n_train:])
    return _to_dataset(arrays, 10, "digits", device, dtype)


# ----------------------------------------------------------------------------------------------
# MNIST-1D: generated offline with the mnist1d package, cached as .npz


def default_data_root() -> Path:
    """Where datasets live: ``$GRADCOURSE_DATA`` if set, else ``<repo>/data`` when writable,
    else ``~/.cache/gradcourse`` (see :mod:`gradcourse.paths`)."""
    return data_root()


def _mnist1d_args(n_train: int, n_test: int, seed: int):
    """The package's default generator arguments with our sizes and seed. The generator makes
    ``num_samples // 10`` examples per class, so the pool is rounded up to a multiple of 10."""
    import mnist1d.data

    args = mnist1d.data.get_dataset_args(as_dict=False)
    args.num_samples = 10 * math.ceil((n_train + n_test) / 10)
    args.train_split = n_train / args.num_samples
    args.seed = seed
    return args


def _mnist1d_cache_path(root: Path, n_train: int, n_test: int, seed: int, args) -> Path:
    settings = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return root / f"mnist1d_train{n_train}_test{n_test}_seed{seed}_{digest}.npz"


def _generate_mnist1d(args, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset``; it seeds the global NumPy and Python generators, so
    their states are saved and restored around it."""
    import mnist1d.data

    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        made = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002 (restoring the legacy global state)
        random.setstate(python_state)
    x = np.concatenate([made["x"], made["x_test"]])  # re-split at exactly n_train
    y = np.concatenate([made["y"], made["y_test"]]).astype(np.int64)
    return {
        "x_train": x[:n_train],
        "y_train": y[:n_train],
        "x_test": x[n_train : n_train + n_test],
        "y_test": y[n_train : n_train + n_test],
    }


def _load_mnist1d_cache(path: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """The cached arrays, checked for the expected keys, shapes and label range."""
    with np.load(path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape != (n, 40) or y.shape != (n,) or not np.isfinite(x).all():
            raise ValueError(f"cached {split} split has shape {x.shape}, expected ({n}, 40)")
        if n and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"cached {split} labels outside [0, 9]")
    return arrays


def mnist1d(
    n_train: int = 4000,
    n_test: int = 1000,
    *,
    seed: int = 42,
    root: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """MNIST-1D (Greydanus 2020, arXiv 2011.14439): 10 classes of 1-D signals of length 40,
    generated offline by the ``mnist1d`` package with its default arguments (the defaults here,
    5,000 examples split 4,000/1,000 with seed 42, are the package's standard configuration).
    The package already centres and scales the whole pool, so no further standardisation is
    applied. The arrays are cached as ``.npz`` under ``root``; an unreadable cache is rebuilt."""
    _check_int("n_train", n_train, 1)
    _check_int("n_test", n_test, 0)
    _check_int("seed", seed, 0, 2**32 - 1)
    root = default_data_root() if root is None else Path(root).expanduser()
    args = _mnist1d_args(n_train, n_test, seed)
    path = _mnist1d_cache_path(root, n_train, n_test, seed, args)
    arrays = None
    if path.exists():
        try:
            arrays = _load_mnist1d_cache(path, n_train, n_test)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            warnings.warn(
                f"MNIST-1D cache {path} is unreadable ({err}); regenerating it", stacklevel=2
            )
    if arrays is None:
        arrays = _generate_mnist1d(args, n_train, n_test)
        try:
            write_atomic(path, lambda fh: np.savez(fh, **arrays))
        except OSError as err:
            warnings.warn(f"could not cache MNIST-1D at {path} ({err})", stacklevel=2)
    ordered = (arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    return _to_dataset(ordered, 10, "mnist1d", device, dtype)


# ----------------------------------------------------------------------------------------------
# Image datasets: Fashion-MNIST and MNIST from validated IDX files, CIFAR-10 through torchvision.
# Files are read from disk; torchvision downloads only when asked (``download=True``).

#: Where Debian's package ``dataset-fashion-mnist`` puts the four gzipped IDX files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

#: The four IDX files of an MNIST-format dataset, per split: (images, labels).
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UINT8 = 0x08
STANDARDIZE: tuple[str, ...] = ("channel", "feature", "none")


class InvalidIDXFile(ValueError):
    """A file is not a well-formed IDX file of the expected shape (the message says why)."""


def read_idx(path: str | Path, *, ndim: int, num_classes: int | None = None) -> np.ndarray:
    """The uint8 array stored in an IDX file (plain or ``.gz``), as in the MNIST distribution:
    magic number ``0x00 0x00 0x08 ndim``, ``ndim`` big-endian int32 sizes, then the bytes.

    Raises :class:`InvalidIDXFile` for a wrong magic number or rank, a length that disagrees
    with the header (truncated or padded), a truncated or corrupt gzip stream, or (with
    ``num_classes``) a label outside ``[0, num_classes - 1]``. The result is read-only and
    cached in memory per file version (path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    return _read_idx_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, ndim, num_classes)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(
    path: str, size: int, mtime_ns: int, ndim: int, num_classes: int | None
) -> np.ndarray:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = Path(path).read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise InvalidIDXFile(f"its gzip stream is truncated or corrupt ({err})") from err
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise InvalidIDXFile(f"it holds {len(raw)} bytes, fewer than an IDX header's {header_len}")
    zero, dtype, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UINT8 or rank != ndim:
        raise InvalidIDXFile(
            f"its magic number is 0x{raw[:4].hex()}, expected 0x0000080{ndim} (uint8, {ndim}-D)"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = header_len + math.prod(shape)
    if len(raw) != expected:
        raise InvalidIDXFile(
            f"its header announces shape {shape} ({expected} bytes) but it holds {len(raw)} bytes"
            f" ({'truncated' if len(raw) < expected else 'trailing data'})"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)
    if num_classes is not None and array.size and int(array.max()) >= num_classes:
        bad = int(np.argmax(array >= num_classes))
        raise InvalidIDXFile(
            f"label {int(array.flat[bad])} at index {bad} is outside [0, {num_classes - 1}]"
        )
    return array  # frombuffer over bytes: already read-only


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (the plain file first)."""
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx_folder(
    folder: Path, image_shape: tuple[int, int], num_classes: int, remedy: str
) -> dict[str, np.ndarray]:
    """The four validated arrays of an MNIST-format folder (``images_train``, ``labels_train``,
    ``images_test``, ``labels_test``); a bad file raises :class:`DatasetUnavailable` naming it."""
    arrays = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        files = {"images": _idx_file(folder, images_stem), "labels": _idx_file(folder, labels_stem)}
        for kind, path in files.items():
            try:
                if path is None:
                    raise InvalidIDXFile("it is missing")
                array = read_idx(path, ndim=3 if kind == "images" else 1,
                                 num_classes=num_classes if kind == "labels" else None)  # fmt: skip
                if kind == "images" and array.shape[1:] != image_shape:
                    raise InvalidIDXFile(
                        f"its images are {array.shape[1]}x{array.shape[2]}, expected "
                        f"{image_shape[0]}x{image_shape[1]}"
                    )
            except (InvalidIDXFile, OSError) as err:
                name = (
                    path.name
                    if path is not None
                    else f"{images_stem if kind == 'images' else labels_stem}[.gz]"
                )
                raise DatasetUnavailable(
                    f"{name} in {folder}{os.sep} is not usable: {err}. {remedy}"
                ) from err
            arrays[f"{kind}_{split}"] = array
        n_images, n_labels = len(arrays[f"images_{split}"]), len(arrays[f"labels_{split}"])
        if n_images != n_labels or n_images == 0:
            raise DatasetUnavailable(
                f"the {split} split in {folder}{os.sep} has {n_images} images but {n_labels} "
                f"labels. {remedy}"
            )
    return arrays


def _has_idx_files(folder: Path) -> bool:
    return all(_idx_file(folder, stem) is not None for pair in IDX_FILES.values() for stem in pair)


def _check_standardize(standardize: str) -> str:
    if standardize not in STANDARDIZE:
        raise ValueError(f"standardize must be one of {STANDARDIZE}, got {standardize!r}")
    return standardize


def _pixel_stats(images: np.ndarray, standardize: str) -> tuple[Tensor, Tensor]:
    """Mean and std of uint8 pixels / 255 over the training images (n, C, H, W): one per channel
    (``"channel"``, exact, from each channel's histogram) or one per pixel (``"feature"``, as
    Cohen et al. 2021), accumulated in float64 blocks so the set is never copied whole as
    floats. Constant pixels get std 1 (they are only centred); ``"none"``: mean 0, std 1."""
    n, c = images.shape[:2]
    if standardize == "none":
        return torch.zeros(1, c, 1, 1, dtype=torch.float64), torch.ones(
            1, c, 1, 1, dtype=torch.float64
        )
    if standardize == "channel":
        levels = np.arange(256) / 255.0
        means, stds = [], []
        for ch in range(c):
            counts = np.bincount(images[:, ch].ravel(), minlength=256)
            mean = counts @ levels / counts.sum()
            means.append(mean)
            stds.append(math.sqrt(counts @ (levels - mean) ** 2 / counts.sum()))
        mean_t = torch.tensor(means, dtype=torch.float64).view(1, c, 1, 1)
        std_t = torch.tensor(stds, dtype=torch.float64).view(1, c, 1, 1)
    else:
        total = np.zeros(images.shape[1:], dtype=np.float64)
        square = np.zeros(images.shape[1:], dtype=np.float64)
        for start in range(0, n, 8192):
            block = images[start : start + 8192].astype(np.float64) / 255.0
            total += block.sum(0)
            square += (block * block).sum(0)
        mean = total / n
        var = np.maximum(square / n - mean * mean, 0.0)
        mean_t, std_t = torch.from_numpy(mean)[None], torch.from_numpy(np.sqrt(var))[None]
    rounding = 100 * torch.finfo(torch.float32).eps * (1 + mean_t.abs())
    return mean_t, torch.where(std_t > rounding, std_t, torch.ones_like(std_t))


def _image_dataset(
    images: tuple[np.ndarray, np.ndarray],
    labels: tuple[np.ndarray, np.ndarray],
    *,
    name: str,
    num_classes: int,
    classes: tuple[str, ...] | None,
    n_train: int | None,
    n_test: int | None,
    balanced: bool,
    standardize: str,
    flatten: bool,
    seed: int,
    device: str | torch.device | None,
    dtype: torch.dtype,
) -> Dataset:
    """A :class:`Dataset` from uint8 images (n, C, H, W) and labels of both splits: pixels / 255,
    standardised with statistics of the *full* training split (so a subset here equals
    ``Dataset.subset`` of the full set, and Cohen et al.'s order: standardise, then subset)."""
    _check_standardize(standardize)
    _check_int("seed", seed, 0, 2**32 - 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    mean, std = _pixel_stats(images[0], standardize)
    xs, ys = [], []
    for im, y, n, arg in zip(images, labels, (n_train, n_test), ("n_train", "n_test"), strict=True):
        y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        if n is not None:
            _check_int(arg, n, 1, len(y))
            if balanced:
                idx = balanced_subset_indices(y, n, seed=seed)
            else:
                gen = torch.Generator().manual_seed(seed)
                idx = torch.randperm(len(y), generator=gen)[:n].sort().values
            im, y = im[idx.numpy()], y[idx]
        work = torch.float64 if dtype == torch.float64 else torch.float32
        numpy_work = np.float64 if work == torch.float64 else np.float32
        x = torch.from_numpy(np.ascontiguousarray(im, dtype=numpy_work))  # (n, C, H, W), C-order
        x = x.div_(255).sub_(mean.to(work)).div_(std.to(work)).to(dtype)
        xs.append((x.flatten(1) if flatten else x).to(device))
        ys.append(y.to(device))
    return Dataset(xs[0], ys[0], xs[1], ys[1], num_classes=num_classes, name=name, classes=classes)


def _remedy(
    bad: Path, folders: Sequence[Path], download_into: Path, install_hint: str, download_hint: str
) -> str:
    """What to do about a damaged file in ``bad``, which depends on whose folder it is."""
    later = [f for f in folders[folders.index(bad) + 1 :] if _has_idx_files(f)]
    if bad == download_into:
        then = f"the copy in {later[0]}{os.sep} is then used" if later else download_hint
        return f"Delete {bad}{os.sep} ({then})."
    if install_hint and "apt-get" in install_hint:
        return "Reinstall the package: `sudo apt-get install --reinstall dataset-fashion-mnist`."
    return f"Replace the file, or {download_hint}."


def _load_idx(
    display: str,
    folders: Sequence[Path],
    download_into: Path,
    torchvision_class: str,
    function: str,
    install_hint: str,
    download: bool,
) -> tuple[Path, dict[str, np.ndarray]]:
    """The folder of an MNIST-format dataset, the first of ``folders`` holding all four IDX
    files (plain or gzipped; downloaded by torchvision into ``download_into`` when asked), and
    its four validated uint8 arrays."""
    download_hint = (
        f"call gradcourse.data.{function}(download=True) on a machine that is online "
        f"(torchvision puts the files into {download_into}{os.sep})"
    )
    found = next((f for f in folders if _has_idx_files(f)), None)
    if found is None and download:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, torchvision_class)
        try:
            cls(root=str(download_into.parent.parent), train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise DatasetUnavailable(
                f"downloading {display} into {download_into} failed "
                f"({' '.join(str(err).split())[:300]}). Retry when online"
                + (f", or {install_hint}." if install_hint else ".")
            ) from err
        found = download_into if _has_idx_files(download_into) else None
    if found is None:
        where = " or ".join(f"{f}{os.sep}" for f in folders)
        files = ", ".join(f"{stem}[.gz]" for pair in IDX_FILES.values() for stem in pair)
        raise DatasetUnavailable(
            f"{display} was not found: looked for {files} in {where}. "
            + (f"{install_hint[:1].upper()}{install_hint[1:]}. Or " if install_hint else "Or ")
            + f"{download_hint}, or copy the files there."
        )
    remedy = _remedy(found, folders, download_into, install_hint, download_hint)
    return found, _read_idx_folder(found, (28, 28), 10, remedy)


def _idx_dataset(
    source: tuple[Any, ...],
    *,
    download: bool,
    classes: tuple[str, ...] | None,
    **options: Any,
) -> Dataset:
    """A :class:`Dataset` from the IDX files :func:`_load_idx` finds for ``source``."""
    found, arrays = _load_idx(*source, download)
    images = (arrays["images_train"][:, None], arrays["images_test"][:, None])
    labels = (arrays["labels_train"], arrays["labels_test"])
    ds = _image_dataset(images, labels, num_classes=10, classes=classes, **options)
    return replace(ds, source=str(found))


def _fashion_source(root: str | Path | None) -> tuple[Any, ...]:
    root = default_data_root() if root is None else Path(root).expanduser()
    folder = root / "FashionMNIST" / "raw"
    return (
        "Fashion-MNIST",
        [folder, SYSTEM_FASHION_MNIST],
        folder,
        "FashionMNIST",
        "fashion_mnist",
        "install Debian's package: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
        f"it puts the files into {SYSTEM_FASHION_MNIST}{os.sep})",
    )


def fashion_mnist_files(root: str | Path | None = None, *, download: bool = False) -> Path:
    """The folder :func:`fashion_mnist` reads, after validating its four files (no tensors are
    built: what ``python -m gradcourse data`` runs). Raises :class:`DatasetUnavailable`."""
    return _load_idx(*_fashion_source(root), download)[0]


def fashion_mnist(
    root: str | Path | None = None,
    *,
    download: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    balanced: bool = True,
    standardize: str = "channel",
    flatten: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv 1708.07747): 60,000 training and 10,000
    test images of 28x28 grey pixels, 10 classes of clothing (6,000 / 1,000 per class), as
    (n, 1, 28, 28), or (n, 784) with ``flatten``.

    Looked for, in order: ``<root>/FashionMNIST/raw/`` (torchvision's layout; ``root`` defaults
    to ``$GRADCOURSE_DATA`` or ``<repo>/data``), then :data:`SYSTEM_FASHION_MNIST`, where
    Debian's ``dataset-fashion-mnist`` installs it (offline); with ``download=True`` and
    neither present, torchvision downloads it into the first. Every file is validated (magic
    number, length, labels in 0..9, intact gzip): a missing or corrupt file raises
    :class:`DatasetUnavailable` naming the folder, the file and what to do.

    Pixels are scaled to [0, 1], then standardised with the full training split's statistics
    as ``standardize`` says: ``"channel"`` (one mean and std), ``"feature"`` (per pixel, as Cohen et al.
    2021) or ``"none"`` (pixels / 255, as Wu, Ma & E 2018 and Jacot et al. 2018).
    ``n_train``/``n_test`` take subsets under ``seed``, class-balanced unless
    ``balanced=False`` (then uniformly at random)."""
    return _idx_dataset(
        _fashion_source(root),
        download=download,
        classes=FASHION_MNIST_CLASSES,
        name="fashion_mnist",
        n_train=n_train,
        n_test=n_test,
        balanced=balanced,
        standardize=standardize,
        flatten=flatten,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def mnist(
    root: str | Path | None = None,
    *,
    download: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    balanced: bool = True,
    standardize: str = "channel",
    flatten: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """MNIST (LeCun et al. 1998) from ``<root>/MNIST/raw/`` (torchvision's layout; the four IDX
    files, plain or gzipped): (n, 1, 28, 28), or (n, 784) with ``flatten``. Downloaded by
    torchvision only when ``download=True``. Files are validated as in :func:`fashion_mnist`,
    and ``standardize``, ``n_train``, ``n_test``, ``balanced`` and ``seed`` mean the same."""
    root = default_data_root() if root is None else Path(root).expanduser()
    folder = root / "MNIST" / "raw"
    return _idx_dataset(
        ("MNIST", [folder], folder, "MNIST", "mnist", ""),
        download=download,
        classes=None,
        name="mnist",
        n_train=n_train,
        n_test=n_test,
        balanced=balanced,
        standardize=standardize,
        flatten=flatten,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def cifar10(
    root: str | Path | None = None,
    *,
    download: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    balanced: bool = True,
    standardize: str = "channel",
    flatten: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """CIFAR-10 via ``torchvision.datasets.CIFAR10`` from ``<root>/cifar-10-batches-py/``:
    (n, 3, 32, 32) pixels scaled to [0, 1], then standardised with training statistics (per
    channel by default; ``standardize`` as in :func:`fashion_mnist`). ``n_train``/``n_test``
    take subsets under ``seed`` (e.g. the 5,000 examples of Cohen et al. 2021). Downloads only
    when ``download=True``."""
    import torchvision.datasets

    _check_standardize(standardize)
    root = default_data_root() if root is None else Path(root).expanduser()
    splits = []
    for train in (True, False):
        try:
            splits.append(
                torchvision.datasets.CIFAR10(root=str(root), train=train, download=download)
            )
        except (RuntimeError, OSError) as err:
            what = (
                f"downloading CIFAR-10 into {root} failed ({' '.join(str(err).split())[:300]})"
                if download
                else f"CIFAR-10 was not found (or is corrupted) under {root}"
            )
            raise DatasetUnavailable(
                f"{what}. Put data_batch_1 ... data_batch_5, test_batch and batches.meta, "
                "extracted from cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html), "
                f"into {root / 'cifar-10-batches-py'}{os.sep}, or call "
                "gradcourse.data.cifar10(download=True) on a machine that is online."
            ) from err
    images = tuple(np.asarray(s.data, dtype=np.uint8).transpose(0, 3, 1, 2) for s in splits)
    labels = tuple(np.asarray(s.targets) for s in splits)
    ds = _image_dataset(
        images,  # type: ignore[arg-type]
        labels,  # type: ignore[arg-type]
        name="cifar10",
        num_classes=len(splits[0].classes),
        classes=tuple(splits[0].classes),
        n_train=n_train,
        n_test=n_test,
        balanced=balanced,
        standardize=standardize,
        flatten=flatten,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    return replace(ds, source=str(root / "cifar-10-batches-py"))


# ----------------------------------------------------------------------------------------------
# Block images (after Shah, Jain & Netrapalli 2021's BlockMNIST)


def null_patch(size: int = 28, side: int = 12, width: int = 2) -> Tensor:
    """The "null" block: a (size, size) image holding the outline of a centred square of
    ``side`` pixels, ``width`` pixels thick, at intensity 1 on 0. The same in every image of
    both classes, so it carries no information about the label."""
    _check_int("size", size, 4)
    _check_int("side", side, 2, size)
    _check_int("width", width, 1, side // 2)
    img = torch.zeros(size, size)
    lo = (size - side) // 2
    hi = lo + side
    img[lo:hi, lo:hi] = 1.0
    img[lo + width : hi - width, lo + width : hi - width] = 0.0
    return img


def block_images(
    images: Tensor, labels: Tensor, *, seed: int = 0, patch: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Stack each (1, H, W) image with a null block (:func:`null_patch`, or ``patch``) into a
    (1, 2H, W) image, the image on top for exactly half of the examples of every class (at
    random, from ``seed``) and below for the rest: BlockMNIST's design (Shah, Jain & Netrapalli
    2021, arXiv 2102.12781, section 4), where only the image's block can tell the classes apart
    and its position cannot. Returns the stacked images and ``top`` (bool, (n,)): whether the
    image is the upper block. Pixels as given (use unstandardised [0, 1] images, so that the
    patch's 1 is the images' white)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (n, 1, H, W), got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    _check_int("seed", seed, 0)
    h, w = images.shape[-2:]
    patch = null_patch(h) if patch is None else torch.as_tensor(patch)
    if patch.shape != (h, w):
        raise ValueError(f"patch must have shape ({h}, {w}), got {tuple(patch.shape)}")
    gen = torch.Generator().manual_seed(seed)
    top = torch.zeros(len(images), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        top[idx[: (len(idx) + 1) // 2]] = True
    null = patch.to(images).expand(len(images), 1, h, w)
    upper = torch.where(top.view(-1, 1, 1, 1).to(images.device), images, null)
    lower = torch.where(top.view(-1, 1, 1, 1).to(images.device), null, images)
    return torch.cat([upper, lower], dim=2), top


def block_mask(top: Tensor, height: int = 28, width: int = 28) -> Tensor:
    """(n, 1, 2 height, width) bool: True on the block that holds the image (the signal)."""
    _check_int("height", height, 1)
    _check_int("width", width, 1)
    top = torch.as_tensor(top, dtype=torch.bool).flatten()
    upper = top.view(-1, 1, 1, 1).expand(len(top), 1, height, width)
    return torch.cat([upper, ~upper], dim=2)
