"""gradcourse.privacy: clipping, DP-SGD and DiceSGD steps against hand computations and
per-sample loops; the clipped fixed point against bisection; the accountants against each other."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcourse import privacy as pv
from gradcourse.models import MLP

F64 = torch.float64


def mean_model(theta0: float = 0.0) -> nn.Module:
    """f(x) = theta for every input: with loss 'mse', l_i = (theta - y_i)^2 / 2, g_i = theta - y_i."""
    m = nn.Linear(1, 1, dtype=F64)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.fill_(theta0)
    m.weight.requires_grad_(False)
    return m


def loop_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, P): each example's cross-entropy gradient w.r.t. the trainable parameters, flattened,
    by a per-sample loop of autograd."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.stack([
        torch.cat([g.flatten() for g in torch.autograd.grad(
            nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)])
        for i in range(len(x))
    ])  # fmt: skip


def heavy_tailed(n: int = 41, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g, dtype=F64)
    y[:4] += torch.tensor([8.0, 10.0, 12.0, 15.0], dtype=F64)  # a few heavy examples
    return y


def test_clip_scales_only_long_rows():
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=F64)
    out = pv.clip(g, 1.0)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8], dtype=F64))
    torch.testing.assert_close(out[1:], g[1:])
    assert pv.clip(g, math.inf) is g
    torch.testing.assert_close(
        pv.clip(torch.tensor([3.0, 4.0], dtype=F64), 2.5), torch.tensor([1.5, 2.0], dtype=F64)
    )
    with pytest.raises(ValueError, match="threshold must be a number > 0"):
        pv.clip(g, 0.0)


def test_clipped_mean_is_the_zero_of_the_clipped_gradient():
    y = heavy_tailed()
    for c in (0.05, 0.5, 1.0, 3.0):
        theta = pv.clipped_mean(y, c)
        # an independent reference: bisection on h(theta) = sum_i clamp(theta - y_i, -C, C)
        lo, hi = float(y.min()), float(y.max())
        for _ in range(200):
            mid = (lo + hi) / 2
            if float((mid - y).clamp(-c, c).sum()) < 0:
                lo = mid
            else:
                hi = mid
        assert theta == pytest.approx((lo + hi) / 2, abs=1e-9)
        assert abs(float((theta - y).clamp(-c, c).sum())) < 1e-9
    big = float((y - y.mean()).abs().max())
    assert pv.clipped_mean(y, big) == pytest.approx(float(y.mean()), abs=1e-12)
    assert pv.clipped_mean(y, math.inf) == pytest.approx(float(y.mean()))
    # small C: the median (odd n), far from the mean the heavy examples pull up
    assert pv.clipped_mean(y, 1e-6) == pytest.approx(float(y.median()), abs=1e-5)
    assert pv.clipped_mean(y, 0.5) < float(y.mean()) - 0.5
    # h flat at zero on an interval: the midpoint of that interval
    assert pv.clipped_mean(np.array([0.0, 10.0]), 1.0) == pytest.approx(5.0)


def test_poisson_batches_rate_and_determinism():
    it, again = pv.poisson_batches(1000, 0.05, seed=3), pv.poisson_batches(1000, 0.05, seed=3)
    sizes = []
    for _ in range(200):
        b = next(it)
        assert torch.equal(b, next(again))
        assert (b[1:] > b[:-1]).all()  # distinct, sorted
        sizes.append(len(b))
    assert np.mean(sizes) == pytest.approx(50, rel=0.05)  # sd of the mean ~ 0.2
    with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\]"):
        next(pv.poisson_batches(10, 1.5))


def test_dpsgd_without_clipping_or_noise_is_sgd_and_matches_autograd():
    x = torch.randn(24, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.arange(24) % 3
    nets = [MLP(5, (7,), 3, seed=1, dtype=F64) for _ in range(3)]
    for net, method in zip(nets, ("sgd", "dpsgd", "dice"), strict=True):
        pv.dp_train(net, x, y, method=method, lr=0.3, steps=7, batch_size=8, clip_norm=math.inf,
                    sampling="shuffle", seed=5)  # fmt: skip
    ref = MLP(5, (7,), 3, seed=1, dtype=F64)
    order = pv._shuffle_batches(24, 8, seed=5)
    for _ in range(7):  # plain SGD on the mean cross-entropy of each batch, by autograd
        idx = next(order)
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.3 * p.grad
    for net in nets:
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_one_dpsgd_step_clips_each_example_like_a_loop():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.arange(10) % 2
    net, ref = MLP(4, (6,), 2, seed=2, dtype=F64), MLP(4, (6,), 2, seed=2, dtype=F64)
    pv.dp_train(net, x, y, method="dpsgd", lr=0.5, steps=1, batch_size=10, clip_norm=0.2,
                sampling="shuffle")  # fmt: skip
    total = [torch.zeros_like(p) for p in ref.parameters()]
    clipped_any = False
    for i in range(10):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.clone() for p in ref.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, 0.2 / float(norm))
        clipped_any |= factor < 1
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    assert clipped_any
    for p, q, t in zip(net.parameters(), ref.parameters(), total, strict=True):
        torch.testing.assert_close(p, q.detach() - 0.5 * t / 10, rtol=1e-10, atol=1e-12)


def test_dice_recursion_by_hand():
    y = torch.tensor([0.0, 1.0, 9.0], dtype=F64)
    x = torch.zeros(3, 1, dtype=F64)
    model = mean_model(0.5)
    thetas = pv.dp_train(model, x, y.reshape(-1, 1), method="dice", loss="mse", lr=0.2, steps=4,
                         batch_size=3, clip_norm=1.0, feedback_clip=2.0, sampling="shuffle",
                         callback=lambda t, m: {"theta": m.bias.item()})  # fmt: skip
    theta, e = 0.5, 0.0
    expected = [theta]
    for _ in range(4):
        g = [theta - yi for yi in y.tolist()]
        clipped = sum(max(-1.0, min(1.0, gi)) for gi in g) / 3
        v = clipped + max(-2.0, min(2.0, e))
        e = e + sum(g) / 3 - v
        theta = theta - 0.2 * v
        expected.append(theta)
    assert [r["theta"] for r in thetas] == pytest.approx(expected, abs=1e-12)


def test_dpsgd_stops_at_the_clipped_mean_and_dice_at_the_mean():
    y = heavy_tailed()
    x = torch.zeros(len(y), 1, dtype=F64)
    kw = dict(loss="mse", lr=0.5, steps=3000, batch_size=len(y), clip_norm=0.5, sampling="shuffle")
    dp, dice = mean_model(), mean_model()
    pv.dp_train(dp, x, y.reshape(-1, 1), method="dpsgd", **kw)
    pv.dp_train(dice, x, y.reshape(-1, 1), method="dice", feedback_clip=5.0, **kw)
    assert dp.bias.item() == pytest.approx(pv.clipped_mean(y, 0.5), abs=1e-6)
    assert dice.bias.item() == pytest.approx(float(y.mean()), abs=1e-6)
    assert abs(float(y.mean()) - pv.clipped_mean(y, 0.5)) > 0.5  # the bias is real


def test_noise_has_the_stated_scale_and_is_seeded():
    x = torch.zeros(4, 200, dtype=F64)
    y = torch.zeros(4, 50, dtype=F64)
    net = nn.Linear(200, 50, dtype=F64)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()  # every gradient is zero: the update is the noise alone
    kw = dict(method="dpsgd", loss="mse", lr=1.0, steps=1, batch_size=4, clip_norm=0.5,
              noise_multiplier=2.0, sampling="shuffle", seed=7)  # fmt: skip
    pv.dp_train(net, x, y, **kw)
    moved = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert moved.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)  # 10,050 draws
    again = nn.Linear(200, 50, dtype=F64)
    with torch.no_grad():
        again.weight.zero_()
        again.bias.zero_()
    pv.dp_train(again, x, y, **kw)
    assert torch.equal(torch.cat([p.detach().flatten() for p in again.parameters()]), moved)


def test_dp_train_refuses_bad_arguments():
    x, y = torch.zeros(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    kw = dict(loss="mse", lr=0.1, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="method must be one of"):
        pv.dp_train(mean_model(), x, y, method="adam", **kw)
    with pytest.raises(ValueError, match="feedback_clip must be >= clip_norm"):
        pv.dp_train(mean_model(), x, y, method="dice", clip_norm=1.0, feedback_clip=0.5, **kw)
    with pytest.raises(ValueError, match="noise_multiplier > 0 needs clipping"):
        pv.dp_train(mean_model(), x, y, method="sgd", noise_multiplier=1.0, **kw)
    with pytest.raises(ValueError, match="sampling must be one of"):
        pv.dp_train(mean_model(), x, y, sampling="fixed", **kw)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        pv.dp_train(mean_model(), x, y, method="dpsgd", loss="mse", lr=0.1, steps=1, batch_size=9)


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.1, 256 / 60000, 2000), (0.8, 0.01, 500), (3.0, 0.1, 100)]
)
def test_the_two_accountants_agree(sigma, q, steps):
    a = pv.epsilon(sigma, q, steps, 1e-5, accountant="opacus")
    b = pv.epsilon(sigma, q, steps, 1e-5, accountant="dp_accounting")
    # the same RDP bound of the subsampled Gaussian, minimised over slightly different grids of
    # Renyi orders: measured differences up to 3e-6 relative
    assert a == pytest.approx(b, rel=1e-4)
    assert pv.epsilon(sigma * 1.5, q, steps, 1e-5) < a < pv.epsilon(sigma, q, steps * 2, 1e-5)


def test_noise_multiplier_reaches_the_target_epsilon():
    sigma = pv.noise_multiplier(2.0, 0.01, 1000, 1e-5)
    eps = pv.epsilon(sigma, 0.01, 1000, 1e-5)
    assert eps <= 2.0 and eps == pytest.approx(2.0, abs=0.05)
    with pytest.raises(ValueError, match=r"delta must be a number in \(0, 1\)"):
        pv.epsilon(1.0, 0.01, 10, 1.5)
    with pytest.raises(ValueError, match="accountant must be one of"):
        pv.epsilon(1.0, 0.01, 10, 1e-5, accountant="moments")
    with pytest.raises(ValueError, match=r"target_epsilon = 0.01 is out of reach"):
        pv.noise_multiplier(0.01, 0.04, 69, 1e-5)


class TwiceApplied(nn.Module):
    """One Linear applied twice: the trick's pass finds it and the norms come from vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Tied(nn.Module):
    """Two Linear modules sharing one weight: refused when the trick is set up."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "twice", "tied"])
def test_clipped_sum_without_per_example_gradients_matches_a_loop(arch):
    from gradcourse.models import SmallCNN

    gen = torch.Generator().manual_seed(4)
    if arch == "mlp":
        net, x = MLP(6, (5, 4), 3, seed=0, dtype=F64), torch.randn(9, 6, generator=gen, dtype=F64)
    elif arch == "cnn":
        net = SmallCNN(1, 3, conv_dim=2, channels=(2, 3), hidden=5, seed=0).double()
        x = torch.randn(9, 1, 12, 12, generator=gen, dtype=F64)
    else:
        torch.manual_seed(0)
        net = (TwiceApplied() if arch == "twice" else Tied()).double()
        x = torch.randn(9, 6, generator=gen, dtype=F64)
    y = torch.arange(9) % 3
    rows = loop_grads(net, x, y)
    c = float(rows.norm(dim=1).median())  # about half the examples are clipped
    expected = (rows * (c / rows.norm(dim=1, keepdim=True)).clamp(max=1.0)).sum(0)
    torch.testing.assert_close(pv.clipped_sum(net, "ce", x, y, c), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        pv.clipped_sum(net, "ce", x, y, math.inf), rows.sum(0), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(pv.clip(rows, c).sum(0), expected, rtol=1e-10, atol=1e-12)
    both = pv._clipped_sums(net, "ce", x, y, c, with_plain=True)  # DiceSGD's two sums
    torch.testing.assert_close(both, torch.stack([expected, rows.sum(0)]), rtol=1e-10, atol=1e-12)


def test_dice_noise_multiplier_is_the_authors_rescaling():
    # sqrt(1 + 2 C2 / C1): sqrt(3) at C2 = C1, by hand
    assert pv.dice_noise_multiplier(0.7, 0.1, 0.1) == pytest.approx(0.7 * math.sqrt(3.0))
    assert pv.dice_noise_multiplier(1.0, 1.0, 4.0) == pytest.approx(3.0)
    assert pv.dice_noise_multiplier(0.0, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="feedback_clip must be >= clip_norm"):
        pv.dice_noise_multiplier(1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="clip_norm must be"):
        pv.dice_noise_multiplier(1.0, 0.0, 1.0)


def test_dice_feedback_on_the_summed_update_is_clipped_at_c2_over_b():
    """feedback_scale='sum' (the authors' code): the error of the summed update clipped at C2,
    i.e. the mean update's error at C2 / b; by hand on three examples, two steps."""
    y = torch.tensor([[0.0], [1.0], [9.0]], dtype=F64)
    x = torch.zeros(3, 1, dtype=F64)
    model = mean_model(0.0)
    kw = dict(method="dice", loss="mse", lr=0.5, batch_size=3, clip_norm=1.0, sampling="shuffle")
    out = pv.dp_train(model, x, y, steps=2, feedback_scale="sum", **kw,
                      callback=lambda s, m: {"theta": m.bias.item()})  # fmt: skip
    theta, e, expected = 0.0, 0.0, [0.0]
    for _ in range(2):
        g = [theta - v for v in (0.0, 1.0, 9.0)]
        v = sum(max(-1.0, min(1.0, gi)) for gi in g) / 3 + max(-1 / 3, min(1 / 3, e))
        e = e + sum(g) / 3 - v
        theta = theta - 0.5 * v
        expected.append(theta)
    assert [r["theta"] for r in out] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="feedback_scale must be one of"):
        pv.dp_train(mean_model(), x, y, steps=1, feedback_scale="batch", **kw)


