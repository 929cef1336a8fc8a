"""Fast tests of notebook 03's experiment functions (gradcourse.experiments.ntk)."""

from __future__ import annotations

import math

import pytest
import torch

from gradcourse import losses, ntk, train
from gradcourse.cache import Cache
from gradcourse.experiments import ntk as nx
from gradcourse.train import Diverged

DT = torch.float64


def _random_psd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 3, generator=g, dtype=DT)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=DT)


# ----------------------------------------------------------------------------- nets, data, GD


def test_circle_and_tasks():
    x = nx.circle(nx.angle_grid(9))
    assert x.shape == (9, 2)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(9, dtype=DT))
    x1, y1 = nx.gaussian_task(5, seed=3)
    x2, y2 = nx.gaussian_task(5, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    torch.testing.assert_close(y1[:, 0], x1[:, 0] * x1[:, 1])
    task = nx.circle_task([0.0, 1.0], n_grid=7)
    torch.testing.assert_close(
        task["y"][:, 0], torch.sin(2 * torch.tensor([0.0, 1.0], dtype=DT)) / 2
    )


def test_gradient_descent_matches_torch_sgd():
    x, y = nx.gaussian_task(8, seed=1)
    ours = nx.make_net(2, 16, 2, seed=4)
    ref = nx.make_net(2, 16, 2, seed=4)
    history = nx.gradient_descent(ours, x, y, lr=0.5, steps=5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        losses.mse(ref(x), y).backward()
        opt.step()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert history.shape == (6,)
    torch.testing.assert_close(history[-1].item(), losses.mse(ref(x), y).item())


def test_gradient_descent_is_train_train_full_batch():
    """The notebook's GD loop makes the same updates as gradcourse.train.train with the squared
    loss: to the bit at lr = 1 (the notebook's), to rounding otherwise (the optimizer computes
    p - lr g in one operation). It stays a loop of its own for steps = 0 and its record."""
    x, y = nx.gaussian_task(8, seed=2)
    for lr, tol in ((1.0, 0.0), (0.7, 1e-12)):
        ours, ref = nx.make_net(2, 32, 2, seed=5), nx.make_net(2, 32, 2, seed=5)
        history = nx.gradient_descent(ours, x, y, lr=lr, steps=6)
        log = train.train(ref, x, y, loss="mse", lr=lr, steps=6, progress=False)
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol)
        losses_ref = torch.tensor(log.loss, dtype=torch.float64)
        torch.testing.assert_close(history, losses_ref, rtol=tol, atol=tol)


def test_gradient_descent_refuses_and_diverges():
    x, y = nx.gaussian_task(4)
    model = nx.make_net(2, 8, 1)
    with pytest.raises(ValueError, match="lr"):
        nx.gradient_descent(model, x, y, lr=0.0, steps=1)
    with pytest.raises(ValueError, match="steps"):
        nx.gradient_descent(model, x, y, lr=1.0, steps=-1)
    with pytest.raises(Diverged):
        nx.gradient_descent(model, x, 1e3 * y, lr=1e6, steps=50)


def test_analytic_helper_is_consistent():
    x1, x2 = nx.circle([0.1, 0.7, 2.0]), nx.circle([-1.0, 0.3])
    k12, t12 = nx.analytic(x1, x2, depth=3, beta=0.1)
    k21, t21 = nx.analytic(x2, x1, depth=3, beta=0.1)
    torch.testing.assert_close(t12, t21.T)
    torch.testing.assert_close(k12, k21.T)
    k11, t11 = nx.analytic(x1, depth=3, beta=0.1)
    torch.testing.assert_close(nx.analytic(x1, x1, depth=3, beta=0.1)[1], t11)


# ----------------------------------------------------------------------------- Fig. 1


def test_kernel_run_shapes_determinism_and_wide_limit():
    kw = dict(depth=1, steps=3, n_train=4, n_angles=5)
    a = nx.kernel_run(16, seed=1, **kw)
    b = nx.kernel_run(16, seed=1, **kw)
    assert a["curve0"].shape == (5,) and a["gram0"].shape == (4, 4) and a["loss"].shape == (4,)
    for key in a:
        assert torch.equal(a[key], b[key])
    # the curve is one column of the full empirical NTK
    model = nx.make_net(2, 16, 1, seed=1)
    xs = nx.circle(nx.angle_grid(5))
    full = ntk.empirical_ntk(model, xs, xs.new_tensor([[1.0, 0.0]]), method="jacobian")
    torch.testing.assert_close(a["curve0"], full[:, 0])
    # a wide one-hidden-layer net is close to the analytic limit (fluctuation ~ 1/sqrt(4096))
    wide = nx.kernel_run(4096, seed=0, depth=1, steps=0, n_train=4, n_angles=5)
    lim = nx.analytic_kernels(depth=1, n_train=4, n_angles=5)
    assert (wide["curve0"] - lim["curve"]).abs().max() < 0.05 * lim["curve"].abs().max()


def test_kernel_runs_uses_the_cache(tmp_path):
    cache = Cache(tmp_path)
    kw = dict(depth=1, steps=2, n_train=3, n_angles=4)
    first = nx.kernel_runs([8, 16], [0, 1], cache=cache, **kw)
    assert set(first) == {8, 16} and first[8]["curve0"].shape == (2, 4)
    assert len(list(tmp_path.glob("ntk-kernel-run-*.npz"))) == 4
    again = nx.kernel_runs([16], [1], cache=cache, **kw)
    assert torch.equal(again[16]["gramT"][0], first[16]["gramT"][1])
    with pytest.raises(ValueError, match="widths"):
        nx.kernel_runs([], [0])


def test_kernel_statistics_on_known_inputs():
    lim = {"curve": torch.tensor([1.0, 2.0], dtype=DT), "gram": torch.eye(2, dtype=DT)}
    curve0 = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=DT)
    runs = {
        "curve0": curve0,
        "curveT": 1.1 * curve0,
        "gram0": torch.stack([torch.eye(2, dtype=DT)] * 2),
        "gramT": torch.stack([2 * torch.eye(2, dtype=DT)] * 2),
    }
    s = nx.kernel_statistics(runs, lim)
    assert s["mean_error"] == 0 and s["spread"] == 0 and s["deviation"] == 0
    assert s["change"] == pytest.approx(1.0) and s["curve_change"] == pytest.approx(0.1)
    # spread: seeds 1 +- d around the limit -> std = d sqrt(2) over RMS(limit)
    runs["curve0"] = torch.tensor([[1.1, 2.1], [0.9, 1.9]], dtype=DT)
    s = nx.kernel_statistics(runs, lim)
    assert s["spread"] == pytest.approx(0.1 * math.sqrt(2) / math.sqrt(2.5))
    with pytest.raises(ValueError, match="2 seeds"):
        nx.kernel_statistics({k: v[:1] for k, v in runs.items()}, lim)


