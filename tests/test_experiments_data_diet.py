"""Fast tests of notebook 04's experiment functions (gradcourse.experiments.data_diet)."""

from __future__ import annotations

import math

import pytest
import torch

from gradcourse import scores
from gradcourse.cache import Cache
from gradcourse.experiments import data_diet as dd

TINY = dict(
    dataset="digits",
    n_train=60,
    n_test=40,
    arch="mlp",
    widths=(8,),
    epochs=3,
    batch_size=20,
    lr=0.1,
    score_seeds=(0, 1),
    score_epochs=(0, 2),
)


@pytest.fixture(scope="module")
def tiny_scores():
    return dd.score_experiment(dd.config(**TINY))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(colour="red"), "unknown configuration keys"),
        (dict(dataset="imagenet"), "dataset must be one of"),
        (dict(arch="vit"), "arch must be one of"),
        (dict(noise=1.5), r"noise must be a number in \[0, 1\]"),
        (dict(score_epochs=(3, 1)), "increasing order"),
        (dict(score_epochs=(0, 99)), r"score_epochs\[1\] must be an int in \[0, 40\]"),
        (dict(score_seeds=()), "score_seeds must hold at least one"),
        (dict(batch_size=5000), "batch_size must be an int in"),
    ],
)
def test_config_refuses_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        dd.config(**overrides)


def test_load_data_flips_exactly_the_noise_fraction_of_train_labels_only():
    clean, none_flipped = dd.load_data(dd.config(**TINY))
    noisy, flipped = dd.load_data(dd.config(**{**TINY, "noise": 0.25}))
    assert not none_flipped.any()
    assert int(flipped.sum()) == round(0.25 * 60)
    assert torch.equal(noisy.x_train, clean.x_train)
    assert (noisy.y_train[flipped] != clean.y_train[flipped]).all()
    assert torch.equal(noisy.y_train[~flipped], clean.y_train[~flipped])
    assert torch.equal(noisy.y_test, clean.y_test)  # test labels are never flipped
    assert (clean.n_train, clean.n_test) == (60, 40)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_label_noise_is_drawn_apart_from_subsets_and_batch_orders(seed):
    # the flips once shared torch.Generator(data_seed)'s randperm with the random subset and
    # the batch order of seed data_seed: the random half of seed 0 held every flipped label
    cfg = dd.config(dataset="mnist1d", n_train=4000, n_test=10, noise=0.2, data_seed=seed)
    _, flipped = dd.load_data(cfg)
    n, k = len(flipped), len(flipped) // 2
    result = {"labels": torch.zeros(n, dtype=torch.int64)}
    subset = dd.kept_indices(result, "random", None, 0.5, seed=seed)
    first_batches = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 5]
    # hypergeometric std of the share in a random half: sqrt(0.2 * 0.8 / k * (n - k) / (n - 1))
    std = math.sqrt(0.2 * 0.8 / k * (n - k) / (n - 1))
    for kept in (subset, first_batches):
        share = float(flipped[kept].double().mean())
        assert abs(share - 0.2) < 5 * std * math.sqrt(k / len(kept)), share
    assert dd.noise_seed(seed) != seed and dd.noise_seed(seed) < 2**63
    assert dd.noise_seed(seed) == dd.noise_seed(seed) != dd.noise_seed(seed + 1)


def test_noisy_configurations_have_their_own_cache_key():
    clean, noisy = dd.config(noise=0.0), dd.config(noise=0.2)
    assert "noise_seed" not in dd._key(clean)
    assert dd._key(noisy)["noise_seed"] == dd.noise_seed(0)


def test_make_model_shapes():
    cfg = dd.config(**{**TINY, "arch": "small_cnn", "channels": (4,), "hidden": 8})
    cnn = dd.make_model(cfg, (40,), 10, seed=0)
    assert cnn(torch.zeros(3, 40)).shape == (3, 10)
    mlp = dd.make_model(dd.config(**TINY), (64,), 10, seed=0)
    assert mlp(torch.zeros(3, 64)).shape == (3, 10)


def test_steps_for_is_the_full_data_number_of_steps():
    assert dd.steps_for(dd.config(**TINY)) == 3 * 3
    assert dd.steps_for(dd.config(**{**TINY, "batch_size": 25})) == 3 * 3  # ceil(60 / 25)


