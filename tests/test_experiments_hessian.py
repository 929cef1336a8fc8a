"""Fast tests of notebook 01's experiment functions (gradcourse.experiments.hessian)."""

from __future__ import annotations

import math

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


def test_near_zero_fraction_and_nonbulk_count():
    eig = torch.tensor([10.0, 5.0, 0.05, -0.05, 0.0, -0.2])
    assert hx.near_zero_fraction(eig, rel=0.01) == pytest.approx(0.5)
    assert hx.nonbulk_count(eig, rel=0.01) == 3  # 10, 5 and -0.2: relative to max|lambda|
    assert hx.nonbulk_count(-eig, rel=0.01) == 3
    assert hx.nonbulk_count(eig, rel=0.6) == 1
    for fn in (hx.near_zero_fraction, hx.nonbulk_count):
        with pytest.raises(ValueError, match="rel must be a finite number > 0"):
            fn(eig, rel=0)
        with pytest.raises(ValueError, match="empty"):
            fn(torch.tensor([]))
        with pytest.raises(ValueError, match="finite"):
            fn(torch.tensor([1.0, float("inf")]))


def test_parts_summary_on_planted_spectra():
    hess = torch.tensor([10.0, 8.0, 4.0, 1.0, 0.5, 0.0])
    between = torch.tensor([0.0, 0.0, 0.0, 4.4, 7.2, 10.0])  # any order
    within = torch.tensor([0.0, 0.2, 0.8])
    residual = torch.tensor([-0.5, 0.1, 0.3])
    got = hx.parts_summary(hess, between, within, residual, k=3)
    assert got["between_match"] == pytest.approx(0.1)  # 7.2 / 8 and 4.4 / 4 are both 10% off
    assert got["within_ratio"] == pytest.approx(0.8 / 4.0)
    assert got["residual_ratio"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="positive"):
        hx.parts_summary(hess, between, within, residual, k=6)


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
    # convex: under its chord (0.25) everywhere inside; the largest excess is at alpha = 0.1
    assert hx.barrier(alphas, (alphas - 0.5) ** 2) == pytest.approx(0.16 - 0.25)
    bump = 1 - alphas + torch.sin(torch.pi * alphas)  # chord 1 - alpha, bump sin(pi alpha)
    assert hx.barrier(alphas, bump) == pytest.approx(1.0)
    # a straight line: the ends, where rounding could leave 1e-16, are not looked at
    line = 0.3 + 0.1 * alphas
    assert abs(hx.barrier(alphas, line)) < 1e-15
    assert hx.barrier(alphas, line + 1e-3 * (alphas == 0)) < 0  # a raised end is no barrier
    with pytest.raises(ValueError, match="must include 0 and 1"):
        hx.barrier(alphas[1:], bump[1:])
    with pytest.raises(ValueError, match="strictly between"):
        hx.barrier(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))


def test_value_at_loss_interpolates_at_the_first_crossing():
    losses = torch.tensor([2.0, 1.0, 0.5, 0.6, 0.25])
    values = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])
    assert hx.value_at_loss(losses, values, 0.75) == pytest.approx(4.0)  # between 1.0 and 0.5
    assert hx.value_at_loss(losses, values, 0.55) == pytest.approx(4.8)  # first crossing only
    assert hx.value_at_loss(losses, values, 1.0) == pytest.approx(3.0)
    assert math.isnan(hx.value_at_loss(losses, values, 2.5))  # the path starts below it
    assert math.isnan(hx.value_at_loss(losses, values, 0.1))  # the path never reaches it
    with pytest.raises(ValueError, match="equal length"):
        hx.value_at_loss(losses, values[:3], 0.5)


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

    alphas, ends = r["alphas"], {}
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
        # the line and its barrier: the largest excess over the chord for alpha in (0, 1)
        hand = torch.stack([loss((1 - a) * start + a * end) for a in alphas])
        torch.testing.assert_close(r[f"{name}_loss"], hand, rtol=1e-10, atol=1e-12)
        inside = (alphas > 0) & (alphas < 1)
        chord = (1 - alphas) * loss(start) + alphas * loss(end)
        bump = (hand - chord)[inside].max().item()
        assert r[f"{name}_barrier"] == pytest.approx(bump, rel=1e-9, abs=1e-15)
        mean_loss = 0.5 * (loss(start) + loss(end)).item()
        assert r[f"{name}_relative_barrier"] == pytest.approx(bump / mean_loss, rel=1e-9, abs=1e-15)
        ends[name] = (start, end)
    # the large-batch path, recorded at the start and end of each of its two legs (path_every
    # = 100 > 4 steps): the first phase, then 4 more steps at batch 10 with the phase-1 batches
    large = ends["large_small"][0]
    onward = phase(large, 10, 1)
    assert r["path_step"].tolist() == [0.0, 4.0, 8.0]
    for got, w in zip(r["path_loss"], (init, large, onward), strict=True):
        assert got.item() == pytest.approx(loss(w).item(), rel=1e-10)
    for got, w in zip(r["path_top"], (init, large, onward), strict=True):
        top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, w)).max().item()
        assert got.item() == pytest.approx(top, rel=1e-8)
    # the small-batch ends against the path at their loss
    for name, small in (
        ("large_small", ends["large_small"][1]),
        ("small_large", ends["small_large"][0]),
    ):
        matched = hx.value_at_loss(r["path_loss"], r["path_top"], loss(small).item())
        assert r[f"{name}_matched_top"] == pytest.approx(matched, nan_ok=True)
    # the control: a second initialisation (seed 10,000) trained like the large-batch phase
    other = phase(flat_params(models.MLP(2, (4,), 2, seed=10_000, dtype=torch.float64)), 10, 0)
    line = torch.stack([loss((1 - a) * large + a * other) for a in alphas])
    torch.testing.assert_close(r["independent_loss"], line, rtol=1e-10, atol=1e-12)
    moved = ((other - large).norm() / large.norm()).item()
    assert r["independent_distance"] == pytest.approx(moved, rel=1e-10)


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
    assert r["count_random"] == 3  # the control: a random direction removed leaves K
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


