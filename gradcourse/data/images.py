"""Image datasets: Fashion-MNIST and MNIST from validated IDX files (the Debian package's copy of
Fashion-MNIST first, offline), CIFAR-10 through torchvision from files on disk. torchvision
downloads only when asked (``download=True``).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import Dataset, DatasetUnavailable, default_data_root
from .idx import _check_standardize, _idx_dataset, _image_dataset, _load_idx

# ----------------------------------------------------------------------------------------------
# Fashion-MNIST, MNIST and CIFAR-10.

#: Where Debian's package ``dataset-fashion-mnist`` puts the four gzipped IDX files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


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
