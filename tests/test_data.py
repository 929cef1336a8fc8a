"""Tests of gradcourse.data: generators, label noise, subsets, loaders, the MNIST-1D cache and the
torchvision path (on small fake files written in the real on-disk formats). All offline."""

from __future__ import annotations

import os
import random
from urllib.error import URLError

import numpy as np
import pytest
import torch

import gradcourse.data as D


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Every test writes under its own tmp dir, never into the repository's data/."""
    root = tmp_path / "gc_data"
    monkeypatch.setenv("GRADCOURSE_DATA", str(root))
    return root


def assert_dataset(ds, n_train, n_test, input_shape, num_classes, dtype=torch.float32):
    assert ds.x_train.shape == (n_train, *input_shape)
    assert ds.x_test.shape == (n_test, *input_shape)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.x_train.dtype == ds.x_test.dtype == dtype
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.num_classes == num_classes and ds.input_shape == input_shape
    assert ds.n_train == n_train and ds.n_test == n_test
    for y in (ds.y_train, ds.y_test):
        assert y.numel() == 0 or (0 <= int(y.min()) and int(y.max()) < num_classes)


def assert_same(a, b):
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def nearest_mean_accuracy(ds):
    means = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(ds.num_classes)])
    return (torch.cdist(ds.x_test, means).argmin(1) == ds.y_test).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Gaussian mixture and digits


def test_gaussian_mixture_shapes_and_standardisation():
    ds = D.gaussian_mixture(120, 80, num_classes=3, dim=5, seed=1)
    assert_dataset(ds, 120, 80, (5,), 3)
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(ds.x_train.std(0, correction=0), torch.ones(5), atol=1e-5)
    assert not torch.allclose(ds.x_test.mean(0), torch.zeros(5), atol=1e-5)  # train stats only
    assert set(ds.y_train.tolist()) == {0, 1, 2}
    raw = D.gaussian_mixture(120, 80, num_classes=3, dim=5, seed=1, standardize=False)
    assert raw.x_train.abs().max() > 3  # centres spread over (-10, 10)
    assert D.gaussian_mixture(dtype=torch.float64).x_train.dtype == torch.float64


def test_gaussian_mixture_determinism():
    assert_same(D.gaussian_mixture(seed=3), D.gaussian_mixture(seed=3))
    assert not torch.equal(D.gaussian_mixture(seed=3).x_train, D.gaussian_mixture(seed=4).x_train)


def test_gaussian_mixture_spread_sets_separability():
    tight = D.gaussian_mixture(200, 200, num_classes=3, spread=0.5, seed=0)
    loose = D.gaussian_mixture(200, 200, num_classes=3, spread=30.0, seed=0)
    assert nearest_mean_accuracy(tight) > 0.99
    assert nearest_mean_accuracy(loose) < 0.7


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_train=0), "n_train"),
        (dict(spread=0.0), "spread"),
        (dict(num_classes=1), "num_classes"),
        (dict(center_box=(1.0, -1.0)), "center_box"),
        (dict(dim=0), "dim"),
    ],
)
def test_gaussian_mixture_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        D.gaussian_mixture(**kwargs)


def test_digits():
    ds = D.digits()
    assert_dataset(ds, 1500, 297, (64,), 10)
    std = ds.x_train.std(0, correction=0)
    constant = std < 1e-6  # always-blank pixels: centred, not divided by zero
    assert constant.any() and torch.allclose(std[~constant], torch.ones(int((~constant).sum())))
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.isfinite(ds.x_test).all()
    assert_same(D.digits(seed=5), D.digits(seed=5))
    assert not torch.equal(D.digits(seed=5).y_train, D.digits(seed=6).y_train)
    raw = D.digits(n_test=97, standardize=False)
    assert raw.n_train == 1700 and 0 <= raw.x_train.min() and raw.x_train.max() <= 1
    with pytest.raises(ValueError, match="n_test"):
        D.digits(n_test=1797)


# ---------------------------------------------------------------------------------------------
# Label noise, subsets, standardisation


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 0.5, 1.0])
def test_label_noise_flips_exactly(fraction):
    clean = torch.arange(200) % 4
    noisy, flipped = D.label_noise(clean, fraction, 4, seed=0)
    assert int(flipped.sum()) == round(fraction * 200)
    assert torch.equal(flipped, noisy != clean)  # every chosen label changed, no other did
    assert noisy.dtype == clean.dtype and 0 <= int(noisy.min()) and int(noisy.max()) < 4
    assert torch.equal(clean, torch.arange(200) % 4)  # input untouched


