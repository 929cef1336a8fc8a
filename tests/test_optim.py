"""gradcourse.optim: SGDP and AdamP step by step against the authors' ``adamp`` package, the
projection's geometry, diffGrad against the authors' fixed formula and its aliased version
against Adam at half the rate, and the momentum norm-growth identity on exactly scale-invariant
layers (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcourse import optim as go

adamp = pytest.importorskip("adamp")


def invariant_net(seed: int = 0, width: int = 16) -> nn.Module:
    """784 -> width -> width -> 10 with bias-free linear layers each followed by a BatchNorm
    without affine parameters and a tiny eps (training mode): the two hidden weights are exactly
    scale-invariant; the last layer is not."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, width, bias=False),
        nn.BatchNorm1d(width, affine=False, eps=1e-12),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width, affine=False, eps=1e-12),
        nn.ReLU(),
        nn.Linear(width, 10),
    ).double()


def batches(n_steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        x = torch.randn(32, 20, generator=g, dtype=torch.float64)
        yield x, torch.randint(0, 10, (32,), generator=g)


def run(model, opt, n_steps=12, seed=0):
    for x, y in batches(n_steps, seed):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        dict(lr=0.05, momentum=0.0, weight_decay=1e-3),
        dict(lr=0.1, momentum=0.9, dampening=0.1, delta=0.0),  # delta 0: never projects
    ],
)
def test_sgdp_equals_the_adamp_package_step_by_step(kwargs):
    a, b = invariant_net(1), invariant_net(1)
    mine = run(a, go.SGDP(a.parameters(), **kwargs))
    theirs = run(b, adamp.SGDP(b.parameters(), **kwargs))
    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=1e-2),
        dict(lr=1e-2, weight_decay=1e-2, nesterov=True),
        dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, wd_ratio=0.5, delta=0.2),
    ],
)
def test_adamp_equals_the_adamp_package_step_by_step(kwargs):
    a, b = invariant_net(2), invariant_net(2)
    mine = run(a, go.AdamP(a.parameters(), **kwargs))
    theirs = run(b, adamp.AdamP(b.parameters(), **kwargs))
    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


def test_projection_removes_the_radial_part_on_invariant_layers_only():
    model = invariant_net(3)
    x, y = next(batches(1, 3))
    F.cross_entropy(model(x), y).backward()
    hidden = [model[0].weight, model[3].weight]
    for w in hidden:  # w . grad = 0 per row, to rounding (the layer is scale-invariant)
        g, w = w.grad, w.detach()
        assert float((w * g).sum(1).abs().max()) < 1e-7 * float(w.norm() * g.norm())
        update = torch.randn_like(w)
        new, projected = go.scale_invariant_projection(w, g, update)
        assert projected
        # eps = 1e-8 in the unit vectors leaves a radial part of about eps / ||row||
        assert float((w * new).sum(1).abs().max()) < 1e-7 * float(w.norm() * new.norm())
        # only the radial part changed: the tangential part is the update's own
        unit = w / w.norm(dim=1, keepdim=True)
        tangential = update - unit * (unit * update).sum(1, keepdim=True)
        torch.testing.assert_close(new, tangential, rtol=1e-6, atol=1e-7)
    last = model[6].weight  # not scale-invariant: its gradient has a radial part
    update = torch.randn_like(last)
    same, projected = go.scale_invariant_projection(last, last.grad, update)
    assert not projected and torch.equal(same, update)
    bias = model[6].bias
    assert go.scale_invariant_projection(bias, bias.grad, bias.grad)[1] is False


def test_sgdp_steps_are_tangent_so_the_norm_grows_only_at_second_order():
    """On a scale-invariant weight the projected update u is orthogonal to w, so without weight
    decay ||w - lr u||^2 = ||w||^2 + lr^2 ||u||^2 at every step (to eps), and the norm grows
    far less than under SGD with the same momentum, whose update keeps a radial part."""
    a, b = invariant_net(4), invariant_net(4)
    w, lr = a[0].weight, 0.5
    opt_p = go.SGDP(a.parameters(), lr=lr, momentum=0.9)
    before = float(w.detach().pow(2).sum())
    for x, y in batches(30, 0):
        opt_p.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt_p.step()
        assert opt_p.state[w]["projected"]
        after = float(w.detach().pow(2).sum())
        u_sq = float(opt_p.state[w]["momentum_buffer"].pow(2).sum())  # the projected update
        assert after - before == pytest.approx(lr**2 * u_sq, rel=1e-6)
        before = after
    assert not opt_p.state[a[6].weight]["projected"]
    run(b, torch.optim.SGD(b.parameters(), lr=lr, momentum=0.9), 30)
    n0 = float(invariant_net(4)[0].weight.norm())
    assert float(b[0].weight.norm()) / n0 > 2 * float(w.norm()) / n0


def _adam_reference(p, grads, lr, betas, eps, xi_of):
    """Adam moments with diffGrad_v2's step, written out: the friction from xi_of(prev, g)."""
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    prev = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        xi = xi_of(prev, g)
        prev = g
        p = p - lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) * m * xi / (v.sqrt() + eps)
    return p


