"""gradcourse.directional: directional sharpness, line search, coordinate clipping and
pseudo-updates, against exact Hessians, hand-written attention, torch's optimisers and
torch's clip_grad_value_."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradcourse as gc
from gradcourse.curvature import HessianOperator, LiveHessianOperator
from gradcourse.directional import (
    DIRECTIONS,
    PseudoUpdates,
    clip_coordinates,
    clip_coordinates_,
    coordinate_threshold,
    directional_sharpness,
    directional_sharpnesses,
    line_search,
)

# ----------------------------------------------------------------------------- clipping


def test_threshold_is_the_authors_index_in_descending_order():
    g = torch.tensor([0.5, -3.0, 2.0, 0.1, -1.0, 4.0, 0.0, -0.2, 0.3, 1.5])
    desc = g.abs().sort(descending=True).values
    for rho in (0.0, 0.1, 0.25, 0.5, 0.95):
        assert coordinate_threshold(g, rho) == pytest.approx(float(desc[int(len(g) * rho)]))
    assert coordinate_threshold(g, 0.0) == 4.0  # nothing clipped


def test_clip_over_a_list_uses_one_global_threshold():
    a, b = torch.tensor([10.0, -1.0]), torch.tensor([[0.5, -8.0], [2.0, 0.1]])
    out = clip_coordinates([a, b], 0.3)  # d = 6, floor(1.8) = 1: tau = 2nd largest = 8
    assert torch.equal(out[0], torch.tensor([8.0, -1.0]))
    assert torch.equal(out[1], b)
    out = clip_coordinates({"a": a, "b": b}, 0.5)  # floor(3) = 3: 4th largest = 1.0
    assert torch.equal(out["a"], torch.tensor([1.0, -1.0]))
    assert torch.equal(out["b"], torch.tensor([[0.5, -1.0], [1.0, 0.1]]))


def test_clip_in_place_equals_clip_grad_value_at_the_threshold():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    F.cross_entropy(net(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
    twin = [p.grad.clone() for p in net.parameters()]
    flat = torch.cat([g.reshape(-1) for g in twin]).abs()
    tau = clip_coordinates_(net.parameters(), 0.1)
    refs = [nn.Parameter(torch.zeros_like(g)) for g in twin]
    for r, g in zip(refs, twin, strict=True):
        r.grad = g
    torch.nn.utils.clip_grad_value_(refs, tau)
    for p, r in zip(net.parameters(), refs, strict=True):
        assert torch.equal(p.grad, r.grad)
    assert int((flat > tau).sum()) == math.floor(0.1 * flat.numel())  # no ties here


def test_clipping_refuses_bad_input():
    g = torch.randn(10)
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="fraction"):
            coordinate_threshold(g, bad)
    with pytest.raises(ValueError, match="finite"):
        coordinate_threshold(torch.tensor([1.0, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="at least one"):
        coordinate_threshold([], 0.1)
    with pytest.raises(ValueError, match="backward"):
        clip_coordinates_(nn.Linear(2, 2).parameters(), 0.1)


# ----------------------------------------------------------------------------- sharpness


def _mlp_problem():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    return net, x, y


def test_directional_sharpness_against_the_exact_hessian():
    net, x, y = _mlp_problem()
    H = gc.curvature.exact_hessian(net, "ce", (x, y))
    P = H.shape[0]
    for seed in range(3):
        u = torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        want = float(u @ H @ u / (u @ u))
        assert directional_sharpness(net, "ce", x, y, u) == pytest.approx(want, rel=1e-10)
        assert directional_sharpness(net, "ce", x, y, 3.0 * u) == pytest.approx(want, rel=1e-10)
    top = torch.linalg.eigh(H)
    assert directional_sharpness(net, "ce", x, y, top.eigenvectors[:, -1]) == pytest.approx(
        float(top.eigenvalues[-1]), rel=1e-9
    )
    # signed: the most negative direction gives a negative sharpness
    assert directional_sharpness(net, "ce", x, y, top.eigenvectors[:, 0]) == pytest.approx(
        float(top.eigenvalues[0]), rel=1e-8, abs=1e-12
    )


def test_directions_may_be_shaped_like_the_parameters():
    net, x, y = _mlp_problem()
    shaped = [torch.randn_like(p) for p in net.parameters()]
    flat = torch.cat([t.reshape(-1) for t in shaped])
    s = directional_sharpnesses(net, "ce", x, y, {"list": shaped, "flat": flat})
    assert s["list"] == s["flat"]
    with pytest.raises(ValueError, match="entries"):
        directional_sharpness(net, "ce", x, y, flat[:-1])
    with pytest.raises(ValueError, match="nonzero"):
        directional_sharpness(net, "ce", x, y, torch.zeros_like(flat))


class _HandAttentionBlock(nn.Module):
    """The same block as gc.models' transformer with attention written out by hand."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.b = block

    def forward(self, x):
        b = self.b
        n, t, w = x.shape
        q, k, v = b.qkv(b.ln1(x)).split(w, dim=-1)
        q, k, v = (z.view(n, t, b.heads, w // b.heads).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(w // b.heads)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        a = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + b.proj(a.transpose(1, 2).reshape(n, t, w))
        return x + b.out(F.gelu(b.fc(b.ln2(x))))


def _tiny_transformer(dtype=torch.float64):
    net = gc.models.CausalTransformer(vocab=7, context=5, width=8, depth=2, heads=2, seed=3)
    with torch.no_grad():  # larger weights than GPT-2's 0.02, so every term of H matters
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    net = net.to(dtype)
    tokens = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(0))
    return net, tokens[:, :-1], tokens[:, 1:]


def _hand_forward(net, x):
    h = net.embed(x) + net.position[: x.shape[1]]
    for block in net.blocks:
        h = _HandAttentionBlock(block)(h)
    return net.head(net.ln(h))


def test_transformer_hvp_against_hand_written_attention_and_finite_differences():
    net, x, y = _tiny_transformer()
    loss = gc.losses.token_cross_entropy
    params = list(net.parameters())
    P = sum(p.numel() for p in params)
    v = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    live = LiveHessianOperator(net, loss, x, y) @ v
    func = HessianOperator(net, loss, (x, y)) @ v
    # double backward by hand through attention written out with softmax and a mask
    g = torch.autograd.grad(loss(_hand_forward(net, x), y), params, create_graph=True)
    flat_g = torch.cat([t.reshape(-1) for t in g])
    hand = torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat_g @ v, params)])
    torch.testing.assert_close(live, hand, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(func, hand, rtol=1e-9, atol=1e-12)

    # central finite differences of the gradient
    def grad_at(shift):
        with torch.no_grad():
            theta = torch.nn.utils.parameters_to_vector(params)
            torch.nn.utils.vector_to_parameters(theta + shift, params)
        gg = torch.autograd.grad(loss(net(x), y), params)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, params)
        return torch.cat([t.reshape(-1) for t in gg])

    h = 1e-5
    fd = (grad_at(h * v) - grad_at(-h * v)) / (2 * h)
    torch.testing.assert_close(fd, hand, rtol=1e-5, atol=1e-7)


