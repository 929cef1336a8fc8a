"""The tour's helpers against closed forms: on a quadratic loss the Hessian is its matrix and the
second-order Taylor model is exact."""

from __future__ import annotations

import pytest
import torch

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


def test_hvp_equals_the_quadratic_form_matrix():
    loss, params, a = _quadratic()
    v = tour.random_direction(params, seed=1)
    hv = tour.hvp(loss, params, v)
    expected = a @ torch.cat([v["w"], v["v"]])
    assert torch.allclose(torch.cat([hv["w"], hv["v"]]), expected, rtol=1e-13, atol=1e-13)


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
    d = torch.cat([direction["w"], direction["v"]])
    assert r["curvature"].item() == pytest.approx((d @ a @ d).item(), rel=1e-12)
    assert torch.allclose(r["quadratic"], r["loss"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(r["linear"], r["loss"], rtol=1e-3)  # the curvature term matters
    with pytest.raises(ValueError, match="radius"):
        tour.taylor_along_direction(loss, params, direction, radius=0.0)


def test_relative_error():
    ref = {"a": torch.tensor([2.0, -4.0]), "b": torch.tensor([1.0])}
    approx = {"a": torch.tensor([2.0, -4.0]), "b": torch.tensor([1.4])}
    assert tour.relative_error(approx, ref) == pytest.approx(0.1)
    assert tour.relative_error(torch.ones(3), torch.ones(3)) == 0.0
    with pytest.raises(ValueError, match="all zeros"):
        tour.relative_error(torch.ones(2), torch.zeros(2))
