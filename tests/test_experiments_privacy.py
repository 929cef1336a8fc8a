"""Fast tests of notebook 05's experiment functions (gradcourse.experiments.privacy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcourse import privacy as pv
from gradcourse.cache import Cache
from gradcourse.experiments import privacy as px

TINY = dict(n_train=200, n_test=100, widths=(8,), epochs=2, batch_size=50, lr=0.5, records=2)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(colour="red"), "unknown configuration keys"),
        (dict(arch="vit"), "arch must be one of"),
        (dict(n_train=70_000), "n_train must be an int"),
        (dict(batch_size=300, n_train=200), "batch_size must be an int"),
        (dict(delta=0.0), "delta must be a finite number > 0"),
        (dict(feedback_ratio=0.5), r"feedback_ratio \(C2 / C1\) must be"),
        (dict(lr=math.nan), "lr must be a finite number > 0"),
        (dict(feedback_scale="batch"), "feedback_scale must be one of"),
        (dict(noise_factor=0.0), "noise_factor must be a finite number > 0"),
        (dict(schedule="linear"), "schedule must be one of"),
    ],
)
def test_config_refuses_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        px.config(**overrides)


def _dp_train_mean(y, method, clip, steps, lr=0.5, scale="mean"):
    """The same full-batch run through gc.privacy.dp_train (per-example machinery, torch)."""
    model = nn.Linear(1, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    model.weight.requires_grad_(False)
    out = pv.dp_train(
        model, torch.zeros(len(y), 1, dtype=torch.float64), y.reshape(-1, 1), method=method,
        loss="mse", lr=lr, steps=steps, batch_size=len(y), clip_norm=clip, sampling="shuffle",
        feedback_scale=scale,
        callback=lambda step, m: {"theta": m.bias.item()},
    )  # fmt: skip
    return np.array([r["theta"] for r in out])


def test_mean_trajectories_match_dp_train_and_reach_their_closed_forms():
    y = px.mean_data()
    mean = float(y.mean())
    for c in (0.1, 1.0, 3.0):
        dp = px.mean_trajectories(y, "dpsgd", c, lr=0.5, steps=1500)[0]
        dice = px.mean_trajectories(y, "dice", c, lr=0.5, steps=1500)[0]
        assert len(dp) == 1501 and dp[0] == 0.0
        assert dp[-1] == pytest.approx(pv.clipped_mean(y, c), abs=1e-6)
        assert dice[-1] == pytest.approx(mean, abs=1e-6)
        for method, fast in (("dpsgd", dp), ("dice", dice)):
            slow = _dp_train_mean(y, method, c, 60)
            np.testing.assert_allclose(fast[:61], slow, rtol=0, atol=1e-12)
        # the error clipped on the summed update (C2 / n on the mean): the same as dp_train's
        fast = px.mean_trajectories(y, "dice", c, lr=0.5, steps=60, feedback_scale="sum")[0]
        slow = _dp_train_mean(y, "dice", c, 60, scale="sum")
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    # the heavy examples pull the mean far from where clipping stops
    assert abs(mean - pv.clipped_mean(y, 1.0)) > 0.5
    with pytest.raises(ValueError, match="method must be 'dpsgd' or 'dice'"):
        px.mean_trajectories(y, "sgd", 1.0, lr=0.5, steps=2)


def test_mean_trajectories_noise_by_hand():
    y = np.array([0.0, 1.0, 5.0])
    out = px.mean_trajectories(y, "dice", 0.5, lr=0.3, steps=4, noise_multiplier=2.0, seeds=(7, 8))
    for row, seed in zip(out, (7, 8), strict=True):
        z = np.random.default_rng(seed).standard_normal(4) * 2.0 * 0.5 / 3
        theta, e, expected = 0.0, 0.0, [0.0]
        for t in range(4):
            g = theta - y
            v = np.clip(g, -0.5, 0.5).mean() + max(-0.5, min(0.5, e))
            e = e + g.mean() - v
            theta = theta - 0.3 * (v + z[t])
            expected.append(theta)
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-14)
    assert not np.array_equal(out[0], out[1])


def test_sigma_for_uses_the_accountant_and_the_dice_rescaling():
    cfg = px.config(**TINY)
    q, steps = px.sample_rate(cfg), px.steps_for(cfg)
    assert q == 0.25 and steps == 2 * 4
    dp = px.sigma_for(cfg, "dpsgd", 0.5, 3.0)
    assert pv.epsilon(dp, q, steps, cfg["delta"]) <= 3.0
    assert pv.epsilon(dp * 0.95, q, steps, cfg["delta"]) > 3.0  # the smallest such sigma
    assert px.sigma_for(cfg, "dice", 0.5, 3.0) == pytest.approx(dp * math.sqrt(3.0))
    assert px.sigma_for(cfg, "sgd", 0.5, 3.0) == 0.0
    louder = px.config(**TINY, noise_factor=math.sqrt(3.0))
    assert px.sigma_for(louder, "dpsgd", 0.5, 3.0) == pytest.approx(dp * math.sqrt(3.0))
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        px.sigma_for(cfg, "dpsgd", 0.5, -1.0)


@pytest.mark.parametrize("arch", ["mlp", "tanh_cnn"])
def test_fashion_run_records_and_caches(tmp_path, arch):
    cfg = px.config(**TINY, arch=arch)
    cache = Cache(tmp_path)
    r = px.cached_run(cfg, "dice", 0.1, 3.0, 0, cache=cache)
    assert r["steps"] == 8 and list(r["step"]) == [0, 4, 8]
    assert r["curve"][-1] == r["accuracy"] and 0.0 <= r["accuracy"] <= 1.0
    assert np.all((0 <= r["clipped"]) & (r["clipped"] <= 1))
    assert r["sigma"] == pytest.approx(px.sigma_for(cfg, "dice", 0.1, 3.0))
    again = px.cached_run(cfg, "dice", 0.1, 3.0, 0, cache=cache)
    assert again["accuracy"] == r["accuracy"]
    # SGD ignores clip and epsilon: one cache entry for all of them
    s = px.cached_run(cfg, "sgd", 0.1, 3.0, 0, cache=cache)
    assert s["sigma"] == 0.0
    assert px.cached_run(cfg, "sgd", 5.0, 1.0, 0, cache=cache)["accuracy"] == s["accuracy"]


def test_the_clipped_share_counts_norms_above_the_threshold():
    cfg = px.config(**TINY)
    tiny = px.fashion_run(cfg, "dpsgd", 1e-6, 3.0, 0)
    huge = px.fashion_run(cfg, "dpsgd", 1e6, 3.0, 0)
    assert np.all(tiny["clipped"] == 1.0) and np.all(huge["clipped"] == 0.0)
    # the clipped gradients' mean length, as a fraction of the threshold: all at C, or far below
    assert np.all(tiny["length"] == 1.0) and np.all(huge["length"] < 1e-4)
    mid = px.fashion_run(cfg, "dpsgd", 0.05, 3.0, 0)
    assert np.all(mid["length"] >= mid["clipped"]) and np.all(mid["length"] <= 1.0)


def test_tanh_cnn_shapes():
    net = px.make_model(px.config(arch="tanh_cnn"), seed=0)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # conv 16x1x8x8+16, conv 32x16x4x4+32, dense 512x32+32, dense 32x10+10, by hand
    assert sum(p.numel() for p in net.parameters()) == 1040 + 8224 + 16416 + 330


def test_mirror_is_symmetric_and_removes_the_bias():
    y = px.mean_data()
    m = px.mirror(y)
    assert len(m) == 2 * len(y) and float(m.mean()) == pytest.approx(float(y.mean()), abs=1e-12)
    np.testing.assert_allclose(np.sort(m - m.mean()), -np.sort(m - m.mean())[::-1], atol=1e-12)
    for c in (0.1, 0.3, 1.0, 3.0):
        assert abs(pv.clipped_mean(y, c) - float(y.mean())) > 0.3  # biased on the data
        assert pv.clipped_mean(m, c) == pytest.approx(float(m.mean()), abs=1e-9)  # not mirrored
    with pytest.raises(ValueError, match="finite"):
        px.mirror([1.0, math.nan])


def test_largest_biased_clip_against_a_dense_scan():
    y = px.mean_data()
    mean, level = float(y.mean()), 0.1 * float(y.std())
    c = px.largest_biased_clip(y, level)
    largest = float((y - mean).abs().max())
    assert 3.0 < c < largest
    assert abs(pv.clipped_mean(y, c) - mean) >= level
    # by brute force: above c the gap stays below the level
    for t in np.linspace(c * (1 + 1e-6), largest, 400):
        assert abs(pv.clipped_mean(y, t) - mean) < level
    assert abs(pv.clipped_mean(y, c * (1 + 1e-6)) - mean) == pytest.approx(level, rel=1e-4)
    # a level the gap never reaches, and a symmetric sample: no biased threshold
    assert px.largest_biased_clip(y, 100.0) == 0.0
    assert px.largest_biased_clip(px.mirror(y), level) == 0.0


def test_farther_end_is_the_equivalence_statistic():
    from gradcourse.stats import Interval

    assert px.farther_end(Interval(0.0, -0.2, 0.1, 0.95, 5)) == 0.2
    assert px.farther_end(Interval(0.5, 0.3, 0.7, 0.95, 5)) == 0.7
    assert px.farther_end(Interval(-0.5, -0.7, -0.3, 0.95, 5)) == 0.7


def test_parameter_noise_is_the_same_at_the_same_lr_times_clip():
    assert px.parameter_noise(2.0, 0.7, 1.0, 256) == pytest.approx(2.0 * 0.7 / 256)
    assert px.parameter_noise(20.0, 0.7, 0.1, 256) == pytest.approx(
        px.parameter_noise(2.0, 0.7, 1.0, 256)
    )
    with pytest.raises(ValueError, match="lr must be"):
        px.parameter_noise(0.0, 0.7, 1.0, 256)


def test_parameter_noise_matches_dp_train():
    """One DP-SGD step with zero gradients (a zero-weight linear model on zero inputs and a
    frozen bias): the parameter moves by the noise alone; its spread is lr sigma C1 / b."""
    torch.manual_seed(0)
    model = nn.Linear(200, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
    x, y = torch.zeros(64, 200, dtype=torch.float64), torch.zeros(64, 1, dtype=torch.float64)
    pv.dp_train(
        model, x, y, method="dpsgd", loss="mse", lr=3.0, steps=1, batch_size=16, clip_norm=0.5,
        noise_multiplier=2.0, seed=4,
    )  # fmt: skip
    spread = float(model.weight.detach().std())
    assert spread == pytest.approx(px.parameter_noise(3.0, 2.0, 0.5, 16), rel=0.15)


def test_cached_runs_match_cached_run(tmp_path):
    cfg = px.config(**TINY)
    cache = Cache(tmp_path)
    jobs = {("dpsgd", s): (cfg, "dpsgd", 0.5, 3.0, s) for s in (0, 1)}
    out = px.cached_runs(jobs, cache=cache, progress=False)
    assert list(out) == list(jobs)
    for (_, s), r in out.items():
        again = px.cached_run(cfg, "dpsgd", 0.5, 3.0, s, cache=cache)
        assert again["accuracy"] == r["accuracy"]


def test_mean_trajectories_and_config_refuse_what_would_break_them():
    with pytest.raises(ValueError, match="at least one value"):
        px.mean_trajectories(np.array([]), "dpsgd", 1.0, lr=0.1, steps=3)
    with pytest.raises(ValueError, match=r"y\[2\] is nan"):
        px.mean_trajectories(np.array([0.0, 1.0, np.nan]), "dice", 1.0, lr=0.1, steps=3)
    with pytest.raises(ValueError, match="theta0 must be a finite number"):
        px.mean_trajectories(np.array([0.0, 1.0]), "dice", 1.0, lr=0.1, steps=3, theta0=np.inf)
    with pytest.raises(ValueError, match="widths must be a sequence of ints"):
        px.config(widths=128)


def test_runs_are_deterministic_and_workers_give_the_same_bits(tmp_path):
    """Seeded, single-threaded runs: the same job twice in this process, and in two worker
    processes, gives identical numbers (not merely close ones)."""
    cfg = px.config(**TINY)
    jobs = {m: (cfg, m, 0.5, 3.0, s) for m, s in (("dpsgd", 0), ("dice", 1))}
    here = px.cached_runs(jobs, progress=False)
    again = px.cached_runs(jobs, progress=False)
    cache = Cache(tmp_path)
    pooled = px.cached_runs(jobs, cache=cache, progress=False, workers=2)
    assert list(pooled) == list(jobs)
    for key in jobs:
        for field in ("curve", "clipped", "length"):
            np.testing.assert_array_equal(here[key][field], again[key][field])
            np.testing.assert_array_equal(here[key][field], pooled[key][field])
        # stored by this process, read back unchanged
        stored = px.cached_run(*jobs[key], cache=cache)
        np.testing.assert_array_equal(stored["curve"], here[key]["curve"])
    with pytest.raises(ValueError, match="workers must be an int"):
        px.cached_runs(jobs, progress=False, workers=0)
