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
        (dict(score_seeds=()), "at least one seed"),
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


def test_curve_key():
    assert dd.curve_key("el2n", 5) == "el2n@5"
    assert dd.curve_key("random", 5) == "random"
    assert dd.curve_key("el2n", 3, 0.2) == "el2n@3+skip0.2"
    assert dd.curve_key("el2n", 3, mode="easiest") == "el2n@3 easiest"
    assert dd.curve_key("random", mode="easiest") == "random"


def test_difference_and_top_k_precision():
    diff, se = dd.difference(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0, 0.0]))
    assert diff == pytest.approx(2.0)
    assert se == pytest.approx(math.sqrt(2.0 / 2))  # var([1, 3]) = 2, over n = 2
    assert dd.difference(torch.tensor([1.0]), torch.tensor([0.5])) == (0.5, 0.0)
    flipped = torch.tensor([True, False, True, False, False])
    perfect = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert dd.top_k_precision(perfect, flipped) == 1.0
    assert dd.top_k_precision(-perfect, flipped) == 0.0
    assert dd.top_k_precision(perfect, flipped, k=4) == 0.5
    with pytest.raises(ValueError, match="same length"):
        dd.top_k_precision(perfect[:3], flipped)
