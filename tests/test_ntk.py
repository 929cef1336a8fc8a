"""gradcourse.ntk against independent references.

- Empirical NTK: the explicit J J^T, with J from ``torch.autograd.functional.jacobian`` of the
  outputs w.r.t. the flat parameter vector, float64.
- Analytic NTK / NNGP: the arc-cosine closed forms written out by hand (Cho & Saul 2009),
  Gauss-Hermite quadrature of the Gaussian expectations, and the mean over many random wide
  networks of gradcourse.models.MLP(parameterization="ntk") (within 4 Monte-Carlo standard errors).
- Kernel dynamics: matrix exponentials / powers and linear solves written out, and gradient
  descent on the linearised network.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from gradcourse import ntk as N
from gradcourse.losses import mse
from gradcourse.models import MLP, SmallCNN

F64 = torch.float64


# ---------------------------------------------------------------- references


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, O, P): d f(x) / d theta by torch.autograd.functional.jacobian on the flat vector."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def f(w: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(w, [p.numel() for p in params.values()])
        d = {n: c.view_as(p) for (n, p), c in zip(params.items(), chunks, strict=True)}
        return functional_call(model, d, (x,)).reshape(x.shape[0], -1)

    return torch.autograd.functional.jacobian(f, flat)


def explicit_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return torch.einsum("iap,jbp->ijab", explicit_jacobian(model, x1), explicit_jacobian(model, x2))


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


MODELS = {
    "mlp_vector": (lambda: MLP(3, [6, 5], 4, parameterization="ntk", seed=1, dtype=F64), (3,)),
    "mlp_scalar": (lambda: MLP(3, [7], 1, parameterization="ntk", seed=2, dtype=F64), (3,)),
    "mlp_standard": (lambda: MLP(3, [5], 2, activation="tanh", seed=3, dtype=F64), (3,)),
    "cnn_1d": (
        lambda: SmallCNN(1, 3, conv_dim=1, channels=(3, 4), hidden=6, pool_size=2, dtype=F64),
        (40,),
    ),
}


# ---------------------------------------------------------------- empirical NTK


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "layerwise"])
def test_empirical_ntk_equals_explicit_jacobian_product(name: str, method: str) -> None:
    build, shape = MODELS[name]
    model = build()
    x1, x2 = randn(5, *shape, seed=10), randn(4, *shape, seed=11)
    ref = explicit_ntk(model, x1, x2)
    o = ref.shape[-1]
    got = N.empirical_ntk(model, x1, x2, method=method)
    if o == 1:  # scalar outputs: (n1, n2)
        assert got.shape == (5, 4)
        torch.testing.assert_close(got, ref[..., 0, 0], rtol=1e-12, atol=1e-12)
    else:
        assert got.shape == (5, 4, o, o)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    traced = N.empirical_ntk(model, x1, x2, method=method, trace_outputs=True)
    assert traced.shape == (5, 4)
    torch.testing.assert_close(
        traced, ref.diagonal(dim1=2, dim2=3).mean(-1), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "layerwise"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunking_and_symmetric_case(method: str, chunk_size: int) -> None:
    model = MODELS["mlp_vector"][0]()
    x1, x2 = randn(7, 3, seed=12), randn(5, 3, seed=13)
    whole = N.empirical_ntk(model, x1, x2, method="jacobian", chunk_size=None)
    chunked = N.empirical_ntk(model, x1, x2, method=method, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)

    sym = N.empirical_ntk(model, x1, method=method, chunk_size=chunk_size)
    torch.testing.assert_close(sym, explicit_ntk(model, x1, x1), rtol=1e-12, atol=1e-12)
    flat = sym.permute(0, 2, 1, 3).reshape(7 * 4, 7 * 4)
    torch.testing.assert_close(flat, flat.T, rtol=0, atol=1e-13)
    eig = torch.linalg.eigvalsh(flat)
    assert eig.min() > -1e-10 * eig.max()


class SharedAndSequence(nn.Module):
    """Linear layers the layerwise route must leave to Jacobian contraction: one applied twice
    (shared weights), one applied along a sequence (input (n, L, in)); and one it can take."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.seq = nn.Linear(2, 3, dtype=F64)
        self.shared = nn.Linear(3, 3, dtype=F64)
        self.head = nn.Linear(3, 2, dtype=F64)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.seq(x.reshape(len(x), 3, 2))).mean(1)  # (n, 3)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h)


def test_layerwise_leaves_shared_and_sequence_layers_to_the_jacobian() -> None:
    model = SharedAndSequence()
    x1, x2 = randn(5, 6, seed=20), randn(3, 6, seed=21)
    ref = explicit_ntk(model, x1, x2)
    got = N.empirical_ntk(model, x1, x2, method="layerwise")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    x = randn(4, 6, seed=22)
    sym = N.empirical_ntk(model, x, method="layerwise", chunk_size=3, trace_outputs=True)
    ref = explicit_ntk(model, x, x).diagonal(dim1=2, dim2=3).mean(-1)
    torch.testing.assert_close(sym, ref, rtol=1e-12, atol=1e-12)


