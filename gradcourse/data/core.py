"""The course's in-memory :class:`Dataset`, its splits, batches, standardisation, class-balanced
subsets and label noise; where dataset files live (:func:`default_data_root`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data import TensorDataset as _TensorDataset

from ..checks import check_int as _check_int
from ..losses import LossFn, targets_for
from ..paths import data_root

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


def default_data_root() -> Path:
    """Where datasets live: ``$GRADCOURSE_DATA`` if set, else ``<repo>/data`` when writable,
    else ``~/.cache/gradcourse`` (see :mod:`gradcourse.paths`)."""
    return data_root()
