"""gradcourse.batchsize against dense Hessians, closed forms and many draws; gc.train's gradient
noise off by default and of the stated variance when on."""

import copy
import math

import numpy as np
import pytest
import torch
from reference import loop_grads
from torch import nn

import gradcourse as gc
from gradcourse import batchsize as bs


def _small(seed=0):
    torch.manual_seed(seed)
    model = gc.models.MLP(4, [5], 3, activation="tanh", seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def _dense_hessian(model, x, y):
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def f(flat):
        chunks = torch.split(flat, sizes)
        p = {k: c.reshape(s) for k, c, s in zip(names, chunks, shapes, strict=True)}
        out = torch.func.functional_call(model, p, (x,))
        return nn.functional.cross_entropy(out, y)

    flat = torch.cat([params[k].detach().flatten() for k in names])
    return torch.autograd.functional.hessian(f, flat)


def test_minibatch_spectrum_against_dense_hessians_of_the_same_batches():
    model, x, y = _small()
    spec = bs.minibatch_spectrum(model, "ce", x, y, [4, 16], draws=3, seed=5, tol=1e-10)
    h_full = _dense_hessian(model, x, y)
    assert math.isclose(spec.lambda_full, float(torch.linalg.eigvalsh(h_full)[-1]), rel_tol=1e-7)
    gen = torch.Generator().manual_seed(5)  # the same draws, in the same order
    for i, b in enumerate((4, 16)):
        for j in range(3):
            idx = torch.randperm(40, generator=gen)[:b]
            h_b = _dense_hessian(model, x[idx], y[idx])
            assert math.isclose(
                spec.lambda_batch[i, j], float(torch.linalg.eigvalsh(h_b)[-1]), rel_tol=1e-6
            )
            want = float(torch.linalg.eigvalsh(h_b - h_full).abs().max())
            assert math.isclose(spec.deviation[i, j], want, rel_tol=1e-6)
    assert np.allclose(spec.noise_scale, np.sqrt(1 / np.array([4, 16]) - 1 / 40))


def test_minibatch_spectrum_refuses_bad_batch_sizes():
    model, x, y = _small()
    with pytest.raises(ValueError, match="batch_sizes"):
        bs.minibatch_spectrum(model, "ce", x, y, [40])
    with pytest.raises(ValueError, match="at least one"):
        bs.minibatch_spectrum(model, "ce", x, y, [])


def test_power_law_recovers_a_known_exponent_and_its_band_covers_it():
    rng = np.random.default_rng(0)
    x = np.array([1, 2, 4, 8, 16, 32], dtype=float)
    ys = 3.0 * x[:, None] ** -0.5 * np.exp(rng.normal(0, 0.05, (6, 20)))
    fit = bs.power_law(x, ys, seed=1)
    assert abs(fit.slope + 0.5) < 0.03
    assert fit.low < -0.5 < fit.high and fit.high - fit.low < 0.1
    exact = bs.power_law(x, np.repeat((2.0 * x**1.5)[:, None], 4, axis=1))
    assert math.isclose(exact.slope, 1.5, rel_tol=1e-10) and math.isclose(
        exact.low, 1.5, rel_tol=1e-10
    )
    with pytest.raises(ValueError, match="positive"):
        bs.power_law(x, -ys)


@pytest.mark.parametrize("lam", [0.5, 3.0, 40.0])
def test_loss_decreases_on_a_quadratic_with_gd_is_exactly_lr_below_two_over_lambda(lam):
    # f(w) = lam/2 (w . x)^2 averaged over examples x = +-1: a quadratic of curvature lam in w
    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))

        def forward(self, x):
            return self.w * x

    def loss(out, target):
        return 0.5 * lam * (out - target).pow(2).mean()

    x = torch.tensor([[1.0], [-1.0]] * 5, dtype=torch.float64)
    y = torch.zeros(10, 1, dtype=torch.float64)
    stable = bs.loss_decreases(Quad(), loss, x, y, optimizer="sgd", batch_size=10, steps=7)
    got = bs.largest_stable_lr(stable, 1e-3, 1e3, iters=40)
    assert math.isclose(got, 2.0 / lam, rel_tol=1e-9)
    assert stable(0.99 * 2 / lam) and not stable(1.01 * 2 / lam)