def test_layerwise_with_some_parameters_frozen_and_auto_picks_it_for_an_mlp() -> None:
    model = MODELS["mlp_vector"][0]()
    names = [n for n, _ in model.named_parameters()]
    chosen = {n: p for n, p in model.named_parameters() if n.endswith("weight") or n == names[-1]}
    x = randn(4, 3, seed=23)
    jac = N.empirical_ntk(model, x, params=chosen, method="jacobian")
    lw = N.empirical_ntk(model, x, params=chosen, method="layerwise")
    torch.testing.assert_close(lw, jac, rtol=1e-12, atol=1e-12)
    full = N.empirical_ntk(model, x, method="jacobian")
    assert not torch.allclose(lw, full)  # the frozen biases really were left out

    fn = N.empirical_ntk_fn(MLP(40, [64, 64], 10, parameterization="ntk", seed=0))
    fn(torch.randn(64, 40, generator=torch.Generator().manual_seed(0)))
    assert fn.last_method == "layerwise"
    # a model without dense layers: the layerwise route is not a candidate
    assert N.auto_method(64, 64, 1, 1000, 4000.0, trace=True) in ("jacobian", "ntk_vp")


def test_methods_agree_on_cnn_in_float32_and_fn_follows_params() -> None:
    model = SmallCNN(1, 4, conv_dim=1, channels=(4, 8), hidden=8, seed=5)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    a = N.empirical_ntk(model, x, method="jacobian")
    b = N.empirical_ntk(model, x, method="ntk_vp", chunk_size=4)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))

    mlp = MODELS["mlp_vector"][0]()
    fn = N.empirical_ntk_fn(mlp, trace_outputs=True)
    x = randn(4, 3, seed=1)
    before = fn(x)
    other = {n: p.detach() + 0.3 for n, p in mlp.named_parameters()}
    at_other = fn(x, params=other)
    with torch.no_grad():
        for n, p in mlp.named_parameters():
            p.copy_(other[n])
    torch.testing.assert_close(fn(x), at_other, rtol=1e-12, atol=1e-12)  # follows the model
    assert not torch.allclose(before, at_other)


# ---------------------------------------------------------------- analytic kernels


def arccos_by_hand(s1: float, s2: float, c: float) -> tuple[float, float]:
    """E[relu(u) relu(v)] and E[1(u>0) 1(v>0)], (u, v) ~ N(0, [[s1, c], [c, s2]]) (Cho & Saul)."""
    phi = math.acos(max(-1.0, min(1.0, c / math.sqrt(s1 * s2))))
    k1 = math.sqrt(s1 * s2) / (2 * math.pi) * (math.sin(phi) + (math.pi - phi) * math.cos(phi))
    k0 = (math.pi - phi) / (2 * math.pi)
    return k1, k0


def test_depth_one_closed_form_by_hand() -> None:
    sw, beta = 1.3, 0.4
    x = randn(4, 3, seed=20)
    nngp, ntk = N.analytic_ntk(x, depth=1, weight_scale=sw, bias_scale=beta)
    n0 = 3
    for i in range(4):
        for j in range(4):
            s = lambda a, b: sw**2 * float(x[a] @ x[b]) / n0 + beta**2  # noqa: E731
            k1, k0 = arccos_by_hand(s(i, i), s(j, j), s(i, j))
            sigma2 = sw**2 * k1 + beta**2
            theta2 = s(i, j) * sw**2 * k0 + sigma2
            assert nngp[i, j].item() == pytest.approx(sigma2, rel=1e-12)
            assert ntk[i, j].item() == pytest.approx(theta2, rel=1e-12)
    # on the diagonal the degree-1 arc-cosine kernel is s/2 and the degree-0 one 1/2
    s_diag = sw**2 * x.pow(2).sum(1) / n0 + beta**2
    torch.testing.assert_close(ntk.diagonal(), s_diag * sw**2 / 2 + sw**2 * s_diag / 2 + beta**2)