# ----------------------------------------------------------------------------- Fig. 2


def _kernels(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A joint NNGP and NTK over n training + m test points (random PSD matrices)."""
    return _random_psd(n + m, seed), _random_psd(n + m, seed + 100)


def test_gaussian_limit_endpoints():
    n, m = 4, 3
    k, t = _kernels(n, m, 0)
    y = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=DT)
    args = (k[:n, :n], k[n:, :n], k[n:, n:].diagonal(), t[:n, :n], t[n:, :n], y)
    start = nx.gaussian_limit(*args, steps=0)
    torch.testing.assert_close(start["mean"], torch.zeros(m, dtype=DT))
    torch.testing.assert_close(start["std"], k[n:, n:].diagonal().sqrt())
    end = nx.gaussian_limit(*args)
    torch.testing.assert_close(end["mean"], ntk.kernel_regression(t[:n, :n], t[n:, :n], y))
    # after many steps the finite-k formula reaches the limit (lr lambda_max / n < 1 here)
    late = nx.gaussian_limit(*args, lr=0.5, steps=100_000)
    torch.testing.assert_close(late["mean"], end["mean"])
    torch.testing.assert_close(late["std"], end["std"])
    # the mean at step k is kernel gradient descent from f0 = 0
    mid = nx.gaussian_limit(*args, lr=0.5, steps=7)
    kgd = ntk.kernel_gradient_descent(t[:n, :n], y, 0.5, 7, ntk_test_train=t[n:, :n]).test
    torch.testing.assert_close(mid["mean"], kgd)
    # on the training points themselves, the t -> inf function interpolates: no variance
    on_train = nx.gaussian_limit(
        k[:n, :n], k[:n, :n], k[:n, :n].diagonal(), t[:n, :n], t[:n, :n], y
    )
    torch.testing.assert_close(on_train["mean"], y)
    assert on_train["std"].max() < 1e-6


def test_gaussian_limit_matches_monte_carlo():
    n, m, samples = 3, 2, 20_000
    k, t = _kernels(n, m, 1)
    y = torch.tensor([1.0, -1.0, 0.5], dtype=DT)
    out = nx.gaussian_limit(
        k[:n, :n], k[n:, :n], k[n:, n:].diagonal(), t[:n, :n], t[n:, :n], y, lr=0.3, steps=5
    )
    # A_k = Theta(x, X) Theta^{-1} (I - (I - lr Theta / n)^k), built here with solve and
    # matrix_power (the function diagonalises Theta instead)
    theta, eye = t[:n, :n], torch.eye(n, dtype=DT)
    a = t[n:, :n] @ torch.linalg.solve(
        theta, eye - torch.linalg.matrix_power(eye - 0.3 * theta / n, 5)
    )
    torch.testing.assert_close(out["A"], a, rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(samples, n + m, generator=g, dtype=DT) @ torch.linalg.cholesky(k).T
    f = f0[:, n:] - (f0[:, :n] - y) @ a.T  # f_k = f0(x) - A (f0(X) - Y)
    se = out["std"] / math.sqrt(samples)
    assert ((f.mean(0) - out["mean"]).abs() < 4 * se).all()
    assert ((f.std(0) / out["std"] - 1).abs() < 4 / math.sqrt(2 * samples)).all()


def test_gaussian_limit_refuses_bad_shapes():
    k = _random_psd(3, 0)
    with pytest.raises(ValueError, match="ntk_train"):
        nx.gaussian_limit(k, k, k.diagonal(), k[:2, :2], k, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="steps"):
        nx.gaussian_limit(k, k, k.diagonal(), k, k, torch.zeros(3, dtype=DT), steps=-1)


def circle_limit_by_hand(angles, *, depth, beta, lr, steps, n_grid):
    """Fig. 2's prediction from scratch: the task on the unit circle (targets x1 x2 =
    sin(2 g) / 2, a grid of n_grid angles in [-pi, pi]), the joint analytic (NNGP, NTK) over grid
    + training points, A_k by solve / matrix_power (inv at k = inf), and the covariance of
    f_k(grid) = [I, -A] (f0(grid), f0(X)) + A Y as B K B^T."""
    g_train = torch.tensor(angles, dtype=DT)
    g_grid = torch.linspace(-math.pi, math.pi, n_grid, dtype=DT)
    n = len(g_train)
    gs = torch.cat([g_grid, g_train])
    pts = torch.stack([torch.cos(gs), torch.sin(gs)], dim=1)
    k, t = ntk.analytic_ntk(pts, depth=depth, weight_scale=1.0, bias_scale=beta)
    theta, eye = t[n_grid:, n_grid:], torch.eye(n, dtype=DT)
    if math.isinf(steps):
        a = t[:n_grid, n_grid:] @ torch.linalg.inv(theta)
    else:
        step = torch.linalg.matrix_power(eye - lr * theta / n, steps)
        a = t[:n_grid, n_grid:] @ torch.linalg.solve(theta, eye - step)
    b = torch.cat([torch.eye(n_grid, dtype=DT), -a], dim=1)
    cov = b @ k @ b.T
    return {"mean": a @ (torch.sin(2 * g_train) / 2), "std": cov.diagonal().sqrt(), "A": a}


@pytest.mark.parametrize(
    ("kwargs", "ref"),
    [
        (dict(n_grid=9), dict(depth=nx.PAPER_DEPTH, beta=0.1, lr=1.0, steps=math.inf)),
        (
            dict(depth=2, beta=0.4, lr=0.7, steps=6, n_grid=7),
            dict(depth=2, beta=0.4, lr=0.7, steps=6),
        ),
        (
            dict(depth=1, beta=0.0, steps=math.inf, n_grid=5),
            dict(depth=1, beta=0.0, lr=1.0, steps=math.inf),
        ),
    ],
)
def test_circle_limit_is_the_gaussian_prediction_of_the_analytic_kernels(kwargs, ref):
    angles = [-2.5, -0.8, 0.6, 2.2]  # notebook 03's Fig. 2
    assert nx.PAPER_DEPTH == 3 and nx.PAPER_BETA == 0.1  # Jacot et al.: L = 4, beta = 0.1
    out = nx.circle_limit(angles, **kwargs)
    expected = circle_limit_by_hand(angles, n_grid=kwargs["n_grid"], **ref)
    for key in ("mean", "std", "A"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-9, atol=1e-10)
    # a non-trivial prediction: a band of width ~0.1 between the points, a mean of size ~0.5
    assert expected["std"].max() > 0.05 and expected["mean"].abs().max() > 0.1


def test_circle_fit_run_is_deterministic_and_fits():
    a = nx.circle_fit_run(32, [-1.0, 0.5, 2.0], depth=1, seed=2, steps=200, n_grid=9)
    b = nx.circle_fit_run(32, [-1.0, 0.5, 2.0], depth=1, seed=2, steps=200, n_grid=9)
    assert torch.equal(a["fT_grid"], b["fT_grid"])
    assert a["f0_grid"].shape == (9,) and a["f0_train"].shape == (3,)
    assert float(a["loss"][0]) < 1e-3


def test_circle_predictors_against_solves_and_monte_carlo():
    angles = [-2.5, -0.8, 0.6, 2.2]
    p = nx.circle_predictors(angles, lr=1.0, steps=50, n_grid=11)
    limit = nx.circle_limit(angles, lr=1.0, steps=50, n_grid=11)
    torch.testing.assert_close(p["ntk"], limit["A"])
    torch.testing.assert_close(p["std"], limit["std"])
    task = nx.circle_task(angles, 11)
    k_all = ntk.analytic_ntk(torch.cat([task["x_grid"], task["x"]]), depth=3, bias_scale=0.1)[0]
    k_gt, k_tt = k_all[:11, 11:], k_all[11:, 11:]
    torch.testing.assert_close(p["k_train"], k_tt)
    # the NNGP posterior mean operator K(x, X) K^{-1}, by a solve
    torch.testing.assert_close(p["nngp"], torch.linalg.solve(k_tt, k_gt.T).T, rtol=1e-8, atol=1e-9)
    # the expected distance between the two own-predictions, by Monte Carlo over f0 ~ GP(0, K)
    g = torch.Generator().manual_seed(0)
    f0 = (
        torch.randn(20_000, 11 + 4, generator=g, dtype=DT)
        @ torch.linalg.cholesky(k_all + 1e-12 * torch.eye(15, dtype=DT)).T
    )
    runs = {"f0_grid": f0[:, :11], "f0_train": f0[:, 11:]}
    diff = nx.own_predictions(runs, p["ntk"], p["y"]) - nx.own_predictions(runs, p["nngp"], p["y"])
    mc = float(diff.pow(2).mean().sqrt())
    assert p["distance"] == pytest.approx(mc, rel=0.02)
    assert p["distance"] > 0.01


def test_own_prediction_gaps_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=DT)
    y = torch.tensor([1.0, -1.0], dtype=DT)
    runs = {
        "f0_grid": torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], dtype=DT),
        "f0_train": torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=DT),
    }
    own = nx.own_predictions(runs, a, y)
    # net 0: f0 - A (f0(X) - Y) = (0.1, 0.2, 0.3) - A (-0.5, 1.5) = (0.6, -0.3, -1.2)
    torch.testing.assert_close(own[0], torch.tensor([0.6, -0.3, -1.2], dtype=DT))
    torch.testing.assert_close(own[1], a @ y)
    runs["fT_grid"] = own + torch.tensor([[0.3], [0.0]], dtype=DT)
    torch.testing.assert_close(
        nx.own_prediction_gaps(runs, a, y), torch.tensor([0.3, 0.0]).double()
    )


def test_circle_fit_runs_stack_and_cache(tmp_path):
    cache = Cache(tmp_path)
    kw = dict(depth=1, steps=3, n_grid=5, lr=1.0, linearized=True, readout=True)
    runs = nx.circle_fit_runs([8, 16], [0, 2], [-1.0, 1.0], cache=cache, **kw)
    assert runs[8]["fT_grid"].shape == (2, 5) and runs[16]["flin_grid"].shape == (2, 5)
    assert runs[8]["lin_dist"].shape == (2, 4) and runs[16]["fro_grid"].shape == (2, 5)
    assert runs[8]["lin_steps"].tolist() == [[0, 1, 2, 3]] * 2
    one = nx.circle_fit_run(16, [-1.0, 1.0], seed=2, **kw)
    torch.testing.assert_close(runs[16]["fT_grid"][1], one["fT_grid"])
    assert len(list(tmp_path.glob("ntk-circle-fit-*.npz"))) == 4


# ----------------------------------------------------------------------------- Fig. 3


def test_kernel_pcs_are_orthonormal_functions():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=DT)
    pc = nx.kernel_pcs(x, depth=2, k=4)
    gram = pc["pcs"] @ pc["pcs"].T / 20
    torch.testing.assert_close(gram, torch.eye(4, dtype=DT))
    assert (pc["eigvals"][:-1] >= pc["eigvals"][1:]).all()
    assert (pc["pcs"].sum(1) > 0).all()
    theta = nx.analytic(x, depth=2, beta=0.1)[1]
    torch.testing.assert_close(theta @ pc["pcs"][1] / 20, pc["eigvals"][1] * pc["pcs"][1])
    with pytest.raises(ValueError, match="k"):
        nx.kernel_pcs(x, k=21)


def test_pc_run_records_and_follows_kernel_gd_when_wide():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    pc = nx.kernel_pcs(x, depth=1, k=2)
    coeffs = [0.0, 0.5]
    run = nx.pc_run(2048, x, pc["pcs"], coeffs, depth=1, steps=20)
    assert run["proj"].shape == (21, 2) and run["orth"].shape == (21,)
    assert run["proj"][0].abs().max() == 0 and run["orth"][0] == 0
    pred = nx.pc_prediction(pc["eigvals"], coeffs, lr=1.0, steps=20)
    dev = nx.line_deviation(run, pred)
    assert dev.max() < 0.1 * 0.5  # width 2048: within 10% of the target's size
    stacked = nx.line_deviation({k: torch.stack([v, v]) for k, v in run.items()}, pred)
    assert stacked.shape == (2, 21) and torch.equal(stacked[1], dev)
    with pytest.raises(ValueError, match="pcs"):
        nx.pc_run(8, x, pc["pcs"], [0.5])


def test_pc_run_linearised_prediction_is_gd_on_the_linearised_net():
    """proj_lin against GD run by hand on gc.ntk.linearize's model (Lee et al. 2019, eq. 5),
    and the Rayleigh quotients against the explicit-Jacobian NTK."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    pc = nx.kernel_pcs(x, depth=2, k=3)
    coeffs, steps, lr = [0.3, 0.5, -0.4], 6, 1.0
    run = nx.pc_run(16, x, pc["pcs"], coeffs, depth=2, seed=1, steps=steps, lr=lr)
    assert run["proj_lin"].shape == (steps + 1, 3) and run["quot0"].shape == (3,)
    model = nx.make_net(3, 16, 2, seed=1)
    theta0 = ntk.empirical_ntk(model, x, method="jacobian")
    torch.testing.assert_close(run["quot0"], nx.rayleigh_quotients(theta0, pc["pcs"]))
    f_lin = ntk.linearize(model)
    params = {k: v.clone() for k, v in f_lin.params0.items()}
    with torch.no_grad():
        f0 = model(x)[:, 0]
    target = f0 + torch.tensor(coeffs, dtype=DT) @ pc["pcs"]

    def cost(p):
        return 0.5 * (f_lin(p, x)[:, 0] - target).pow(2).mean()

    by_hand = [torch.zeros(3, dtype=DT)]
    for _ in range(steps):
        grads = torch.func.grad(cost)(params)
        params = {k: v - lr * grads[k] for k, v in params.items()}
        by_hand.append(pc["pcs"] @ (f_lin(params, x)[:, 0].detach() - f0) / 10)
    torch.testing.assert_close(run["proj_lin"], torch.stack(by_hand), rtol=1e-8, atol=1e-10)


