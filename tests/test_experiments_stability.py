"""The experiment functions of notebook 02 at toy scale: shapes, determinism, caching, claims'
ingredients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcourse import models, stability
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
    assert len(first["matvecs"]) == 3 and (first["matvecs"] >= 1).all()


def test_sharpness_run_records_divergence(tmp_path):
    out = sx.sharpness_run(lr=50.0, n=32, widths=(8,), steps=50, every=10, cache=Cache(tmp_path))
    assert out["diverged_at"] >= 0


def _jacobian_rows(model, x):
    """Per-example gradients of the scalar output, one autograd call per example (reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(model(x[i : i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_relu_measures_match_the_explicit_gauss_newton_matrix():
    x, _, _, _ = sx.teacher_regression(12, 1, 4, seed=3)
    model = models.two_layer_relu(4, 6, seed=3, dtype=torch.float64)
    j = _jacobian_rows(model, x)
    eig = torch.linalg.eigvalsh(j.T @ j / len(x))  # G = 1/n sum_i J_i^T J_i, P x P
    m = sx._measures(model, x)
    assert m["lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-10)
    assert m["trace"] == pytest.approx(float(eig.sum()), rel=1e-10)
    assert m["frobenius"] == pytest.approx(float(eig.norm()), rel=1e-8)
    w1, b1 = model.layers[0].weight, model.layers[0].bias
    a = model.layers[1].weight.reshape(-1)
    with torch.no_grad():
        by_hand = sum(
            abs(float(a[k])) * float(torch.cat([w1[k], b1[k : k + 1]]).norm()) for k in range(6)
        )
    assert sx._path_norm(model) == pytest.approx(by_hand, rel=1e-12)


def test_relu_sweep_sgd_sits_below_gd(tmp_path):
    r = sx.relu_sweep(lrs=[0.2], batch_sizes=[2], n=16, width=16, steps=400, cache=Cache(tmp_path))
    assert list(r["batch_size"]) == [16, 2] and not r["diverged"].any()
    gd, sgd = 0, 1
    assert r["train_loss"][gd] < 1e-3 and r["train_loss"][sgd] < 1e-3  # both at a minimum
    assert r["lambda_max"][gd] <= 2 / 0.2 * 1.05  # GD's minimum is GD-stable
    assert r["trace"][sgd] < r["trace"][gd] and r["lambda_max"][sgd] < r["lambda_max"][gd]
    np.testing.assert_array_equal(r["converged"], r["train_loss"] <= 1e-5)
    # for GD, A = (I - lr G)^2: its top eigenvalue is max(1, (1 - lr lambda_max)^2), the 1 from
    # G's null space (P > n)
    expected = max(1.0, (1 - 0.2 * r["lambda_max"][gd]) ** 2)
    assert r["wme_lambda"][gd] == pytest.approx(expected, rel=1e-6)
    # the exact mean-square rates: GD's rows carry SGD's rate at GD's minimum, one per B
    assert r["ms_rate_sgd"].shape == (2, 1) and np.isnan(r["ms_rate_sgd"][sgd]).all()
    assert np.isfinite(r["ms_rate"]).all() and np.isfinite(r["ms_rate_sgd"][gd]).all()


def test_endpoint_rates_match_gds_closed_form_and_grow_with_the_noise():
    from gradcourse import stability, train

    x, y, _, _ = sx.teacher_regression(12, 1, 5, seed=3)
    model = models.two_layer_relu(5, 8, seed=3, dtype=torch.float64)
    train.train(model, x, y, lr=0.05, steps=1500, progress=False, log_every=100)
    lr = 0.3
    gd, b4, b1 = sx._rates(model, x, y, lr, [12, 4, 1])
    # for B = n the map is (I - lr H) (x) (I - lr H) on the span of the gradients: its spectral
    # radius is max_i (1 - lr lambda_i)^2 over the nonzero Gauss-Newton eigenvalues
    eig = stability.gauss_newton_spectrum(model, x)
    eig = eig[eig > 1e-10 * eig.max()]
    assert gd == pytest.approx(float(((1 - lr * eig) ** 2).max()), rel=1e-8)
    assert gd <= b4 <= b1  # SGD's noise only adds to the second moment


def test_linear_stability_thresholds_and_second_moments(tmp_path):
    r = sx.linear_stability(
        batch_size=2, factors=[0.5, 3.0], n=8, width=8, train_steps=300, sim_steps=10,
        num_runs=2_000, cache=Cache(tmp_path),
    )  # fmt: skip
    # eta* (Wu-Ma-E, sufficient) <= the exact mean-square threshold <= GD's 2 / lambda_max
    assert r["lr_star"] <= r["lr_ms"] * (1 + 1e-6) and r["lr_ms"] <= r["lr_gd"] * (1 + 1e-6)
    assert r["rank"] == 8  # the span of the 8 per-example gradients
    assert r["lambda_max_a"][0] <= 1 + 1e-6 < r["lambda_max_a"][1]
    # the rate decides the long run: below 1 the exact second moment decays, above 1 it grows
    assert (r["rate"][0] < 1) == (r["exact"][0, -1] < 1)
    assert r["exact"][:, 0].tolist() == [1.0, 1.0]
    # the sampled mean estimates the exact second moment at the stable factor (2,000 runs)
    rel = abs(r["mc_mean"][0, -1] - r["exact"][0, -1]) / r["exact"][0, -1]
    assert rel < 0.1
    assert r["mc_median"].shape == r["exact"].shape
    # the matrices and the start it returns reproduce its exact second moments
    hs, start = torch.as_tensor(r["hessians"]), torch.as_tensor(r["start"])
    assert hs.shape == (8, 8, 8) and start.shape == (8,)
    s = torch.outer(start, start)
    step = stability.second_moment_map(hs, 3.0 * r["lr_star"], 2)
    for _ in range(10):
        s = step(s)
    assert float(s.trace()) == pytest.approx(r["exact"][1, -1], rel=1e-9)


def test_gradient_basis_spans_every_per_example_gradient():
    x, _, _, _ = sx.teacher_regression(6, 1, 3, seed=0)
    model = models.two_layer_relu(3, 5, seed=0, dtype=torch.float64)
    basis = sx._gradient_basis(model, x)
    assert basis.shape[1] == 6
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=torch.float64))
    j = _jacobian_rows(model, x)
    torch.testing.assert_close(basis @ (basis.T @ j.T), j.T)  # each g_i lies in the span


def test_torch_default_init_matches_pytorch_and_leaves_the_global_rng_alone():
    model = models.MLP(400, (300,), 10, seed=0)
    state = torch.random.get_rng_state()
    sx.torch_default_init_(model, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    first = model.layers[0]
    bound = 1 / 400**0.5
    weight, bias = first.weight.detach(), first.bias.detach()
    assert float(weight.abs().max()) <= bound and float(bias.abs().max()) <= bound
    # U(-b, b): std b / sqrt(3), like nn.Linear's own reset_parameters
    reference = torch.nn.Linear(400, 300)
    assert float(weight.std()) == pytest.approx(float(reference.weight.detach().std()), rel=0.02)
    again = sx.torch_default_init_(models.MLP(400, (300,), 10, seed=9), seed=3)
    assert torch.equal(again.layers[0].weight, first.weight)


def test_converged_sharpness_matches_the_dense_hessian(tmp_path):
    from gradcourse import curvature, train

    # a tolerance it cannot reach: the run stops at max_steps and says it did not converge
    kw = dict(lr=0.005, n=20, widths=(4,), loss_tol=1e-9, max_steps=200)
    r = sx.converged_sharpness(cache=Cache(tmp_path), **kw)
    assert r["steps"] == 200 and not r["converged"] and r["final_loss"] > 1e-9
    # the same run by hand: PyTorch's default initialisation, GD, dense float64 Hessians
    (x, y), _ = sx.load_classification("fashion_mnist", 20, standardize="none")
    model = sx.torch_default_init_(models.MLP(784, (4,), 10, activation="relu", seed=0), 0)
    top0 = torch.linalg.eigvalsh(curvature.exact_hessian(model.double(), "mse", (x.double(), y)))
    assert r["sharpness_init"] == pytest.approx(float(top0[-1]), rel=1e-3)
    model = sx.torch_default_init_(models.MLP(784, (4,), 10, activation="relu", seed=0), 0)
    hist = train.train(model, x, y, loss="mse", lr=0.005, steps=200, progress=False)
    assert r["final_loss"] == pytest.approx(hist.loss[-1], rel=1e-5)
    top = torch.linalg.eigvalsh(curvature.exact_hessian(model.double(), "mse", (x.double(), y)))
    assert r["sharpness"] == pytest.approx(float(top[-1]), rel=1e-3)  # float32 run, Lanczos


def test_signed_sparse_regression_and_random_diagonal_init(tmp_path):
    x, y, _, _ = sx.sparse_regression(200, 1, 30, 6, seed=3, signed=True)
    beta = torch.linalg.lstsq(x, y).solution.flatten()
    support = beta.abs() > 0.5
    assert int(support.sum()) == 6 and {round(v) for v in beta[support].tolist()} == {-1, 1}
    r = sx.diagonal_sweep(lrs=[0.05], batch_sizes=[4], n=10, dim=12, steps=300, init="random",
                          init_scale=0.5, signed=True, cache=Cache(tmp_path))  # fmt: skip
    assert not r["diverged"].any()
    assert np.all(r["trace"] >= r["weighted_l1"] - 1e-12)  # AM-GM, equality only when |u| = |v|
    assert np.any(r["trace"] > r["weighted_l1"] * 1.01)


def test_diagonal_measures_match_the_explicit_gauss_newton_trace():
    x, _, _, _ = sx.sparse_regression(10, 1, 12, 3, seed=2)
    model = models.DiagonalLinear(12, init="random", init_scale=0.7, seed=4, dtype=torch.float64)
    j = _jacobian_rows(model, x)
    u, v = model.u.detach(), model.v.detach()
    m = sx._diagonal_measures(model, x)
    assert m["trace"] == pytest.approx(float((j**2).sum() / len(x)), rel=1e-12)
    assert m["l1"] == pytest.approx(float((u * v).abs().sum()), rel=1e-12)
    assert m["trace"] > m["weighted_l1"] * 1.05  # AM-GM, strict when |u| != |v|


def test_diagonal_sweep_keeps_u_equal_v_so_the_bound_is_tight(tmp_path):
    r = sx.diagonal_sweep(
        lrs=[0.05], batch_sizes=[1], n=10, dim=12, steps=300, cache=Cache(tmp_path)
    )
    assert list(r["batch_size"]) == [10, 1] and not r["diverged"].any()
    # from u = v, GD and SGD update u and v identically, so AM-GM holds with equality
    np.testing.assert_allclose(r["trace"], r["weighted_l1"], rtol=1e-12)
    np.testing.assert_array_equal(r["converged"], r["train_loss"] <= 1e-6)


def test_sharpness_run_tracks_the_last_quarter_densely(tmp_path):
    kw = dict(lr=0.2, n=32, widths=(8,), steps=40, every=5, cache=Cache(tmp_path))
    sparse = sx.sharpness_run(every_early=15, **kw)
    assert list(sparse["sharp_step"]) == [0, 15, 30, 35, 40]  # tail: steps >= 0.75 * 40
    dense = sx.sharpness_run(**kw)
    assert len(dense["sharp_step"]) == 9 and sparse["matvecs"].sum() < dense["matvecs"].sum()
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


def test_profiles_use_fashion_mnist_with_rates_below_the_initial_sharpness_edge():
    """Every profile's edge-of-stability rates start below 2/eta (Fashion-MNIST's fc-tanh starts
    near 25, so 2/eta must exceed that: eta < 0.08), and its catapult rate above it."""
    for profile in ("ci", "cpu", "gpu"):
        cfg = notebook_config(profile)
        assert cfg["eos"]["dataset"] == "fashion_mnist" and cfg["eos"]["init"] == "torch"
        assert all(2 / lr > 30 for lr in cfg["eos_lrs"]) and 2 / cfg["catapult"]["lr"] < 25


def test_sharpness_run_reports_divergence_near_overflow(tmp_path):
    # At lr 0.8 the loss grows by ~100x a step and reaches ~1e35 (still finite in float32) near
    # step 25, a measurement step, where the Hessian products overflow. What must hold on every
    # CPU (the exact step of overflow depends on rounding, so it is not pinned): divergence is
    # reported within a few steps of the first overflow, every loss before it is finite, and the
    # sharpness recorded at the last measurement before it is NaN, not a crash or a number.
    kw = dict(dataset="mnist1d", n=128, widths=(32, 32), steps=200, every=25, every_early=None)
    r = sx.sharpness_run(lr=0.8, optimizer="sgd", batch_size=16, cache=Cache(tmp_path), **kw)
    step, loss = r["diverged_at"], r["loss"]
    assert step > 0 and len(loss) == step and np.isfinite(loss).all()
    assert loss[-1] > 1e30  # it was heading to overflow, not stopped early for another reason
    first_overflow = int(np.argmax(loss > 1e30))
    assert step - first_overflow <= 5
    last = r["sharp_step"][-1]
    assert step - 5 <= last <= step and np.isnan(r["sharpness"][-1])
    assert np.isfinite(r["sharpness"][:-1]).all()  # measured normally before the blow-up


def test_sweep_runs_gd_then_sgd_at_every_lr_and_keeps_the_named_columns(tmp_path):
    """The helper both sweeps share: GD (B = n) first, then each SGD batch size, every lr in
    each; ``measure`` sees each run's (lr, B, diverged); only ``columns`` come back, in their
    order; the cache is keyed by the experiment's settings too."""
    calls = []

    def measure(model, x, y, lr, batch_size, diverged):
        calls.append((lr, batch_size, diverged))
        return {"mark": 10 * lr + batch_size}

    def sweep(settings):
        return sx._sweep(
            "sweep-test", settings,
            lambda: sx.sparse_regression(6, 3, 4, 2, seed=0),
            lambda: models.DiagonalLinear(4, seed=0, dtype=torch.float64),
            measure, ("batch_size", "lr", "mark", "steps", "diverged", "converged"),
            lrs=[0.01, 100.0], batch_sizes=[2], steps=20, loss_tol=1e-6, seed=0,
            cache=Cache(tmp_path),
        )  # fmt: skip

    r = sweep({"size": 6})
    assert list(r) == ["batch_size", "lr", "mark", "steps", "diverged", "converged"]
    assert r["batch_size"].tolist() == [6, 6, 2, 2] and r["lr"].tolist() == [0.01, 100.0] * 2
    assert calls == list(zip(r["lr"], r["batch_size"], r["diverged"], strict=True))
    assert r["mark"].tolist() == [6.1, 1006.0, 2.1, 1002.0]
    assert r["diverged"].tolist() == [False, True, False, True]  # lr = 100 blows up
    assert not r["converged"].any() and (r["steps"] <= 20).all()
    sweep({"size": 6})
    assert len(calls) == 4  # cached
    sweep({"size": 7})
    assert len(calls) == 8  # other settings, another entry


def _table(rows):
    """A sweep table from (seed, lr, batch_size, converged, trace, lambda_max, value) rows."""
    cols = ("seed", "lr", "batch_size", "converged", "trace", "lambda_max", "weighted_l1")
    return {c: np.asarray([r[i] for r in rows]) for i, c in enumerate(cols)}


def test_over_seeds_concatenates_and_labels_every_row():
    calls = []

    def sweep(seed, scale):
        calls.append(seed)
        return {"lr": np.array([0.1, 0.2]), "trace": np.array([seed * scale, seed + scale])}

    out = sx.over_seeds(sweep, (3, 5), scale=2.0)
    assert calls == [3, 5]
    np.testing.assert_array_equal(out["seed"], [3, 3, 5, 5])
    np.testing.assert_array_equal(out["trace"], [6.0, 5.0, 10.0, 7.0])
    with pytest.raises(ValueError, match="seeds"):
        sx.over_seeds(sweep, ())


def test_paired_log_ratios_pair_sgd_with_gd_at_the_same_seed_and_lr():
    n = 8
    table = _table([
        (0, 0.1, n, True, 10.0, 4.0, 0), (0, 0.1, 2, True, 5.0, 2.0, 0),   # a pair
        (0, 0.2, n, True, 8.0, 4.0, 0), (0, 0.2, 2, False, 1.0, 1.0, 0),   # SGD did not converge
        (1, 0.1, n, False, 9.0, 3.0, 0), (1, 0.1, 2, True, 3.0, 1.0, 0),   # GD did not converge
        (1, 0.2, n, True, 6.0, 3.0, 0), (1, 0.2, 4, True, 3.0, 6.0, 0),    # B = 4: not asked
        (1, 0.2, 2, True, 12.0, 6.0, 0),                                   # a pair above GD
    ])  # fmt: skip
    out = sx.paired_log_ratios(table, "lambda_max", [2], n)
    np.testing.assert_allclose(out["log_ratio"], [np.log(0.5), np.log(2.0)])
    np.testing.assert_array_equal(out["seed"], [0, 1])
    np.testing.assert_array_equal(out["lr"], [0.1, 0.2])


def test_convergence_prediction_judges_gds_minimum_by_sgds_trace_bound():
    from gradcourse import stability

    n = 8
    table = _table([
        (0, 0.1, n, True, 10.0, 4.0, 0),
        (0, 0.1, 1, False, np.nan, np.nan, 0),  # bound 2/0.1 = 20 > 10: predicted to converge
        (0, 0.1, 4, True, 1.0, 1.0, 0),
        (0, 1.0, n, True, 10.0, 1.5, 0),
        (0, 1.0, 1, False, np.nan, np.nan, 0),  # bound 2 < 10: predicted not to
        (1, 0.1, n, False, 1.0, 1.0, 0),        # GD did not converge: left out
        (1, 0.1, 1, True, 1.0, 1.0, 0),
    ])  # fmt: skip
    out = sx.convergence_prediction(table, n)
    np.testing.assert_array_equal(out["batch_size"], [1, 4, 1])
    np.testing.assert_array_equal(out["predicted"], [True, True, False])
    np.testing.assert_array_equal(out["observed"], [False, True, False])
    bounds = [stability.trace_bound(0.1, 1, n), stability.trace_bound(0.1, 4, n), 2.0]
    np.testing.assert_allclose(out["slack"], np.array(bounds) / 10.0)


def test_relative_drops_per_seed():
    table = _table([
        (0, 0.1, 1, True, 0, 0, 10.0), (0, 0.2, 1, True, 0, 0, 8.0), (0, 0.4, 1, True, 0, 0, 5.0),
        (1, 0.1, 1, True, 0, 0, 4.0), (1, 0.4, 1, True, 0, 0, 5.0), (1, 0.2, 1, False, 0, 0, 1.0),
        (1, 0.1, 9, True, 0, 0, 1.0),
    ])  # fmt: skip
    out = sx.relative_drops(table, "weighted_l1", 1)
    np.testing.assert_allclose(out["drop"], [0.5, -0.25])
    assert out["spearman"][0] == pytest.approx(-1.0) and np.isnan(out["spearman"][1])
    np.testing.assert_array_equal(out["runs"], [3, 2])
