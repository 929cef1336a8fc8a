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


def test_sharpness_run_tracks_the_last_quarter_densely(tmp_path):
    kw = dict(lr=0.2, n=32, widths=(8,), steps=40, every=5, cache=Cache(tmp_path))
    sparse = sx.sharpness_run(every_early=15, **kw)
    assert list(sparse["sharp_step"]) == [0, 15, 30, 35, 40]  # tail: steps >= 0.75 * 40
    dense = sx.sharpness_run(**kw)
    assert sparse["track_time"] < dense["track_time"]
    np.testing.assert_allclose(  # the same trajectory, measured where both measure
        sparse["sharpness"][-3:], dense["sharpness"][-3:], rtol=1e-4
    )
    with pytest.raises(ValueError, match="every_early"):
        sx.sharpness_run(every_early=7, **kw)


def test_eos_dataset_falls_back_to_mnist1d_without_cifar(monkeypatch):
    def missing(**kwargs):
        raise sx.gdata.DatasetUnavailable("CIFAR-10 is not on disk.\nPut the files there.")

    monkeypatch.setattr(sx.gdata, "cifar10", missing)
    dataset, note = sx.eos_dataset("cifar10")
    assert dataset == "mnist1d" and "CIFAR-10 unavailable (CIFAR-10 is not on disk.)" in note
    monkeypatch.setattr(sx.gdata, "cifar10", lambda **kwargs: None)
    assert sx.eos_dataset("cifar10")[0] == "cifar10"
    assert sx.eos_dataset("mnist1d")[0] == "mnist1d"
    with pytest.raises(ValueError, match="dataset"):
        sx.eos_dataset("imagenet")


def notebook_config(profile: str) -> dict:
    """The ``cfg = P.pick(...)`` of notebook 02, evaluated for one profile (no CUDA needed)."""
    import ast
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "notebooks" / "02_sgd_stability.ipynb"
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "cfg":
                profiles = {kw.arg: kw.value for kw in node.value.keywords}
                return eval(compile(ast.Expression(profiles[profile]), str(path), "eval"))
    raise AssertionError("no cfg = P.pick(...) in notebook 02")


def test_gpu_profile_picks_learning_rates_for_the_dataset_loaded():
    """At gpu, Cohen et al.'s CIFAR-10 rates when CIFAR-10 is on disk; on the MNIST-1D fallback,
    the cpu profile's MNIST-1D rates rescaled by one factor (the same 2 / (eta lambda_0), for the
    wider net's larger sharpness at initialisation), never Cohen's CIFAR rates."""
    gpu, cpu = notebook_config("gpu"), notebook_config("cpu")
    assert gpu["eos"]["dataset"] == "cifar10" and cpu["eos"]["dataset"] == "mnist1d"
    assert sx.for_dataset(gpu["eos_lrs"], "cifar10") == [0.01, 0.02, 0.04]
    assert sx.for_dataset(gpu["sweep_lrs"], "cifar10") == [0.01, 0.015, 0.02, 0.03, 0.04, 0.06]
    factors = set()
    for key in ("eos_lrs", "sweep_lrs"):
        fallback = np.array(sx.for_dataset(gpu[key], "mnist1d"))
        factors |= set(np.round(fallback / np.array(cpu[key]), 6))
        assert fallback.tolist() != sx.for_dataset(gpu[key], "cifar10")
    assert len(factors) == 1 and 0 < factors.pop() <= 1
    assert sx.for_dataset([0.1, 0.2], "cifar10") == [0.1, 0.2]
    with pytest.raises(ValueError, match="no setting"):
        sx.for_dataset({"cifar10": [0.01]}, "mnist1d")