def test_label_noise_new_label_uniform_over_other_classes():
    k, n = 4, 40_000
    clean = torch.zeros(n, dtype=torch.int64)
    noisy, flipped = D.label_noise(clean, 0.75, k, seed=1)
    counts = torch.bincount(noisy[flipped], minlength=k).double()
    assert counts[0] == 0
    expected = flipped.sum() / (k - 1)  # each count ~ Binomial(30000, 1/3), sd ~ 82
    assert (counts[1:] - expected).abs().max() < 5 * (expected * (1 - 1 / (k - 1))).sqrt()


def test_label_noise_determinism_and_errors():
    clean = torch.arange(100) % 10
    a, b = D.label_noise(clean, 0.3, 10, seed=2), D.label_noise(clean, 0.3, 10, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], D.label_noise(clean, 0.3, 10, seed=3)[1])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
            D.label_noise(clean, bad, 10)
    with pytest.raises(ValueError, match="num_classes"):
        D.label_noise(clean, 0.1, 1)
    with pytest.raises(ValueError, match="labels"):
        D.label_noise(clean, 0.1, 5)  # labels up to 9


def test_balanced_subset_indices():
    labels = torch.arange(300) % 3
    idx = D.balanced_subset_indices(labels, 30, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [10, 10, 10]
    assert len(set(idx.tolist())) == 30 and torch.equal(idx, idx.sort().values)
    idx = D.balanced_subset_indices(labels, 32, seed=0)
    counts = torch.bincount(labels[idx], minlength=3)
    assert counts.sum() == 32 and sorted(counts.tolist()) == [10, 11, 11]
    assert torch.equal(idx, D.balanced_subset_indices(labels, 32, seed=0))
    assert not torch.equal(idx, D.balanced_subset_indices(labels, 32, seed=1))
    with pytest.raises(ValueError, match=r"n must be an int in"):
        D.balanced_subset_indices(labels, 301)
    scarce = torch.tensor([0] * 50 + [1] * 3)
    with pytest.raises(ValueError, match="class 1"):
        D.balanced_subset_indices(scarce, 10)


def test_dataset_subset_to_targets_and_repr():
    ds = D.gaussian_mixture(100, 20, num_classes=4, seed=0)
    sub = ds.subset(40, seed=0)
    assert sub.n_train == 40 and torch.bincount(sub.y_train).tolist() == [10] * 4
    assert torch.equal(sub.x_test, ds.x_test) and sub.name != ds.name
    assert ds.subset(40, balanced=False, seed=1).n_train == 40
    with pytest.raises(ValueError, match="n_train"):
        ds.subset(101)
    wide = ds.to(dtype=torch.float64)
    assert wide.x_train.dtype == torch.float64 and wide.y_train.dtype == torch.int64
    assert ds.x_train.dtype == torch.float32  # a copy, not in place
    mse = ds.targets("mse")
    assert mse.shape == (100, 4) and torch.equal(mse.argmax(1), ds.y_train)
    assert torch.equal(ds.targets("ce", split="test"), ds.y_test)
    x, y = D.full_batch(ds, "test", device="cpu")
    assert torch.equal(x, ds.x_test) and torch.equal(y, ds.y_test)
    text = repr(ds)
    assert "train=100" in text and "test=20" in text and len(text) < 200
    assert torch.equal(D.one_hot(torch.tensor([1, 0]), 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_standardize_per_channel_and_constant_features():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, 4, generator=gen) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    x_train, x_test, mean, std = D.standardize(x, x[:5], dims=(0, 2, 3))
    assert mean.shape == std.shape == (1, 3, 1, 1)
    assert torch.allclose(x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x_train.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    assert torch.allclose(x_test, x_train[:5])
    flat = torch.full((1000, 2), 3.3)  # constant, but float32 rounding makes its std ~2e-7
    assert D.standardize(flat, flat)[0].abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# Loader


def index_dataset(n=50):
    """A dataset whose single feature is the example's index, so batches reveal the order."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(n) % 2
    return D.Dataset(x, y, x[:7].clone(), y[:7].clone(), num_classes=2, name="index")


def epoch_order(loader):
    return torch.cat([x[:, 0] for x, _ in loader]).long().tolist()


def test_loader_batches_and_coverage():
    ds = index_dataset(50)
    loader = ds.loader(16, seed=0)
    sizes = [len(x) for x, _ in loader]
    assert sizes == [16, 16, 16, 2] and len(loader) == 4
    for _ in range(2):  # every index exactly once, in each epoch
        assert sorted(epoch_order(loader)) == list(range(50))
    for x, y in loader:
        assert torch.equal(y, x[:, 0].long() % 2)  # inputs and labels stay paired
    assert [len(x) for x, _ in ds.loader(16, drop_last=True)] == [16, 16, 16]
    assert epoch_order(ds.loader(16, shuffle=False)) == list(range(50))
    assert epoch_order(ds.loader(4, split="test", shuffle=False)) == list(range(7))
    with pytest.raises(ValueError, match="batch_size"):
        ds.loader(0)
    with pytest.raises(ValueError, match="split"):
        ds.loader(4, split="val")


def test_loader_order_is_deterministic_under_seed():
    ds = index_dataset(50)
    first = epoch_order(ds.loader(8, seed=3))
    assert first == epoch_order(ds.loader(8, seed=3))
    assert first != epoch_order(ds.loader(8, seed=4))
    assert first != list(range(50))
    loader = ds.loader(8, seed=3)
    assert epoch_order(loader) != epoch_order(loader)  # a fresh order each epoch


# ---------------------------------------------------------------------------------------------
# MNIST-1D and its cache


def test_mnist1d_shapes_determinism_and_global_rng(data_dir):
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    ds = D.mnist1d(33, 12, seed=0)  # the mnist1d generator seeds both global generators
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:] and random.getstate() == python_state
    assert_dataset(ds, 33, 12, (40,), 10)
    assert torch.isfinite(ds.x_train).all() and ds.name == "mnist1d"
    assert list(data_dir.glob("*.npz"))  # default root comes from $GRADCOURSE_DATA
    assert_same(ds, D.mnist1d(33, 12, seed=0, root=data_dir / "elsewhere"))
    assert not torch.equal(ds.x_train, D.mnist1d(33, 12, seed=1).x_train)
    assert D.mnist1d(33, 12, seed=0, dtype=torch.float64).x_train.dtype == torch.float64


def test_mnist1d_cache_written_once_and_reused(tmp_path, monkeypatch):
    import mnist1d.data

    first = D.mnist1d(40, 10, seed=0, root=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith(".npz") and "seed0" in files[0]
    stamp = (tmp_path / files[0]).stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the cache was valid")

    monkeypatch.setattr(mnist1d.data, "make_dataset", fail)
    assert_same(first, D.mnist1d(40, 10, seed=0, root=tmp_path))
    assert (tmp_path / files[0]).stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="regenerated"):
        D.mnist1d(40, 10, seed=1, root=tmp_path)  # other arguments: another file


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_mnist1d_corrupt_cache_is_regenerated(tmp_path, damage):
    fresh = D.mnist1d(40, 10, seed=0, root=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        labels = np.zeros(10, dtype=np.int64)
        np.savez(
            path,
            x_train=np.zeros((3, 40)),
            y_train=labels[:3],
            x_test=np.zeros((10, 40)),
            y_test=labels,
        )
    with pytest.warns(UserWarning, match="regenerating"):
        again = D.mnist1d(40, 10, seed=0, root=tmp_path)
    assert_same(fresh, again)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # repaired, no temp files
    with np.load(path, allow_pickle=False) as stored:
        assert stored["x_train"].shape == (40, 40)


def test_mnist1d_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def broken_savez(file, **arrays):
        file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(D.np, "savez", broken_savez)
    with pytest.warns(UserWarning, match="could not cache"):
        ds = D.mnist1d(40, 10, seed=0, root=tmp_path)
    assert ds.n_train == 40
    assert list(tmp_path.iterdir()) == []


def test_mnist1d_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        D.mnist1d(0, 10, root=tmp_path)
    with pytest.raises(ValueError, match="seed"):
        D.mnist1d(10, 10, seed=-1, root=tmp_path)


def test_default_data_root_follows_environment(data_dir):
    assert D.default_data_root() == data_dir


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and MNIST through torchvision, on small fake files in the real formats (writers and
# the md5 fixture in conftest.py)


def test_cifar10_from_fake_files(tmp_path, write_fake_cifar10):
    written = write_fake_cifar10(tmp_path)
    ds = D.cifar10(root=tmp_path)
    assert_dataset(ds, 100, 20, (3, 32, 32), 10)
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.y_train.tolist() == train_labels
    assert ds.y_test.tolist() == written["test_batch"][1]
    assert torch.allclose(ds.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(ds.x_train.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4)
    # pixels / 255, standardised per channel with the training split's statistics
    pixels = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    pixels = pixels.reshape(-1, 3, 32, 32) / 255.0
    mean, std = pixels.mean((0, 2, 3), keepdims=True), pixels.std((0, 2, 3), keepdims=True)
    assert np.allclose(ds.x_train.numpy(), (pixels - mean) / std, atol=1e-5)
    test_pixels = written["test_batch"][0].reshape(-1, 3, 32, 32) / 255.0
    assert np.allclose(ds.x_test.numpy(), (test_pixels - mean) / std, atol=1e-5)

    assert ds.x_train.is_contiguous()  # NHWC pixels come out as ordinary (n, C, H, W) tensors
    ds.x_train.view(len(ds.x_train), -1)
    sub = D.cifar10(root=tmp_path, n_train=50, n_test=10, seed=0)
    assert_dataset(sub, 50, 10, (3, 32, 32), 10)
    assert torch.bincount(sub.y_train).tolist() == [5] * 10
    assert torch.bincount(sub.y_test).tolist() == [1] * 10
    assert_same(sub, D.cifar10(root=tmp_path, n_train=50, n_test=10, seed=0))
    # statistics come from the full training split, so this equals subsetting the full set
    later = ds.subset(50, seed=0)
    assert torch.equal(sub.x_train, later.x_train) and torch.equal(sub.y_train, later.y_train)


def test_mnist_from_fake_files(tmp_path, write_fake_mnist):
    arrays = write_fake_mnist(tmp_path)
    ds = D.mnist(root=tmp_path)
    assert_dataset(ds, 30, 10, (1, 28, 28), 10)
    assert ds.y_train.tolist() == arrays["train"][1].tolist()
    assert ds.y_test.tolist() == arrays["t10k"][1].tolist()
    assert abs(ds.x_train.mean().item()) < 1e-5
    assert abs(ds.x_train.std(correction=0).item() - 1) < 1e-4
    pixels = arrays["train"][0] / 255.0
    expected = (arrays["t10k"][0] / 255.0 - pixels.mean()) / pixels.std()
    assert np.allclose(ds.x_test[:, 0].numpy(), expected, atol=1e-5)
    sub = D.mnist(root=tmp_path, n_train=20, seed=1)
    assert torch.bincount(sub.y_train).tolist() == [2] * 10 and sub.n_test == 10


@pytest.mark.parametrize(
    "loader, folder", [(D.cifar10, "cifar-10-batches-py"), (D.mnist, os.path.join("MNIST", "raw"))]
)
def test_missing_dataset_says_where_to_put_files(tmp_path, loader, folder):
    with pytest.raises(D.DatasetUnavailable) as info:
        loader(root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / folder) in message and "download=True" in message
    assert isinstance(info.value, RuntimeError)


def test_cifar10_message_names_the_files(tmp_path):
    with pytest.raises(D.DatasetUnavailable, match="cifar-10-python.tar.gz"):
        D.cifar10(root=tmp_path)
    with pytest.raises(D.DatasetUnavailable, match="train-images-idx3-ubyte"):
        D.mnist(root=tmp_path)


def test_failed_download_is_chained(tmp_path, monkeypatch):
    import torchvision.datasets.cifar
    import torchvision.datasets.mnist

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(D.DatasetUnavailable, match="downloading CIFAR-10") as info:
        D.cifar10(root=tmp_path, download=True)
    assert isinstance(info.value.__cause__, URLError)
    with pytest.raises(D.DatasetUnavailable, match="downloading MNIST") as info:
        D.mnist(root=tmp_path, download=True)
    assert info.value.__cause__ is not None


def test_null_patch_is_a_square_outline():
    p = D.null_patch(28, side=12, width=2)
    assert p.shape == (28, 28) and set(p.unique().tolist()) == {0.0, 1.0}
    # the outline: 12^2 - 8^2 pixels, centred; its inside and the border of the block are 0
    assert int(p.sum()) == 12 * 12 - 8 * 8
    assert p[8, 8] == 1 and p[14, 14] == 0 and p[0].sum() == 0 and p[:, 0].sum() == 0
    with pytest.raises(ValueError, match="side must be an int"):
        D.null_patch(28, side=40)


def test_block_images_stack_signal_and_null_blocks_balanced_by_class():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(21, 1, 28, 28, generator=g)
    labels = torch.tensor([0] * 11 + [1] * 10)
    x, top = D.block_images(images, labels, seed=3)
    assert x.shape == (21, 1, 56, 28) and top.dtype == torch.bool
    null = D.null_patch(28)
    for i in range(21):
        signal, other = (x[i, 0, :28], x[i, 0, 28:]) if top[i] else (x[i, 0, 28:], x[i, 0, :28])
        assert torch.equal(signal, images[i, 0]) and torch.equal(other, null)
    # exactly half of each class on top (the odd class rounds up), and seeded
    assert int(top[labels == 0].sum()) == 6 and int(top[labels == 1].sum()) == 5
    assert torch.equal(D.block_images(images, labels, seed=3)[1], top)
    assert not torch.equal(D.block_images(images, labels, seed=4)[1], top)
    mask = D.block_mask(top)
    assert mask.shape == x.shape and int(mask[0].sum()) == 28 * 28
    torch.testing.assert_close(x[mask].view(21, 28, 28), images[:, 0])
    with pytest.raises(ValueError, match=r"images must be \(n, 1, H, W\)"):
        D.block_images(images[:, 0], labels)