def test_spectrum_run_checkpoints_leave_the_run_unchanged_and_match_its_ends():
    config = dict(widths=(4,), max_steps=30, grad_tol=1e-12, data_options=dict(n_train=30, dim=2))
    plain = hx.spectrum_run("blobs", 3, **config)
    r = hx.spectrum_run("blobs", 3, checkpoints=(0, 10, 30, 99), decompose=True, **config)
    tol = dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r["eig_final"], plain["eig_final"], **tol)
    assert r["ckpt_step"].tolist() == [0, 10, 30]  # 99 is past the end of the run
    top20 = lambda eig: eig.flip(0)[:20]  # noqa: E731
    torch.testing.assert_close(r["ckpt_top"][0], top20(r["eig_init"]), **tol)
    torch.testing.assert_close(r["ckpt_top"][2], top20(r["eig_final"]), **tol)
    short = hx.spectrum_run("blobs", 3, **{**config, "max_steps": 10})
    torch.testing.assert_close(r["ckpt_top"][1], top20(short["eig_final"]), **tol)
    assert r["ckpt_count"].tolist()[1:] == [short["count"], r["count"]]
    assert r["ckpt_loss"][2].item() == pytest.approx(r["final_loss"], rel=1e-12)
    assert r["ckpt_within_top"][2].item() == pytest.approx(r["eig_within"].max().item())
    torch.testing.assert_close(r["ckpt_between_top"][2], top20(r["eig_between"]), **tol)
    with pytest.raises(ValueError, match="checkpoints"):
        hx.spectrum_run("blobs", 3, checkpoints=(-1,), **config)


def test_initial_spectrum_is_the_untrained_run_and_varies_with_the_init_seed():
    config = dict(widths=(4,), data_options=dict(n_train=30, dim=2))
    run = hx.spectrum_run("blobs", 3, seed=1, max_steps=1, **config)
    same = hx.initial_spectrum("blobs", 3, seed=1, decompose=True, **config)
    torch.testing.assert_close(same["eig"], run["eig_init"], rtol=1e-12, atol=1e-14)
    assert same["count"] == hx.count_outliers(same["eig"])
    other = hx.initial_spectrum("blobs", 3, seed=1, init_seed=2, **config)
    assert (other["eig"] - same["eig"]).abs().max() > 1e-3  # another net on the same data
    # H = G + R and G = between + within, by traces
    total = same["eig_between"].sum() + same["eig_within"].sum() + same["eig_residual"].sum()
    assert total.item() == pytest.approx(same["eig"].sum().item(), rel=1e-9)


def test_regime_table_collects_the_controls(tmp_path):
    config = dict(widths=(4,), max_steps=20, data_options=dict(n_train=30, dim=2))
    table = hx.regime_table("blobs", [2, 3], [0, 1], cache=Cache(tmp_path), progress=False,
                            **config)  # fmt: skip
    r = hx.spectrum_run("blobs", 3, seed=1, **config)
    assert table["count_random"][1, 1] == r["count_random"]
    assert table["count_init"][1, 1] == hx.count_outliers(r["eig_init"])
    assert table["nonbulk"][1, 1] == hx.nonbulk_count(r["eig_final"])
    assert table["align_max"][1, 1] == pytest.approx(r["alignment"].max().item())
    top = r["eig_final"].max() / r["eig_final"].abs().mean()
    assert table["top_over_mean"][1, 1].item() == pytest.approx(top.item())
    assert table["median_init"].shape == (2,)
    assert (table["inner_ratio"][1, 1].item(), table["gap_ratio"][1, 1].item()) == pytest.approx(
        hx.outlier_gaps(r["eig_final"], 3)
    )
    assert len(list(tmp_path.glob(f"{hx.CACHE_PREFIX}-spectrum_run-*.npz"))) == 4