def test_rayleigh_quotients_are_eigenvalues_on_eigenvectors():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(5), dtype=DT)
    pc = nx.kernel_pcs(x, depth=2, k=3)
    theta = nx.analytic(x, depth=2, beta=nx.PAPER_BETA)[1]
    torch.testing.assert_close(nx.rayleigh_quotients(theta, pc["pcs"]), pc["eigvals"])


def test_pc_runs_stack_and_cache(tmp_path):
    cache = Cache(tmp_path)
    kw = dict(dataset="mnist1d", n=20, depth=1, steps=4, lr=1.0)
    runs = nx.pc_runs([8], [0, 1], [0.0, 0.5], cache=cache, **kw)
    assert runs[8]["proj"].shape == (2, 5, 2) and runs[8]["proj_lin"].shape == (2, 5, 2)
    one = nx.pc_experiment(8, [0.0, 0.5], seed=1, **kw)
    torch.testing.assert_close(runs[8]["proj"][1], one["proj"])
    assert len(list(tmp_path.glob("ntk-pc-lin-run-*.npz"))) == 2


def test_pc_prediction_is_kernel_gradient_descent_along_the_pcs():
    """The closed form over eigenvalues equals the library's kernel gradient descent with the
    limiting NTK towards targets along its PCs, read in the PCs' coordinates."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    pc = nx.kernel_pcs(x, depth=2, k=3)
    coeffs, steps, n = [0.5, -1.0, 2.0], 12, x.shape[0]
    theta = nx.analytic(x, depth=2, beta=nx.PAPER_BETA)[1]
    target = torch.tensor(coeffs, dtype=DT) @ pc["pcs"]
    f = ntk.kernel_gradient_descent(theta, target, 1.0, torch.arange(steps + 1)).train
    proj = f @ pc["pcs"].T / n  # (steps + 1, k): f_t's coordinates along the PCs (f_0 = 0)
    pred = nx.pc_prediction(pc["eigvals"], coeffs, lr=1.0, steps=steps)
    torch.testing.assert_close(pred, proj, rtol=1e-10, atol=1e-12)


def test_half_times_and_prediction():
    lam = torch.tensor([0.5, 0.1], dtype=DT)
    pred = nx.pc_prediction(lam, [1.0, -2.0], lr=1.0, steps=10)
    torch.testing.assert_close(pred[0], torch.zeros(2, dtype=DT))
    torch.testing.assert_close(pred[3], torch.tensor([1 - 0.5**3, -2 * (1 - 0.9**3)], dtype=DT))
    t = nx.half_times(pred, [1.0, -2.0])
    # PC1 reaches exactly 1/2 at step 1; PC2 crosses between step 6 (1 - 0.9^6 = 0.469) and
    # step 7 (0.522), interpolated linearly
    lo, hi = 1 - 0.9**6, 1 - 0.9**7
    assert t[0].item() == 1.0
    assert t[1].item() == pytest.approx(6 + (0.5 - lo) / (hi - lo), rel=1e-12)
    # the continuous half-time of the recursion, ln 2 / -ln(1 - lambda), to a small fraction
    assert t[1].item() == pytest.approx(math.log(2) / -math.log(0.9), abs=0.05)
    assert math.isinf(nx.half_times(pred[:3], [1.0, -2.0])[1])
    # already half-learnt at t = 0, and leading (seed) dimensions kept
    assert nx.half_times(torch.full((4, 1), 0.7, dtype=DT), [1.0]).tolist() == [0.0]
    stacked = nx.half_times(torch.stack([pred, pred]), [1.0, -2.0])
    assert stacked.shape == (2, 2) and torch.equal(stacked[1], t)
    with pytest.raises(ValueError, match="non-zero"):
        nx.half_times(pred, [1.0, 0.0])
    ratios = nx.half_time_ratios(torch.stack([t, 2 * t]), t)
    torch.testing.assert_close(ratios, torch.full((2,), 1.5, dtype=DT))


def test_pc_inputs_refuses_unknown_dataset():
    with pytest.raises(ValueError, match="dataset"):
        nx.pc_inputs(8, dataset="cifar")


# ----------------------------------------------------------------------------- explore


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(width=1), "width"),
        (dict(width=10_000), "width"),
        (dict(depth=0), "depth"),
        (dict(depth=9), "depth"),
        (dict(beta=-0.1), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(steps=-1), "steps"),
        (dict(steps=5000), "steps"),
    ],
)
def test_explore_kernel_refuses_bad_values(kwargs, match):
    args = dict(width=8, depth=1, beta=0.1, steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        nx.explore_kernel(**args)


@pytest.mark.parametrize(("width", "depth", "beta"), [(2, 1, 0.0), (16, 2, 2.0)])
def test_explore_kernel_extremes_and_cache(tmp_path, width, depth, beta):
    cache = Cache(tmp_path)
    kw = dict(seeds=(0, 1), n_train=4, n_angles=5, cache=cache)
    r = nx.explore_kernel(width, depth, beta, 2, **kw)
    assert r["curve0"].shape == (2, 5) and r["curve"].shape == (5,)
    assert set(r["stats"]) >= {"spread", "deviation", "change"}
    again = nx.explore_kernel(width, depth, beta, 2, **kw)
    assert torch.equal(again["curveT"], r["curveT"])


# ----------------------------------------------------------------------------- scaling statistics


def test_init_kernels_are_the_kernel_runs_initial_kernels(tmp_path):
    init = nx.init_kernels(32, [0, 3], depth=2, n_train=5, n_angles=7)
    assert init["curve0"].shape == (2, 7) and init["gram0"].shape == (2, 5, 5)
    for i, seed in enumerate((0, 3)):
        run = nx.kernel_run(32, depth=2, seed=seed, steps=1, n_train=5, n_angles=7)
        torch.testing.assert_close(init["gram0"][i], run["gram0"])
        torch.testing.assert_close(init["curve0"][i], run["curve0"])
    grams = nx.init_grams(32, [0, 3], depth=2, n_train=5)
    torch.testing.assert_close(grams, init["gram0"])
    with pytest.raises(ValueError, match="seeds"):
        nx.init_grams(32, [])
    cache = Cache(tmp_path)
    kw = dict(depth=2, n_train=5, n_angles=7)
    runs = nx.init_kernel_runs([16, 32], [0, 3], cache=cache, **kw)
    torch.testing.assert_close(runs[32]["curve0"], init["curve0"])
    assert len(list(tmp_path.glob("ntk-init-kernels-*.npz"))) == 2
    again = nx.init_kernel_runs([32], [0, 3], cache=cache, **kw)
    assert torch.equal(again[32]["gram0"], runs[32]["gram0"])


def test_init_statistics_by_hand():
    limit = torch.tensor([1.0, 2.0], dtype=DT)
    curves = torch.tensor([[1.1, 2.2], [0.9, 2.0], [1.3, 1.9]], dtype=DT)
    s = nx.init_statistics(curves, limit)
    scale = math.sqrt((1 + 4) / 2)
    mean = curves.mean(0)
    std = curves.std(0)  # correction 1
    assert s["mean_error"] == pytest.approx(float((mean - limit).pow(2).mean().sqrt()) / scale)
    assert s["spread"] == pytest.approx(float(std.pow(2).mean().sqrt()) / scale)
    assert s["mean_stderr"] == pytest.approx(s["spread"] / math.sqrt(3))
    assert nx.spread(curves) == pytest.approx(s["spread"] * scale)
    with pytest.raises(ValueError, match="curves"):
        nx.init_statistics(curves[:1], limit)
    # the same statistics in another unit: divided by a given scale instead of RMS(limit)
    e = nx.ensemble_statistics(curves, limit, scale=0.5)
    assert e["spread"] == pytest.approx(s["spread"] * scale / 0.5)
    assert e["mean_error"] == pytest.approx(s["mean_error"] * scale / 0.5)
    with pytest.raises(ValueError, match="scale"):
        nx.ensemble_statistics(curves, limit, scale=0.0)


def test_limit_rivals_are_distances_from_the_limit():
    r = nx.limit_rivals(depth=3, beta=0.1, n_angles=9)
    assert set(r) == {
        "the limit with beta = 0",
        "the depth-4 limit",
        "the depth-2 limit",
        "the NNGP kernel",
    }
    xs = nx.circle(nx.angle_grid(9))
    x0 = xs.new_tensor([[1.0, 0.0]])
    lim = ntk.analytic_ntk(xs, x0, depth=3, bias_scale=0.1)[1][:, 0]
    deeper = ntk.analytic_ntk(xs, x0, depth=4, bias_scale=0.1)[1][:, 0]
    rel = float((deeper - lim).pow(2).mean().sqrt() / lim.pow(2).mean().sqrt())
    assert r["the depth-4 limit"] == pytest.approx(rel)
    assert all(v > 0.05 for v in r.values())
    # at beta = 0 the "beta = 0" rival is the limit itself; depth 1 has no shallower rival
    assert nx.limit_rivals(depth=1, beta=0.0, n_angles=9)["the limit with beta = 0"] == 0.0
    assert "the depth-0 limit" not in nx.limit_rivals(depth=1, n_angles=9)


def test_bootstrap_seeds_resamples_nets_within_each_sample():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 3, generator=gen, dtype=DT) + 2.0
    b = torch.randn(20, 3, generator=gen, dtype=DT)
    band = nx.bootstrap_seeds(lambda u, v: float(u.mean() - v.mean()), a, b, seed=1)
    # the same bootstrap on the per-net row means, through gradcourse.stats directly
    from gradcourse import stats

    ref = stats.bootstrap(
        lambda g: float(g[0].mean() - g[1].mean()),
        [a.mean(1).numpy(), b.mean(1).numpy()],
        seed=1,
    )
    assert band.estimate == pytest.approx(ref.estimate)
    assert band.low == pytest.approx(ref.low) and band.high == pytest.approx(ref.high)
    assert band.low < 2.0 < band.high and band.n == 20
    rms = nx.rms_band(torch.full((5,), 3.0, dtype=DT))
    assert rms.estimate == rms.low == rms.high == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least one"):
        nx.bootstrap_seeds(lambda: 0.0)


def test_band_distance_is_signed():
    from gradcourse.stats import Interval

    band = Interval(-0.8, -1.1, -0.6, 0.9, 10)
    assert nx.band_distance(band, -0.5) == pytest.approx(0.1)  # above the upper end
    assert nx.band_distance(band, -1.0) == pytest.approx(-0.1)  # inside, 0.1 from the low end
    assert nx.band_distance(band, -1.3) == pytest.approx(0.2)
    assert nx.farthest_end(band, -1.0) == pytest.approx(0.4)  # the upper end, -0.6
    assert nx.farthest_end(band, -0.8) == pytest.approx(0.3)  # the lower end, -1.1


def test_t_interval_is_students():
    band = nx.t_interval(torch.tensor([1.0, 2.0, 3.0], dtype=DT), level=0.9)
    # mean 2, standard deviation 1, t_{0.95, 2} = 2.919986
    half = 2.919986 / math.sqrt(3)
    assert band.estimate == pytest.approx(2.0)
    assert band.low == pytest.approx(2.0 - half, rel=1e-6)
    assert band.high == pytest.approx(2.0 + half, rel=1e-6)
    assert band.n == 3 and band.level == 0.9


def test_window_and_power_exponents():
    # "ratio = 8^-1/2 within a factor 2": 8^-e in [8^-1/2 / 2, 2 * 8^-1/2] <=> e in 1/2 -+ 1/3
    lo, hi = nx.window_exponents(8)
    assert lo == pytest.approx(1 / 6) and hi == pytest.approx(5 / 6)
    assert nx.window_exponents(4) == pytest.approx((0.0, 1.0))  # a x4 window accepts 0 and 1
    with pytest.raises(ValueError, match="exceed 1"):
        nx.window_exponents(1.0)
    from gradcourse.stats import Interval

    # a ratio narrow/wide of a quantity ~ width^-e, widths 128 and 1024: 8^e
    band = Interval(8**0.5, 8**0.4, 8**0.7, 0.9, 40)
    assert nx.power_exponents(band, 128 / 1024) == pytest.approx((0.4, 0.7))
    # the same as wide/narrow
    inverse = Interval(8**-0.5, 8**-0.7, 8**-0.4, 0.9, 40)
    assert nx.power_exponents(inverse, 1024 / 128) == pytest.approx((0.4, 0.7))
    with pytest.raises(ValueError, match="width ratio"):
        nx.power_exponents(band, 1.0)
    # a wide t-interval reaching below 0: the exponent is unbounded at that end
    assert nx.power_exponents(Interval(0.3, -0.1, 0.7, 0.9, 3), 8) == (
        pytest.approx(-math.log(0.7) / math.log(8)),
        math.inf,
    )


def test_bound_ratio_by_hand():
    widths = [50, 100, 200, 400]

    def planted(values):  # every net at a width has the same distance: the RMS is that value
        return [torch.full((4,), float(v), dtype=DT) for v in values]

    # exactly on the bound c w^-1/2: the ratio is 1 at every wider width
    on = nx.bound_ratio(widths, planted([w**-0.5 for w in widths]), w0=50)
    assert on.estimate == pytest.approx(1.0) and on.low == pytest.approx(1.0)
    # falling like w^-1: the tightest wider width is the next one, (100 / 50)^-1/2
    fast = nx.bound_ratio(widths, planted([1 / w for w in widths]), w0=50)
    assert fast.estimate == pytest.approx(2**-0.5)
    # a bump at width 100 (d sqrt(w) 1.3 times its value at w0) is a violation, 1.3
    bump = [50**-0.5, 1.3 * 100**-0.5, 200**-0.5, 400**-0.5]
    assert nx.bound_ratio(widths, planted(bump), w0=50).estimate == pytest.approx(1.3)
    # ... which a constant set at width 100 does not see
    assert nx.bound_ratio(widths, planted(bump), w0=100).estimate == pytest.approx(1 / 1.3)
    # the interval resamples nets within each width
    gen = torch.Generator().manual_seed(0)
    noisy = [w**-0.5 * (1 + 0.2 * torch.randn(10, generator=gen, dtype=DT)) for w in widths]
    band = nx.bound_ratio(widths, noisy, w0=50)
    assert band.low < band.estimate < band.high and band.n == 10
    with pytest.raises(ValueError, match="w0"):
        nx.bound_ratio(widths, planted(bump), w0=400)
    with pytest.raises(ValueError, match="w0"):
        nx.bound_ratio(widths, planted(bump), w0=60)


def test_relative_deviations_change_and_inflation_by_hand():
    limit = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    grams = torch.stack([limit, 2 * limit])
    # RMS(G - limit) / RMS(limit): 0 for the first, 1 for the second
    torch.testing.assert_close(
        nx.relative_deviations(grams, limit), torch.tensor([0.0, 1.0]).double()
    )
    runs = {"gram0": grams, "gramT": torch.stack([3 * limit, 2 * limit])}
    torch.testing.assert_close(nx.per_seed_change(runs), torch.tensor([2.0, 0.0]).double())
    torch.testing.assert_close(nx.per_seed_inflation(runs), torch.tensor([2.0, 0.0]).double())
    torch.testing.assert_close(nx.per_seed_growth(runs), torch.tensor([2.0, 0.0]).double())
    # a change orthogonal to the initial kernel inflates its norm but does not grow it
    ortho = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=DT)
    eye = torch.eye(2, dtype=DT)
    turned = {"gram0": eye[None], "gramT": (eye + 0.5 * ortho)[None]}
    assert float(nx.per_seed_growth(turned)[0]) == pytest.approx(0.0, abs=1e-15)
    assert float(nx.per_seed_inflation(turned)[0]) == pytest.approx(math.sqrt(1.25) - 1)


def test_slope_with_band_recovers_a_planted_power_law():
    gen = torch.Generator().manual_seed(0)
    widths = [64, 128, 256, 512, 1024]
    # per-initialisation values c w^-1/2 times lognormal noise: the rms over many is ~ w^-1/2
    values = [
        w**-0.5 * torch.exp(0.3 * torch.randn(200, generator=gen, dtype=torch.float64))
        for w in widths
    ]
    band = nx.slope_with_band(widths, values, summary="rms")
    assert band.low < -0.5 < band.high and band.high - band.low < 0.1
    assert band.estimate == pytest.approx(-0.5, abs=0.05)
    mean_band = nx.slope_with_band(widths, values, summary="mean")
    assert mean_band.low < -0.5 < mean_band.high
    with pytest.raises(ValueError, match="summary"):
        nx.slope_with_band(widths, values, summary="median")
    with pytest.raises(ValueError, match="one array of values per width"):
        nx.slope_with_band(widths[:1], values[:1])


def test_steps_to_learn_is_kernel_gd_closed_form():
    lam = 0.0063
    t = nx.steps_to_learn(lam, 0.9)
    assert 1 - (1 - lam) ** t >= 0.9 > 1 - (1 - lam) ** (t - 1)
    half = nx.steps_to_learn(lam, 0.5, lr=2.0)
    assert abs(half - math.log(2) / (2.0 * lam)) < 2  # the ln 2 / (lr lambda) rule
    with pytest.raises(ValueError, match="lr \\* eigval"):
        nx.steps_to_learn(2.0, 0.5)
    with pytest.raises(ValueError, match="strictly"):
        nx.steps_to_learn(0.1, 1.0)


def test_fashion_pc_inputs_are_pixels_over_255_with_balanced_labels():
    x, y = nx.pc_inputs(40, dataset="fashion_mnist", labels=True)
    assert x.shape == (40, 784) and x.dtype == torch.float64
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.max()) > 0.9
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10
    assert torch.equal(nx.pc_inputs(40, dataset="fashion_mnist"), x)


def test_circle_fit_linearized_prediction_is_gd_on_the_linearised_net():
    """flin_grid against GD run by hand on gc.ntk.linearize's model (Lee et al. 2019, eq. 5)."""
    from gradcourse import ntk

    angles, steps, lr = [-2.5, -0.8, 0.6, 2.2], 15, 1.0
    r = nx.circle_fit_run(8, angles, steps=steps, lr=lr, n_grid=9, linearized=True)
    task = nx.circle_task(angles, 9)
    model = nx.make_net(2, 8, nx.PAPER_DEPTH, beta=nx.PAPER_BETA, seed=0)
    f_lin = ntk.linearize(model)
    params = {k: v.clone() for k, v in f_lin.params0.items()}

    def cost(p):
        return 0.5 * (f_lin(p, task["x"])[:, 0] - task["y"][:, 0]).pow(2).mean()

    for _ in range(steps):
        grads = torch.func.grad(cost)(params)
        params = {k: v - lr * grads[k] for k, v in params.items()}
    by_hand = f_lin(params, task["x_grid"])[:, 0].detach()
    torch.testing.assert_close(r["flin_grid"], by_hand, rtol=1e-8, atol=1e-10)
    plain = nx.circle_fit_run(8, angles, steps=2, n_grid=9)
    assert "flin_grid" not in plain and "lin_dist" not in plain and "fro_grid" not in plain
    # lin_dist: the RMS over the grid of f_t - f_lin_t at every step t
    assert r["lin_dist"].shape == (steps + 1,) and float(r["lin_dist"][0]) == 0.0
    assert r["lin_steps"].tolist() == list(range(steps + 1))
    final = float((r["fT_grid"] - r["flin_grid"]).pow(2).mean().sqrt())
    assert float(r["lin_dist"][-1]) == pytest.approx(final, rel=1e-10)
    shorter = nx.circle_fit_run(8, angles, steps=6, lr=lr, n_grid=9, linearized=True)
    at_6 = float((shorter["fT_grid"] - shorter["flin_grid"]).pow(2).mean().sqrt())
    assert float(r["lin_dist"][6]) == pytest.approx(at_6, rel=1e-10)
    # every 4th step from 0, and the last: steps 0, 4, 8, 12, 15
    sparse = nx.circle_fit_run(
        8, angles, steps=steps, lr=lr, n_grid=9, linearized=True, record_every=4
    )
    assert sparse["lin_steps"].tolist() == [0, 4, 8, 12, 15]
    torch.testing.assert_close(sparse["lin_dist"], r["lin_dist"][[0, 4, 8, 12, 15]])
    torch.testing.assert_close(sparse["fT_grid"], r["fT_grid"])


