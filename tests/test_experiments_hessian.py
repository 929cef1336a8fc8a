"""Fast tests of notebook 01's experiment functions (gradcourse.experiments.hessian)."""

from __future__ import annotations

import pytest
import torch
from reference import flat_params, mlp_by_hand

from gradcourse import curvature, models
from gradcourse.cache import Cache
from gradcourse.experiments import hessian as hx


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_count_outliers_finds_planted_outliers(k):
    gen = torch.Generator().manual_seed(k)
    bulk = torch.rand(200, generator=gen, dtype=torch.float64) * 2 - 1  # in [-1, 1]
    outliers = 10 + 10 * torch.rand(k, generator=gen, dtype=torch.float64)  # in [10, 20]
    spectrum = torch.cat([bulk, outliers])[torch.randperm(200 + k, generator=gen)]
    assert hx.count_outliers(spectrum) == k


def test_count_outliers_is_scale_free_and_respects_the_window():
    spectrum = torch.tensor([100.0, 90.0, 80.0, 1.0, 0.9, 0.5, 0.0, -0.3], dtype=torch.float64)
    assert hx.count_outliers(spectrum) == 3
    assert hx.count_outliers(1e-6 * spectrum) == 3
    # only the ratios 100/90 and 90/80 are looked at: the larger is 90/80, so 2
    assert hx.count_outliers(spectrum, max_outliers=2) == 2


def test_count_outliers_ignores_exact_zeros():
    spectrum = torch.tensor([5.0, 4.0, 1.0, 0.0, 0.0, 0.0])
    assert hx.count_outliers(spectrum) == 2


@pytest.mark.parametrize(
    ("spectrum", "kwargs", "match"),
    [
        ([1.0], {}, "at least 2"),
        ([-1.0, -2.0], {}, "positive"),
        ([1.0, float("nan")], {}, "finite"),
        ([2.0, 1.0], {"max_outliers": 0}, "max_outliers must be an int >= 1"),
    ],
)
def test_count_outliers_refuses_bad_input(spectrum, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hx.count_outliers(torch.tensor(spectrum), **kwargs)


def test_near_zero_fraction():
    eig = torch.tensor([10.0, 5.0, 0.05, -0.05, 0.0])
    assert hx.near_zero_fraction(eig, rel=0.01) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="rel must be a finite number > 0"):
        hx.near_zero_fraction(eig, rel=0)


def _tiny_problem():
    x, y = hx.blobs(3, n_train=30, dim=2, spread=1.0, seed=0)
    model = models.MLP(2, (4,), 3, seed=0, dtype=torch.float64)
    return model, x, y


def _ce_by_hand(out, y):
    """Mean softmax cross-entropy: logsumexp of the logits minus the true class's logit."""
    return (torch.logsumexp(out, dim=1) - out.gather(1, y[:, None]).squeeze(1)).mean()


def test_interpolation_endpoints_are_the_two_models_losses():
    model, x, y = _tiny_problem()
    other = models.MLP(2, (4,), 3, seed=1, dtype=torch.float64)
    theta_a = torch.cat([p.detach().flatten() for p in model.parameters()])
    theta_b = torch.cat([p.detach().flatten() for p in other.parameters()])
    losses = hx.interpolate(model, theta_a, theta_b, x, y, [0.0, 0.5, 1.0])
    expected_a = torch.nn.functional.cross_entropy(model(x), y).item()
    expected_b = torch.nn.functional.cross_entropy(other(x), y).item()
    assert losses[0].item() == pytest.approx(expected_a, rel=1e-12)
    assert losses[2].item() == pytest.approx(expected_b, rel=1e-12)


def test_barrier_of_a_convex_and_a_bumped_path():
    alphas = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert hx.barrier(alphas, (alphas - 0.5) ** 2) <= 1e-12  # convex: below its chord
    bump = 1 - alphas + torch.sin(torch.pi * alphas)  # chord 1 - alpha, bump sin(pi alpha)
    assert hx.barrier(alphas, bump) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must include 0 and 1"):
        hx.barrier(alphas[1:], bump[1:])


