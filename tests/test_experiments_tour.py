"""The tour's helpers against closed forms: on a quadratic loss the Hessian is its matrix and the
second-order Taylor model is exact; on a cubic the Taylor errors are known terms (slopes 2 and
3); on a quartic the central difference's error is eps^2 v^3 / 3 exactly; the symmetry error of
an explicit matrix is its closed form; and the checks of notebook 00 catch the planted bugs
(the Gauss-Newton product in place of the HVP) except where they cannot (symmetry)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gradcourse as gc
from gradcourse.experiments import tour


def _quadratic(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    params = {
        "w": torch.randn(3, generator=gen, dtype=torch.float64),
        "v": torch.randn(2, generator=gen, dtype=torch.float64),
    }

    def loss(p):
        theta = torch.cat([p["w"], p["v"]])
        return 0.5 * theta @ a @ theta - b @ theta

    return loss, params, a


def _flat(d):
    return torch.cat([d["w"], d["v"]])


def _cubic():
    """L = 1/2 theta'A theta + sum(theta^3)/6: H = A + diag(theta), and along v,
    L(theta + t v) = L + t g.v + t^2/2 v'Hv + t^3/6 sum(v^3) exactly."""
    quad, params, a = _quadratic()

    def loss(p):
        return quad(p) + (_flat(p) ** 3).sum() / 6

    return loss, params, a


def test_hvp_equals_the_quadratic_form_matrix():
    loss, params, a = _quadratic()
    v = tour.random_direction(params, seed=1)
    hv = tour.hvp(loss, params, v)
    expected = a @ _flat(v)
    assert torch.allclose(_flat(hv), expected, rtol=1e-13, atol=1e-13)


def test_random_direction_has_unit_norm_and_depends_on_seed():
    _, params, _ = _quadratic()
    d0, d1 = tour.random_direction(params, 0), tour.random_direction(params, 1)
    norm = torch.sqrt(sum((t**2).sum() for t in d0.values()))
    assert norm.item() == pytest.approx(1.0, abs=1e-14)
    assert not torch.equal(d0["w"], d1["w"])
    assert torch.equal(d0["w"], tour.random_direction(params, 0)["w"])


