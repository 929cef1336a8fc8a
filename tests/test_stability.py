"""gradcourse.stability against dense references: explicit per-example Hessians, the Wu-Ma-E
matrix formed densely, and the exact expected one-step map of linear regression."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from reference import flat_params
from torch import nn

from gradcourse import models, stability, train
from gradcourse.curvature import GGNOperator, HessianOperator, LiveHessianOperator, lanczos


def tiny_problem(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    model = models.MLP(3, [4], 2, activation="tanh", seed=seed, dtype=torch.float64)
    return model, x, y


def per_example_hessians(model, x, y):
    """H_i = Hessian of 1/2 ||f(x_i) - y_i||^2, with torch.autograd.functional.hessian."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = flat_params(model)

    def unflat(w):
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            out[k] = w[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    hs = []
    for i in range(len(x)):

        def loss(w, i=i):
            out = torch.func.functional_call(model, unflat(w), (x[i : i + 1],))
            return 0.5 * (out - y[i : i + 1]).pow(2).sum()

        hs.append(torch.autograd.functional.hessian(loss, w0))
    return torch.stack(hs)


@pytest.fixture(scope="module")
def tiny():
    model, x, y = tiny_problem()
    return model, x, y, per_example_hessians(model, x, y)


def test_per_example_products_match_explicit_hessians(tiny):
    model, x, y, hs = tiny
    pe = stability.PerExampleCurvature(model, "mse", (x, y))
    v = torch.randn(pe.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(pe.products(v), hs @ v, rtol=1e-10, atol=1e-12)
    vs = torch.randn(len(x), pe.size, generator=torch.Generator().manual_seed(2)).double()
    torch.testing.assert_close(pe.products(vs), torch.einsum("ipq,iq->ip", hs, vs))
    idx = torch.tensor([4, 1, 1])
    torch.testing.assert_close(pe.batch_matvec(v, idx), hs[idx].mean(0) @ v)
    torch.testing.assert_close(hs.mean(0) @ v, pe.mean.matvec(v))


def test_ggn_products_are_psd_and_match_the_mean_ggn(tiny):
    model, x, y, _ = tiny
    pe = stability.PerExampleCurvature(model, "mse", (x, y), curvature="ggn")
    eye = torch.eye(pe.size, dtype=torch.float64)
    dense = torch.stack([pe.products(e) for e in eye], dim=2)  # (n, P, P)
    assert torch.linalg.eigvalsh(dense).min() > -1e-10
    ggn = GGNOperator(model, "mse", (x, y)).dense()
    torch.testing.assert_close(dense.mean(0), ggn)


def test_sigma_operator_matches_dense_covariance(tiny):
    model, x, y, hs = tiny
    sigma_dense = (hs @ hs).mean(0) - hs.mean(0) @ hs.mean(0)
    sigma = stability.SigmaOperator(model, "mse", (x, y))
    torch.testing.assert_close(sigma.dense(), sigma_dense, rtol=1e-9, atol=1e-11)
    assert torch.linalg.eigvalsh(sigma_dense).min() > -1e-10  # a covariance is PSD


@pytest.mark.parametrize("batch_size", [1, 2, 4, 6])
def test_wu_ma_e_operator_matches_dense_matrix_and_eigenvalues(tiny, batch_size):
    model, x, y, hs = tiny
    n, lr = len(x), 0.7
    h = hs.mean(0)
    sigma_dense = (hs @ hs).mean(0) - h @ h
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    c = (n - batch_size) / (batch_size * (n - 1))
    a_dense = (eye - lr * h) @ (eye - lr * h) + lr**2 * c * sigma_dense
    sigma = stability.SigmaOperator(model, "mse", (x, y))
    op = stability.sgd_stability_operator(sigma.mean, sigma, lr, batch_size, n)
    torch.testing.assert_close(op.dense(), a_dense, rtol=1e-9, atol=1e-11)
    lam, stable = stability.wu_ma_e_stable(sigma.mean, sigma, lr, batch_size, n)
    top = torch.linalg.eigvalsh(a_dense).max().item()
    assert lam == pytest.approx(top, rel=1e-8)
    assert stable == (top <= 1 + 1e-6)


def test_the_expected_minibatch_square_is_the_wu_ma_e_matrix(tiny):
    """E_B[(I - lr H_B)^2] over all batches of size B (enumerated) = the Wu-Ma-E matrix."""
    model, x, y, hs = tiny
    n, lr, b = len(x), 0.3, 2
    eye = torch.eye(hs.shape[1], dtype=torch.float64)
    batches = list(itertools.combinations(range(n), b))
    expected = sum(
        (eye - lr * hs[list(bb)].mean(0)) @ (eye - lr * hs[list(bb)].mean(0)) for bb in batches
    ) / len(batches)
    sigma = stability.SigmaOperator(model, "mse", (x, y))
    op = stability.sgd_stability_operator(sigma.mean, sigma, lr, b, n)
    torch.testing.assert_close(op.dense(), expected, rtol=1e-9, atol=1e-11)


def test_full_batch_reduces_to_gd_condition():
    """B = n: stable iff lambda_max(H) <= 2 / lr, for a PSD H (the Gauss-Newton matrix)."""
    model, x, y = tiny_problem(n=8, seed=3)
    h = GGNOperator(model, "mse", (x, y))
    top = float(lanczos(h, k=1).eigenvalues[0])
    for factor, expect in [(0.9, True), (0.99, True), (1.01, False), (1.5, False)]:
        lr = factor * 2 / top
        lam, stable = stability.wu_ma_e_stable(h, None, lr, len(x), len(x))
        assert stable is expect
        assert lam == pytest.approx(max(1.0, (1 - lr * top) ** 2), rel=1e-8)
    assert stability.sgd_noise_factor(8, 8) == 0.0
    assert stability.sgd_noise_factor(1, 8) == 1.0
    lr_star = stability.critical_learning_rate(h, None, len(x), len(x), rel_tol=1e-4)
    assert lr_star == pytest.approx(2 / top, rel=2e-4)


def test_smaller_batches_lower_the_critical_learning_rate():
    model, x, y = tiny_problem(n=8, seed=3)
    sigma = stability.SigmaOperator(model, "mse", (x, y), curvature="ggn")
    rates = [
        stability.critical_learning_rate(sigma.mean, sigma, b, 8, rel_tol=1e-2) for b in (1, 3, 8)
    ]
    assert all(a <= b * (1 + 2e-2) for a, b in zip(rates, rates[1:], strict=False))
    assert rates[0] < 0.95 * rates[-1]


# ---------------------------------------------------------------- linear regression: exact maps


def linear_regression(n=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    y = model(x).detach()  # zero loss: w is a minimum
    hs = torch.einsum("ip,iq->ipq", x, x)  # H_i = x_i x_i^T exactly
    return model, x, y, hs


def exact_second_moments(hs, lr, b, steps, s0):
    """S_{t+1} = E_B[(I - lr H_B) S_t (I - lr H_B)], enumerating every batch of size b."""
    n, d = hs.shape[0], hs.shape[1]
    maps = [
        torch.eye(d, dtype=hs.dtype) - lr * hs[list(bb)].mean(0)
        for bb in itertools.combinations(range(n), b)
    ]
    out, s = [torch.trace(s0)], s0
    for _ in range(steps):
        s = sum(m @ s @ m for m in maps) / len(maps)
        out.append(torch.trace(s))
    return torch.stack(out) / out[0]


@pytest.mark.parametrize("lr_factor", [0.5, 1.3])
def test_simulated_second_moment_matches_exact_map(lr_factor):
    model, x, y, hs = linear_regression()
    n, b, steps, runs = len(x), 2, 6, 4000
    pe = stability.PerExampleCurvature(model, "mse", (x, y))
    torch.testing.assert_close(pe.products(torch.ones(3, dtype=torch.float64)), hs.sum(2))
    sigma = stability.SigmaOperator(model, "mse", (x, y))
    lr_star = stability.critical_learning_rate(sigma.mean, sigma, b, n, rel_tol=1e-5)
    lr = lr_factor * lr_star
    check = stability.wu_ma_e_stable(sigma.mean, sigma, lr, b, n)
    assert check.stable == (lr_factor < 1)
    x0 = check.eigenvector
    sim = stability.linearized_sgd_second_moment(pe, lr, b, steps, x0=x0, num_runs=runs, seed=1)
    exact = exact_second_moments(hs, lr, b, steps, torch.outer(x0, x0))
    # one step from the top eigenvector: E||x_1||^2 / ||x_0||^2 = lambda_max(A) exactly
    assert exact[1].item() == pytest.approx(check.lambda_max, rel=1e-8)
    # Monte-Carlo: relative error ~ spread / sqrt(runs); 5 standard errors of a heavy tail
    for t in range(1, steps + 1):
        assert sim[t].item() == pytest.approx(exact[t].item(), rel=0.15)
    if lr_factor < 1:
        assert exact[-1] < exact[1] <= 1 + 1e-9
    else:
        assert exact[-1] > exact[1] > 1


def test_simulation_is_seeded_and_validates():
    model, x, y, _ = linear_regression()
    pe = stability.PerExampleCurvature(model, "mse", (x, y))
    a = stability.linearized_sgd_second_moment(pe, 0.1, 2, 3, num_runs=8, seed=4)
    b = stability.linearized_sgd_second_moment(pe, 0.1, 2, 3, num_runs=8, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch_size"):
        stability.linearized_sgd_second_moment(pe, 0.1, 6, 3)
    with pytest.raises(ValueError, match="lr"):
        stability.linearized_sgd_second_moment(pe, -1.0, 2, 3)
    with pytest.raises(ValueError, match="curvature"):
        stability.PerExampleCurvature(model, "mse", (x, y), curvature="fisher")
    with pytest.raises(ValueError, match="sigma"):
        stability.sgd_stability_operator(pe.mean, None, 0.1, 2, 5)


def test_trace_bound_holds_for_stable_rank_one_minima():
    """Scalar output at zero loss: if SGD(lr, B) is stable then tr(H) <= 2 / (lr c_B)."""
    model, x, y, hs = linear_regression(n=6, d=4, seed=2)
    sigma = stability.SigmaOperator(model, "mse", (x, y))
    trace = hs.mean(0).trace().item()
    for b in (1, 2, 3):
        lr_star = stability.critical_learning_rate(sigma.mean, sigma, b, 6, rel_tol=1e-5)
        assert trace <= stability.trace_bound(lr_star, b, 6) * (1 + 1e-4)
    assert stability.trace_bound(0.1, 1, 6) == pytest.approx(20.0)
    assert math.isinf(stability.trace_bound(0.1, 6, 6))


def test_gauss_newton_spectrum_matches_dense_ggn(tiny):
    model, x, y, _ = tiny
    eig = stability.gauss_newton_spectrum(model, x)
    dense = torch.linalg.eigvalsh(GGNOperator(model, "mse", (x, y)).dense()).flip(0)
    k = len(eig)
    torch.testing.assert_close(eig, dense[:k].clamp_min(0), rtol=1e-8, atol=1e-10)
    assert dense[k:].abs().max() < 1e-10


def test_sharpness_tracker_follows_training_and_warm_starts():
    model, x, y = tiny_problem(n=16, seed=5)
    tracker = stability.SharpnessTracker(x, y, tol=1e-6)
    hist = train.train(model, x, y, lr=0.05, steps=20, callback=tracker, every=5, progress=False)
    rec = hist.record_arrays()
    assert list(rec["step"]) == [0, 5, 10, 15, 20]
    top = float(lanczos(HessianOperator(model, "mse", (x, y)), k=1).eigenvalues[0])
    assert rec["sharpness"][-1] == pytest.approx(top, rel=1e-6)
    assert tracker.total_time == pytest.approx(rec["sharpness_time"].sum())
    assert rec["sharpness_matvecs"][-1] < rec["sharpness_matvecs"][0]  # the warm start pays


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_tracker_operator_matches_the_hessian_operator(loss):
    """The tracker's double-backward operator on the live module is the Hessian over the
    trainable parameters only (a frozen, non-zero first bias left out), against autograd of the
    hand-written net and loss, and HessianOperator's H; a train-mode dropout is refused."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (9,), generator=g)
    model = models.MLP(3, [5, 4], 2, activation="tanh", seed=3, dtype=torch.float64)
    frozen = torch.randn(5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.layers[0].bias.copy_(frozen)
    model.layers[0].bias.requires_grad_(False)

    def hand_loss(w):  # w: W0 (5x3), W1 (4x5), b1, W2 (2x4), b2; b0 = frozen, a constant
        w0, w1, b1 = w[:15].view(5, 3), w[15:35].view(4, 5), w[35:39]
        w2, b2 = w[39:47].view(2, 4), w[47:49]
        out = torch.tanh(torch.tanh(x @ w0.T + frozen) @ w1.T + b1) @ w2.T + b2
        if loss == "mse":  # 1/n sum_i 1/2 ||f(x_i) - onehot(y_i)||^2
            return 0.5 * (out - nn.functional.one_hot(y, 2).double()).pow(2).sum() / len(y)
        return (torch.logsumexp(out, 1) - out.gather(1, y[:, None]).squeeze(1)).mean()

    trainable = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    reference = torch.autograd.functional.hessian(hand_loss, trainable)
    current = LiveHessianOperator(model, loss, x, y).dense()
    assert current.shape == (49, 49)
    torch.testing.assert_close(current, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(current, HessianOperator(model, loss, (x, y)).dense())
    with pytest.raises(ValueError, match="dropout"):
        LiveHessianOperator(nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)), loss, x, y)


def test_sharpness_tracker_measures_only_where_asked():
    model, x, y = tiny_problem(n=16, seed=5)
    tracker = stability.SharpnessTracker(x, y, measure_at=lambda step: step % 10 == 0 or step > 15)
    hist = train.train(model, x, y, lr=0.05, steps=20, callback=tracker, every=5, progress=False)
    assert list(hist.record_arrays()["step"]) == [0, 10, 20]


def test_sharpness_tracker_records_nan_on_an_overflowed_model():
    model, x, y = tiny_problem()
    tracker = stability.SharpnessTracker(x, y)
    assert math.isfinite(tracker(0, model)["sharpness"]) and tracker.v is not None
    with torch.no_grad():
        model.layers[-1].weight.fill_(1e200)  # finite weights; products overflow to inf
    out = tracker(1, model)
    assert math.isnan(out["sharpness"]) and out["sharpness_matvecs"] == 0 and tracker.v is None


def test_mse_on_integer_labels_uses_one_hot_targets():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    model = models.MLP(3, [4], 3, activation="tanh", seed=1, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    for curvature in ("hessian", "ggn"):
        a = stability.SigmaOperator(model, "mse", (x, labels), curvature=curvature).dense()
        b = stability.SigmaOperator(model, "mse", (x, onehot), curvature=curvature).dense()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_per_example_curvature_refuses_several_batches():
    model, x, y = tiny_problem()
    with pytest.raises(ValueError, match="one \\(x, y\\) pair of tensors"):
        stability.PerExampleCurvature(model, "mse", [(x[:3], y[:3]), (x[3:], y[3:])])


# --------------------------------------------------------------------------------------------
# The exact second moment, against enumeration of every batch


def random_psd_hessians(n=5, r=3, rank_one=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank_one:  # H_i = g_i g_i^T: square loss, scalar output, at a zero-loss minimum
        v = torch.randn(n, r, generator=g, dtype=torch.float64)
        return torch.einsum("ip,iq->ipq", v, v)
    a = torch.randn(n, r, r, generator=g, dtype=torch.float64)
    return a @ a.transpose(1, 2) / r


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("b", [1, 2, 4])
def test_second_moment_map_equals_the_mean_over_every_batch(replacement, b):
    hs = random_psd_hessians(n=5, r=3, seed=b)
    n, r, lr = 5, 3, 0.3
    g = torch.Generator().manual_seed(7)
    a = torch.randn(r, r, generator=g, dtype=torch.float64)
    s = a @ a.T
    draws = (
        itertools.product(range(n), repeat=b)  # ordered draws, each equally likely
        if replacement
        else itertools.combinations(range(n), b)
    )
    maps = [torch.eye(r, dtype=torch.float64) - lr * hs[list(batch)].mean(0) for batch in draws]
    enumerated = sum(m @ s @ m for m in maps) / len(maps)
    exact = stability.second_moment_map(hs, lr, b, replacement=replacement)(s)
    torch.testing.assert_close(exact, enumerated, rtol=1e-12, atol=1e-12)
    matrix = stability.second_moment_matrix(hs, lr, b, replacement=replacement)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close((matrix @ s.reshape(-1)).reshape(r, r), enumerated)


@pytest.mark.parametrize("lr", [0.2, 0.6])
def test_second_moment_over_steps_equals_enumerated_batch_sequences(lr):
    hs = random_psd_hessians(n=4, r=3, seed=3)
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    steps, b = 3, 2
    batches = list(itertools.combinations(range(4), b))
    total = 0.0
    for sequence in itertools.product(batches, repeat=steps):  # 6^3 equally likely sequences
        x = x0.clone()
        for batch in sequence:
            x = x - lr * hs[list(batch)].mean(0) @ x
        total += float(x @ x)
    enumerated = total / len(batches) ** steps / float(x0 @ x0)
    exact = stability.sgd_second_moment(hs, lr, b, steps, s0=torch.outer(x0, x0))
    assert exact[-1].item() == pytest.approx(enumerated, rel=1e-12)
    assert exact[0].item() == 1.0
    reference = exact_second_moments(hs, lr, b, steps, torch.outer(x0, x0))
    torch.testing.assert_close(exact, reference, rtol=1e-12, atol=0)


def test_full_batch_second_moment_is_gd():
    hs = random_psd_hessians(n=4, r=3, seed=5)
    eig = torch.linalg.eigvalsh(hs.mean(0))
    for lr in (0.1, 0.9 * 2 / float(eig[-1])):
        rate = stability.mean_square_rate(hs, lr, batch_size=4)
        assert rate == pytest.approx(float(((1 - lr * eig) ** 2).max()), rel=1e-10)
    threshold = stability.mean_square_threshold(hs, batch_size=4, rel_tol=1e-9)
    assert threshold == pytest.approx(2 / float(eig[-1]), rel=1e-8)


def wu_ma_e_rate(hs, lr, b):
    """lambda_max of the explicit Wu-Ma-E matrix (I - lr H)^2 + lr^2 c_B Sigma."""
    n, r = hs.shape[:2]
    h = hs.mean(0)
    sigma = (hs @ hs).mean(0) - h @ h
    step = torch.eye(r, dtype=torch.float64) - lr * h
    return float(
        torch.linalg.eigvalsh(step @ step + lr**2 * stability.sgd_noise_factor(b, n) * sigma)[-1]
    )


@pytest.mark.parametrize("seed", range(4))
def test_mean_square_threshold_lies_between_wu_ma_e_and_gd(seed):
    hs = random_psd_hessians(n=6, r=4, rank_one=seed % 2 == 0, seed=seed)
    b = 2
    top = float(torch.linalg.eigvalsh(hs.mean(0))[-1])
    grid = torch.linspace(1e-3, 2 / top, 4000, dtype=torch.float64).tolist()
    wme = max(lr for lr in grid if wu_ma_e_rate(hs, lr, b) <= 1 + 1e-12)
    threshold = stability.mean_square_threshold(hs, b, rel_tol=1e-9)
    assert wme <= threshold * (1 + 1e-6) and threshold <= 2 / top * (1 + 1e-9)
    # on either side of it, the exact second moment decays or grows over a long run
    below = stability.sgd_second_moment(hs, 0.98 * threshold, b, 3000)
    above = stability.sgd_second_moment(hs, 1.02 * threshold, b, 3000)
    assert below[-1] < below[1] and above[-1] > 1e3


def test_mean_square_threshold_against_wu_ma_e_by_hand_and_on_correlated_examples():
    # two orthogonal examples, H_i = 2 e_i e_i^T, n = 2, B = 1: one SGD step multiplies x_i by
    # (1 - 2 lr) or 1, w.p. 1/2 each, so A = ((1 - 2 lr)^2 + 1) / 2 I and both the Wu-Ma-E lr
    # and the mean-square threshold are 1 (by hand), half of GD's 2 / lambda_max(H) = 2
    hs = torch.stack([torch.diag(torch.tensor([2.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
    hs = hs.double()
    assert wu_ma_e_rate(hs, 1.0, 1) == pytest.approx(1.0)
    assert stability.mean_square_threshold(hs, 1, rel_tol=1e-10) == pytest.approx(1.0, rel=1e-8)
    # correlated rank-one examples: the one-step bound is strictly conservative (a gap of about
    # 22% in float64 arithmetic, the same on any machine; asked: more than 10%)
    hs = random_psd_hessians(n=6, r=4, rank_one=True, seed=0)
    top = float(torch.linalg.eigvalsh(hs.mean(0))[-1])
    grid = torch.linspace(1e-3, 2 / top, 4000, dtype=torch.float64).tolist()
    wme = max(lr for lr in grid if wu_ma_e_rate(hs, lr, 1) <= 1 + 1e-12)
    assert stability.mean_square_threshold(hs, 1, rel_tol=1e-9) > 1.1 * wme


def test_per_example_matrices_restrict_the_explicit_hessians(tiny):
    model, x, y, hs = tiny
    pe = stability.PerExampleCurvature(model, "mse", (x, y))
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(hs.shape[1], 4, generator=g, dtype=torch.float64))
    restricted = stability.per_example_matrices(pe, q)
    torch.testing.assert_close(restricted, q.T @ hs @ q, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="basis"):
        stability.per_example_matrices(pe, q[:5])


def test_second_moment_arguments_are_checked():
    hs = random_psd_hessians()
    with pytest.raises(ValueError, match="hessians"):
        stability.second_moment_map(hs[0], 0.1, 2)
    with pytest.raises(ValueError, match="symmetric"):
        stability.second_moment_map(hs + torch.triu(torch.ones(3, 3), 1), 0.1, 2)
    # float32 matrices asymmetric at their rounding level are accepted (and symmetrised)
    noisy = hs.float() + 1e-7 * torch.triu(torch.ones(3, 3), 1)
    torch.testing.assert_close(
        stability.second_moment_map(noisy, 0.1, 2)(torch.eye(3)),
        stability.second_moment_map(hs, 0.1, 2)(torch.eye(3)),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="s0 must be a second moment"):
        stability.sgd_second_moment(hs, 0.1, 2, 3, s0=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="batch_size"):
        stability.second_moment_map(hs, 0.1, 6)
    with pytest.raises(ValueError, match="lr"):
        stability.mean_square_rate(hs, 0.0, 2)
    with pytest.raises(ValueError, match="singular"):
        stability.mean_square_threshold(random_psd_hessians(n=2, r=3, rank_one=True), 1)


def test_sampled_runs_average_to_the_exact_second_moment_and_gd_runs_are_gd():
    hs = random_psd_hessians(n=6, r=3, seed=11)
    x0 = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    lr = 0.5 / float(torch.linalg.eigvalsh(hs.mean(0))[-1])
    runs = stability.sgd_run_norms(hs, lr, 2, 5, x0=x0, num_runs=4_000, seed=0)
    assert runs.shape == (4_000, 6) and torch.all(runs[:, 0] == 1)
    exact = stability.sgd_second_moment(hs, lr, 2, 5, s0=torch.outer(x0, x0))
    stderr = runs.std(0) / 4_000**0.5
    assert torch.all((runs.mean(0) - exact).abs() <= 5 * stderr + 1e-12)
    # the full batch has no randomness: every run is GD, norm for norm
    gd = stability.sgd_run_norms(hs, lr, 6, 5, x0=x0, num_runs=3, seed=1)
    step = torch.eye(3, dtype=torch.float64) - lr * hs.mean(0)
    x, expected = x0.clone(), [1.0]
    for _ in range(5):
        x = step @ x
        expected.append(float(x @ x / (x0 @ x0)))
    torch.testing.assert_close(gd, torch.tensor([expected] * 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x0"):
        stability.sgd_run_norms(hs, lr, 2, 5, x0=torch.zeros(3, dtype=torch.float64))