def test_score_experiment_shapes_and_init_scores_match_a_fresh_network(tiny_scores):
    r = tiny_scores
    assert r["epochs"].tolist() == [0, 2]
    assert r["el2n"].shape == r["grand"].shape == (2, 2, 60)
    assert r["forgetting"].shape == (2, 60) and (r["forgetting"] >= 0).all()
    assert r["test_accuracy"].shape == (2,)
    assert int(r["steps"]) == 9
    # independent reference: the epoch-0 scores are those of a freshly initialised network
    ds, _ = dd.load_data(dd.config(**TINY))
    for run, seed in enumerate(TINY["score_seeds"]):
        net = dd.make_model(dd.config(**TINY), ds.input_shape, 10, seed=seed)
        el2n = scores.el2n_scores(net, ds.x_train, ds.y_train).double()
        grand = scores.grand_scores(net, ds.x_train, ds.y_train).double()
        torch.testing.assert_close(r["el2n"][0, run], el2n)
        torch.testing.assert_close(r["grand"][0, run], grand)
    torch.testing.assert_close(r["input_norm"], ds.x_train.flatten(1).norm(dim=1).double())
    # EL2N of a softmax error lies in [0, sqrt(2)]
    assert (r["el2n"] >= 0).all() and (r["el2n"] <= math.sqrt(2) + 1e-6).all()


def test_score_experiment_is_deterministic(tiny_scores):
    again = dd.score_experiment(dd.config(**TINY))
    for key in ("el2n", "grand", "forgetting", "test_accuracy"):
        assert torch.equal(again[key], tiny_scores[key])


def test_correctness_record_is_the_record_the_scoring_runs_forgetting_counts(tiny_scores):
    cfg = dd.config(**TINY)
    for r, seed in enumerate(cfg["score_seeds"]):
        record = dd.correctness_record(cfg, seed)
        assert record.dtype == torch.bool and record.shape == (cfg["epochs"], cfg["n_train"])
        assert torch.equal(scores.forgetting_events(record), tiny_scores["forgetting"][r])


def test_method_scores_and_kept_indices(tiny_scores):
    r = tiny_scores
    el2n = dd.method_scores(r, "el2n", 2)
    torch.testing.assert_close(el2n, r["el2n"][1].mean(0))
    assert dd.method_scores(r, "random") is None
    assert dd.method_scores(r, "forgetting").shape == (60,)
    with pytest.raises(ValueError, match=r"epoch must be one of the scored epochs \[0, 2\]"):
        dd.method_scores(r, "grand", 1)
    with pytest.raises(ValueError, match="method must be one of"):
        dd.method_scores(r, "loss")
    kept = dd.kept_indices(r, "el2n", 2, 0.25)
    assert len(kept) == 15
    assert el2n[kept].min() >= torch.sort(el2n, descending=True).values[14]
    window = dd.kept_indices(r, "el2n", 2, 0.25, offset=0.5)
    order = torch.sort(-el2n, stable=True).indices
    assert torch.equal(window, order[30:45].sort().values)
    assert len(dd.kept_indices(r, "random", None, 1.0)) == 60  # the slider's extremes
    assert len(dd.kept_indices(r, "input_norm", None, 0.05)) == 3
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        dd.kept_indices(r, "el2n", 2, 0.0)


def test_kept_indices_easiest_keeps_the_lowest_scores(tiny_scores):
    r = tiny_scores
    el2n = dd.method_scores(r, "el2n", 2)
    easy = dd.kept_indices(r, "el2n", 2, 0.25, mode="easiest")
    assert torch.equal(easy, scores.prune(el2n, 0.25, mode="easiest"))
    assert len(easy) == 15
    assert el2n[easy].max() <= torch.sort(el2n).values[14]
    hard = dd.kept_indices(r, "el2n", 2, 0.75)
    assert sorted(easy.tolist() + hard.tolist()) == list(range(60))  # complements, ties too
    # random ignores the mode: the same subset either way
    assert torch.equal(
        dd.kept_indices(r, "random", None, 0.5, seed=3, mode="easiest"),
        dd.kept_indices(r, "random", None, 0.5, seed=3),
    )
    with pytest.raises(ValueError, match=r"mode must be one of \('hardest', 'easiest'\)"):
        dd.kept_indices(r, "el2n", 2, 0.25, mode="window")
    with pytest.raises(ValueError, match="offset .* is only used with mode='hardest'"):
        dd.kept_indices(r, "el2n", 2, 0.25, offset=0.1, mode="easiest")