def test_second_order_taylor_is_exact_on_a_quadratic():
    loss, params, a = _quadratic()
    direction = tour.random_direction(params, 2)
    r = tour.taylor_along_direction(loss, params, direction, radius=3.0, num=11)
    d = _flat(direction)
    assert r["curvature"].item() == pytest.approx((d @ a @ d).item(), rel=1e-12)
    assert torch.allclose(r["quadratic"], r["loss"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(r["linear"], r["loss"], rtol=1e-3)  # the curvature term matters
    with pytest.raises(ValueError, match="radius"):
        tour.taylor_along_direction(loss, params, direction, radius=0.0)
    wrong = tour.taylor_along_direction(loss, params, direction, radius=3.0, num=11, curvature=0)
    assert torch.allclose(wrong["quadratic"], wrong["linear"])  # curvature 0: the linear model


def test_taylor_error_slopes_on_a_cubic():
    loss, params, a = _cubic()
    direction = tour.random_direction(params, 3)
    d = _flat(direction)
    ts = torch.logspace(-2, -1, 5, dtype=torch.float64)
    r = tour.taylor_error_slopes(loss, params, direction, ts)
    cubic = (d**3).sum().abs().item() / 6
    assert torch.allclose(r["quadratic_error"], cubic * ts**3, rtol=1e-6)
    assert r["quadratic_slope"] == pytest.approx(3.0, abs=1e-6)
    # the first-order error is |t^2/2 v'Hv + t^3/6 sum v^3|: slope 2 while t is small
    curvature = d @ a @ d + (_flat(params) * d**2).sum()
    assert r["curvature"].item() == pytest.approx(curvature.item(), rel=1e-12)
    exact = (0.5 * ts**2 * curvature + ts**3 * (d**3).sum() / 6).abs()
    assert torch.allclose(r["linear_error"], exact, rtol=1e-6)
    assert r["linear_slope"] == pytest.approx(2.0, abs=0.05)
    # a wrong curvature (half of v'Av) leaves a t^2 term in the second-order model: slope 2
    half = 0.5 * curvature.item()
    wrong = tour.taylor_error_slopes(loss, params, direction, ts, curvature=half)
    assert wrong["quadratic_slope"] == pytest.approx(2.0, abs=0.05)
    with pytest.raises(ValueError, match="positive"):
        tour.taylor_error_slopes(loss, params, direction, torch.tensor([0.0, 0.1]))


def test_taylor_error_slope_is_nan_when_an_error_is_exactly_zero():
    loss, params, _ = _quadratic()
    direction = {k: torch.zeros_like(p) for k, p in params.items()}  # L constant along it
    r = tour.taylor_error_slopes(loss, params, direction, torch.tensor([0.1, 0.2]))
    assert r["quadratic_slope"] != r["quadratic_slope"]  # NaN


def _quartic():
    """L = sum(theta^4) / 12: g = theta^3 / 3, H = diag(theta^2), and the central difference
    of g along v is H v + eps^2 v^3 / 3 exactly."""
    _, params, _ = _quadratic()

    def loss(p):
        return (_flat(p) ** 4).sum() / 12

    return loss, params


def test_central_difference_error_is_eps_squared_v_cubed_over_3():
    loss, params = _quartic()
    v = tour.random_direction(params, 4)
    hv = tour.hvp(loss, params, v)
    assert torch.allclose(_flat(hv), _flat(params) ** 2 * _flat(v), rtol=1e-13)
    for eps in (1e-1, 1e-2):
        fd = tour.central_difference(loss, params, v, eps)
        assert torch.allclose(_flat(fd) - _flat(hv), eps**2 * _flat(v) ** 3 / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        tour.central_difference(loss, params, v, 0.0)


def test_finite_difference_sweep_against_the_closed_form():
    loss, params = _quartic()
    v = tour.random_direction(params, 4)
    hv = tour.hvp(loss, params, v)
    epsilons = [1e-1, 1e-2, 1e-3]
    r = tour.finite_difference_sweep(loss, params, v, hv, epsilons)
    v3, ref = _flat(v) ** 3 / 3, _flat(hv)
    expected = [(e**2 * v3).abs().max().item() / ref.abs().max().item() for e in epsilons]
    assert r["error"].tolist() == pytest.approx(expected, rel=1e-5)
    assert gc.plotting.loglog_slope(r["eps"], r["error"]) == pytest.approx(2.0, abs=1e-4)
    g = torch.cat([t.flatten() for t in torch.func.grad(loss)(params).values()])
    u = torch.finfo(torch.float64).eps / 2
    model = [u * g.abs().max().item() / (e * ref.abs().max().item()) for e in epsilons]
    assert r["rounding_model"].tolist() == pytest.approx(model, rel=1e-12)
    # a wrong product (2 H v): the error stays near 1/2 whatever eps, it does not fall as eps^2
    wrong = tour.finite_difference_sweep(
        loss, params, v, {k: 2 * t for k, t in hv.items()}, epsilons
    )
    assert wrong["error"].min().item() > 0.4
    with pytest.raises(ValueError, match="epsilons"):
        tour.finite_difference_sweep(loss, params, v, hv, [1e-3, -1e-3])


def test_symmetry_error_closed_form():
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    u, v = (
        torch.randn(4, generator=gen, dtype=torch.float64),
        torch.randn(4, generator=gen, dtype=torch.float64),
    )

    def wrap(t):
        return {"a": t[:3], "b": t[3:]}

    sym = m + m.T
    assert tour.symmetry_error(wrap(u), wrap(sym @ v), wrap(v), wrap(sym @ u)) < 1e-15
    expected = abs(u @ m @ v - v @ m @ u) / max(
        u.norm() * (m @ v).norm(), v.norm() * (m @ u).norm()
    )
    measured = tour.symmetry_error(wrap(u), wrap(m @ v), wrap(v), wrap(m @ u))
    assert measured == pytest.approx(expected.item(), rel=1e-12)
    assert measured > 0.01
    zero = wrap(torch.zeros(4, dtype=torch.float64))
    assert tour.symmetry_error(wrap(u), zero, wrap(v), zero) == 0.0  # the zero map passes


def _tiny_net(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    model = gc.models.MLP(5, [4], 3, activation="tanh", seed=seed).double()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    return model, params, loss, x, y


def test_hvp_equals_the_course_hessian_operator_cached_uncached_and_on_a_block():
    model, params, loss, x, y = _tiny_net()
    vs = [tour.random_direction(params, s) for s in range(3)]
    ref = torch.stack(
        [torch.cat([t.flatten() for t in tour.hvp(loss, params, v).values()]) for v in vs], 1
    )
    block = torch.stack([torch.cat([t.flatten() for t in v.values()]) for v in vs], 1)
    for cache in (True, False):
        op = gc.curvature.HessianOperator(model, "ce", (x, y), cache=cache)
        assert tour.relative_error(op @ block[:, 0], ref[:, 0]) < 1e-12
        assert tour.relative_error(op @ block, ref) < 1e-12


def test_the_checks_catch_the_gauss_newton_product_but_symmetry_cannot():
    model, params, loss, x, y = _tiny_net()
    u, v = tour.random_direction(params, 1), tour.random_direction(params, 2)
    hess = gc.curvature.HessianOperator(model, "ce", (x, y))
    ggn = gc.curvature.GGNOperator(model, "ce", (x, y))

    def product(op, w):
        return op.unflatten(op @ torch.cat([t.flatten() for t in w.values()]))

    hv = tour.hvp(loss, params, v)
    claims = gc.claims.Claims("test", write=False, verbose=False, profile="ci")
    exact = claims.check(
        "HVP exact", tour.relative_error(hv, product(hess, v)), 0.0, tol=1e-12, kind="sanity"
    )
    sym = claims.check(
        "symmetric",
        tour.symmetry_error(u, hv, v, tour.hvp(loss, params, u)),
        0.0,
        tol=1e-12,
        kind="sanity",
    )
    assert tour.recheck(exact, tour.relative_error(product(ggn, v), hv), "Gv") is True
    ggn_asymmetry = tour.symmetry_error(u, product(ggn, v), v, product(ggn, u))
    assert tour.recheck(sym, ggn_asymmetry, "Gv") is False  # necessary, not sufficient


def test_recheck_applies_the_same_comparison(capsys):
    claims = gc.claims.Claims("test", write=False, verbose=False, profile="ci")
    verdict = claims.check("slope", 3.01, 3.0, tol=0.1, kind="sanity")
    assert tour.recheck(verdict, 2.0, "a wrong curvature") is True
    assert "caught:     fails 'slope' on a wrong curvature: measured 2" in capsys.readouterr().out
    assert tour.recheck(verdict, 3.05, "a near miss") is False
    assert "NOT caught: passes" in capsys.readouterr().out
    below = claims.check("ratio", 0.05, 0.1, compare="<=", kind="sanity")
    assert tour.recheck(below, 0.2, "x") is True and tour.recheck(below, 0.1, "x") is False


def test_time_median_warms_up_once_then_takes_the_median():
    calls = []
    seconds = tour.time_median(lambda: calls.append(1), repeats=3)
    assert len(calls) == 4 and seconds >= 0
    with pytest.raises(ValueError, match="repeats"):
        tour.time_median(lambda: None, repeats=0)


def test_relative_error():
    ref = {"a": torch.tensor([2.0, -4.0]), "b": torch.tensor([1.0])}
    approx = {"a": torch.tensor([2.0, -4.0]), "b": torch.tensor([1.4])}
    assert tour.relative_error(approx, ref) == pytest.approx(0.1)
    assert tour.relative_error(torch.ones(3), torch.ones(3)) == 0.0
    with pytest.raises(ValueError, match="all zeros"):
        tour.relative_error(torch.ones(2), torch.zeros(2))
