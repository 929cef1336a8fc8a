"""Fast tests of notebook 06's experiment functions (gradcourse.experiments.attribution)."""

from __future__ import annotations

import pytest
import torch

from gradcourse import attribution as at
from gradcourse import data as D
from gradcourse.cache import Cache
from gradcourse.experiments import attribution as ax

TINY = dict(n_train=120, n_test=40, epochs=1, batch_size=40, pgd_steps=2, widths=(16,))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(colour="red"), "unknown configuration keys"),
        (dict(classes=(3, 3)), "two different classes"),
        (dict(arch="vit"), "arch must be one of"),
        (dict(eps=2.0), r"eps must be a number in \[0, 1\]"),
        (dict(n_train=50_000), "n_train must be an int"),
    ],
)
def test_config_refuses_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ax.config(**overrides)


def test_load_blocks_two_classes_in_two_blocks():
    ds, top_tr, top_te = ax.load_blocks(ax.config(**TINY, classes=(7, 2)))
    assert ds.x_train.shape == (120, 1, 56, 28) and ds.x_test.shape == (40, 1, 56, 28)
    assert set(ds.y_train.tolist()) == {0, 1} and ds.classes == ("Sneaker", "Pullover")
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    null = D.null_patch(28)
    for i in range(5):  # the block that is not the signal is the null patch
        other = ds.x_train[i, 0, 28:] if top_tr[i] else ds.x_train[i, 0, :28]
        assert torch.equal(other, null)
    for c in (0, 1):  # half of each class on top (the odd class rounds up)
        n = int((ds.y_train == c).sum())
        assert int(top_tr[ds.y_train == c].sum()) == (n + 1) // 2


@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
def test_cached_model_trains_caches_and_measures(tmp_path, arch):
    cfg = ax.config(**TINY, arch=arch, eps=0.1)
    cache = Cache(tmp_path)
    model, rec = ax.cached_model(cfg, 0, cache=cache)
    assert 0.0 <= rec["accuracy"] <= 1.0 and 0.0 <= rec["robust_accuracy"] <= 1.0
    again, rec2 = ax.cached_model(cfg, 0, cache=cache)
    ds, _, top = ax.load_blocks(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ds.x_test), again(ds.x_test))
    assert rec2["accuracy"] == rec["accuracy"]
    methods = ax.METHODS if arch == "small_cnn" else ("gradient", "smoothgrad")
    for method in methods:
        mass = ax.attribution_mass(model, ds.x_test, ds.y_test, top, method, samples=2)
        assert mass.shape == (40,)
        finite = mass[~mass.isnan()]  # Grad-CAM: nan where the ReLU leaves an all-zero map
        assert len(finite) > 0 and ((finite >= 0) & (finite <= 1)).all()
        if method != "gradcam":
            assert len(finite) == 40
    # the input-gradient share by hand: |gradient| summed over the signal block / over all
    g = at.input_gradients(model, ds.x_test[:3], ds.y_test[:3]).abs()
    by_hand = [
        float((g[i, 0, :28] if top[i] else g[i, 0, 28:]).sum() / g[i].sum()) for i in range(3)
    ]
    got = ax.attribution_mass(model, ds.x_test[:3], ds.y_test[:3], top[:3], "gradient")
    assert got.tolist() == pytest.approx(by_hand)
    if arch == "mlp":
        with pytest.raises(ValueError, match="needs a convolutional layer"):
            ax.attribution_mass(model, ds.x_test, ds.y_test, top, "gradcam")


def test_standard_and_robust_training_differ():
    std = ax.train_model(ax.config(**TINY), 0)
    rob = ax.train_model(ax.config(**TINY, eps=0.1), 0)
    assert std["attack_eps"] == 0.1 and rob["attack_eps"] == 0.1
    diff = [not torch.equal(std["state"][k], rob["state"][k]) for k in std["state"]]
    assert any(diff)