def test_feedback_noise_ratio_by_hand():
    # mean scale: (sigma C1 / b) / (2 C2); sum scale: (sigma C1 / b) / (2 C2 / b)
    assert pv.feedback_noise_ratio(1.2, 0.1, 0.1, 256) == pytest.approx(1.2 * 0.1 / 256 / 0.2)
    assert pv.feedback_noise_ratio(1.2, 0.1, 0.1, 256, "sum") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="feedback_scale must be one of"):
        pv.feedback_noise_ratio(1.0, 1.0, 1.0, 4, "batch")


# ------------------------------------------------------------------- the edges (issue #28)


class WithAux(nn.Module):
    """A body the loss uses and an auxiliary head it does not: the head gets zero gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.aux = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_an_unused_trainable_parameter_gets_a_zero_clipped_gradient():
    torch.manual_seed(0)
    net = WithAux().double()
    x, y = torch.randn(7, 6, dtype=F64), torch.arange(7) % 3
    rows = []
    for i in range(7):  # the reference: per-example gradients of the body, one at a time
        g = torch.autograd.grad(
            nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]),
            list(net.body.parameters()),
        )
        rows.append(torch.cat([t.flatten() for t in g]))
    rows = torch.stack(rows)
    c = float(rows.norm(dim=1).median())
    got = pv.clipped_sum(net, "ce", x, y, c)
    body = sum(p.numel() for p in net.body.parameters())
    torch.testing.assert_close(got[:body], pv.clip(rows, c).sum(0), rtol=1e-10, atol=1e-12)
    assert torch.equal(got[body:], torch.zeros(len(got) - body, dtype=F64))
    before = [p.detach().clone() for p in net.aux.parameters()]
    pv.dp_train(net, x, y, lr=0.1, steps=3, batch_size=3, noise_multiplier=0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.aux.parameters(), strict=True))


def test_non_finite_inputs_and_bad_labels_are_refused_by_name():
    net = MLP(6, (5,), 3, seed=0, dtype=F64)
    x, y = torch.randn(8, 6, dtype=F64), torch.arange(8) % 3
    bad = x.clone()
    bad[5, 2] = math.nan
    with pytest.raises(ValueError, match="x must hold finite numbers: example 5 holds nan"):
        pv.clipped_sum(net, "ce", bad, y, 1.0)
    with pytest.raises(ValueError, match="example 5 holds nan"):
        pv.dp_train(net, bad, y, lr=0.1, steps=2, batch_size=4)
    from gradcourse import pergrad

    with pytest.raises(ValueError, match="example 5 holds nan"):  # the same check, shared
        pergrad.per_example_grad_norms(net, "ce", bad, y)
    with pytest.raises(ValueError, match="integer class labels"):
        pv.clipped_sum(net, "ce", x, y.double(), 1.0)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\] for a model with 3 outputs"):
        pv.clipped_sum(net, "ce", x, y + 3, 1.0)
    soft = torch.full((8, 3), 1 / 3, dtype=F64)  # class probabilities are a valid target
    assert torch.isfinite(pv.clipped_sum(net, "ce", x, soft, 1.0)).all()


def test_a_gradient_that_overflows_is_named_not_clipped_to_zero():
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.fill_(3e38)  # float32: finite weights, infinite logits
    x, y = torch.ones(5, 4), torch.arange(5) % 3
    with pytest.raises(ValueError, match="gradient of example 0 is not finite"):
        pv.clipped_sum(net, "ce", x, y, 1.0)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), "at least one example"),
        (torch.zeros(8, 4), torch.zeros(10, dtype=torch.long), "got 8 and 10"),
        (torch.zeros(8, 4), torch.zeros(5, dtype=torch.long), "got 8 and 5"),
    ],
)
def test_dp_train_checks_its_batch_before_training(x, y, message):
    with pytest.raises(ValueError, match=message):
        pv.dp_train(nn.Linear(4, 3), x, y, lr=0.1, steps=3, batch_size=4)


def test_clip_refuses_what_has_no_direction_and_keeps_float16_in_range():
    with pytest.raises(ValueError, match="example 1 holds inf"):
        pv.clip(torch.tensor([[1.0, 0.0], [math.inf, 0.0]]), 1.0)
    with pytest.raises(ValueError, match="floating-point"):
        pv.clip(torch.tensor([[3, 4]]), 1.0)
    with pytest.raises(ValueError, match="0-d"):
        pv.clip(torch.tensor(3.0), 1.0)
    half = pv.clip(torch.tensor([[60000.0, 60000.0]], dtype=torch.float16), 1.0)
    assert half.dtype == torch.float16
    assert float(half.double().norm()) == pytest.approx(1.0, rel=1e-3)  # float16's rounding


class Residual(nn.Module):
    """A layer whose output is changed in place after it ran (z += r, then ReLU(inplace))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        z += x
        return self.head(self.act(z))


