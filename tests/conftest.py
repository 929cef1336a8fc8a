"""Shared test set-up: keep every test's files out of the repository's data/, build/ and results/, and
writers of small fake dataset files in the real on-disk formats (for the torchvision path)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest


def pytest_configure(config):
    """Under pytest-xdist (`make test-unit` runs `TEST_PROCS` processes) each process computes
    on one thread: two processes of two threads each on a 2-core machine wait at OpenMP's
    barriers for threads that cannot run (measured: 191 s against 134 s on one process)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GRADCOURSE_DATA", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("GRADCOURSE_BUILD", str(tmp_path_factory.mktemp("build")))
    monkeypatch.setenv("GRADCOURSE_RESULTS", str(tmp_path_factory.mktemp("results")))


# ---------------------------------------------------------------------------------------------
# Fake CIFAR-10 and MNIST files


def _write_fake_cifar10(root, per_batch=20, n_test=20):
    """``cifar-10-batches-py/`` as torchvision reads it: pickled dicts with uint8 ``data``
    (n, 3072; channel-major 3x32x32) and ``labels``, plus ``batches.meta`` with label names.
    Returns ``{file name: (data, labels)}``."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels_written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        low = np.array([0, 100, 200]).repeat(1024)  # channel c holds values in [low_c, low_c + 50)
        data = (low + rng.integers(0, 50, size=(n, 3072))).astype(np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(n) % 10)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        labels_written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return labels_written


def _idx_bytes(array):
    """An idx file's bytes as in the MNIST distribution: magic (0, 0, 0x08 = uint8, ndim),
    big-endian int32 sizes, then the raw bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path, array, gz=False):
    data = _idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _write_fake_idx_folder(folder, n_train=30, n_test=10, gz=False, seed=0):
    """The four idx files of an MNIST-format dataset in ``folder`` (gzipped when ``gz``, as
    Debian ships Fashion-MNIST), uint8 images (n, 28, 28) and labels ``arange(n) % 10``.
    Returns ``{"train": (images, labels), "t10k": (images, labels)}``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        arrays[prefix] = (images, labels)
    return arrays


def _write_fake_mnist(root, n_train=30, n_test=10):
    """``MNIST/raw/`` in torchvision's layout: the four idx files (gunzipped)."""
    return _write_fake_idx_folder(root / "MNIST" / "raw", n_train, n_test)


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks the md5 of every CIFAR-10 file against the real archive's, which fake
    files cannot match. Only that checksum is replaced by a check that the file exists; the
    pickle reading, reshaping and layout are torchvision's own code."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


@pytest.fixture
def write_fake_cifar10(skip_cifar_md5):
    """The writer ``write_fake_cifar10(root, per_batch=20, n_test=20)`` of fake CIFAR-10 files
    (five training batches of ``per_batch`` and a test batch), with torchvision's md5 check
    replaced for the test (:func:`skip_cifar_md5`)."""
    return _write_fake_cifar10


@pytest.fixture
def write_fake_idx_folder():
    """The writer ``write_fake_idx_folder(folder, n_train=30, n_test=10, gz=False, seed=0)`` of
    the four idx files of an MNIST-format dataset (MNIST, Fashion-MNIST)."""
    return _write_fake_idx_folder


@pytest.fixture
def write_fake_mnist():
    """The writer ``write_fake_mnist(root, n_train=30, n_test=10)`` of fake MNIST idx files
    (torchvision checks only that they exist)."""
    return _write_fake_mnist
