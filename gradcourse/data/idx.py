"""MNIST-format image files: the validated IDX reader, and image datasets built from them."""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checks import check_int as _check_int
from .core import Dataset, DatasetUnavailable, balanced_subset_indices

# ----------------------------------------------------------------------------------------------
# Image datasets: Fashion-MNIST and MNIST from validated IDX files, CIFAR-10 through torchvision.
# Files are read from disk; torchvision downloads only when asked (``download=True``).

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