@pytest.mark.parametrize("inplace", ["relu", "residual"])
def test_clipped_sum_is_exact_when_an_in_place_op_overwrites_a_layer_output(inplace):
    """The layers' outputs are differentiated against without a copy unless an in-place op
    touched one: then the forward pass runs again with copies. Both routes against a loop."""
    torch.manual_seed(1)
    if inplace == "relu":
        net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    else:
        net = Residual().double()
    x, y = torch.randn(9, 6, dtype=F64), torch.arange(9) % 3
    rows = loop_grads(net, x, y)
    c = float(rows.norm(dim=1).median())
    torch.testing.assert_close(
        pv.clipped_sum(net, "ce", x, y, c), pv.clip(rows, c).sum(0), rtol=1e-10, atol=1e-12
    )
    from gradcourse import pergrad

    torch.testing.assert_close(
        pergrad.per_example_grad_norms(net, "ce", x, y, method="linear_trick"),
        rows.norm(dim=1),
        rtol=1e-10,
        atol=1e-12,
    )


class _NoWeighted(nn.Linear):
    """A Linear under a rule that has norms but no weighted gradients."""


@pytest.mark.parametrize("rule", ["book-keeping", "reweighted backward"])
def test_clipped_sum_takes_one_backward_pass_when_every_rule_has_weighted_grads(rule, monkeypatch):
    """With every layer's rule able to form sum_i w_i grad l_i, the clipped sum (and DiceSGD's
    plain sum beside it) comes from the one backward pass that gave the norms; with one rule
    unable, one backward pass per sum follows it. Both against a per-sample loop (a BatchNorm
    with running statistics, a frozen layer, float64)."""
    from gradcourse import layers as L

    if rule == "reweighted backward":

        @L.register(_NoWeighted)
        class NormsOnly(L.LayerRule):
            def sq_norms(self, m, a, e):
                return L.LinearRule().sq_norms(m, a, e)

    try:
        torch.manual_seed(2)
        first = _NoWeighted(6, 5) if rule == "reweighted backward" else nn.Linear(6, 5)
        net = nn.Sequential(first, nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                            nn.Linear(4, 3)).double()  # fmt: skip
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[3].requires_grad_(False)
        net.eval()
        x, y = torch.randn(9, 6, dtype=F64), torch.arange(9) % 3
        rows = loop_grads(net, x, y)
        c = float(rows.norm(dim=1).median())
        calls = []
        grad = torch.autograd.grad
        monkeypatch.setattr(
            torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k)
        )
        both = pv._clipped_sums(net, "ce", x, y, c, with_plain=True)
        assert len(calls) == (1 if rule == "book-keeping" else 3)
        expected = torch.stack([pv.clip(rows, c).sum(0), rows.sum(0)])
        torch.testing.assert_close(both, expected, rtol=1e-10, atol=1e-12)
    finally:
        L._RULES.pop(_NoWeighted, None)