def test_prune_curve_shapes_cache_and_lookup(tmp_path):
    cache = Cache(tmp_path)
    cfg = dd.config(**{**TINY, "score_seeds": (0,)})
    curve = dd.prune_curve(cfg, "el2n", 2, (0.5, 1.0), (0, 1), cache=cache)
    assert curve["accuracy"].shape == (2, 2)
    assert ((curve["accuracy"] >= 0) & (curve["accuracy"] <= 1)).all()
    again = dd.prune_curve(cfg, "el2n", 2, (0.5, 1.0), (0, 1), cache=cache)
    assert torch.equal(again["accuracy"], curve["accuracy"])
    # keeping everything, seed s, is the full-data run of seed s: same steps, same batches
    full = dd.score_experiment(cfg)
    assert curve["accuracy"][1, 0].item() == pytest.approx(full["test_accuracy"][0].item())
    curves = {dd.curve_key("el2n", 2): curve}
    assert dd.find_curve(curves, "el2n", 2) is curve
    with pytest.raises(ValueError, match="no pruning curve was computed for grand@0"):
        dd.find_curve(curves, "grand", 0)
    assert torch.equal(dd.accuracy_at(curve, 0.5), curve["accuracy"][0])
    with pytest.raises(ValueError, match="fraction kept 0.3 was not computed"):
        dd.accuracy_at(curve, 0.3)