def test_interpolate_refuses_mismatched_vectors():
    model, x, y = _tiny_problem()
    with pytest.raises(ValueError, match="theta_a must have"):
        hx.interpolate(model, torch.zeros(3), torch.zeros(3), x, y, [0.0])


def test_explore_spectrum_is_deterministic_and_cached(tmp_path):
    cache = Cache(tmp_path)
    a = hx.explore_spectrum(2, 3, 1.0, 5, cache=cache)
    b = hx.explore_spectrum(2, 3, 1.0, 5, cache=cache)
    c = hx.explore_spectrum(2, 3, 1.0, 5, cache=None)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    assert torch.equal(a["eig_final"], b["eig_final"]) and torch.equal(
        a["eig_final"], c["eig_final"]
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1, 4, 1.0, 10), r"num_classes \(K\) must be an int in \[2, 10\]"),
        ((2, 0, 1.0, 10), r"width must be an int in \[1, 32\]"),
        ((2, 4, 0.0, 10), "spread must be a finite number > 0"),
        ((2, 4, 1.0, 0), r"steps must be an int in \[1, 5000\]"),
    ],
)
def test_explore_spectrum_refuses_bad_sliders(args, match):
    with pytest.raises(ValueError, match=match):
        hx.explore_spectrum(*args)


def test_batch_switch_experiment_matches_hand_training_and_autograd_hessians():
    r = hx.batch_switch_experiment(
        data="blobs", num_classes=2, widths=(4,), lr=3.0, large_batch=10, small_batch=5,
        steps_first=4, steps_second=4, num_alphas=9, data_options=dict(n_train=20, dim=2),
    )  # fmt: skip
    # The experiment does not return its models: train them again by hand, from the same blobs
    # and initialisation, on a hand-written loss. Plain SGD w <- w - 3 grad; each phase cuts its
    # batches from one permutation of range(20) per epoch, drawn from a generator seeded with
    # the phase number (0, then 1).
    x, y = hx.blobs(2, n_train=20, dim=2, spread=1.0, seed=0)
    sizes = (2, 4, 2)
    init = flat_params(models.MLP(2, (4,), 2, seed=0, dtype=torch.float64))

    def loss(w, idx=slice(None)):
        return _ce_by_hand(mlp_by_hand(w, x[idx], sizes), y[idx])

    def phase(w, batch, seed, steps=4):
        gen = torch.Generator().manual_seed(seed)
        batches = torch.cat([torch.randperm(20, generator=gen) for _ in range(4)]).split(batch)
        for idx in batches[:steps]:
            w = w - 3.0 * torch.func.grad(loss)(w, idx)
        return w

    alphas = r["alphas"]
    for name, (first, second) in (("large_small", (10, 5)), ("small_large", (5, 10))):
        start = phase(init, first, 0)
        end = phase(start, second, 1)
        assert r[f"{name}_end_loss"][0] == pytest.approx(loss(start).item(), rel=1e-10)
        assert r[f"{name}_end_loss"][1] == pytest.approx(loss(end).item(), rel=1e-10)
        moved = ((end - start).norm() / start.norm()).item()
        assert r[f"{name}_distance"] == pytest.approx(moved, rel=1e-10)
        # the Lanczos sharpness at each end: the top eigenvalue of the exact autograd Hessian
        for got, w in zip(r[f"{name}_top"], (start, end), strict=True):
            top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, w)).max().item()
            assert got == pytest.approx(top, rel=1e-8), name
        # the line and its barrier: the largest excess over the chord for alpha in [0, 1]
        hand = torch.stack([loss((1 - a) * start + a * end) for a in alphas])
        torch.testing.assert_close(r[f"{name}_loss"], hand, rtol=1e-10, atol=1e-12)
        inside = (alphas >= 0) & (alphas <= 1)
        chord = (1 - alphas) * loss(start) + alphas * loss(end)
        bump = (hand - chord)[inside].max().item()
        assert r[f"{name}_barrier"] == pytest.approx(bump, rel=1e-9, abs=1e-15)
        mean_loss = 0.5 * (loss(start) + loss(end)).item()
        assert r[f"{name}_relative_barrier"] == pytest.approx(bump / mean_loss, rel=1e-9, abs=1e-15)