def test_relu_kernel_matches_numerical_integration() -> None:
    """E[relu(u) relu(v)] = int_0^inf u p(u) E[relu(v) | u] du with the Gaussian conditional
    E[relu(v) | u] = m Phi(m/s) + s phi(m/s), integrated by scipy's adaptive quadrature."""
    from scipy.integrate import quad
    from scipy.stats import norm

    s1, s2 = 1.7, 0.6
    for rho in (-0.9, -0.3, 0.0, 0.5, 0.95):
        c = rho * math.sqrt(s1 * s2)
        sd = math.sqrt(s2 - c**2 / s1)  # v | u ~ N(c u / s1, sd^2)

        def density(u: float) -> float:
            return norm.pdf(u, scale=math.sqrt(s1))

        def relu_given(u: float, sd: float = sd, c: float = c) -> float:
            m = c * u / s1
            return m * norm.cdf(m / sd) + sd * norm.pdf(m / sd)

        k1 = quad(lambda u: u * density(u) * relu_given(u), 0, math.inf, epsabs=1e-13)[0]
        k0 = quad(lambda u, sd=sd, c=c: density(u) * norm.cdf(c * u / s1 / sd), 0, math.inf)[0]
        k = N.Kernel(
            torch.tensor([[c]], dtype=F64),
            torch.tensor([[1.0]], dtype=F64),
            torch.tensor([s1], dtype=F64),
            torch.tensor([s2], dtype=F64),
        )
        out = N.relu_kernel(k)
        assert out.nngp.item() == pytest.approx(k1, rel=1e-8, abs=1e-12)
        assert out.ntk.item() == pytest.approx(k0, rel=1e-8)
        assert out.var1.item() == pytest.approx(s1 / 2)


def test_depth_zero_is_the_exact_linear_kernel() -> None:
    x = randn(5, 4, seed=21)
    model = MLP(4, [], 1, parameterization="ntk", weight_scale=1.5, bias_scale=0.3, dtype=F64)
    _, ntk = N.analytic_ntk(x, depth=0, weight_scale=1.5, bias_scale=0.3)
    torch.testing.assert_close(N.empirical_ntk(model, x), ntk, rtol=1e-12, atol=1e-12)


