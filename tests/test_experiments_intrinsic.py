"""Fast tests of notebook 07's experiment functions (gradcourse.experiments.intrinsic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradcourse import models
from gradcourse.cache import Cache
from gradcourse.experiments import intrinsic as ix
from gradcourse.subspace import SubspaceModel

TINY = dict(n_train=200, n_test=100, epochs=2, batch_size=50, widths=(16,))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(colour="red"), "unknown configuration keys"),
        (dict(arch="vit"), "arch must be one of"),
        (dict(activation="gelu"), "activation must be"),
        (dict(projection="hadamard"), "projection must be one of"),
        (dict(d=0), "d must be an int"),
        (dict(n_train=100_000), "n_train must be an int"),
        (dict(shuffle_pixels=1), "shuffle_pixels must be True or False"),
        (dict(subspace_step=0.0), "subspace_step"),
        (dict(batch_size=20_000), "batch_size must be an int"),
    ],
)
def test_config_refuses_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ix.config(**overrides)


def test_load_shuffles_pixels_by_one_permutation_and_keeps_labels():
    plain = ix.load(ix.config(**TINY))
    shuffled = ix.load(ix.config(**TINY, shuffle_pixels=True))
    a, b = plain.x_train.flatten(1), shuffled.x_train.flatten(1)
    assert not torch.equal(a, b)
    # one permutation for every image: sorting each image's pixels gives the same values
    torch.testing.assert_close(a.sort(1).values, b.sort(1).values, rtol=0, atol=0)
    perm = torch.randperm(784, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b, a[:, perm], rtol=0, atol=0)
    torch.testing.assert_close(shuffled.x_test.flatten(1), plain.x_test.flatten(1)[:, perm])
    assert torch.equal(plain.y_train, shuffled.y_train)


def test_random_labels_replace_training_labels_only():
    plain = ix.load(ix.config(**TINY))
    rand = ix.load(ix.config(**TINY, random_labels=True))
    assert torch.equal(plain.x_train, rand.x_train) and torch.equal(plain.y_test, rand.y_test)
    agree = float((plain.y_train == rand.y_train).float().mean())
    assert agree < 0.3  # about 1 in 10 by chance
    assert set(rand.y_train.tolist()) == set(range(10))


def test_he_normal_draws_the_stated_variance_and_zero_bias():
    net = ix.he_normal_(models.MLP(784, [400], 10, seed=0), seed=3)
    w = net.layers[0].weight.detach()
    assert abs(float(w.var()) / (2 / 784) - 1) < 0.02  # 313,600 draws: s.e. of the ratio 0.0025
    assert float(net.layers[0].bias.detach().abs().max()) == 0.0
    again = ix.he_normal_(models.MLP(784, [400], 10, seed=9), seed=3)
    assert torch.equal(w, again.layers[0].weight)  # the seed decides, not the model's own


@pytest.mark.parametrize("arch", ["fc", "lenet"])
def test_make_model_wraps_a_subspace_and_counts_D(arch):
    cfg = ix.config(**TINY, arch=arch)
    D = ix.num_params(cfg)
    assert D == models.count_params(ix.make_model(cfg, seed=0))
    sub = ix.make_model({**cfg, "d": 30}, seed=0)
    assert isinstance(sub, SubspaceModel) and sub.D == D and sub.d == 30
    assert [p.numel() for p in sub.parameters() if p.requires_grad] == [30]


def test_width_for_params_is_the_closest_count():
    assert ix.width_for_params(805) == 1  # 784 * 1 + 1 + 1 * 10 + 10
    assert ix.width_for_params(1600) == 2
    for d in (900, 3000, 20_000):
        w = ix.width_for_params(d)
        counts = [models.count_params(models.MLP(784, [v], 10)) for v in (w - 1, w, w + 1) if v]
        assert abs(counts[1 if w > 1 else 0] - d) == min(abs(c - d) for c in counts)


def test_crossing_interpolates_in_log_d_and_flags_censoring():
    ds = [100, 200, 400, 800]
    acc = [0.5, 0.6, 0.8, 0.9]
    # 0.7 is half way between 200 and 400 in accuracy: half way in log d is sqrt(200 * 400)
    assert ix.crossing(ds, acc, 0.7) == pytest.approx(math.sqrt(200 * 400))
    assert ix.crossing(ds, acc, 0.8) == pytest.approx(400)
    assert ix.crossing(ds, acc, 0.4) == 100  # censored below: the first grid point
    assert ix.crossing(ds, acc, 0.95) == math.inf
    # the first crossing counts, even if the curve dips again after it
    assert ix.crossing(ds, [0.5, 0.9, 0.6, 0.95], 0.85) < 200
    with pytest.raises(ValueError, match="increasing"):
        ix.crossing([200, 100], [0.5, 0.6], 0.55)


def test_dint_interval_brackets_the_estimate_and_reports_censoring():
    ds = [100, 200, 400, 800]
    rng = np.random.default_rng(0)
    acc = [np.array([0.5, 0.6, 0.8, 0.9])[i] + 0.01 * rng.standard_normal(5) for i in range(4)]
    band, censored = ix.dint_interval(ds, acc, 0.7)
    assert not censored
    assert band.low <= band.estimate <= band.high
    assert 200 < band.low and band.high < 400
    band, censored = ix.dint_interval(ds, acc, 0.99)
    assert censored and band.estimate == pytest.approx(1600)  # one grid step above the grid


def test_ratio_interval_of_a_curve_shifted_by_a_factor():
    ds = [100, 200, 400, 800, 1600]
    base = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    rng = np.random.default_rng(1)
    a = [v + 0.005 * rng.standard_normal(4) for v in base]
    b = [
        v + 0.005 * rng.standard_normal(4) for v in np.r_[base[1:], 0.95]
    ]  # b reaches it 2x sooner
    r = ix.ratio_interval(ds, a, ds, b, 0.75)
    assert r.estimate == pytest.approx(2.0, rel=0.1)
    assert r.low < r.estimate < r.high and 1.5 < r.low and r.high < 2.5
    spread = ix.sweeps_interval(
        [(ds, a, 0.75), (ds, b, 0.75), (ds, a, 0.75)], lambda v: v.max() / v.min()
    )
    assert spread.estimate == pytest.approx(r.estimate)


def test_train_run_learns_caches_and_records(tmp_path):
    cfg = ix.config(**{**TINY, "epochs": 5}, d=50)
    cache = Cache(tmp_path)
    rec = ix.cached_run(cfg, 0, cache=cache)
    assert rec["d"] == 50 and rec["D"] == ix.num_params(cfg) and rec["steps"] == 20
    assert 0.3 < rec["train_accuracy"] <= 1.0 and rec["theta_d_norm"] > 0
    again = ix.cached_run(cfg, 0, cache=cache)
    assert again["accuracy"] == rec["accuracy"] and again["seconds"] == rec["seconds"]
    direct = ix.train_run(ix.config(**{**TINY, "epochs": 10}), 0)
    assert direct["d"] == direct["D"] and direct["theta_d_norm"] == 0.0
    assert direct["train_accuracy"] > 0.5


def test_train_run_is_seeded():
    cfg = ix.config(**TINY, d=20)
    a, b = ix.train_run(cfg, 1), ix.train_run(cfg, 1)
    assert a["accuracy"] == b["accuracy"] and a["train_loss"] == b["train_loss"]
    c = ix.train_run(cfg, 2)
    assert c["train_loss"] != a["train_loss"]


def test_cached_runs_returns_every_job_in_order(tmp_path):
    jobs = {("fc", d): (ix.config(**{**TINY, "epochs": 1}, d=d), 0) for d in (5, 10)}
    out = ix.cached_runs(jobs, cache=Cache(tmp_path), progress=False)
    assert list(out) == list(jobs) and [r["d"] for r in out.values()] == [5, 10]
