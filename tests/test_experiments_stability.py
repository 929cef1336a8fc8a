"""The experiment functions of notebook 02 at toy scale: shapes, determinism, caching, claims'
ingredients."""

from __future__ import annotations

import numpy as np
import pytest

from gradcourse.cache import Cache
from gradcourse.experiments import stability as sx


def test_spearman_and_validation():
    assert sx.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert sx.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # learning rates repeat across batch sizes: ties must share their mean rank (scipy's rule)
    assert sx.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(3**0.5 / 2)
    with pytest.raises(ValueError, match="same length"):
        sx.spearman([1, 2], [1, 2, 3])


def test_data_is_seeded():
    a = sx.teacher_regression(8, 4, 3, seed=1)
    b = sx.teacher_regression(8, 4, 3, seed=1)
    for s, t in zip(a, b, strict=True):
        assert (s == t).all()
    x, y, _, _ = sx.sparse_regression(10, 5, 6, 2, seed=0)
    assert x.shape == (10, 6) and y.shape == (10, 1)


def test_sharpness_run_is_cached_and_deterministic(tmp_path):
    cache = Cache(tmp_path)
    kw = dict(lr=0.2, n=32, widths=(8,), steps=20, every=10, cache=cache)
    first = sx.sharpness_run(**kw)
    second = sx.sharpness_run(**kw)
    np.testing.assert_array_equal(first["sharpness"], second["sharpness"])
    fresh = sx.sharpness_run(**{**kw, "cache": Cache(enabled=False)})
    np.testing.assert_array_equal(first["sharpness"], fresh["sharpness"])
    assert list(first["sharp_step"]) == [0, 10, 20] and first["diverged_at"] == -1
    assert 0 < first["track_time"] < first["wall_time"]


def test_sharpness_run_records_divergence(tmp_path):
    out = sx.sharpness_run(lr=50.0, n=32, widths=(8,), steps=50, every=10, cache=Cache(tmp_path))
    assert out["diverged_at"] >= 0


def test_relu_sweep_sgd_sits_below_gd(tmp_path):
    r = sx.relu_sweep(lrs=[0.2], batch_sizes=[2], n=16, width=16, steps=400, cache=Cache(tmp_path))
    assert list(r["batch_size"]) == [16, 2]
    assert np.all(r["trace"] >= r["lambda_max"])
    assert np.all(r["frobenius"] <= r["trace"] + 1e-9)


def test_linear_stability_one_step_growth_is_lambda_max(tmp_path):
    r = sx.linear_stability(
        batch_size=2,
        factors=[0.5, 1.5],
        n=8,
        width=8,
        train_steps=300,
        sim_steps=10,
        num_runs=64,
        cache=Cache(tmp_path),
    )
    assert r["lambda_max_a"][0] <= 1 + 1e-6 < r["lambda_max_a"][1]
    assert r["lr_star"] <= r["lr_gd"] * (1 + 1e-2)
    np.testing.assert_allclose(r["one_step"], r["lambda_max_a"], rtol=0.3)


def test_diagonal_sweep_trace_bounds_weighted_l1(tmp_path):
    r = sx.diagonal_sweep(
        lrs=[0.05], batch_sizes=[1], n=10, dim=12, steps=300, cache=Cache(tmp_path)
    )
    assert np.all(r["trace"] >= r["weighted_l1"] - 1e-12)