def test_circle_fit_readout_is_the_readout_layer_trained_to_convergence():
    """fro_grid against the readout layer's minimum-change least-squares solution, set into the
    net and evaluated: the limit of GD on the readout layer alone from its initialisation."""
    angles, width = [-2.5, -0.8, 0.6, 2.2], 8
    r = nx.circle_fit_run(width, angles, steps=3, n_grid=9, readout=True)
    task = nx.circle_task(angles, 9)
    model = nx.make_net(2, width, nx.PAPER_DEPTH, beta=nx.PAPER_BETA, seed=0)
    last = model.layers[-1]
    feats = {}
    hook = last.register_forward_hook(lambda m, inp, out: feats.__setitem__("a", inp[0]))
    with torch.no_grad():
        f0 = model(task["x"])[:, 0]
    hook.remove()
    # the readout is f = sw W a / sqrt(n) + beta b: its gradient w.r.t. (W, b) is (sw a / sqrt(n), beta)
    phi = torch.cat(
        [last.weight_scale * feats["a"] / math.sqrt(width), torch.full((4, 1), last.bias_scale)],
        dim=1,
    ).double()
    # the minimum-norm change that fits, the one GD from the initialisation converges to
    delta = phi.T @ torch.linalg.solve(phi @ phi.T, (task["y"][:, 0] - f0)[:, None])
    with torch.no_grad():
        last.weight += delta[:width, 0][None, :]
        last.bias += delta[width:, 0]
        fitted = model(task["x_grid"])[:, 0]
        assert torch.allclose(model(task["x"])[:, 0], task["y"][:, 0], atol=1e-10)
    torch.testing.assert_close(r["fro_grid"], fitted, rtol=1e-6, atol=1e-7)  # a 4 x 4 solve
    # the readout layer's own empirical NTK, the kernel used: GD on the readout alone for k
    # steps (the other layers frozen, so they do not move) is kernel GD with it
    net = nx.make_net(2, width, nx.PAPER_DEPTH, beta=nx.PAPER_BETA, seed=0)
    params = dict(net.layers[-1].named_parameters(prefix=f"layers.{len(net.layers) - 1}"))
    k_xx = ntk.empirical_ntk(net, task["x"], params=params)
    k_gx = ntk.empirical_ntk(net, task["x_grid"], task["x"], params=params)
    torch.testing.assert_close(k_xx, phi @ phi.T)
    with torch.no_grad():
        f0_grid = net(task["x_grid"])[:, 0]
    for layer in net.layers[:-1]:
        layer.requires_grad_(False)
    before = net.layers[0].weight.clone()
    nx.gradient_descent(net, task["x"], task["y"], lr=1.0, steps=50)
    assert torch.equal(net.layers[0].weight, before)
    with torch.no_grad():
        gd = net(task["x_grid"])[:, 0]
    kgd = ntk.kernel_gradient_descent(
        k_xx, task["y"][:, 0], 1.0, 50, ntk_test_train=k_gx, f0_train=f0, f0_test=f0_grid
    ).test
    torch.testing.assert_close(gd, kgd, rtol=1e-8, atol=1e-10)