def test_load_blocks_reads_mnist_when_asked(tmp_path, monkeypatch, write_fake_mnist):
    """The paper's BlockMNIST: digits 0 and 1 of MNIST (here fake idx files the test writes),
    pixels / 255, stacked with the null block."""
    monkeypatch.setenv("GRADCOURSE_DATA", str(tmp_path))
    arrays = write_fake_mnist(tmp_path, n_train=40, n_test=20)  # labels arange(n) % 10
    small = {**TINY, "n_train": 8, "n_test": 4, "batch_size": 8}  # 4 test images of 0 and 1
    ds, top, _ = ax.load_blocks(ax.config(**small, dataset="mnist"))
    assert ds.name == "block_mnist" and ds.classes == ("0", "1")
    images, labels = arrays["train"]
    keep = [i for i in range(40) if labels[i] in (0, 1)][:8]
    expected = torch.from_numpy(images[keep] / 255.0).float()
    for j in range(8):
        block = ds.x_train[j, 0, :28] if top[j] else ds.x_train[j, 0, 28:]
        torch.testing.assert_close(block, expected[j], rtol=0, atol=1e-6)
    assert ds.y_train.tolist() == [int(labels[i] == 1) for i in keep]
    with pytest.raises(ValueError, match="dataset must be one of"):
        ax.config(dataset="cifar10")
    with pytest.raises(ValueError, match=r"n_test=5, but mnist has only 4 images of classes"):
        ax.load_blocks(ax.config(**{**small, "n_test": 5}, dataset="mnist"))


def test_diffroar_retrains_on_the_kept_pixels(tmp_path, monkeypatch):
    """DiffROAR against its definition: the retrained models' accuracies are those of
    models trained (by the same routine, same seed) on keep_ranked images by hand."""
    cfg = ax.config(**TINY)
    src = ax.config(**TINY, eps=0.1)
    model, _ = ax.cached_model(src, 1, cache=Cache(tmp_path))
    r = ax.diffroar(cfg, model, 0.1, seed=1)
    assert r["diffroar"] == pytest.approx(r["top"] - r["bottom"]) and r["fraction"] == 0.1
    ds, _, _ = ax.load_blocks(cfg)

    def log_odds_gradient(x):  # the label plays no part in the ranking
        return at.input_gradients(model, x, 1) - at.input_gradients(model, x, 0)

    for name, highest in (("top", True), ("bottom", False)):
        keep = {
            split: at.keep_ranked(x, log_odds_gradient(x), 0.1, highest=highest)
            for split, x in (("tr", ds.x_train), ("te", ds.x_test))
        }
        fitted = ax._fit(cfg, 1, keep["tr"], ds.y_train, None)
        with torch.no_grad():
            acc = (fitted(keep["te"]).argmax(1) == ds.y_test).double().mean().item()
        assert r[name] == acc
    cache = Cache(tmp_path / "c2")
    first = ax.cached_diffroar(cfg, src, 0.1, seed=1, cache=Cache(tmp_path))
    assert first == pytest.approx(r)  # the cached model is the one used above
    rand = ax.cached_diffroar(cfg, "random", 0.1, seed=1, cache=cache)
    assert ax.cached_diffroar(cfg, "random", 0.1, seed=1, cache=cache) == rand
    assert len(list(cache.root.rglob("*attr-diffroar*"))) >= 1
    with pytest.raises(ValueError, match="source must be a model or 'random'"):
        ax.diffroar(cfg, "noise", 0.1, seed=0)
    with pytest.raises(ValueError, match="inputs must be one of"):
        ax.diffroar(cfg, model, 0.1, seed=0, inputs="values")


def test_diffroar_mask_control_and_random_streams():
    """inputs="mask": the retrained model sees 1 where a pixel was kept, 0 elsewhere (checked
    by retraining on those masks by hand); the random ranking's training and test draws come
    from one stream per seed, so no seed's test ranking repeats another seed's training one."""
    cfg = ax.config(**TINY)
    ds, _, _ = ax.load_blocks(cfg)
    r = ax.diffroar(cfg, "random", 0.2, seed=3, inputs="mask")
    gen = torch.Generator().manual_seed(3)
    rank_tr = torch.rand(ds.x_train.shape, generator=gen)
    rank_te = torch.rand(ds.x_test.shape, generator=gen)
    masks = [at.keep_ranked(torch.ones_like(ds.x_train), rank_tr, 0.2),
             at.keep_ranked(torch.ones_like(ds.x_test), rank_te, 0.2)]  # fmt: skip
    assert set(masks[0].unique().tolist()) == {0.0, 1.0}
    fitted = ax._fit(cfg, 3, masks[0], ds.y_train, None)
    with torch.no_grad():
        assert r["top"] == (fitted(masks[1]).argmax(1) == ds.y_test).double().mean().item()
    nxt = torch.rand(ds.x_train.shape, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(rank_te, nxt[: len(rank_te)])