def monte_carlo(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stack = torch.stack(values)
    return stack.mean(0), stack.std(0) / math.sqrt(len(values))


PAIRS_X = torch.tensor([[1.0, 0.0, 0.5], [0.6, 0.8, -0.5], [-1.0, 0.3, 0.2]], dtype=F64)


@pytest.mark.parametrize(("depth", "width", "nets"), [(1, 1024, 120), (3, 512, 100)])
def test_analytic_ntk_is_the_mean_wide_net_ntk(depth: int, width: int, nets: int) -> None:
    sw, beta = 1.2, 0.3
    x = PAIRS_X
    _, expected = N.analytic_ntk(x, depth=depth, weight_scale=sw, bias_scale=beta)
    draws = []
    for seed in range(nets):
        net = MLP(
            3,
            [width] * depth,
            1,
            parameterization="ntk",
            weight_scale=sw,
            bias_scale=beta,
            seed=seed,
            dtype=F64,
        )
        draws.append(N.empirical_ntk(net, x))
    mean, se = monte_carlo(draws)
    assert (se < 0.05 * expected.abs()).all()  # the check has teeth
    assert ((mean - expected).abs() < 4 * se).all(), (mean, expected, se)


@pytest.mark.parametrize("depth", [1, 3])
def test_analytic_nngp_is_the_output_covariance_at_init(depth: int) -> None:
    sw, beta, outputs = 1.1, 0.5, 32
    x = PAIRS_X
    expected, _ = N.analytic_ntk(x, depth=depth, weight_scale=sw, bias_scale=beta)
    draws = []
    for seed in range(150):
        net = MLP(
            3,
            [256] * depth,
            outputs,
            parameterization="ntk",
            weight_scale=sw,
            bias_scale=beta,
            seed=1000 + seed,
            dtype=F64,
        )
        with torch.no_grad():
            f = net(x)  # (3, outputs): each output is a draw of the Gaussian process
        draws.append(f @ f.T / outputs)
    mean, se = monte_carlo(draws)
    assert ((mean - expected).abs() < 4 * se).all(), (mean, expected, se)
    assert (se.diagonal() < 0.05 * expected.diagonal()).all()


# ---------------------------------------------------------------- kernel dynamics


def spd_kernels(n: int, m: int, o: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A train kernel J J^T (n, n, o, o) and a test-train kernel from a random 'Jacobian'."""
    jac = randn(n + m, o, 3 * (n + m) * o, seed=seed)
    k = torch.einsum("iap,jbp->ijab", jac, jac) / jac.shape[-1]
    return k[:n, :n], k[n:, :n]


def test_kernel_flow_endpoints_and_explicit_matrix_exponential() -> None:
    n, m, o = 6, 3, 2
    k_tr, k_te = spd_kernels(n, m, o, seed=30)
    y, f0, f0t = randn(n, o, seed=31), randn(n, o, seed=32), randn(m, o, seed=33)
    start = N.kernel_gradient_flow(k_tr, y, 0.0, ntk_test_train=k_te, f0_train=f0, f0_test=f0t)
    torch.testing.assert_close(start.train, f0)
    torch.testing.assert_close(start.test, f0t)

    t = 2.5
    flat = k_tr.permute(0, 2, 1, 3).reshape(n * o, n * o)
    flat_te = k_te.permute(0, 2, 1, 3).reshape(m * o, n * o)
    decay = torch.linalg.matrix_exp(-t * flat / n)
    r = (f0 - y).reshape(-1)
    train_ref = y.reshape(-1) + decay @ r
    test_ref = f0t.reshape(-1) - flat_te @ torch.linalg.solve(flat, r - decay @ r)
    out = N.kernel_gradient_flow(
        k_tr, y, torch.tensor([0.0, t]), ntk_test_train=k_te, f0_train=f0, f0_test=f0t
    )
    assert out.train.shape == (2, n, o) and out.test.shape == (2, m, o)
    torch.testing.assert_close(out.train[1].reshape(-1), train_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.test[1].reshape(-1), test_ref, rtol=1e-10, atol=1e-10)

    late = N.kernel_gradient_flow(k_tr, y, 1e9, ntk_test_train=k_te, f0_train=f0, f0_test=f0t)
    inf = N.kernel_gradient_flow(k_tr, y, math.inf, ntk_test_train=k_te, f0_train=f0, f0_test=f0t)
    reg = N.kernel_regression(k_tr, k_te, y, f0_train=f0, f0_test=f0t)
    torch.testing.assert_close(late.train, y)
    torch.testing.assert_close(inf.train, y)
    torch.testing.assert_close(late.test, reg, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(inf.test, reg, rtol=1e-10, atol=1e-10)
    ref = f0t.reshape(-1) + flat_te @ torch.linalg.solve(flat, (y - f0).reshape(-1))
    torch.testing.assert_close(reg.reshape(-1), ref, rtol=1e-10, atol=1e-10)


def test_scalar_kernel_acts_on_every_output_and_ridge() -> None:
    n, m, o = 5, 4, 3
    k_tr, k_te = spd_kernels(n, m, 1, seed=34)
    k_tr, k_te = k_tr[..., 0, 0], k_te[..., 0, 0]
    eye = torch.eye(o, dtype=F64)
    blocks_tr = k_tr[:, :, None, None] * eye
    blocks_te = k_te[:, :, None, None] * eye
    y, f0 = randn(n, o, seed=35), randn(n, o, seed=36)
    a = N.kernel_gradient_flow(k_tr, y, torch.tensor([0.3, 4.0]), ntk_test_train=k_te, f0_train=f0)
    b = N.kernel_gradient_flow(
        blocks_tr, y, torch.tensor([0.3, 4.0]), ntk_test_train=blocks_te, f0_train=f0
    )
    torch.testing.assert_close(a.train, b.train)
    torch.testing.assert_close(a.test, b.test)
    ridge = 0.7
    got = N.kernel_regression(k_tr, k_te, y, ridge=ridge)
    ref = k_te @ torch.linalg.solve(k_tr + ridge * torch.eye(n, dtype=F64), y)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # scalar outputs of shape (n,) keep their shape
    flat_y = y[:, 0]
    out = N.kernel_gradient_flow(k_tr, flat_y, 1.0, ntk_test_train=k_te)
    assert out.train.shape == (n,) and out.test.shape == (m,)


def test_gd_on_the_linearised_network_is_discrete_kernel_descent() -> None:
    model = MLP(3, [8, 8], 2, parameterization="ntk", seed=7, dtype=F64)
    x, xt = randn(6, 3, seed=40), randn(4, 3, seed=41)
    y = randn(6, 2, seed=42)
    f_lin = N.linearize(model)
    params0 = f_lin.params0
    with torch.no_grad():
        torch.testing.assert_close(f_lin(params0, x), model(x))
    k_tr = N.empirical_ntk(model, x)
    k_te = N.empirical_ntk(model, xt, x)
    lr, steps = 0.5, 25
    params = dict(params0)
    outs_train, outs_test = [], []
    loss_grad = grad(lambda p: mse(f_lin(p, x), y))
    for _ in range(steps + 1):
        outs_train.append(f_lin(params, x).detach())
        outs_test.append(f_lin(params, xt).detach())
        g = loss_grad(params)
        params = {n: p - lr * g[n] for n, p in params.items()}
    pred = N.kernel_gradient_descent(
        k_tr,
        y,
        lr,
        torch.arange(steps + 1),
        ntk_test_train=k_te,
        f0_train=model(x).detach(),
        f0_test=model(xt).detach(),
    )
    torch.testing.assert_close(pred.train, torch.stack(outs_train), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pred.test, torch.stack(outs_test), rtol=1e-10, atol=1e-10)
    # small steps approach the flow at t = lr * k
    small = N.kernel_gradient_descent(k_tr, y, 1e-3, 2000, ntk_test_train=k_te)
    flow = N.kernel_gradient_flow(k_tr, y, 2.0, ntk_test_train=k_te)
    torch.testing.assert_close(small.test, flow.test, rtol=1e-2, atol=1e-3)


def test_gradient_descent_mse_predicts_what_flow_and_descent_do() -> None:
    """One eigendecomposition, then the predictions of kernel_gradient_flow (lr=None, t a time)
    and kernel_gradient_descent (lr given, t a step count), on blocks and on a scalar kernel."""
    n, m, o = 5, 3, 2
    k_tr, k_te = spd_kernels(n, m, o, seed=50)
    y, f0, f0t = randn(n, o, seed=51), randn(n, o, seed=52), randn(m, o, seed=53)
    times = torch.tensor([0.0, 0.7, 3.0, math.inf])
    flow = N.gradient_descent_mse(k_tr, y)
    got = flow(times, f0, f0t, k_te)
    ref = N.kernel_gradient_flow(k_tr, y, times, ntk_test_train=k_te, f0_train=f0, f0_test=f0t)
    torch.testing.assert_close(got.train, ref.train, rtol=0, atol=0)
    torch.testing.assert_close(got.test, ref.test, rtol=0, atol=0)
    steps = torch.arange(6)
    descent = N.gradient_descent_mse(k_tr, y, lr=0.8)
    got = descent(t=steps, fx_train_0=f0, fx_test_0=f0t, k_test_train=k_te)
    ref = N.kernel_gradient_descent(
        k_tr, y, 0.8, steps, ntk_test_train=k_te, f0_train=f0, f0_test=f0t
    )
    torch.testing.assert_close(got.train, ref.train, rtol=0, atol=0)
    torch.testing.assert_close(got.test, ref.test, rtol=0, atol=0)
    # without a test kernel only the training predictions; fx_train_0 = 0 is f0_train = None
    only = descent(3)
    assert only.test is None
    ref = N.kernel_gradient_descent(k_tr, y, 0.8, 3)
    torch.testing.assert_close(only.train, ref.train, rtol=0, atol=0)
    # t = None is the end of training, kernel regression on the test inputs, for both
    reg = N.kernel_regression(k_tr, k_te, y, f0_train=f0, f0_test=f0t)
    for predict in (flow, descent):
        end = predict(None, f0, f0t, k_te)
        torch.testing.assert_close(end.train, y)
        torch.testing.assert_close(end.test, reg, rtol=1e-10, atol=1e-10)
    # a number for fx_train_0 / fx_test_0 is that number on every entry
    const = flow(1.5, 0.25, -1.0, k_te)
    ref = N.kernel_gradient_flow(
        k_tr,
        y,
        1.5,
        ntk_test_train=k_te,
        f0_train=torch.full((n, o), 0.25, dtype=F64),
        f0_test=torch.full((m, o), -1.0, dtype=F64),
    )
    torch.testing.assert_close(const.train, ref.train, rtol=0, atol=0)
    torch.testing.assert_close(const.test, ref.test, rtol=0, atol=0)
    # a scalar kernel with targets of shape (n,)
    s_tr, s_te = k_tr[:, :, 0, 0], k_te[:, :, 0, 0]
    got = N.gradient_descent_mse(s_tr, y[:, 0], lr=0.5)(4, f0[:, 0], None, s_te)
    ref = N.kernel_gradient_descent(s_tr, y[:, 0], 0.5, 4, ntk_test_train=s_te, f0_train=f0[:, 0])
    assert got.train.shape == (n,) and got.test.shape == (m,)
    torch.testing.assert_close(got.test, ref.test, rtol=0, atol=0)


def test_gradient_descent_mse_closed_form_on_a_diagonal_kernel(monkeypatch) -> None:
    """Theta = diag(a, b) on n = 2 training points: each residual decays on its own, by
    exp(-t a / 2) under the flow and (1 - lr a / 2)^k under descent, and a test point with
    Theta(x, X) = (p, q) moves by p (1 - decay_a) / a (y1 - f1) + q (1 - decay_b) / b (y2 - f2)."""
    a, b, p, q = 3.0, 0.5, 0.4, -1.2
    k_tr = torch.tensor([[a, 0.0], [0.0, b]], dtype=F64)
    k_te = torch.tensor([[p, q]], dtype=F64)
    y = torch.tensor([1.0, -2.0], dtype=F64)
    f0, f0t = torch.tensor([0.5, 0.3], dtype=F64), torch.tensor([0.1], dtype=F64)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda x: calls.append(1) or eigh(x))
    flow = N.gradient_descent_mse(k_tr, y)
    descent = N.gradient_descent_mse(k_tr, y, lr=0.6)

    def by_hand(da: float, db: float) -> tuple[torch.Tensor, torch.Tensor]:
        train = torch.tensor([y[0] + da * (f0[0] - y[0]), y[1] + db * (f0[1] - y[1])])
        test = f0t + p * (1 - da) / a * (y[0] - f0[0]) + q * (1 - db) / b * (y[1] - f0[1])
        return train.to(F64), test

    t = 1.7
    train, test = by_hand(math.exp(-t * a / 2), math.exp(-t * b / 2))
    got = flow(t, f0, f0t, k_te)
    torch.testing.assert_close(got.train, train, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.test, test, rtol=1e-12, atol=1e-12)
    k, lr = 4, 0.6
    train, test = by_hand((1 - lr * a / 2) ** k, (1 - lr * b / 2) ** k)
    got = descent(k, f0, f0t, k_te)
    torch.testing.assert_close(got.train, train, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.test, test, rtol=1e-12, atol=1e-12)
    train, test = by_hand(0.0, 0.0)
    torch.testing.assert_close(descent(None, f0, f0t, k_te).test, test, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2  # one eigendecomposition per predictor, none per prediction


def test_gradient_descent_mse_refuses() -> None:
    k_tr, k_te = spd_kernels(3, 2, 1, seed=60)
    k_tr, k_te = k_tr[..., 0, 0], k_te[..., 0, 0]
    y = randn(3, seed=61)
    with pytest.raises(ValueError, match="lr"):
        N.gradient_descent_mse(k_tr, y, lr=0.0)
    with pytest.raises(ValueError, match="t must be"):
        N.gradient_descent_mse(k_tr, y)(-1.0)
    with pytest.raises(ValueError, match="t must be"):
        N.gradient_descent_mse(k_tr, y, lr=0.1)(2.5)  # descent counts steps
    big = 2.5 * k_tr.shape[0] / float(torch.linalg.eigvalsh(k_tr).max())
    with pytest.raises(ValueError, match="diverges"):
        N.gradient_descent_mse(k_tr, y, lr=big)(None)
    with pytest.raises(ValueError, match="fx_test_0"):
        N.gradient_descent_mse(k_tr, y)(1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="fx_train_0"):
        N.gradient_descent_mse(k_tr, y)(1.0, math.nan)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    model = MODELS["mlp_vector"][0]()
    x = randn(3, 3, seed=0)
    with pytest.raises(ValueError, match="method"):
        N.empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        N.empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="x2"):
        N.empirical_ntk(model, x, randn(2, 4, seed=0))
    with pytest.raises(ValueError, match="x1"):
        N.empirical_ntk(model, x[:0])
    with pytest.raises(ValueError, match="params"):
        N.empirical_ntk(model, x, params={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="BatchNorm"):
        N.empirical_ntk(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), x)
    with pytest.raises(ValueError, match="depth"):
        N.analytic_ntk(x, depth=-1)
    with pytest.raises(ValueError, match="weight_scale"):
        N.analytic_ntk(x, depth=1, weight_scale=0.0)
    with pytest.raises(ValueError, match="bias_scale"):
        N.analytic_ntk(x, depth=1, bias_scale=-0.1)
    with pytest.raises(ValueError, match="activation"):
        N.analytic_ntk(x, depth=1, activation="erf")
    k_tr, k_te = spd_kernels(3, 2, 1, seed=1)
    k_tr, k_te = k_tr[..., 0, 0], k_te[..., 0, 0]
    y = randn(3, seed=2)
    with pytest.raises(ValueError, match="t must be"):
        N.kernel_gradient_flow(k_tr, y, -1.0, ntk_test_train=k_te)
    with pytest.raises(ValueError, match="lr"):
        N.kernel_gradient_descent(k_tr, y, 0.0, 3, ntk_test_train=k_te)
    with pytest.raises(ValueError, match="steps"):
        N.kernel_gradient_descent(k_tr, y, 0.1, 1.5, ntk_test_train=k_te)
    with pytest.raises(ValueError, match="ridge"):
        N.kernel_regression(k_tr, k_te, y, ridge=-1.0)
    with pytest.raises(ValueError, match="ntk_test_train"):
        N.kernel_regression(k_tr, k_te.T, y)
    with pytest.raises(ValueError, match="ntk_train_train"):
        N.kernel_regression(k_tr[:2], k_te, y)
    with pytest.raises(ValueError, match="y_train"):
        N.kernel_regression(k_tr, k_te, randn(4, seed=3))
    with pytest.raises(ValueError, match="y_train"):
        N.kernel_regression(k_tr, k_te, [0.0, 1.0, 2.0])


def test_targets_follow_the_kernel_to_its_device() -> None:
    """y_train (like f0_* and the test kernel) is moved to the kernel's device and dtype (the
    meta device stands in for CUDA: no data, but devices are checked)."""
    k_tr, k_te = spd_kernels(4, 3, 2, seed=7)
    y, f0 = randn(4, 2, seed=8).float(), randn(4, 2, seed=9)
    meta_tr, meta_te = k_tr.to("meta"), k_te.to("meta")
    spec = N._Spectral(meta_tr, y)  # shared by flow, descent and regression
    assert spec.y.device.type == "meta" and spec.y.dtype == F64
    out = N.kernel_gradient_descent(
        meta_tr, y, 0.1, torch.tensor([0, 3]), ntk_test_train=meta_te, f0_train=f0
    )
    assert out.train.device.type == out.test.device.type == "meta"
    assert out.train.shape == (2, 4, 2) and out.test.shape == (2, 3, 2)
    if torch.cuda.is_available():
        ref = N.kernel_gradient_flow(k_tr, y, 2.0, ntk_test_train=k_te, f0_train=f0)
        got = N.kernel_gradient_flow(k_tr.cuda(), y, 2.0, ntk_test_train=k_te.cuda(), f0_train=f0)
        torch.testing.assert_close(got.test.cpu(), ref.test, rtol=1e-10, atol=1e-10)


def test_analytic_ntk_of_two_input_sets_is_the_off_diagonal_block():
    """analytic_ntk(x1, x2) must equal the (x1, x2) block of analytic_ntk on both sets stacked."""
    gen = torch.Generator().manual_seed(5)
    x1 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    x2 = torch.randn(6, 3, generator=gen, dtype=torch.float32)  # other dtype: cast to float64
    nngp, ntk = N.analytic_ntk(x1, x2, depth=2, bias_scale=0.3)
    nngp_all, ntk_all = N.analytic_ntk(torch.cat([x1, x2.double()]), depth=2, bias_scale=0.3)
    assert nngp.shape == ntk.shape == (4, 6)
    torch.testing.assert_close(nngp, nngp_all[:4, 4:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ntk, ntk_all[:4, 4:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(6), nn.Dropout(0.5)], ids=["bn", "dropout"])
def test_switching_to_train_mode_after_configuring_is_refused(layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), layer, nn.Tanh(), nn.Linear(6, 2)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    ntk, lin = N.EmpiricalNTK(model), N.linearize(model)
    reference = ntk(x)
    model.train()
    with pytest.raises(ValueError, match="train mode"):
        ntk(x)
    with pytest.raises(ValueError, match="train mode"):
        lin(lin.params0, x)
    model.eval()
    torch.testing.assert_close(ntk(x), reference)


@pytest.mark.parametrize("method", ["auto", "layerwise", "jacobian", "ntk_vp"])
def test_tied_weights_are_exact_on_every_route(method):
    # b.weight = a.weight: the reference sums both uses through plain autograd, one output of
    # one example at a time; a layerwise rule would see one use only (about 20% off)
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(4, 2)).double()
    x = randn(6, 4, seed=7)
    params = list(model.parameters())  # the shared weight once
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1]).reshape(-1)
        for o in range(len(out)):
            g = torch.autograd.grad(out[o], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    jac = torch.stack(rows).reshape(len(x), 2, -1)
    reference = torch.einsum("iap,jbp->ijab", jac, jac)
    ntk = N.EmpiricalNTK(model, method=method)
    torch.testing.assert_close(ntk(x), reference)


@pytest.mark.parametrize("method", ["auto", "layerwise"])
def test_a_weight_tied_by_a_function_call_is_exact(method):
    torch.manual_seed(0)

    class TiedByCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 3, bias=False)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t())
            return self.head(h)

    model = TiedByCall().double()
    x = randn(5, 4, seed=3)
    torch.testing.assert_close(N.EmpiricalNTK(model, method=method)(x), explicit_ntk(model, x, x))


def jacrev_ntk(model: nn.Module, names: list[str], x1: torch.Tensor, x2: torch.Tensor):
    """(n1, n2, O, O): J(x1) J(x2)^T, J by torch.func.jacrev w.r.t. the parameters ``names``."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def f(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x,)).reshape(len(x), -1)

    def flat(x: torch.Tensor) -> torch.Tensor:
        jac = torch.func.jacrev(f)(params, x)  # name -> (n, O, *shape)
        return torch.cat([j.reshape(*j.shape[:2], -1) for j in jac.values()], dim=-1)

    return torch.einsum("iap,jbp->ijab", flat(x1), flat(x2))


@pytest.mark.parametrize("method", ["auto", "jacobian", "ntk_vp", "layerwise"])
def test_integer_inputs_are_only_moved_and_float_inputs_cast(method):
    # token ids for an embedding: cast to the parameters' float dtype they would be refused
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Tanh(), nn.Linear(12, 2)).double()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(10, (5, 3), generator=g), torch.randint(10, (4, 3), generator=g)
    for names in (["0.weight"], [n for n, _ in model.named_parameters()]):
        params = {n: p for n, p in model.named_parameters() if n in names}
        ntk = N.EmpiricalNTK(model, params=params, method=method, chunk_size=3)
        torch.testing.assert_close(ntk(x1, x2), jacrev_ntk(model, names, x1, x2))
        torch.testing.assert_close(ntk(x1), jacrev_ntk(model, names, x1, x1))
    lin = N.linearize(model)
    torch.testing.assert_close(lin(lin.params0, x1.int()), model(x1))
    # floating inputs are cast to the parameters' dtype
    mlp = MODELS["mlp_vector"][0]()
    x = randn(4, 3, seed=5)
    expected = N.empirical_ntk(mlp, x.float().double(), method=method)
    torch.testing.assert_close(N.empirical_ntk(mlp, x.float(), method=method), expected)


