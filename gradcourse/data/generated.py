"""Data generated or bundled offline: Gaussian mixtures (Sagun et al. 2017), scikit-learn's
digits, and MNIST-1D (Greydanus 2020; generated with the ``mnist1d`` package and cached as
``.npz``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..checks import check_int as _check_int
from ..checks import check_positive as _check_positive
from ..paths import write_atomic
from .core import Dataset, _standardize, _to_dataset, default_data_root

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