def test_fused_attention_needs_the_math_kernel():
    net, x, y = _tiny_transformer(torch.float32)
    params = list(net.parameters())
    g = torch.autograd.grad(gc.losses.token_cross_entropy(net(x), y), params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # what the library works around
        torch.autograd.grad(sum((t * t).sum() for t in g), params)
    s = directional_sharpness(
        net, gc.losses.token_cross_entropy, x, y, torch.ones(sum(p.numel() for p in params))
    )
    assert math.isfinite(s)


# ----------------------------------------------------------------------------- line search


def test_line_search_on_a_quadratic_matches_the_grid_by_hand():
    torch.manual_seed(0)
    net = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randn(30, 1, dtype=torch.float64)
    before = net.weight.detach().clone()
    g = torch.autograd.grad(gc.losses.mse(net(x), y), net.weight)[0].reshape(-1)
    res = line_search(net, "mse", x, y, g, spacing=0.05, points=50)
    assert torch.equal(net.weight, before)  # the model is not moved
    d = g / g.norm()

    def f(t):
        w = before.reshape(-1) - t * d
        return float(gc.losses.mse(x @ w[:, None], y))

    by_hand = [f(i * 0.05) for i in range(len(res.losses))]
    assert res.losses == pytest.approx(by_hand, rel=1e-12)
    assert res.losses[-1] > res.losses[0] or len(res.losses) == 51
    assert res.decrease == pytest.approx(res.losses[0] - min(by_hand), rel=1e-12)
    assert res.decrease > 0 and res.shrinks == 0
    # the exact minimiser along the line lies within one spacing of the grid's best
    A, b = (x.T @ x) / len(x), (x.T @ y).reshape(-1) / len(x)
    t_star = float((d @ (A @ before.reshape(-1) - b)) / (d @ A @ d))
    assert abs(res.best - t_star) <= 0.05


def test_line_search_shrinks_when_the_first_step_overshoots():
    torch.manual_seed(0)
    net = nn.Linear(3, 1, bias=False).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    g = torch.autograd.grad(gc.losses.mse(net(x), y), net.weight)[0].reshape(-1)
    res = line_search(net, "mse", x, y, g, spacing=100.0)
    assert res.shrinks >= 1 and len(res.losses) >= 4 and res.decrease > 0
    assert res.spacing == pytest.approx(100.0 / 5**res.shrinks)
    up = line_search(net, "mse", x, y, -g, spacing=1.0, max_shrinks=3)  # an ascent direction
    assert up.decrease == 0.0 and up.shrinks == 3
    with pytest.raises(ValueError, match="min_points"):
        line_search(net, "mse", x, y, g, points=3, min_points=5)


# ----------------------------------------------------------------------------- pseudo-updates


def _grads(steps, P=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(P, generator=gen) * torch.linspace(0.1, 5.0, P) for _ in range(steps)]


def test_adam_direction_is_torch_adams_step():
    for clip in (False, True):
        pu = PseudoUpdates(adam_fraction=0.25)
        w = nn.Parameter(torch.zeros(40))
        opt = torch.optim.Adam([w], lr=1.0)
        for g in _grads(6):
            pu.update(g)
            w.grad = clip_coordinates(g, 0.25) if clip else g.clone()
            before = w.detach().clone()
            opt.step()
            u = pu.directions()["adam_clip" if clip else "adam"]
            torch.testing.assert_close(before - w.detach(), u, rtol=1e-5, atol=1e-7)


def test_momentum_directions_are_torch_sgds_step_up_to_scale():
    pu = PseudoUpdates(momentum=0.9, sgd_fraction=0.1)
    w = nn.Parameter(torch.zeros(40))
    wc = nn.Parameter(torch.zeros(40))
    opt = torch.optim.SGD([w], lr=1.0, momentum=0.9, dampening=0.9)
    optc = torch.optim.SGD([wc], lr=1.0, momentum=0.9, dampening=0.9)
    for g in _grads(5):
        pu.update(g)
        w.grad, wc.grad = g.clone(), clip_coordinates(g, 0.1)
        before, beforec = w.detach().clone(), wc.detach().clone()
        opt.step()
        optc.step()
        d = pu.directions()
        # torch's first step puts the raw gradient into the buffer, as PseudoUpdates does
        torch.testing.assert_close(before - w.detach(), d["momentum"])
        torch.testing.assert_close(beforec - wc.detach(), d["momentum_clip"])
    assert torch.equal(d["sgd"], g) and torch.equal(d["sgd_clip"], clip_coordinates(g, 0.1))


def test_shuffled_control_has_clippings_factors_on_other_coordinates():
    pu = PseudoUpdates(sgd_fraction=0.2, seed=4)
    g = _grads(1)[0]
    pu.update(g)
    d = pu.directions()
    factors, shuffled = d["sgd_clip"] / g, d["sgd_shuffled"] / g
    torch.testing.assert_close(factors.sort().values, shuffled.sort().values)
    assert not torch.allclose(factors, shuffled)
    assert set(d) == set(DIRECTIONS)


def test_pseudo_updates_refuse_bad_input():
    with pytest.raises(RuntimeError, match="update"):
        PseudoUpdates().directions()
    with pytest.raises(ValueError, match="betas"):
        PseudoUpdates(betas=(0.9,))
    with pytest.raises(ValueError, match="momentum"):
        PseudoUpdates(momentum=1.0)
    pu = PseudoUpdates()
    pu.update(torch.randn(5))
    with pytest.raises(ValueError, match="entries"):
        pu.update(torch.randn(6))
    with pytest.raises(ValueError, match="finite"):
        pu.update(torch.tensor([1.0, float("inf"), 0.0, 0.0, 0.0]))
