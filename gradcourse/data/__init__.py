"""Datasets of the course, as tensors in memory, plus label noise and class-balanced subsets.

    ds = gc.data.gaussian_mixture(n_train=100, num_classes=2, seed=0)   # Sagun et al. 2017
    ds = gc.data.mnist1d()                                              # generated offline, cached
    ds = gc.data.digits()                                               # bundled with scikit-learn
    ds = gc.data.fashion_mnist(n_train=1_000)                           # real images, offline
    ds = gc.data.cifar10(n_train=5_000)                                 # torchvision, files on disk
    x, y = gc.data.full_batch(ds, device="cuda")
    src = gc.data.python_source("train")                                # the stdlib's Python, bytes

Every generator returns a :class:`Dataset` (float inputs, int64 labels), standardised with
statistics of its training split only (MNIST-1D keeps its package's own scaling), and is
deterministic under ``seed`` without touching the global random state; the text corpus is a
:class:`Corpus` of byte tokens. Files live under :func:`default_data_root` (``$GRADCOURSE_DATA``
or ``<repo>/data``). By topic:

- :mod:`.core`       :class:`Dataset`, splits, batches, standardisation, subsets, label noise;
- :mod:`.generated`  Gaussian mixtures, scikit-learn's digits, MNIST-1D;
- :mod:`.idx`        the validated IDX reader (MNIST-format files);
- :mod:`.images`     Fashion-MNIST, MNIST, CIFAR-10 (``SYSTEM_FASHION_MNIST`` lives here);
- :mod:`.blocks`     block images (notebook 06);
- :mod:`.text`       the standard library's Python source as byte tokens (notebook 09).

Every public name is importable from here, as ``gradcourse.data.fashion_mnist`` etc.
"""

from __future__ import annotations

import numpy as np  # noqa: F401 (tests patch np.savez through this module, as before the split)

from ..losses import one_hot
from .blocks import block_images, block_mask, null_patch
from .core import (
    SPLITS,
    Dataset,
    DatasetUnavailable,
    balanced_subset_indices,
    default_data_root,
    full_batch,
    label_noise,
    standardize,
)
from .generated import digits, gaussian_mixture, mnist1d
from .idx import IDX_FILES, STANDARDIZE, InvalidIDXFile, read_idx
from .images import (
    FASHION_MNIST_CLASSES,
    SYSTEM_FASHION_MNIST,
    cifar10,
    fashion_mnist,
    fashion_mnist_files,
    mnist,
)
from .text import CORPUS_SPLITS, Corpus, python_source, stdlib_files, token_windows

__all__ = [
    "Corpus",
    "Dataset",
    "DatasetUnavailable",
    "InvalidIDXFile",
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
    "python_source",
    "read_idx",
    "standardize",
    "stdlib_files",
    "token_windows",
    # constants
    "CORPUS_SPLITS",
    "FASHION_MNIST_CLASSES",
    "IDX_FILES",
    "SPLITS",
    "STANDARDIZE",
    "SYSTEM_FASHION_MNIST",
]