@pytest.mark.parametrize("aliased", [False, True])
def test_diffgrad_is_the_authors_fixed_formula_and_aliasing_gives_xi_one_half(aliased):
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(6)]
    w0 = torch.randn(7, generator=g, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = go.DiffGrad([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, aliased=aliased)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    if aliased:  # the first step's stored gradient is 0 (as in the code), then the live one
        want = _adam_reference(
            w0,
            grads,
            0.01,
            (0.9, 0.99),
            1e-8,
            lambda a, b: 1 / (1 + torch.exp(-b.abs())) if not a.any() else torch.full_like(b, 0.5),
        )
        assert torch.equal(opt.state[p]["xi"], torch.full_like(w0, 0.5))
    else:
        want = _adam_reference(
            w0, grads, 0.01, (0.9, 0.99), 1e-8, lambda a, b: 1 / (1 + torch.exp(-(a - b).abs()))
        )
        assert float(opt.state[p]["xi"].min()) > 0.5
    torch.testing.assert_close(p.detach(), want, rtol=1e-13, atol=1e-15)


def test_aliased_diffgrad_is_adam_at_half_the_rate_from_its_second_step():
    """With eps = 0 (diffGrad's eps sits outside the bias correction of v, Adam's inside), after
    one common first step the aliased diffGrad and Adam at half the rate are the same function
    of the gradients."""
    a, b = invariant_net(6), invariant_net(6)
    opt_a = go.DiffGrad(a.parameters(), lr=1e-2, eps=0.0, aliased=True)
    opt_b = torch.optim.Adam(b.parameters(), lr=5e-3, eps=0.0)
    run(a, opt_a, 1)
    with torch.no_grad():  # the same point after the first step, and the same moments
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            q.copy_(p)
            opt_b.state[q] = {
                "step": torch.tensor(1.0, dtype=torch.float64),
                "exp_avg": opt_a.state[p]["exp_avg"].clone(),
                "exp_avg_sq": opt_a.state[p]["exp_avg_sq"].clone(),
            }
    mine, adam = run(a, opt_a, 10, seed=3), run(b, opt_b, 10, seed=3)
    torch.testing.assert_close(mine, adam, rtol=1e-10, atol=1e-12)


def test_diffgrad_weight_decay_enters_the_gradient():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    q = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt_p = go.DiffGrad([p], lr=0.1, weight_decay=0.5)
    opt_q = go.DiffGrad([q], lr=0.1)
    p.grad = torch.zeros(3, dtype=torch.float64)
    q.grad = 0.5 * q.detach().clone()
    opt_p.step()
    opt_q.step()
    torch.testing.assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99])
def test_momentum_norm_identity_on_exactly_scale_invariant_layers(beta):
    model = invariant_net(7)
    w = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=beta)
    norms_sq, updates_sq = [float(w.detach().pow(2).sum())], []
    for x, y in batches(25, 7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        buf = opt.state[w].get("momentum_buffer")  # torch keeps none at momentum 0: p_t = g_t
        updates_sq.append(float((w.grad if buf is None else buf).pow(2).sum()))
        norms_sq.append(float(w.detach().pow(2).sum()))
    predicted = go.momentum_norm_prediction(norms_sq[0], updates_sq, 0.3, beta)
    torch.testing.assert_close(
        predicted, torch.tensor(norms_sq, dtype=torch.float64), rtol=1e-9, atol=0
    )
    if beta == 0.99:  # momentum's term is most of the growth
        plain = go.momentum_norm_prediction(norms_sq[0], updates_sq, 0.3, 0.0)
        assert float(predicted[-1] - predicted[0]) > 3 * float(plain[-1] - plain[0])


def test_angular_update_against_closed_forms():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for theta in (0.0, 1e-6, 0.3, math.pi / 2, 3.0):
        b = 2.5 * torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
        assert go.angular_update(a, b) == pytest.approx(theta, rel=1e-9, abs=1e-15)
    assert go.angular_update(a.view(1, 3), 7 * a.view(1, 3)) == 0.0  # a rescaling does not turn it
    with pytest.raises(ValueError, match="zero weight"):
        go.angular_update(a, torch.zeros(3))


def test_weight_norms_and_effective_steps():
    model = invariant_net(8)
    norms = go.weight_norms(model)
    assert sorted(norms) == ["0.weight", "3.weight", "6.weight"]
    assert norms["0.weight"] == pytest.approx(float(model[0].weight.norm()))
    steps = go.effective_steps(0.1, norms)
    assert steps["3.weight"] == pytest.approx(0.1 / norms["3.weight"] ** 2)
    with pytest.raises(ValueError, match="no parameters named"):
        go.weight_norms(model, ["fc.weight"])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: go.SGDP(p, lr=-1.0), "lr"),
        (lambda p: go.SGDP(p, lr=0.1, momentum=1.0), "momentum"),
        (lambda p: go.AdamP(p, betas=(0.9, 1.5)), r"betas\[1\]"),
        (lambda p: go.AdamP(p, wd_ratio=2.0), "wd_ratio"),
        (lambda p: go.DiffGrad(p, eps=-1.0), "eps"),
    ],
)
def test_bad_hyperparameters_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make([nn.Parameter(torch.zeros(2))])


def test_a_state_dict_round_trip_continues_identically():
    a = invariant_net(9)
    opt = go.AdamP(a.parameters(), lr=1e-2, weight_decay=1e-2)
    run(a, opt, 5)
    b = copy.deepcopy(a)
    opt_b = go.AdamP(b.parameters(), lr=1e-2, weight_decay=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # it would share tensors
    torch.testing.assert_close(run(a, opt, 4, seed=1), run(b, opt_b, 4, seed=1), rtol=0, atol=0)