class Doubled(nn.Linear):
    """A Linear subclass without a layer rule that rescales in forward: layerwise must not take
    it for a plain Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class Flagged(nn.Module):
    """Its forward pass applies ``a`` once, or twice when ``twice`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head, self.twice = nn.Linear(3, 3), nn.Linear(3, 2), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.a(h)) if self.twice else h)


def test_layer_analysis_is_reused_only_while_the_model_is_unchanged() -> None:
    """The dense-layer analysis is kept between calls of one EmpiricalNTK; swapping a layer,
    replacing a parameter or changing the example shape makes it look again. Every call is
    checked against the explicit Jacobian product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    kernel = N.EmpiricalNTK(model, method="layerwise")
    x = randn(6, 3, seed=0)
    for _ in range(2):
        torch.testing.assert_close(kernel(x), explicit_ntk(model, x, x))
    assert len(kernel._layouts) == 1  # the second call reused the first analysis
    old = model[2]
    model[2] = Doubled(5, 2).double()
    model[2].load_state_dict(old.state_dict())
    torch.testing.assert_close(kernel(x), explicit_ntk(model, x, x))
    model[0].weight = nn.Parameter(randn(5, 3, seed=1))
    torch.testing.assert_close(kernel(x), explicit_ntk(model, x, x))
    ntk_net = MLP(3, [5], 2, parameterization="ntk", seed=0, dtype=F64)  # scales read anew
    kernel = N.EmpiricalNTK(ntk_net, method="layerwise")
    kernel(x)
    ntk_net.layers[0].weight_scale = 3.0
    torch.testing.assert_close(kernel(x), explicit_ntk(ntk_net, x, x))
    flagged = Flagged().double()  # a flag makes one layer run twice: found again
    kernel = N.EmpiricalNTK(flagged, method="layerwise")
    torch.testing.assert_close(kernel(x), explicit_ntk(flagged, x, x))
    flagged.twice = True
    torch.testing.assert_close(kernel(x), explicit_ntk(flagged, x, x))
    wide = nn.Sequential(nn.Flatten(), nn.Linear(6, 2)).double()
    kernel = N.EmpiricalNTK(wide, method="layerwise")
    for shape in ((4, 6), (4, 2, 3)):
        xs = randn(*shape, seed=2)
        torch.testing.assert_close(kernel(xs), explicit_ntk(wide, xs, xs))
    assert len(kernel._layouts) == 2


def test_the_light_flop_count_equals_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from gradcourse.functional import FunctionalModel
    from gradcourse.models import MLP, SmallCNN
    from gradcourse.ntk.empirical import _find_dense, _ForwardFlops

    for net, x in (
        (MLP(40, [64, 64], 1, parameterization="ntk", seed=0), torch.randn(1, 40)),
        (SmallCNN(1, 10, conv_dim=1, channels=(16, 32), hidden=64, seed=0), torch.randn(1, 40)),
    ):
        fm = FunctionalModel(net, copy=False)
        with FlopCounterMode(display=False) as reference:
            _find_dense(fm, x)
        with _ForwardFlops() as light:
            _find_dense(fm, x)
        assert light.total == reference.get_total_flops() > 0


def test_one_call_after_another_on_one_model_reuses_its_layer_analysis(monkeypatch) -> None:
    """empirical_ntk called again on the same model does not search its layers again (the
    analysis is shared per model, keyed by its structure); a swapped layer searches anew, and
    forget() drops what was kept. Every kernel is checked against the explicit product."""
    import gradcourse.ntk.empirical as E

    searches = []
    real = E._find_dense
    monkeypatch.setattr(E, "_find_dense", lambda fm, x: searches.append(1) or real(fm, x))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = randn(6, 3, seed=0)
    for _ in range(3):
        torch.testing.assert_close(
            N.empirical_ntk(model, x, method="layerwise"), explicit_ntk(model, x, x)
        )
    assert len(searches) == 1
    model[2] = nn.Linear(5, 2).double()
    torch.testing.assert_close(
        N.empirical_ntk(model, x, method="layerwise"), explicit_ntk(model, x, x)
    )
    assert len(searches) == 2
    N.EmpiricalNTK(model).forget()
    N.empirical_ntk(model, x, method="layerwise")
    assert len(searches) == 3
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    N.empirical_ntk(other, x, method="layerwise")  # another model: its own analysis
    assert len(searches) == 4