def test_largest_stable_lr_brackets():
    assert bs.largest_stable_lr(lambda lr: True, 1e-3, 10.0) == 10.0
    with pytest.raises(ValueError, match="stable\\(low\\) fails"):
        bs.largest_stable_lr(lambda lr: False, 1e-3, 10.0)
    got = bs.largest_stable_lr(lambda lr: lr <= 0.37, 1e-3, 10.0, iters=20)
    assert got <= 0.37 and got > 0.37 * (1e4) ** (-(2**-20)) * 0.999


def test_loss_decreases_leaves_the_model_alone_and_uses_the_same_batches_for_every_lr():
    model, x, y = _small()
    before = [p.detach().clone() for p in model.parameters()]
    stable = bs.loss_decreases(model, "ce", x, y, optimizer="adam", batch_size=8, steps=5, seed=3)
    a, b = stable(1e-3), stable(1e-3)
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not stable(1e6)
    with pytest.raises(ValueError, match="optimizer must be"):
        bs.loss_decreases(model, "ce", x, y, optimizer="rmsprop", batch_size=8, steps=5)


def test_loss_decreases_passes_the_optimizers_hyperparameters():
    """Adam's defaults given explicitly change nothing; other betas run torch.optim.Adam with
    them (the final loss of a loop by hand decides stability the same way at every rate)."""
    model, x, y = _small()
    kw = dict(optimizer="adam", batch_size=8, steps=5, seed=3)
    plain = bs.loss_decreases(model, "ce", x, y, **kw)
    same = bs.loss_decreases(model, "ce", x, y, **kw, optimizer_kwargs={"betas": (0.9, 0.999)})
    other = bs.loss_decreases(model, "ce", x, y, **kw, optimizer_kwargs={"betas": (0.0, 0.5)})
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randperm(40, generator=gen)[:8] for _ in range(5)]
    start = nn.functional.cross_entropy(model(x), y).item()

    def by_hand(lr, betas):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=lr, betas=betas)
        for idx in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        return nn.functional.cross_entropy(m(x), y).item() <= start

    rates = np.geomspace(1e-3, 30, 25)
    assert [plain(r) for r in rates] == [same(r) for r in rates]
    assert [other(r) for r in rates] == [by_hand(r, (0.0, 0.5)) for r in rates]
    assert [other(r) for r in rates] != [plain(r) for r in rates]
    with pytest.raises(ValueError, match="must not hold lr"):
        bs.loss_decreases(model, "ce", x, y, **kw, optimizer_kwargs={"lr": 1.0})


def test_sqrt_scaled_adam_by_hand_and_its_limits():
    assert bs.sqrt_scaled_adam(16, 16) == {"betas": (0.9, 0.999), "eps": 1e-8}
    got = bs.sqrt_scaled_adam(64, 16)  # kappa = 4
    assert got["betas"] == pytest.approx((0.6, 0.996), abs=1e-15)
    assert got["eps"] == pytest.approx(0.5e-8, rel=1e-15)
    got = bs.sqrt_scaled_adam(8, 16, betas=(0.8, 0.99), eps=1e-6)  # kappa = 1/2
    assert got["betas"] == pytest.approx((0.9, 0.995), abs=1e-15)
    assert got["eps"] == pytest.approx(1e-6 * math.sqrt(2), rel=1e-15)
    assert bs.sqrt_scaled_adam(160, 16)["betas"][0] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="betas\\[0\\] = 0.9 would become"):
        bs.sqrt_scaled_adam(176, 16)
    with pytest.raises(ValueError, match="base_batch"):
        bs.sqrt_scaled_adam(16, 0)