def test_prune_curve_easiest_is_its_own_cached_curve(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    cfg = dd.config(**{**TINY, "score_seeds": (0,)})
    hard = dd.prune_curve(cfg, "el2n", 2, (0.5,), (0,), cache=cache)
    kept = []
    real = dd.kept_indices
    monkeypatch.setattr(dd, "kept_indices", lambda *a, **k: kept.append(k["mode"]) or real(*a, **k))
    easy = dd.prune_curve(cfg, "el2n", 2, (0.5,), (0,), mode="easiest", cache=cache)
    assert kept == ["easiest"]  # computed, not read from the hardest-first entry
    assert easy["accuracy"].shape == hard["accuracy"].shape == (1, 1)
    again = dd.prune_curve(cfg, "el2n", 2, (0.5,), (0,), mode="easiest", cache=cache)
    assert kept == ["easiest"] and torch.equal(again["accuracy"], easy["accuracy"])
    # the default mode is not in the cache key: the hardest-first curve is found as before
    dd.prune_curve(cfg, "el2n", 2, (0.5,), (0,), mode="hardest", cache=cache)
    assert kept == ["easiest"]
    with pytest.raises(ValueError, match="mode must be one of"):
        dd.prune_curve(cfg, "el2n", 2, (0.5,), (0,), mode="middle")


def test_prune_curve_is_cached_per_fraction(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    cfg = dd.config(**{**TINY, "score_seeds": (0,)})
    both = dd.prune_curve(cfg, "el2n", 2, (0.3, 0.5), (0, 1), cache=cache)
    calls = []
    real = dd.kept_indices
    monkeypatch.setattr(dd, "kept_indices", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    half = dd.prune_curve(cfg, "el2n", 2, (0.5,), (0, 1), cache=cache)
    assert calls == [] and torch.equal(half["accuracy"][0], both["accuracy"][1])
    assert torch.equal(half["class_accuracy"][0], both["class_accuracy"][1])
    more = dd.prune_curve(cfg, "el2n", 2, (0.5, 0.7), (0, 1), cache=cache)
    assert calls == [0.7, 0.7]  # only the new fraction is trained, once per seed
    assert torch.equal(more["accuracy"][0], both["accuracy"][1])


def test_curve_key():
    assert dd.curve_key("el2n", 5) == "el2n@5"
    assert dd.curve_key("random", 5) == "random"
    assert dd.curve_key("el2n", 3, 0.2) == "el2n@3+skip0.2"
    assert dd.curve_key("el2n", 3, mode="easiest") == "el2n@3 easiest"
    assert dd.curve_key("random", mode="easiest") == "random"


def test_top_k_precision():
    flipped = torch.tensor([True, False, True, False, False])
    perfect = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert dd.top_k_precision(perfect, flipped) == 1.0
    assert dd.top_k_precision(-perfect, flipped) == 0.0
    assert dd.top_k_precision(perfect, flipped, k=4) == 0.5
    with pytest.raises(ValueError, match="same length"):
        dd.top_k_precision(perfect[:3], flipped)


def test_top_k_per_run_and_random_top_k():
    flipped = torch.tensor([True, False, True, False, False, False])
    el2n = torch.tensor(
        [[[6.0, 1, 5, 2, 3, 4], [6.0, 5, 1, 2, 3, 4]]], dtype=torch.float64
    )  # (epochs, runs, n): run 0 finds both flipped labels, run 1 one of them
    result = {"epochs": torch.tensor([1]), "el2n": el2n, "flipped": flipped}
    assert dd.top_k_per_run(result, "el2n", 1).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="no flipped label"):
        dd.top_k_per_run({**result, "flipped": torch.zeros(6, dtype=torch.bool)}, "el2n", 1)
    # a random ranking finds the noise rate on average
    many = torch.rand(10_000, generator=torch.Generator().manual_seed(5)) < 0.2
    shares = dd.random_top_k(many, range(20))
    assert shares.shape == (20,)
    assert abs(float(shares.mean()) - float(many.double().mean())) < 0.02
    assert torch.equal(shares, dd.random_top_k(many, range(20)))  # seeded


def test_balanced_kept_indices_keep_each_class_its_share(tiny_scores):
    r = tiny_scores
    labels = r["labels"]
    share = torch.bincount(labels, minlength=10).double() / len(labels)
    for method, epoch in (("el2n", 2), ("random", None)):
        kept = dd.kept_indices(r, method, epoch, 0.5, balanced=True)
        counts = dd.class_counts(r, kept)
        # largest-remainder quotas: each class within one example of half its size
        assert ((counts.double() - 0.5 * torch.bincount(labels, minlength=10)).abs() < 1).all()
        assert int(counts.sum()) == 30 and torch.equal(
            counts, torch.bincount(labels[kept], minlength=10)
        )
    # within a class, the balanced hardest rule keeps that class's highest scores
    s = dd.method_scores(r, "el2n", 2)
    kept = set(dd.kept_indices(r, "el2n", 2, 0.5, balanced=True).tolist())
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten().tolist()
        mine = [i for i in members if i in kept]
        dropped = [i for i in members if i not in kept]
        if mine and dropped:
            assert min(s[mine]) >= max(s[dropped])
    assert share.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="balanced must be True or False"):
        dd.kept_indices(r, "el2n", 2, 0.5, balanced="yes")
    with pytest.raises(ValueError, match="num_classes must exceed"):
        dd.class_counts(r, torch.arange(60), num_classes=3)


def test_prune_curve_balanced_and_class_accuracy(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    cfg = dd.config(**{**TINY, "score_seeds": (0,)})
    seen = []
    real = dd.kept_indices
    monkeypatch.setattr(
        dd, "kept_indices", lambda *a, **k: seen.append(k["balanced"]) or real(*a, **k)
    )
    plain = dd.prune_curve(cfg, "el2n", 2, (0.5,), (0,), cache=cache)
    bal = dd.prune_curve(cfg, "el2n", 2, (0.5,), (0,), balanced=True, cache=cache)
    assert seen == [False, True]  # its own cache entry
    assert bal["class_accuracy"].shape == plain["class_accuracy"].shape == (1, 1, 10)
    # the overall accuracy is the per-class accuracies weighted by the test class counts
    ds, _ = dd.load_data(cfg)
    weights = torch.bincount(ds.y_test, minlength=10).double()
    ca = plain["class_accuracy"][0, 0]
    present = weights > 0
    overall = float((ca[present] * weights[present]).sum() / weights.sum())
    assert overall == pytest.approx(plain["accuracy"][0, 0].item(), abs=1e-6)  # float32 mean
    assert dd.curve_key("el2n", 2, balanced=True) == "el2n@2 balanced"


def test_class_accuracy_against_a_loop():
    cfg = dd.config(**TINY)
    ds, _ = dd.load_data(cfg)
    model = dd.make_model(cfg, ds.input_shape, ds.num_classes, seed=3)
    got = dd.class_accuracy(model, ds)
    with torch.no_grad():
        pred = model(ds.x_test).argmax(1)
    for c in range(10):
        mask = ds.y_test == c
        if mask.any():
            assert got[c].item() == pytest.approx((pred[mask] == c).double().mean().item())
        else:
            assert math.isnan(got[c].item())


def test_torch_init_has_biases_and_breaks_homogeneity():
    cfg = dd.config(**{**TINY, "init": "torch"})
    ds, _ = dd.load_data(cfg)
    net = dd.make_model(cfg, ds.input_shape, ds.num_classes, seed=0)
    plain = dd.make_model(dd.config(**TINY), ds.input_shape, ds.num_classes, seed=0)
    biases = [m.bias for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert all(b.abs().max() > 0 for b in biases)
    assert all(m.bias.abs().max() == 0 for m in plain.modules() if isinstance(m, torch.nn.Linear))
    x = ds.x_train[:5]
    with torch.no_grad():  # f(2x) = 2 f(x) for the zero-bias ReLU net only
        torch.testing.assert_close(plain(2 * x), 2 * plain(x))
        assert not torch.allclose(net(2 * x), 2 * net(x))
    with pytest.raises(ValueError, match="init='torch' is only used with arch='mlp'"):
        dd.config(**{**TINY, "init": "torch", "arch": "small_cnn"})
    with pytest.raises(ValueError, match="init must be one of"):
        dd.config(**{**TINY, "init": "xavier"})


def loop_grand(model, ds, i: int) -> float:
    """||grad_w l_i|| of training example i by one backward pass of its own loss."""
    model.zero_grad()
    x, y = ds.x_train[i : i + 1], ds.y_train[i : i + 1]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()


def test_grand_at_init_matches_a_per_example_loop():
    cfg = dd.config(**{**TINY, "init": "torch"})
    g = dd.grand_at_init(cfg, (0, 4))
    ds, _ = dd.load_data(cfg)
    assert g.shape == (2, 60)
    model = dd.make_model(cfg, ds.input_shape, ds.num_classes, seed=4)
    for i in (0, 17, 59):
        assert g[1, i].item() == pytest.approx(loop_grand(model, ds, i), rel=1e-4)


def test_grand_at_init_bias_std_redraws_the_biases():
    cfg = dd.config(**TINY)
    ds, _ = dd.load_data(cfg)
    plain = dd.grand_at_init(cfg, (2,))
    assert torch.equal(dd.grand_at_init(cfg, (2,), bias_std=0.0), plain)  # zero biases again
    biased = dd.grand_at_init(cfg, (2,), bias_std=3.0)
    assert not torch.allclose(biased, plain)
    # the same net by hand: biases N(0, 9) from a generator seeded by the run's seed
    model = dd.make_model(cfg, ds.input_shape, ds.num_classes, seed=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.bias.copy_(
                    torch.randn(layer.bias.shape, generator=g, dtype=torch.float64) * 3
                )
    for i in (0, 31):
        assert biased[0, i].item() == pytest.approx(loop_grand(model, ds, i), rel=1e-4)
    with pytest.raises(ValueError, match="bias_std must be a finite number >= 0"):
        dd.grand_at_init(cfg, (0,), bias_std=-1.0)


def test_bands_contain_their_estimates_and_shrink_with_n():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, generator=gen)
    b = a + 0.5 * torch.randn(2000, generator=gen)
    band = dd.spearman_band(a, b, num_resamples=200)
    assert band.estimate == pytest.approx(scores.spearman(a, b))
    assert band.low < band.estimate < band.high and band.high - band.low < 0.05
    small = dd.spearman_band(a[:100], b[:100], num_resamples=200)
    assert small.high - small.low > band.high - band.low
    flipped = torch.zeros(2000, dtype=torch.bool)
    flipped[:200] = True
    score = flipped.double() + torch.randn(2000, generator=gen)  # a noisy detector
    top = dd.top_k_band(score, flipped, num_resamples=200)
    assert top.estimate == pytest.approx(dd.top_k_precision(score, flipped))
    assert top.low <= top.estimate <= top.high and 0.1 < top.estimate < 1.0
    with pytest.raises(ValueError, match="same length >= 3"):
        dd.spearman_band(a[:2], b[:2])
    with pytest.raises(ValueError, match=">= 1 flipped"):
        dd.top_k_band(score, torch.zeros(2000, dtype=torch.bool))


def test_prune_curves_are_the_single_curves_by_name(tmp_path):
    cache = Cache(tmp_path)
    cfg = dd.config(**{**TINY, "score_seeds": (0,)})
    specs = {
        "hard": dict(method="el2n", epoch=2, fractions=(0.5,)),
        "easy within": dict(
            method="el2n", epoch=2, fractions=(0.5,), mode="easiest", balanced=True
        ),
        "random": dict(method="random", fractions=(0.5, 1.0)),
    }
    got = dd.prune_curves(cfg, specs, (0, 1), cache=cache, progress=True)
    assert list(got) == list(specs)
    easy = dd.prune_curve(cfg, "el2n", 2, (0.5,), (0, 1), mode="easiest", balanced=True)
    assert torch.equal(got["easy within"]["accuracy"], easy["accuracy"])
    assert got["random"]["accuracy"].shape == (2, 2)
    with pytest.raises(ValueError, match=r"specs\['x'\] needs 'method' and 'fractions'"):
        dd.prune_curves(cfg, {"x": dict(method="el2n", epoch=2)}, (0,))
    with pytest.raises(ValueError, match="may hold"):
        dd.prune_curves(cfg, {"x": dict(method="el2n", fractions=(0.5,), colour=1)}, (0,))


def test_run_scores_average_to_method_scores(tiny_scores):
    r = tiny_scores
    for method, epoch in (("el2n", 2), ("grand", 0), ("forgetting", None)):
        rows = dd.run_scores(r, method, epoch)
        assert rows.shape == (2, 60)
        torch.testing.assert_close(rows.mean(0), dd.method_scores(r, method, epoch))
    assert dd.run_scores(r, "input_norm").shape == (1, 60)
    with pytest.raises(ValueError, match="method must be one of"):
        dd.run_scores(r, "random")
    with pytest.raises(ValueError, match="epoch must be one of the scored epochs"):
        dd.run_scores(r, "el2n", 1)


def test_per_run_and_between_run_spearman_against_loops(tiny_scores):
    r = tiny_scores
    within = dd.per_run_spearman(r, ("el2n", 2), ("grand", 2))
    assert within.shape == (2,)
    for run in range(2):
        expect = scores.spearman(r["el2n"][1, run], r["grand"][1, run])
        assert within[run].item() == pytest.approx(expect)
    norm = dd.per_run_spearman(r, ("grand", 0), ("input_norm", None))  # broadcast to every run
    assert norm[1].item() == pytest.approx(scores.spearman(r["grand"][0, 1], r["input_norm"]))
    between = dd.between_run_spearman(r, "el2n", 2)
    assert between.shape == (1,)
    assert between[0].item() == pytest.approx(scores.spearman(r["el2n"][1, 0], r["el2n"][1, 1]))
    three = {**r, "el2n": torch.randn(2, 3, 60, dtype=torch.float64)}
    assert dd.between_run_spearman(three, "el2n", 0).shape == (3,)  # pairs (0,1), (0,2), (1,2)
    with pytest.raises(ValueError, match=">= 2 scoring runs"):
        dd.between_run_spearman(r, "input_norm")


def test_mean_interval_is_the_t_interval_of_the_mean():
    from scipy.stats import t

    v = torch.tensor([0.90, 0.92, 0.95, 0.91])
    got = dd.mean_interval(v)
    half = t.ppf(0.975, 3) * v.double().std().item() / 2
    assert got.estimate == pytest.approx(v.double().mean().item())
    assert got.low == pytest.approx(got.estimate - half)
    assert got.high == pytest.approx(got.estimate + half)
    assert dd.mean_interval(v, level=0.9).high < got.high


def test_init_spearman_matches_grand_at_init_and_is_cached(tmp_path):
    cfg = dd.config(**TINY)
    ds, _ = dd.load_data(cfg)
    g = dd.grand_at_init(cfg, (0, 3), bias_std=1.0)
    norm = ds.x_train.flatten(1).norm(dim=1)
    expect = [scores.spearman(row, norm) for row in g]
    cache = Cache(tmp_path)
    got = dd.init_spearman(cfg, (0, 3), bias_std=1.0, cache=cache)
    assert got.tolist() == pytest.approx(expect)
    assert torch.equal(dd.init_spearman(cfg, (0, 3), bias_std=1.0, cache=cache), got)
    plain = dd.init_spearman(cfg, (0, 3), cache=cache)  # its own entry: the cfg's own biases
    assert plain.tolist() == pytest.approx(
        [scores.spearman(row, norm) for row in dd.grand_at_init(cfg, (0, 3))]
    )


def test_first_layer_scales():
    cfg = dd.config(**TINY)
    plain = dd.first_layer_scales(cfg, 0)
    assert plain["bias_std"] == 0.0 and plain["preactivation_std"] > 0
    torch_init = dd.first_layer_scales(dd.config(**{**TINY, "init": "torch"}), 0)
    assert torch_init["bias_std"] > 0
    ds, _ = dd.load_data(cfg)
    net = dd.make_model(cfg, ds.input_shape, ds.num_classes, seed=0)
    w = next(m for m in net.modules() if isinstance(m, torch.nn.Linear)).weight
    with torch.no_grad():
        assert plain["preactivation_std"] == pytest.approx(float((ds.x_train @ w.T).std()))
    with pytest.raises(ValueError, match="needs arch='mlp'"):
        dd.first_layer_scales(dd.config(**{**TINY, "arch": "small_cnn"}), 0)


def test_single_run_ranks_by_one_run(tiny_scores):
    r = tiny_scores
    one = dd.single_run(r, 1)
    torch.testing.assert_close(dd.method_scores(one, "el2n", 2), r["el2n"][1, 1])
    torch.testing.assert_close(dd.method_scores(one, "forgetting"), r["forgetting"][1])
    assert torch.equal(one["labels"], r["labels"]) and r["el2n"].shape == (2, 2, 60)
    with pytest.raises(ValueError, match="run must be an int in"):
        dd.single_run(r, 2)


def test_class_shares_and_least_kept_shares(tiny_scores):
    r = tiny_scores
    size = torch.bincount(r["labels"], minlength=10).double()
    full = dd.class_shares(r, torch.arange(60), 1.0)
    assert torch.equal(full[size > 0], torch.ones(int((size > 0).sum()), dtype=torch.float64))
    assert full[size == 0].isnan().all()  # a class absent from the training set
    kept = dd.kept_indices(r, "el2n", 2, 0.3)
    shares = dd.class_shares(r, kept, 0.3)
    assert (shares * 0.3 * size).nansum().item() == pytest.approx(len(kept))
    least = dd.least_kept_shares(r, "el2n", 2, 0.3)
    assert least.shape == (3,)  # the averaged score, then each of the two runs
    assert least[0].item() == pytest.approx(shares[size > 0].min().item())
    own = dd.kept_indices(dd.single_run(r, 1), "el2n", 2, 0.3, mode="easiest")
    easy = dd.least_kept_shares(r, "el2n", 2, 0.3, mode="easiest")
    assert easy[2].item() == pytest.approx(dd.class_shares(r, own, 0.3)[size > 0].min().item())
    rand = dd.random_least_shares(r, 0.3, (0, 5))
    own = dd.kept_indices(r, "random", None, 0.3, seed=5)
    assert rand[1].item() == pytest.approx(dd.class_shares(r, own, 0.3)[size > 0].min().item())
    with pytest.raises(ValueError, match="for random use random_least_shares"):
        dd.least_kept_shares(r, "random", None, 0.3)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("widths", 128, "widths must be a sequence of ints >= 1"),
        ("channels", 3, "channels must be a sequence of ints >= 1"),
        ("widths", (64, 0), r"widths\[1\] must be an int >= 1"),
        ("hidden", 0, "hidden must be an int >= 1"),
        ("lr", -1.0, "lr must be a finite number > 0"),
        ("momentum", 1.0, r"momentum must be a number in \[0, 1\)"),
        ("weight_decay", -1e-4, "weight_decay must be a finite number >= 0"),
    ],
)
def test_config_checks_every_key_when_it_is_made(key, value, message):
    with pytest.raises(ValueError, match=message):
        dd.config(**{key: value})