def test_slq_moments_match_the_exact_spectrum():
    r = hx.slq_experiment(n_train=40, hidden=4, epochs=1, batch_size=20, num_probes=3, num_iters=12)
    assert r["num_params"] == 40 * 4 + 4 + 4 * 10 + 10
    # Each Rademacher probe gives an unbiased estimate of tr(H)/P; allow 5 standard errors.
    assert abs(r["slq_m1"] - r["exact_m1"]) <= 5 * r["slq_m1_stderr"] + 1e-12
    assert float(r["eig"].max()) == pytest.approx(r["top"], rel=1e-3)  # Lanczos finds the top
    grid, dens = hx.density_from(r)
    assert torch.trapezoid(dens, grid).item() == pytest.approx(1.0, abs=0.05)


def test_slq_experiment_refuses_unknown_names():
    with pytest.raises(ValueError, match="dataset must be"):
        hx.slq_experiment(dataset="imagenet")
    with pytest.raises(ValueError, match="model must be"):
        hx.slq_experiment(model="vit")


def test_hessian_ggn_and_residual_match_autograd_on_the_blob_problem():
    """exact_hessian, G = J^T H_out J and R = H - G on the blob MLP (ReLU, models.MLP's
    parameter order), against autograd of the hand-written network and loss."""
    model, x, y = _tiny_problem()
    sizes, w = (2, 4, 3), flat_params(model)
    h_ref = torch.autograd.functional.hessian(lambda v: _ce_by_hand(mlp_by_hand(v, x, sizes), y), w)
    out = mlp_by_hand(w, x, sizes).detach()
    jac = torch.autograd.functional.jacobian(lambda v: mlp_by_hand(v, x, sizes).reshape(-1), w)
    out_hess = torch.autograd.functional.hessian(
        lambda o: _ce_by_hand(o.reshape(out.shape), y), out.reshape(-1)
    )
    g_ref = jac.T @ out_hess @ jac
    assert (h_ref - g_ref).abs().max() > 1e-3  # the residual is not negligible here
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curvature.exact_hessian(model, "ce", (x, y)), h_ref, **tol)
    torch.testing.assert_close(curvature.GGNOperator(model, "ce", (x, y)).dense(), g_ref, **tol)
    residual = curvature.ResidualOperator(model, "ce", (x, y)).dense()
    torch.testing.assert_close(residual, h_ref - g_ref, **tol)


# ----------------------------------------------------------------------------- the two regimes