def test_class_gradient_ratio_against_per_class_autograd():
    model, x, y = _tiny_problem()
    sizes, w = (2, 4, 3), flat_params(model)

    def grad_of(idx):
        return torch.func.grad(lambda v: _ce_by_hand(mlp_by_hand(v, x[idx], sizes), y[idx]))(w)

    full = grad_of(torch.arange(len(y)))
    shares = [float((y == c).double().mean()) for c in range(3)]
    per_class = [grad_of(torch.nonzero(y == c).flatten()) for c in range(3)]
    # the full gradient is the share-weighted sum of the class gradients
    torch.testing.assert_close(sum(p * g for p, g in zip(shares, per_class, strict=True)), full)
    expected = full.norm() / sum(p * g.norm() for p, g in zip(shares, per_class, strict=True))
    got = hx.class_gradient_ratio(model, x, y, 3)
    assert got == pytest.approx(expected.item(), rel=1e-10)
    assert 0 < got <= 1


def test_outlier_gaps_on_a_planted_spectrum():
    spectrum = torch.tensor([100.0, 50.0, 40.0, 10.0, 2.0, 1.0, 0.5])  # K = 4: 10 is the gradient's
    inner, gap = hx.outlier_gaps(spectrum[torch.randperm(7)], 4)
    assert inner == pytest.approx(2.0)  # 100 / 50, the largest ratio inside the top 3
    assert gap == pytest.approx(20.0)  # 40 / 2, across the 4th eigenvalue
    assert hx.outlier_gaps(spectrum, 2) == (1.0, pytest.approx(100.0 / 40.0))
    with pytest.raises(ValueError, match="positive"):
        hx.outlier_gaps(torch.tensor([3.0, 2.0, -1.0]), 2)


# ----------------------------------------------------------------------------- round 2 additions


def test_near_zero_fraction_relative_to_the_kth_eigenvalue():
    eig = torch.tensor([100.0, 10.0, 5.0, 0.04, -0.045, 0.06, 0.0, 0.9], dtype=torch.float64)
    # 1% of lambda_3 = 0.05: 0.04, -0.045 and 0.0 are at most that, 0.06 is not
    assert hx.near_zero_fraction(eig, k=3) == pytest.approx(3 / 8)
    # 1% of max |lambda| = 1.0: everything but 100, 10 and 5
    assert hx.near_zero_fraction(eig) == pytest.approx(5 / 8)
    # a larger top outlier leaves the lambda_K cut-off where it was
    assert hx.near_zero_fraction(eig * torch.tensor([10.0] + [1.0] * 7), k=3) == pytest.approx(
        3 / 8
    )
    with pytest.raises(ValueError, match="positive"):
        hx.near_zero_fraction(torch.tensor([1.0, -1.0, -2.0]), k=2)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        hx.near_zero_fraction(torch.tensor([1.0, 0.5, 0.1]), k=4)


def test_outlier_bulk_scales_on_a_planted_spectrum():
    eig = torch.tensor([0.5, 8.0, -0.1, 2.0, 0.0, 0.2])
    outliers, bulk = hx.outlier_bulk_scales(eig, 2)
    assert outliers == pytest.approx(4.0)  # sqrt(8 * 2)
    assert bulk == pytest.approx((0.5 + 0.1 + 0.0 + 0.2) / 4)
    scaled = hx.outlier_bulk_scales(3 * eig, 2)
    assert scaled == pytest.approx((12.0, 3 * bulk))  # both scale with the spectrum
    with pytest.raises(ValueError, match="positive"):
        hx.outlier_bulk_scales(torch.tensor([1.0, -1.0, -2.0]), 2)
    with pytest.raises(ValueError, match="n_outliers"):
        hx.outlier_bulk_scales(eig, 6)


