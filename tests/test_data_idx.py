"""Fashion-MNIST and MNIST from IDX files: the reader's validation on small files written here
(valid, gzipped, truncated, wrong magic, bad label, broken gzip), the search order, the download
path (torchvision's downloader replaced by one that writes small files), and the real
Fashion-MNIST files when this machine has them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _idx_bytes, _write_fake_idx_folder

import gradcourse.data as D


@pytest.fixture(autouse=True)
def no_system_copy(tmp_path, monkeypatch):
    """Hide the Debian copy unless a test puts one back, so the tests see only their files."""
    monkeypatch.setattr(D.images, "SYSTEM_FASHION_MNIST", tmp_path / "no-system-copy")


def fashion_folder(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


# ---------------------------------------------------------------------------------------------
# The IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    data = _idx_bytes(images)
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    read = D.read_idx(path, ndim=3)
    assert read.dtype == np.uint8 and np.array_equal(read, images)
    assert not read.flags.writeable  # shared by the in-memory cache: nobody may change it


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda b: b[:-7], "truncated"),
        (lambda b: b + b"\x00", "trailing data"),
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic number is 0x00000d03"),  # float, not uint8
        (lambda b: b"\x00\x00\x08\x02" + b[4:], "magic number"),  # rank 2 where 3 is expected
        (lambda b: b"", "fewer than an IDX header"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, corrupt, message):
    path = tmp_path / "images"
    path.write_bytes(corrupt(_idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(D.InvalidIDXFile, match=message):
        D.read_idx(path, ndim=3)


def test_read_idx_rejects_a_broken_gzip_stream(tmp_path):
    packed = gzip.compress(_idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    for name, data in [("cut.gz", packed[: len(packed) // 2]), ("junk.gz", b"not gzip at all")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(D.InvalidIDXFile, match="gzip stream is truncated or corrupt"):
            D.read_idx(tmp_path / name, ndim=3)


def test_read_idx_checks_the_label_range(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(_idx_bytes(np.array([0, 9, 3, 200, 1], np.uint8)))
    with pytest.raises(D.InvalidIDXFile, match="label 200 at index 3 is outside"):
        D.read_idx(path, ndim=1, num_classes=10)
    assert D.read_idx(path, ndim=1).tolist() == [0, 9, 3, 200, 1]  # no range asked, none checked


def test_read_idx_sees_a_rewritten_file(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(_idx_bytes(np.array([1, 2], np.uint8)))
    assert D.read_idx(path, ndim=1).tolist() == [1, 2]
    path.write_bytes(_idx_bytes(np.array([3, 4, 5], np.uint8)))  # new size: a new cache entry
    assert D.read_idx(path, ndim=1).tolist() == [3, 4, 5]


# ---------------------------------------------------------------------------------------------
# fashion_mnist on small files


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_small_files(tmp_path, gz):
    arrays = _write_fake_idx_folder(fashion_folder(tmp_path), n_train=40, n_test=20, gz=gz)
    ds = D.fashion_mnist(root=tmp_path, standardize="none")
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 10
    assert ds.classes == D.FASHION_MNIST_CLASSES and ds.source == str(fashion_folder(tmp_path))
    assert ds.y_train.tolist() == arrays["train"][1].tolist()
    assert np.allclose(ds.x_test[:, 0].numpy(), arrays["t10k"][0] / 255.0, atol=1e-7)


def test_fashion_mnist_standardisations(tmp_path):
    arrays = _write_fake_idx_folder(fashion_folder(tmp_path), n_train=40, n_test=20)
    pixels = arrays["train"][0].reshape(40, -1) / 255.0
    test_pixels = arrays["t10k"][0].reshape(20, -1) / 255.0

    channel = D.fashion_mnist(root=tmp_path, flatten=True, dtype=torch.float64)
    expected = (test_pixels - pixels.mean()) / pixels.std()
    assert channel.x_test.shape == (20, 784)
    assert np.allclose(channel.x_test.numpy(), expected, atol=1e-12)

    feature = D.fashion_mnist(
        root=tmp_path, flatten=True, standardize="feature", dtype=torch.float64
    )
    expected = (test_pixels - pixels.mean(0)) / pixels.std(0)
    assert np.allclose(feature.x_test.numpy(), expected, atol=1e-10)
    assert np.allclose(feature.x_train.numpy().mean(0), 0, atol=1e-10)

    with pytest.raises(ValueError, match="standardize must be one of"):
        D.fashion_mnist(root=tmp_path, standardize="pixel")


def test_fashion_mnist_constant_pixels_are_only_centred(tmp_path):
    folder = fashion_folder(tmp_path)
    folder.mkdir(parents=True)
    images = np.zeros((20, 28, 28), np.uint8)
    images[:, 5:, :] = np.arange(20, dtype=np.uint8)[:, None, None] * 10
    images[:, :5, :] = 7  # the top rows never change
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            _idx_bytes(np.arange(20, dtype=np.uint8) % 10)
        )
    ds = D.fashion_mnist(root=tmp_path, standardize="feature")
    assert torch.isfinite(ds.x_train).all()
    assert torch.equal(ds.x_train[:, 0, :5], torch.zeros(20, 5, 28))


def test_fashion_mnist_subsets(tmp_path):
    _write_fake_idx_folder(fashion_folder(tmp_path), n_train=100, n_test=50)
    full = D.fashion_mnist(root=tmp_path)
    sub = D.fashion_mnist(root=tmp_path, n_train=30, n_test=20, seed=3)
    assert torch.bincount(sub.y_train).tolist() == [3] * 10
    assert torch.bincount(sub.y_test).tolist() == [2] * 10
    later = full.subset(30, seed=3)  # statistics of the full split: the same numbers
    assert torch.equal(sub.x_train, later.x_train) and torch.equal(sub.y_train, later.y_train)
    random = D.fashion_mnist(root=tmp_path, n_train=30, balanced=False, seed=3)
    assert random.n_train == 30 and not torch.equal(random.y_train, sub.y_train)
    with pytest.raises(ValueError, match=r"n_train must be an int in \[1, 100\]"):
        D.fashion_mnist(root=tmp_path, n_train=101)
    on = D.fashion_mnist(root=tmp_path, n_train=10, device="cpu", dtype=torch.float64)
    assert on.x_train.dtype == torch.float64 and on.x_train.device.type == "cpu"


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _write_fake_idx_folder(system, n_train=20, n_test=10, gz=True, seed=1)
    monkeypatch.setattr(D.images, "SYSTEM_FASHION_MNIST", system)
    root = tmp_path / "root"
    assert D.fashion_mnist(root=root).source == str(system)  # nothing under root: Debian's copy
    _write_fake_idx_folder(fashion_folder(root), n_train=30, n_test=10, seed=2)
    assert D.fashion_mnist(root=root).n_train == 30  # the user's copy comes first
    monkeypatch.setenv("GRADCOURSE_DATA", str(root))
    assert D.fashion_mnist().source == str(fashion_folder(root))  # default root: the variable


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train-images-idx3-ubyte", lambda b: b[:-100], "truncated"),
        ("train-labels-idx1-ubyte", lambda b: b"\x00\x00\x08\x09" + b[4:], "magic number"),
        ("t10k-labels-idx1-ubyte", lambda b: b[:-1] + b"\xc8", "label 200"),
        ("t10k-images-idx3-ubyte", lambda b: b"", "fewer than an IDX header"),
    ],
)
def test_bad_file_names_folder_file_and_remedy(tmp_path, name, content, message):
    folder = fashion_folder(tmp_path)
    _write_fake_idx_folder(folder, n_train=20, n_test=10)
    path = folder / name
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(D.DatasetUnavailable) as info:
        D.fashion_mnist(root=tmp_path)
    text = str(info.value)
    assert name in text and str(folder) in text and message in text
    assert f"Delete {folder}" in text and "download=True" in text  # no other copy to fall to
    assert isinstance(info.value.__cause__, D.InvalidIDXFile)


def test_the_remedy_depends_on_whose_folder_holds_the_bad_file(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _write_fake_idx_folder(system, n_train=20, n_test=10, gz=True)
    monkeypatch.setattr(D.images, "SYSTEM_FASHION_MNIST", system)
    user = fashion_folder(tmp_path / "root")
    _write_fake_idx_folder(user, n_train=20, n_test=10)
    (user / "train-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(D.DatasetUnavailable) as info:
        D.fashion_mnist(root=tmp_path / "root")
    assert f"Delete {user}" in str(info.value) and f"the copy in {system}" in str(info.value)
    (user / "train-labels-idx1-ubyte").unlink()  # the user's copy is incomplete: Debian's is used
    bad = system / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(D.DatasetUnavailable, match="apt-get install --reinstall dataset-fashion"):
        D.fashion_mnist(root=tmp_path / "root")


def test_fashion_mnist_files_validates_without_building_tensors(tmp_path):
    _write_fake_idx_folder(fashion_folder(tmp_path), n_train=20, n_test=10)
    assert D.fashion_mnist_files(tmp_path) == fashion_folder(tmp_path)
    (fashion_folder(tmp_path) / "t10k-labels-idx1-ubyte").write_bytes(b"\x00")
    with pytest.raises(D.DatasetUnavailable, match="t10k-labels-idx1-ubyte"):
        D.fashion_mnist_files(tmp_path)


def test_only_floating_dtypes_and_contiguous_tensors(tmp_path):
    _write_fake_idx_folder(fashion_folder(tmp_path), n_train=20, n_test=10)
    for bad in (torch.int64, torch.bool, "float32"):
        with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
            D.fashion_mnist(root=tmp_path, dtype=bad)
    ds = D.fashion_mnist(root=tmp_path)
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()


def test_bad_gzip_and_mismatched_counts(tmp_path):
    folder = fashion_folder(tmp_path)
    _write_fake_idx_folder(folder, n_train=20, n_test=10, gz=True)
    packed = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(packed[:-30])
    with pytest.raises(D.DatasetUnavailable, match="train-images-idx3-ubyte.gz .*gzip"):
        D.fashion_mnist(root=tmp_path)
    _write_fake_idx_folder(folder, n_train=20, n_test=10, gz=True)
    labels = np.zeros(19, np.uint8)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    with pytest.raises(D.DatasetUnavailable, match="20 images but 19 labels"):
        D.fashion_mnist(root=tmp_path)


def test_missing_files_say_where_and_how(tmp_path):
    folder = fashion_folder(tmp_path)
    _write_fake_idx_folder(folder, n_train=20, n_test=10)
    (folder / "t10k-labels-idx1-ubyte").unlink()  # three of four files: not a usable copy
    with pytest.raises(D.DatasetUnavailable) as info:
        D.fashion_mnist(root=tmp_path)
    text = str(info.value)
    assert "t10k-labels-idx1-ubyte" in text and str(folder) in text
    assert str(D.images.SYSTEM_FASHION_MNIST) in text
    assert "sudo apt-get install dataset-fashion-mnist" in text and "download=True" in text


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:
        """torchvision's class, with its download replaced by small files in its layout."""

        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            _write_fake_idx_folder(Path(root) / "FashionMNIST" / "raw", 20, 10, gz=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(D.DatasetUnavailable):
        D.fashion_mnist(root=tmp_path)  # without download=True nothing is fetched
    assert calls == []
    ds = D.fashion_mnist(root=tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and ds.n_train == 20
    D.fashion_mnist(root=tmp_path, download=True)  # the files are there now: no second fetch
    assert len(calls) == 1


def test_failed_download_is_chained(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.mnist

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(D.DatasetUnavailable, match="downloading Fashion-MNIST") as info:
        D.fashion_mnist(root=tmp_path, download=True)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------------------------
# MNIST gets the same validation


def test_mnist_rejects_an_empty_file_and_a_bad_label(tmp_path, write_fake_mnist):
    write_fake_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(D.DatasetUnavailable, match="train-images-idx3-ubyte in .*MNIST"):
        D.mnist(root=tmp_path)
    write_fake_mnist(tmp_path / "again")
    raw = tmp_path / "again" / "MNIST" / "raw"
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels[:-1] + bytes([200]))
    with pytest.raises(D.DatasetUnavailable, match="label 200"):
        D.mnist(root=tmp_path / "again")


# ---------------------------------------------------------------------------------------------
# The real files (Debian's dataset-fashion-mnist), where this machine has them


@pytest.fixture
def real_fashion_mnist(monkeypatch, tmp_path):
    system = Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setattr(D.images, "SYSTEM_FASHION_MNIST", system)  # the real Debian path
    monkeypatch.setenv("GRADCOURSE_DATA", str(tmp_path / "empty"))  # and no copy of the user's
    if not (system / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed here (make data installs it)")
    return D.fashion_mnist(standardize="none")


def test_real_fashion_mnist_shapes_classes_and_statistics(real_fashion_mnist):
    ds = real_fashion_mnist
    assert ds.x_train.shape == (60_000, 1, 28, 28) and ds.x_test.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6_000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1_000] * 10
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    # pixels / 255 over the training split: mean 0.2860, std 0.3530 (the dataset's known values)
    assert ds.x_train.mean().item() == pytest.approx(0.2860, abs=5e-5)
    assert ds.x_train.std().item() == pytest.approx(0.3530, abs=5e-5)