def test_gradient_noise_has_the_papers_variance_schedule_over_many_draws():
    noise = bs.GradientNoise(0.3, 0.55, seed=2)
    p = nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    for t in range(4):
        p.grad = torch.zeros_like(p)
        sd = noise.add_([p])
        want = 0.3 / (1 + t) ** 0.55
        assert math.isclose(sd**2, want, rel_tol=1e-12)
        var = float(p.grad.var())
        assert abs(var / want - 1) < 0.02  # 200,000 draws: relative sd of the variance ~0.3%
        assert abs(float(p.grad.mean())) < 5 * math.sqrt(want / 200_000)


def test_noise_displacement_std_matches_noise_only_sgd_with_momentum():
    """Noise alone (zero gradient) through torch's SGD with momentum for 60 steps: the spread of
    100,000 coordinates against the closed form; and plain SGD (momentum 0) by hand."""
    noise = bs.GradientNoise(0.03, 0.55, seed=4)
    p = nn.Parameter(torch.zeros(100_000, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.01, momentum=0.9)
    for _ in range(60):
        p.grad = torch.zeros_like(p)
        noise.add_([p])
        opt.step()
    want = bs.GradientNoise(0.03, 0.55).displacement_std(0.01, 0.9, 60)
    assert abs(float(p.detach().std()) / want - 1) < 0.01  # relative sd of the std ~0.2%
    by_hand = 0.5 * math.sqrt(sum(2.0 / (1 + t) ** 0.55 for t in range(7)))
    assert math.isclose(bs.GradientNoise(2.0).displacement_std(0.5, 0.0, 7), by_hand, rel_tol=1e-12)
    assert bs.GradientNoise(2.0).displacement_std(0.5, 0.9, 0) == 0.0
    with pytest.raises(ValueError, match="momentum"):
        bs.GradientNoise(2.0).displacement_std(0.5, 1.0, 7)


def test_gradient_noise_until_stops_it_and_keeps_the_draws_before():
    """until = 3: the first three steps draw exactly what the unstopped noise draws, the rest
    add nothing; its displacement sums the noise of those three steps only (by hand)."""
    plain, stopped = bs.GradientNoise(0.5, seed=7), bs.GradientNoise(0.5, seed=7, until=3)
    for t in range(6):
        p, q = nn.Parameter(torch.zeros(50)), nn.Parameter(torch.zeros(50))
        p.grad, q.grad = torch.zeros(50), torch.zeros(50)
        sd_p, sd_q = plain.add_([p]), stopped.add_([q])
        if t < 3:
            assert sd_q == sd_p > 0 and torch.equal(q.grad, p.grad)
        else:
            assert (
                sd_q == 0.0 and stopped.variance(t) == 0.0 and torch.equal(q.grad, torch.zeros(50))
            )
    by_hand = 0.5 * math.sqrt(sum(2.0 / (1 + t) ** 0.55 for t in range(3)))
    got = bs.GradientNoise(2.0, until=3).displacement_std(0.5, 0.0, 7)
    assert math.isclose(got, by_hand, rel_tol=1e-12)
    assert bs.GradientNoise(2.0, until=7).displacement_std(0.5, 0.9, 7) == pytest.approx(
        bs.GradientNoise(2.0).displacement_std(0.5, 0.9, 7), rel=1e-15
    )
    with pytest.raises(ValueError, match="until"):
        bs.GradientNoise(1.0, until=-1)


def test_gradient_noise_zero_adds_nothing_and_skips_parameters_without_grad():
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert bs.GradientNoise(0.0).add_([p, q]) == 0.0
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and q.grad is None
    with pytest.raises(ValueError, match="eta"):
        bs.GradientNoise(-1.0)


def _train(noise, seed=0):
    model, x, y = _small(1)
    gc.train.train(
        model,
        x,
        y,
        loss="ce",
        lr=0.1,
        optimizer="sgd",
        batch_size=8,
        steps=6,
        seed=seed,
        progress=False,
        grad_noise=noise,
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_has_no_gradient_noise_by_default_and_adds_it_when_asked():
    model, x, y = _small(1)
    gc.train.train(
        model,
        x,
        y,
        loss="ce",
        lr=0.1,
        optimizer="sgd",
        batch_size=8,
        steps=6,
        seed=0,
        progress=False,
    )
    default = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(default, _train(0.0))
    noisy = _train(0.1)
    assert not torch.allclose(noisy, default)
    assert torch.equal(noisy, _train(0.1))  # seeded: reproducible
    with pytest.raises(ValueError, match="grad_noise"):
        _train(-0.1)


def test_gradient_moments_against_a_per_example_loop_and_noise_fraction_limits():
    model, x, y = _small()
    g = loop_grads(model, x, y)
    mean, var = bs.gradient_moments(model, "ce", x, y, chunk_size=7)
    assert torch.allclose(mean, g.mean(0), rtol=1e-10, atol=1e-13)
    assert torch.allclose(var, g.var(0, unbiased=False), rtol=1e-9, atol=1e-13)
    # B = N: no noise; the fraction falls as B grows
    assert bs.noise_fraction(mean, var, 40, 40) == 0.0
    fr = [bs.noise_fraction(mean, var, b, 40) for b in (1, 4, 16, 39)]
    assert all(a > b for a, b in zip(fr, fr[1:], strict=False)) and 0 < fr[-1] < fr[0] < 1
    # a coordinate with zero mean is all noise; one with zero variance none
    m2, v2 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    assert math.isclose(bs.noise_fraction(m2, v2, 5, 10), 0.5)


def _flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _set_flat(model, flat):
    with torch.no_grad():
        start = 0
        for p in model.parameters():
            p.copy_(flat[start : start + p.numel()].reshape(p.shape))
            start += p.numel()


@pytest.mark.parametrize("preconditioner", bs.PRECONDITIONERS)
@pytest.mark.parametrize("b", [1, 3, 6])
def test_one_step_rate_is_exact_on_a_quadratic_loss_by_enumerating_every_batch(preconditioner, b):
    # a linear model under mse: the loss is quadratic in the parameters, so the expansion is exact
    # and the mean loss after one step, over every batch of b of the 7 examples, equals the start
    # at the returned rate (and is below it at half the rate, above at twice)
    import itertools

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 2, generator=g, dtype=torch.float64)
    res = bs.one_step_rate(model, "mse", x, y, [b], preconditioner=preconditioner, chunk_size=2)
    lr = float(res.rate[0])
    w0 = _flat_params(model)
    mean, var = bs.gradient_moments(model, "mse", x, y)
    c = bs.batch_noise_factor(b, 7)
    v = {"sgd": None, "adam": mean.pow(2) + c * var, "adam-noise": c * var}[preconditioner]
    p = torch.ones_like(w0) if v is None else 1.0 / (v.sqrt() + 1e-8)

    def loss_at(w):
        _set_flat(model, w)
        with torch.no_grad():
            return float(gc.losses.mse(model(x), y))

    def grad_at(idx):
        _set_flat(model, w0)
        model.zero_grad()
        gc.losses.mse(model(x[idx]), y[idx]).backward()
        return torch.cat([q.grad.flatten() for q in model.parameters()])

    start = loss_at(w0)
    batches = [list(t) for t in itertools.combinations(range(7), b)]
    grads = [grad_at(idx) for idx in batches]
    # Adam's expected second moment: the mean of g_B^2 over every batch is g_bar^2 + c_B s^2
    assert torch.allclose(torch.stack(grads).pow(2).mean(0), mean.pow(2) + c * var, rtol=1e-12)

    def expected(rate):
        return float(np.mean([loss_at(w0 - rate * p * gb) for gb in grads]))

    assert math.isclose(expected(lr), start, rel_tol=1e-9)
    assert expected(lr / 2) < start < expected(2 * lr)
    _set_flat(model, w0)


def test_one_step_rate_terms_against_a_dense_hessian_and_per_example_loop():
    # a tanh MLP under cross-entropy: each term by hand from the exact Hessian
    model, x, y = _small()
    h = _dense_hessian(model, x, y)
    g = loop_grads(model, x, y)
    mean, var = g.mean(0), g.var(0, unbiased=False)
    sizes = (2, 10, 40)
    for name in bs.PRECONDITIONERS:
        res = bs.one_step_rate(model, "ce", x, y, sizes, preconditioner=name, chunk_size=6)
        for i, b in enumerate(sizes):
            c = (1 / b - 1 / 40) * 40 / 39
            v = {"sgd": None, "adam": mean.pow(2) + c * var, "adam-noise": c * var}[name]
            p = torch.ones_like(mean) if v is None else 1 / (v.sqrt() + 1e-8)
            php = p[:, None] * h * p[None, :]
            cov = (g - mean).T @ (g - mean) / 40
            assert math.isclose(res.signal[i], float(mean @ (p * mean)), rel_tol=1e-9)
            assert math.isclose(res.mean_curvature[i], float(mean @ php @ mean), rel_tol=1e-7)
            assert math.isclose(
                res.noise_curvature[i], c * float(torch.trace(php @ cov)), rel_tol=1e-7, abs_tol=0
            )
        assert res.noise_curvature[-1] == 0.0 and res.noise_share[-1] == 0.0  # B = N
        assert res.examples == 40 and res.batch_sizes == sizes


def test_one_step_rate_on_a_subset_of_examples_is_unbiased_and_the_same_at_every_b():
    model, x, y = _small()
    full = bs.one_step_rate(model, "ce", x, y, (4, 8), preconditioner="sgd")
    subs = [
        bs.one_step_rate(model, "ce", x, y, (4, 8), preconditioner="sgd", examples=10, seed=s)
        for s in range(40)
    ]
    # one trace for every B under P = I: the ratio of the noise terms is c_4 / c_8 exactly
    for r in subs[:3]:
        ratio = bs.batch_noise_factor(4, 40) / bs.batch_noise_factor(8, 40)
        assert math.isclose(r.noise_curvature[0] / r.noise_curvature[1], ratio, rel_tol=1e-12)
        assert r.examples == 10
    est = np.array([r.noise_curvature[0] for r in subs])
    # a mean over 40 subsets within four standard errors of the exact value
    assert abs(est.mean() - full.noise_curvature[0]) < 4 * est.std() / math.sqrt(len(est))
    assert np.allclose([r.signal for r in subs], full.signal, rtol=1e-12)


def test_one_step_rate_refuses_bad_arguments():
    model, x, y = _small()
    with pytest.raises(ValueError, match="preconditioner"):
        bs.one_step_rate(model, "ce", x, y, (4,), preconditioner="rmsprop")
    with pytest.raises(ValueError, match=r"batch_sizes\[1\] must be an int in \[1, 40\]"):
        bs.one_step_rate(model, "ce", x, y, (4, 41))
    with pytest.raises(ValueError, match="batch_sizes must hold at least one"):
        bs.one_step_rate(model, "ce", x, y, ())
    # numpy integers are batch sizes too
    assert bs.one_step_rate(model, "ce", x, y, np.array([4])).batch_sizes == (4,)
    with pytest.raises(ValueError, match="examples"):
        bs.one_step_rate(model, "ce", x, y, (4,), examples=0)
    with pytest.raises(ValueError, match="eps"):
        bs.one_step_rate(model, "ce", x, y, (4,), preconditioner="adam", eps=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        bs.batch_noise_factor(0, 10)


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_loss_decreases_with_a_frozen_preconditioner_is_exactly_lr_below_two_over_p_lambda(lam):
    # f(w) = lam/2 (w1^2 + 4 w2^2) with GD preconditioned by P = (p1, p2): each coordinate
    # contracts by |1 - lr p_i lam_i|; where p_i lam_i is the same for both, the loss after 7
    # steps is at most the start's exactly when lr <= 2 / (p_i lam_i)
    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))

        def forward(self, x):
            return self.w * x

    def loss(out, target):
        return 0.5 * lam * (out - target).pow(2).mean(0).sum()

    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]] * 5, dtype=torch.float64)
    y = torch.zeros(10, 2, dtype=torch.float64)
    for p, scale in (((4.0, 1.0), 4.0), ((1.0, 0.25), 1.0), ((0.1, 0.025), 0.1)):
        stable = bs.loss_decreases(
            Quad(), loss, x, y, optimizer="sgd", batch_size=10, steps=7,
            preconditioner=torch.tensor(p, dtype=torch.float64),
        )  # fmt: skip
        got = bs.largest_stable_lr(stable, 1e-3, 1e3, iters=40)
        assert math.isclose(got, 2.0 / (scale * lam), rel_tol=1e-9)


