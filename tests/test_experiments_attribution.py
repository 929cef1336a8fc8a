"""Fast tests of notebook 06's experiment functions (gradcourse.experiments.attribution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcourse import attribution as at
from gradcourse import data as D
from gradcourse import stats
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
        (dict(placement="left"), "placement must be one of"),
        (dict(pgd_steps=-1), "pgd_steps must be an int"),
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
            right = fitted(keep["te"]).argmax(1) == ds.y_test
        assert r[name] == right.double().mean().item()
        assert r[f"{name}_correct"].tolist() == right.int().tolist()
    cache = Cache(tmp_path / "c2")
    first = ax.cached_diffroar(cfg, src, 0.1, seed=1, cache=Cache(tmp_path))
    for k, v in r.items():  # the cached model is the one used above
        assert np.asarray(first[k]).tolist() == pytest.approx(np.asarray(v).tolist())
    rand = ax.cached_diffroar(cfg, "random", 0.1, seed=1, cache=cache)
    again = ax.cached_diffroar(cfg, "random", 0.1, seed=1, cache=cache)
    assert again["diffroar"] == rand["diffroar"]
    assert np.array_equal(again["top_correct"], rand["top_correct"])
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


def test_attribution_map_and_share_table_by_hand(tmp_path):
    """attribution_map: |input gradient| / |SmoothGrad| of the one channel, Grad-CAM on the last
    convolution's rectified maps; share_table: attribution_mass's mean per model (nan left out)
    and the all-zero maps counted per class, for every key and method."""
    cfg = ax.config(**TINY, arch="small_cnn")
    cache = Cache(tmp_path)
    ds, _, top = ax.load_blocks(cfg)
    x, y, top = ds.x_test[:12], ds.y_test[:12], top[:12]
    runs = ax.cached_models({s: (cfg, s) for s in (0, 1)}, cache=cache, progress=False)
    models = [m for m, _ in runs.values()]
    assert list(runs) == [0, 1]
    assert runs[1][1]["accuracy"] == ax.cached_model(cfg, 1, cache=cache)[1]["accuracy"]
    net = models[0]
    g = at.input_gradients(net, x, y)
    torch.testing.assert_close(ax.attribution_map(net, x, y, "gradient"), g.abs()[:, 0])
    sg = at.smoothgrad(net, x, y, samples=3, seed=2)
    torch.testing.assert_close(
        ax.attribution_map(net, x, y, "smoothgrad", samples=3, seed=2), sg.abs()[:, 0]
    )
    cam = at.grad_cam(net, x, "convs.1", y, rectify=True)
    torch.testing.assert_close(ax.attribution_map(net, x, y, "gradcam"), cam)
    with pytest.raises(ValueError, match="method must be one of"):
        ax.attribution_map(net, x, y, "lime")
    methods = {"cnn": ("gradient", "gradcam")}
    share, zeros = ax.share_table({"cnn": models}, methods, x, y, top, progress=False)
    assert set(share) == {("cnn", "gradient"), ("cnn", "gradcam")}
    for method in methods["cnn"]:
        assert share["cnn", method].shape == (2, 12)
        for i, model in enumerate(models):
            m = ax.attribution_mass(model, x, y, top, method)
            np.testing.assert_allclose(share["cnn", method][i], m.double().numpy())
            assert zeros["cnn", method][i] == [int(m[y == c].isnan().sum()) for c in (0, 1)]
    assert zeros["cnn", "gradient"] == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="method must be one of"):
        ax.share_table({"cnn": models}, {"cnn": ("lime",)}, x, y, top, progress=False)


def test_cached_diffroars_is_cached_diffroar_per_job(tmp_path):
    cfg = ax.config(**TINY)
    cache = Cache(tmp_path)
    jobs = {
        ("random", 0, "pixels"): (cfg, "random", 0.2, 0, "pixels"),
        ("random", 1, "mask"): (cfg, "random", 0.2, 1, "mask"),
    }
    got = ax.cached_diffroars(jobs, cache=cache, progress=False)
    assert list(got) == list(jobs)
    for key, (c, source, fraction, seed, inputs) in jobs.items():
        want = ax.diffroar(c, source, fraction, seed=seed, inputs=inputs)
        assert got[key]["diffroar"] == want["diffroar"]
        assert np.array_equal(got[key]["bottom_correct"], want["bottom_correct"])


def test_kept_nonzero_by_hand():
    """The share of kept pixels that are not 0, per image set, against a loop over images with
    the ranking written out (the log-odds gradient; a seeded uniform draw for "random")."""
    cfg = ax.config(**TINY)
    ds, _, _ = ax.load_blocks(cfg)
    x = ds.x_test[:6]
    model = ax.make_model(cfg, seed=0)
    rankings = {
        "model": at.input_gradients(model, x, 1) - at.input_gradients(model, x, 0),
        "random": torch.rand(x.shape, generator=torch.Generator().manual_seed(4)),
    }
    for name, rank in rankings.items():
        got = ax.kept_nonzero(model if name == "model" else "random", x, 0.1, seed=4)
        k = round(0.1 * x[0].numel())
        for where in ("top", "bottom"):
            nonzero = 0
            for i in range(len(x)):
                order = torch.sort(-rank[i].abs().flatten(), stable=True).indices
                kept = order[:k] if where == "top" else order[-k:]
                nonzero += int((x[i].flatten()[kept] != 0).sum())
            assert got[where] == pytest.approx(nonzero / (k * len(x)))


def test_placement_top_and_noise_training(tmp_path):
    """placement="top": the same images, the signal always the upper block over the null block;
    pgd_steps=0 at eps > 0 trains on uniform noise in the ball (PGD's random start, no steps):
    different from standard and from PGD training. A default placement keeps the cache key of
    a configuration written before the key existed."""
    rnd, top_rnd, _ = ax.load_blocks(ax.config(**TINY))
    fixed, top_fixed, top_te = ax.load_blocks(ax.config(**TINY, placement="top"))
    assert bool(top_fixed.all()) and bool(top_te.all())
    for i in range(6):
        signal = rnd.x_train[i, 0, :28] if top_rnd[i] else rnd.x_train[i, 0, 28:]
        assert torch.equal(fixed.x_train[i, 0, :28], signal)
        assert torch.equal(fixed.x_train[i, 0, 28:], D.null_patch(28))
    assert torch.equal(fixed.y_train, rnd.y_train)
    states = {
        name: ax.train_model(ax.config(**{**TINY, **kw}), 0)["state"]
        for name, kw in (
            ("standard", {}),
            ("noise", dict(eps=0.1, pgd_steps=0)),
            ("pgd", dict(eps=0.1, pgd_steps=2)),
        )
    }
    for a, b in (("standard", "noise"), ("noise", "pgd")):
        assert any(not torch.equal(states[a][k], states[b][k]) for k in states[a])
    cache = Cache(tmp_path)
    cfg = ax.config(**TINY)
    old_key = {k: v for k, v in cfg.items() if k != "placement"}
    assert cache.path("attr-model", {**old_key, "seed": 0}) == cache.path(
        "attr-model", {**ax._cache_key(cfg), "seed": 0}
    )
    top_cfg = ax.config(**TINY, placement="top")
    assert ax._cache_key(top_cfg)["placement"] == "top"


def test_seeds_and_images_interval_covers_a_redraw_of_both():
    """Against the two-way model v = m + a_seed + b_image + e: the interval holds the mean m in
    at least its level of redraws of seeds and images, where the t-interval over seeds alone,
    blind to the shared test images, falls short; and by hand on one array."""
    rng = np.random.default_rng(0)
    hits_both = hits_seeds = 0
    trials = 400
    for _ in range(trials):
        v = (
            rng.normal(0, 0.15, (5, 1))
            + rng.normal(0, 2.0, (1, 200))
            + rng.normal(0, 0.5, (5, 200))
        )
        iv = ax.seeds_and_images_interval(v)
        hits_both += iv.low <= 0 <= iv.high
        seeds_only = stats.paired_interval(v.mean(1), np.zeros(5))
        hits_seeds += seeds_only.low <= 0 <= seeds_only.high
    assert hits_both / trials >= 0.93
    assert hits_seeds / trials < 0.8
    v = rng.normal(size=(4, 30))
    var = v.mean(1).var(ddof=1) / 4 + v.mean(0).var(ddof=1) / 30
    from scipy.stats import t

    iv = ax.seeds_and_images_interval(v, level=0.9)
    half = t.ppf(0.95, 3) * np.sqrt(var)
    assert (iv.estimate, iv.low, iv.high) == pytest.approx(
        (v.mean(), v.mean() - half, v.mean() + half)
    )
    with pytest.raises(ValueError, match="values must be"):
        ax.seeds_and_images_interval(np.ones(5))
    with pytest.raises(ValueError, match="finite"):
        ax.seeds_and_images_interval(np.full((3, 3), np.nan))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("classes", 1, "classes must be a sequence of ints"),
        ("widths", 128, "widths must be a sequence of ints"),
        ("channels", (8, 0), r"channels\[1\] must be an int >= 1"),
        ("classes", (3, 3), "two different classes"),
    ],
)
def test_config_checks_every_key_when_it_is_made(key, value, message):
    with pytest.raises(ValueError, match=message):
        ax.config(**{key: value})