def test_gradient_alignment_finds_a_planted_eigenvector():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64)).Q
    values = torch.tensor([9.0, 7.0, 5.0, 3.0] + [0.01] * 8, dtype=torch.float64)
    hess = basis @ torch.diag(values) @ basis.T
    align = hx.gradient_alignment(hess, -2.5 * basis[:, 2], top=5)
    torch.testing.assert_close(align, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
                               atol=1e-12, rtol=0)  # fmt: skip
    mixed = hx.gradient_alignment(hess, basis[:, 0] + basis[:, 3], top=4)
    torch.testing.assert_close(mixed, torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=torch.float64),
                               atol=1e-12, rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="non-zero"):
        hx.gradient_alignment(hess, torch.zeros(12, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        hx.gradient_alignment(hess, torch.ones(11, dtype=torch.float64))


def test_project_out_matches_the_explicit_projector_and_drops_one_outlier():
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64)).Q
    values = torch.tensor([50.0, 40.0, 30.0] + [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    hess = basis @ torch.diag(values.double()) @ basis.T
    u = basis[:, 1] + 1e-3 * basis[:, 5]
    proj = torch.eye(10, dtype=torch.float64) - torch.outer(u, u) / (u @ u)
    torch.testing.assert_close(hx.project_out(hess, u), proj @ hess @ proj)
    assert hx.count_outliers(torch.linalg.eigvalsh(hess)) == 3
    assert hx.count_outliers(torch.linalg.eigvalsh(hx.project_out(hess, u))) == 2


def test_simplex_classes_are_balanced_equidistant_and_seeded():
    x, y = hx.simplex_classes(4, n_train=4_000, dim=6, separation=3.0, noise=1.5, seed=2)
    assert x.dtype == torch.float64 and x.shape == (4_000, 6)
    assert torch.bincount(y).tolist() == [1_000] * 4
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    expected = 3.0 * torch.eye(4, 6, dtype=torch.float64)
    assert (means - expected).abs().max() < 0.2  # 5 standard errors of a mean of 1000 draws
    spread = torch.stack([(x[y == c] - means[c]).std(0) for c in range(4)])
    assert (spread - 1.5).abs().max() < 0.1
    x2, _ = hx.simplex_classes(4, n_train=4_000, dim=6, seed=2)
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="dim"):
        hx.simplex_classes(5, dim=4)


def test_spectrum_run_separable_blobs_gradient_is_the_kth_outlier():
    """Sagun's regime, small: on separable blobs the gradient is the K-th eigenvector and the
    count drops by one once it is projected out; the result is consistent with itself."""
    r = hx.spectrum_run(
        "blobs", 3, widths=(16, 16), max_steps=2_000, decompose=True,
        data_options=dict(n_train=200, dim=10),
    )  # fmt: skip
    assert r["count"] == hx.count_outliers(r["eig_final"])
    assert int(torch.argmax(r["alignment"])) == 2 and r["alignment"].max() > 0.9
    assert r["count"] == 3 and r["count_projected"] == 2
    # G + R = H, so their traces add up (a sanity check of the bookkeeping)
    total = r["eig_ggn"].sum() + r["eig_residual"].sum()
    assert abs(float(total - r["eig_final"].sum())) < 1e-9 * float(r["eig_final"].abs().sum())
    assert r["eig_within"].min() > -1e-12 * r["eig_ggn"].max()


def test_spectrum_run_refuses_bad_arguments():
    with pytest.raises(ValueError, match="data must be"):
        hx.spectrum_run("cifar", 3)
    with pytest.raises(ValueError, match="init"):
        hx.spectrum_run("blobs", 3, init="xavier")
    with pytest.raises(ValueError, match="10 classes"):
        hx.spectrum_run("fashion", 3)


def test_sagun_init_draws_every_parameter_from_n0_01():
    model = models.MLP(50, (200,), 10, dtype=torch.float64)
    hx._init_sagun_(model, seed=0)
    flat = flat_params(model)
    assert abs(float(flat.std()) - 0.1) < 0.005 and abs(float(flat.mean())) < 0.005
    biases = torch.cat([layer.bias.detach() for layer in model.layers])
    assert float(biases.abs().min()) > 0


def test_batch_switch_experiment_refuses_batches_larger_than_the_data():
    with pytest.raises(ValueError, match="batch sizes"):
        hx.batch_switch_experiment(data="blobs", num_classes=3, large_batch=1_000,
                                   data_options=dict(n_train=60, dim=4))  # fmt: skip


@pytest.mark.parametrize("data", ["blobs", "simplex"])
def test_explore_spectrum_at_the_slider_extremes(data):
    for k, width, spread, steps in ((2, 1, 0.5, 1), (10, 2, 4.0, 5)):
        r = hx.explore_spectrum(k, width, spread, steps, data=data)
        assert r["eig_final"].numel() == r["num_params"] and 0 <= r["count"] <= 20
    with pytest.raises(ValueError, match="data must be"):
        hx.explore_spectrum(3, 4, 1.0, 5, data="fashion")