def test_loss_decreases_preconditioner_by_hand_and_refusals():
    model, x, y = _small()
    size = sum(p.numel() for p in model.parameters())
    precond = torch.linspace(0.5, 2.0, size, dtype=torch.float64)
    stable = bs.loss_decreases(
        model, "ce", x, y, optimizer="sgd", batch_size=8, steps=5, seed=3, preconditioner=precond
    )
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randperm(40, generator=gen)[:8] for _ in range(5)]
    start = nn.functional.cross_entropy(model(x), y).item()

    def by_hand(lr):
        m = copy.deepcopy(model)
        for idx in batches:
            m.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            g = torch.cat([q.grad.flatten() for q in m.parameters()])
            with torch.no_grad():
                _set_flat(m, _flat_params(m) - lr * precond * g)
        return nn.functional.cross_entropy(m(x), y).item() <= start

    rates = np.geomspace(1e-2, 100, 25)
    assert [stable(r) for r in rates] == [by_hand(r) for r in rates]
    assert any(stable(r) for r in rates) and not all(stable(r) for r in rates)
    kw = dict(batch_size=8, steps=5)
    with pytest.raises(ValueError, match="preconditioner is for optimizer 'sgd'"):
        bs.loss_decreases(model, "ce", x, y, optimizer="adam", preconditioner=precond, **kw)
    with pytest.raises(ValueError, match=rf"shape \({size},\)"):
        bs.loss_decreases(model, "ce", x, y, optimizer="sgd", preconditioner=precond[:-1], **kw)
    with pytest.raises(ValueError, match="finite and positive"):
        bs.loss_decreases(model, "ce", x, y, optimizer="sgd", preconditioner=-precond, **kw)