def test_subspace_overlaps_on_planted_eigenvectors():
    gen = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64)).Q
    a = q @ torch.diag(torch.tensor([8.0, 6, 4, 2, 1, 0.5, 0.2, 0.1], dtype=torch.float64)) @ q.T
    # b: the same top 2 eigenvectors in the other order, then q[:, 3] before q[:, 2]
    order = [1, 0, 3, 2, 4, 5, 6, 7]
    b = q[:, order] @ torch.diag(torch.linspace(9, 1, 8, dtype=torch.float64)) @ q[:, order].T
    got = hx.subspace_overlaps(a, b, top=5)
    # m = 1: q0 against q1 (0); m = 2: the same plane (1); m = 3: {q0, q1, q2} vs {q1, q0, q3}
    # share 2 of 3 directions; m = 4, 5: the same subspaces again
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 2 / 3, 1.0, 1.0], dtype=torch.float64),
                               atol=1e-10, rtol=0)  # fmt: skip
    brute = [
        float((q[:, :m].T @ q[:, order][:, :m]).pow(2).sum() / m) for m in range(1, 6)
    ]  # the definition, from the planted bases
    torch.testing.assert_close(got, torch.tensor(brute, dtype=torch.float64), atol=1e-10, rtol=0)
    assert hx.subspace_overlaps(a, a, top=20).shape == (8,)  # at most P values
    with pytest.raises(ValueError, match="square"):
        hx.subspace_overlaps(a[:3], b)
    with pytest.raises(ValueError, match="differ in shape"):
        hx.subspace_overlaps(a, b[:4, :4])


def test_bracket_at_loss_gives_the_records_around_the_crossing():
    losses = torch.tensor([2.0, 1.0, 0.5, 0.6, 0.25])
    values = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])
    assert hx.bracket_at_loss(losses, values, 0.75) == (3.0, 5.0)
    assert hx.bracket_at_loss(losses, values, 0.55) == (3.0, 5.0)  # the first crossing
    assert hx.bracket_at_loss(losses, -values, 0.75) == (-5.0, -3.0)  # smaller first
    lo, hi = hx.bracket_at_loss(losses, values, 0.75)
    assert lo <= hx.value_at_loss(losses, values, 0.75) <= hi
    assert all(math.isnan(v) for v in hx.bracket_at_loss(losses, values, 0.1))
    assert all(math.isnan(v) for v in hx.bracket_at_loss(losses, values, 2.5))


def test_simplex_classes_standardized_keep_equidistant_means_at_every_noise():
    for noise in (0.5, 3.0):
        x, y = hx.simplex_classes(4, n_train=4_000, dim=6, noise=noise, standardize=True, seed=1)
        torch.testing.assert_close(
            x.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0
        )
        torch.testing.assert_close(x.std(0, correction=0), torch.ones(6, dtype=torch.float64))
        assert (x**2).sum(1).mean().item() == pytest.approx(6.0)  # the same scale at every noise
        raw, _ = hx.simplex_classes(4, n_train=4_000, dim=6, noise=noise, seed=1)
        # the same draw, each feature shifted and scaled
        scale = raw.std(0, correction=0)
        torch.testing.assert_close(x * scale + raw.mean(0), raw)
        means = torch.stack([x[y == c].mean(0) for c in range(4)])
        dist = torch.cdist(means, means)[torch.triu_indices(4, 4, 1).unbind()]
        assert float(dist.max() / dist.min()) < 1.1  # still equidistant, up to sampling


def test_regime_table_shares_and_scales_match_their_functions(tmp_path):
    config = dict(widths=(6,), max_steps=30, data_options=dict(n_train=30, dim=2))
    table = hx.regime_table("blobs", [3], [0], cache=Cache(tmp_path), progress=False, **config)
    r = hx.spectrum_run("blobs", 3, seed=0, **config)
    assert table["frac_final_k"][0, 0] == pytest.approx(hx.near_zero_fraction(r["eig_final"], k=3))
    assert table["frac_init_k"][0, 0] == pytest.approx(hx.near_zero_fraction(r["eig_init"], k=3))
    scales = hx.outlier_bulk_scales(r["eig_final"], 2)
    assert (table["outlier_scale"][0, 0].item(), table["bulk_scale"][0, 0].item()) == pytest.approx(
        scales
    )


def test_spectrum_run_overlap_of_h_and_the_between_part():
    r = hx.spectrum_run("blobs", 3, widths=(5,), max_steps=50, decompose=True,
                        data_options=dict(n_train=40, dim=3))  # fmt: skip
    overlap = r["overlap_between"]
    assert overlap.shape == (20,) and bool(((overlap >= -1e-12) & (overlap <= 1 + 1e-12)).all())
    r0 = hx.initial_spectrum("blobs", 3, widths=(5,), decompose=True,
                             data_options=dict(n_train=40, dim=3))  # fmt: skip
    # the same net and data by hand: H, the between part, and the overlaps of their eigenvectors
    x, y = hx.blobs(3, n_train=40, dim=3, seed=0)
    model = models.MLP(3, (5,), 3, seed=0, dtype=torch.float64)
    hess = curvature.exact_hessian(model, "ce", (x, y))
    between = curvature.class_decomposition(model, "ce", (x, y)).between
    torch.testing.assert_close(r0["overlap_between"], hx.subspace_overlaps(hess, between))