def test_adam_preconditioner_by_hand():
    mean = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    var = torch.tensor([4.0, 0.0, 9.0], dtype=torch.float64)
    c = bs.batch_noise_factor(5, 11)
    assert math.isclose(c, (1 / 5 - 1 / 11) * 11 / 10)
    got = bs.adam_preconditioner(mean, var, 5, 11, eps=1e-3)
    want = 1 / ((mean**2 + c * var).sqrt() + 1e-3)
    assert torch.allclose(got, want, rtol=1e-15)
    noise = bs.adam_preconditioner(mean, var, 5, 11, eps=1e-3, noise_only=True)
    assert torch.allclose(noise, 1 / ((c * var).sqrt() + 1e-3), rtol=1e-15)
    assert float(noise[1]) == 1e3  # a coordinate without noise: 1 / eps


def test_one_step_rate_of_a_float32_model_is_close_to_its_float64_copy():
    # the notebook's models are float32: the Hessian products run in float32, the sums in float64
    model, x, y = _small()
    single = copy.deepcopy(model).float()
    for name in bs.PRECONDITIONERS:
        a = bs.one_step_rate(model, "ce", x, y, (4, 16), preconditioner=name)
        b = bs.one_step_rate(single, "ce", x.float(), y, (4, 16), preconditioner=name)
        assert np.allclose(a.rate, b.rate, rtol=1e-3), name
