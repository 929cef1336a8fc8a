"""gradcourse.curvature against independent references.

The references never go through the library: a hand-written MLP on a flat parameter vector,
differentiated by ``torch.autograd.functional`` (hessian, jacobian), and ``torch.linalg.eigvalsh``
of the resulting dense matrix, all in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import flat_params, mlp_by_hand
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradcourse import curvature as C
from gradcourse.stability import SigmaOperator

F64 = torch.float64


# ---------------------------------------------------------------- tiny models and references


def make_mlp(sizes: tuple[int, ...], act: type[nn.Module], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(F64)


def make_data(n: int, d: int, c: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, c, (n,), generator=g)


def loss_by_hand(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":  # 1/n sum 1/2 ||f - onehot(y)||^2
        target = torch.zeros_like(out).scatter_(1, y[:, None], 1.0)
        return 0.5 * (out - target).pow(2).sum() / len(y)
    return (torch.logsumexp(out, dim=1) - out.gather(1, y[:, None]).squeeze(1)).mean()


ACTS = {"tanh": (nn.Tanh, torch.tanh), "relu": (nn.ReLU, torch.relu)}
SIZES = (2, 4, 3)
X, Y = make_data(20, 2, 3)


def reference_hessian(model, act: str, loss: str, x=X, y=Y, sizes=SIZES) -> torch.Tensor:
    def f(w):
        return loss_by_hand(mlp_by_hand(w, x, sizes, ACTS[act][1]), y, loss)

    return torch.autograd.functional.hessian(f, flat_params(model))


def reference_ggn(model, act: str, loss: str, x=X, y=Y, sizes=SIZES) -> torch.Tensor:
    w = flat_params(model)
    out = mlp_by_hand(w, x, sizes, ACTS[act][1])
    jac = torch.autograd.functional.jacobian(
        lambda w: mlp_by_hand(w, x, sizes, ACTS[act][1]).reshape(-1), w
    )
    out_hess = torch.autograd.functional.hessian(
        lambda o: loss_by_hand(o.reshape(out.shape), y, loss), out.detach().reshape(-1)
    )
    return jac.T @ out_hess @ jac


@pytest.fixture(scope="module")
def tanh_ce():
    model = make_mlp(SIZES, nn.Tanh)
    return model, reference_hessian(model, "tanh", "ce")


# ---------------------------------------------------------------- operators


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_hessian_matches_autograd_reference(act, loss):
    model = make_mlp(SIZES, ACTS[act][0])
    ref = reference_hessian(model, act, loss)
    for cache in (True, False):
        op = C.HessianOperator(model, loss, (X, Y), cache=cache)
        assert op.shape == (27, 27) and op.dtype == F64
        torch.testing.assert_close(op.dense(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(C.exact_hessian(model, loss, (X, Y)), ref, rtol=1e-10, atol=1e-12)


def test_hvp_equals_exact_hessian_times_v(tanh_ce):
    model, ref = tanh_ce
    op = C.HessianOperator(model, "ce", (X, Y))
    v = torch.randn(27, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(op @ v, ref @ v, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == 1
    with torch.no_grad():  # the torch.func transforms ignore an outer no_grad
        torch.testing.assert_close(op.matvec(v), ref @ v, rtol=1e-10, atol=1e-12)


class _WithUnused(nn.Module):
    """An MLP next to a layer the loss never reaches: its block of H is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp(SIZES, nn.Tanh)
        self.unused = nn.Linear(2, 2).to(F64)

    def forward(self, x):
        return self.mlp(x)


def test_cached_products_match_uncached_with_dead_gradient_blocks():
    # the cached path keeps one autograd graph of the gradient; entries of the gradient that do
    # not depend on the parameters (an unused layer; every entry, for a loss linear in them)
    # give zero blocks, alone (matvec), in a vmapped block (matmat) and under no_grad
    v = torch.randn(33, generator=torch.Generator().manual_seed(5), dtype=F64)
    block = torch.randn(33, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    for cls in (C.HessianOperator, C.ResidualOperator):
        cached = cls(_WithUnused(), "ce", (X, Y), cache=True)
        uncached = cls(_WithUnused(), "ce", (X, Y), cache=False)
        with torch.no_grad():
            torch.testing.assert_close(cached @ v, uncached @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cached @ block, uncached @ block, rtol=1e-10, atol=1e-12)
        assert (cached @ v)[27:].abs().max() == 0
    linear = C.HessianOperator(nn.Linear(2, 3).to(F64), lambda out, y: out.mean(), (X, Y))
    assert torch.equal(linear @ v[:9], torch.zeros(9, dtype=F64))
    assert torch.equal(linear @ block[:9], torch.zeros(9, 4, dtype=F64))


def test_batched_data_gives_the_mean_loss_operator(tanh_ce):
    model, ref = tanh_ce
    uneven = [(X[:7], Y[:7]), (X[7:9], Y[7:9]), (X[9:], Y[9:])]
    loader = DataLoader(TensorDataset(X, Y), batch_size=6)  # batches 6, 6, 6, 2
    for data, cache in ((uneven, False), (uneven, True), (loader, False), (loader, True)):
        op = C.HessianOperator(model, "ce", data, cache=cache)
        torch.testing.assert_close(op.dense(), ref, rtol=1e-10, atol=1e-12)
    ggn = C.GGNOperator(model, "ce", loader).dense()
    torch.testing.assert_close(ggn, C.GGNOperator(model, "ce", (X, Y)).dense())


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_ggn_and_residual_match_explicit_jacobian_products(loss):
    model = make_mlp(SIZES, nn.Tanh)
    ref_ggn = reference_ggn(model, "tanh", loss)
    ref_hess = reference_hessian(model, "tanh", loss)
    for cache in (True, False):
        ggn = C.GGNOperator(model, loss, (X, Y), cache=cache).dense()
        res = C.ResidualOperator(model, loss, (X, Y), cache=cache).dense()
        torch.testing.assert_close(ggn, ref_ggn, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res, ref_hess - ref_ggn, rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(ref_ggn).min() > -1e-12  # G is positive semi-definite


def test_operator_arithmetic_and_scipy_view(tanh_ce):
    model, ref = tanh_ce
    hess = C.HessianOperator(model, "ce", (X, Y))
    ggn = C.GGNOperator(model, "ce", (X, Y))
    diff = hess - ggn
    torch.testing.assert_close(diff.dense(), ref - reference_ggn(model, "tanh", "ce"))
    assert hess.num_matvecs == 27 and diff.num_matvecs == 27
    torch.testing.assert_close((2.0 * hess + (-ggn)).dense(), 2 * ref - ggn.dense())
    from scipy.sparse.linalg import eigsh

    top = eigsh(hess.to_scipy(), k=1, which="LA", return_eigenvectors=False)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(ref)[-1]), rel=1e-8)


def test_linear_model_with_mse_has_zero_residual():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(F64)
    x, y = make_data(15, 3, 2)
    res = C.ResidualOperator(model, "mse", (x, y)).dense()
    assert res.abs().max() < 1e-12
    # and H = G = (1/n) sum_i J_i^T J_i is the input second moment, once per output
    hess = C.HessianOperator(model, "mse", (x, y)).dense()
    torch.testing.assert_close(hess, C.GGNOperator(model, "mse", (x, y)).dense())
    xb = torch.cat([x, torch.ones(15, 1, dtype=F64)], dim=1)
    assert torch.trace(hess).item() == pytest.approx(2 * (xb**2).sum().item() / 15, rel=1e-12)


def test_params_subset_is_a_block_of_the_full_hessian(tanh_ce):
    model, ref = tanh_ce
    last = {n: p for n, p in model.named_parameters() if n.startswith("2.")}
    op = C.HessianOperator(model, "ce", (X, Y), params=last)
    assert op.shape == (15, 15)
    torch.testing.assert_close(op.dense(), ref[12:, 12:], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not parameters"):
        C.HessianOperator(model, "ce", (X, Y), params={"nope": torch.zeros(1)})


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.Dropout(0.1)], ids=["bn", "dropout"])
def test_train_mode_batchnorm_and_dropout_are_refused(layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), layer, nn.Tanh(), nn.Linear(4, 3)).to(F64)
    for cls in (C.HessianOperator, C.GGNOperator, C.ResidualOperator):
        with pytest.raises(ValueError, match=r"train mode.*model\.eval\(\)"):
            cls(model.train(), "ce", (X, Y))
    op = C.HessianOperator(model.eval(), "ce", (X, Y))
    dense = op.dense()
    torch.testing.assert_close(dense, dense.T)
    torch.testing.assert_close(dense, C.exact_hessian(model, "ce", (X, Y)))


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.Dropout(0.5)], ids=["bn", "dropout"])
@pytest.mark.parametrize("cache", [True, False])
def test_switching_to_train_mode_after_building_is_refused_at_product_time(layer, cache):
    # built in eval mode, then put in train mode before any product: the forward pass of the
    # products would use dropout masks (a wrong lambda_max) or batch statistics (a torch.func
    # crash for BatchNorm), so the product refuses, naming the module
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), layer, nn.Tanh(), nn.Linear(4, 3)).to(F64)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    for cls in (C.HessianOperator, C.GGNOperator, C.ResidualOperator):
        op = cls(model.eval(), "ce", (X, Y), cache=cache)
        model.train()
        with pytest.raises(ValueError, match=r"train mode.*model\.eval\(\)"):
            op @ v
        model.eval()
        torch.testing.assert_close(op @ v, cls(model, "ce", (X, Y)) @ v)
    sigma = SigmaOperator(model.eval(), "mse", (X, Y))
    model.train()
    with pytest.raises(ValueError, match="train mode"):
        sigma @ v


def test_bad_operator_inputs():
    model = make_mlp(SIZES, nn.Tanh)
    with pytest.raises(ValueError, match="re-iterable"):
        C.HessianOperator(model, "ce", ((X, Y) for _ in range(2)))
    with pytest.raises(ValueError, match="loss"):
        C.HessianOperator(model, "hinge", (X, Y))
    with pytest.raises(ValueError, match="shape"):
        C.HessianOperator(model, "ce", (X, Y)).matvec(torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="max_params"):
        C.exact_hessian(model, "ce", (X, Y), max_params=10)
    with pytest.raises(ValueError, match="no batches"):
        C.HessianOperator(model, "ce", []).matvec(torch.zeros(27, dtype=F64))


# ---------------------------------------------------------------- Lanczos

MID_SIZES = (3, 10, 4)  # P = 84 > default basis size 40, so restarts are exercised


@pytest.fixture(scope="module")
def mid_problem():
    model = make_mlp(MID_SIZES, nn.Tanh, seed=2)
    x, y = make_data(40, 3, 4, seed=5)
    ref = reference_hessian(model, "tanh", "ce", x, y, MID_SIZES)
    return model, (x, y), torch.linalg.eigvalsh(ref)


def assert_rel_close(found: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    err = ((found - expected).abs() / expected.abs()).max().item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_lanczos_matches_eigvalsh(mid_problem, which):
    model, data, evals = mid_problem
    op = C.HessianOperator(model, "ce", data)
    k = 6
    res = C.lanczos(op, k=k, which=which)
    expected = {
        "largest": evals.flip(0)[:k],
        "smallest": evals[:k],
        "both": torch.cat([evals.flip(0)[:k], evals[:k].flip(0)]),
    }[which]
    assert bool(res.converged.all())
    assert res.num_restarts > 0 and res.num_matvecs == op.num_matvecs < 84 * 3
    assert_rel_close(res.eigenvalues, expected, 1e-6)
    vecs = res.eigenvectors
    torch.testing.assert_close(
        vecs.T @ vecs, torch.eye(len(expected), dtype=F64), atol=1e-8, rtol=0
    )
    residual = (op @ vecs) - vecs * res.eigenvalues
    assert residual.norm(dim=0).max() <= 1e-6 * evals.abs().max()


def test_lanczos_on_a_tiny_operator_is_exact(tanh_ce):
    _, ref = tanh_ce
    evals = torch.linalg.eigvalsh(ref)
    op = C.HessianOperator(make_mlp(SIZES, nn.Tanh), "ce", (X, Y))
    res = C.lanczos(op, k=3)
    assert_rel_close(res.eigenvalues, evals.flip(0)[:3], 1e-6)
    assert res.num_matvecs <= 27


def test_lanczos_warm_start_reduces_matvecs(mid_problem):
    model, data, _ = mid_problem
    res = C.lanczos(C.HessianOperator(model, "ce", data), k=3, seed=0)
    # a nearby point, as after a training step
    g = torch.Generator().manual_seed(9)
    moved = {
        n: p.detach() + 1e-3 * torch.randn(p.shape, generator=g, dtype=F64)
        for n, p in model.named_parameters()
    }
    cold = C.lanczos(C.HessianOperator(model, "ce", data, params=moved), k=3, seed=0)
    warm = C.lanczos(C.HessianOperator(model, "ce", data, params=moved), k=3, v0=res.eigenvectors)
    assert warm.num_matvecs < cold.num_matvecs
    assert_rel_close(warm.eigenvalues, cold.eigenvalues, 1e-6)
    again = C.lanczos(C.HessianOperator(model, "ce", data), k=1, v0=res.eigenvectors[:, 0])
    assert again.num_matvecs <= 3


def test_lanczos_float32_and_reproducible(mid_problem):
    model, (x, y), evals = mid_problem
    op32 = C.HessianOperator(copy.deepcopy(model).float(), "ce", (x.float(), y))
    a = C.lanczos(op32, k=3, seed=4)
    b = C.lanczos(op32, k=3, seed=4)
    assert a.eigenvectors.dtype == torch.float32
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs
    assert_rel_close(a.eigenvalues, evals.flip(0)[:3], 1e-4)


def test_lanczos_refuses_an_operator_that_overflows():
    class Overflowing(C.CurvatureOperator):
        def _matvec(self, v):
            return v * math.inf

    with pytest.raises(C.NonFiniteOperatorError, match="inf/NaN at product 1"):
        C.lanczos(Overflowing(5, torch.float64, torch.device("cpu")), k=1)


def test_lanczos_bad_arguments(tanh_ce):
    op = C.HessianOperator(make_mlp(SIZES, nn.Tanh), "ce", (X, Y))
    for kwargs, word in [
        (dict(k=0), "k must"),
        (dict(k=28), "k must"),
        (dict(k=14, which="both"), "k must"),
        (dict(which="middle"), "which"),
        (dict(tol=0.0), "tol"),
        (dict(tol=float("inf")), r"tol must be a number in \(0, 1\)"),
        (dict(tol=float("nan")), "tol"),
        (dict(tol=1.0), "tol"),
        (dict(tol="1e-3"), "tol"),
        (dict(basis_size=100), "basis_size"),
        (dict(max_matvecs=0), "max_matvecs"),
        (dict(seed=-1), "seed"),
        (dict(v0=torch.zeros(27)), "v0"),
        (dict(v0=torch.ones(5)), "v0"),
    ]:
        with pytest.raises(ValueError, match=word):
            C.lanczos(op, **{"k": 2, **kwargs})


def test_lanczos_warns_when_not_converged(mid_problem):
    model, data, _ = mid_problem
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = C.lanczos(C.HessianOperator(model, "ce", data), k=2, max_matvecs=5)
    assert not bool(res.converged.all())


# ---------------------------------------------------------------- trace, Frobenius, SLQ


def test_hutchinson_trace_within_three_stderr(tanh_ce):
    model, ref = tanh_ce
    op = C.HessianOperator(model, "ce", (X, Y))
    for dist in ("rademacher", "gaussian"):
        est = C.hutchinson_trace(op, 200, seed=1, dist=dist)
        assert abs(est.value - torch.trace(ref).item()) <= 3 * est.stderr
        assert est.samples.shape == (200,) and est.num_matvecs == 200


def seeded_probes(num: int, seed: int, dist: str, size: int = 27) -> torch.Tensor:
    """The estimators' probes, redrawn: one at a time from torch.Generator().manual_seed(seed),
    Rademacher as 2 randint(0, 2) - 1, Gaussian as randn in float64; rows (num, size)."""
    g = torch.Generator().manual_seed(seed)
    if dist == "rademacher":
        draws = [torch.randint(0, 2, (size,), generator=g) * 2 - 1 for _ in range(num)]
    else:
        draws = [torch.randn(size, generator=g, dtype=F64) for _ in range(num)]
    return torch.stack(draws).to(F64)


def test_hutchinson_samples_are_the_quadratic_forms_of_the_seeded_probes(tanh_ce):
    """Zero-noise check: each sample is v_i^T H v_i (trace) or ||H v_i||^2 (Frobenius) for the
    same seeded probe v_i, H the autograd reference; any bias shows, not only one > 3 stderr."""
    model, ref = tanh_ce
    op = C.HessianOperator(model, "ce", (X, Y))
    for dist in ("rademacher", "gaussian"):
        vs = seeded_probes(50, 1, dist)
        hv = vs @ ref  # rows (H v_i)^T, H symmetric
        for block_size in (None, 8, 3, 1):
            trace = C.hutchinson_trace(op, 50, seed=1, dist=dist, block_size=block_size)
            torch.testing.assert_close(trace.samples, (vs * hv).sum(1), rtol=1e-10, atol=1e-10)
            fro = C.hutchinson_squared_frobenius(op, 50, seed=1, dist=dist, block_size=block_size)
            torch.testing.assert_close(fro.samples, hv.pow(2).sum(1), rtol=1e-10, atol=1e-10)


def test_default_block_size_follows_the_activation_size(tanh_ce):
    from gradcourse.curvature.probes import _generator
    from gradcourse.curvature.trace import (
        CPU_BLOCK_BUDGET_BYTES,
        CPU_BLOCK_MAX_BYTES,
        CPU_MAX_BLOCK_SIZE,
        _auto_block_size,
        _probe_blocks,
    )

    model, _ = tanh_ce
    small = C.HessianOperator(model, "ce", (X, Y))
    assert small.activation_bytes() == 20 * 4 * 8  # the widest layer's output, float64
    assert _auto_block_size(small) == CPU_MAX_BLOCK_SIZE
    assert _auto_block_size(small - small) == CPU_MAX_BLOCK_SIZE

    def repeated(n: int) -> C.HessianOperator:  # (n, 4) activations
        reps = n // 20 + 1
        return C.HessianOperator(model, "ce", (X.repeat(reps, 1)[:n], Y.repeat(reps)[:n]))

    at_limit = repeated(CPU_BLOCK_MAX_BYTES // (4 * 8))
    assert _auto_block_size(at_limit) == CPU_BLOCK_BUDGET_BYTES // CPU_BLOCK_MAX_BYTES == 16
    big = repeated(CPU_BLOCK_MAX_BYTES // (4 * 8) + 1)  # just over the limit
    assert _auto_block_size(big) == 1
    assert _auto_block_size(C.LiveHessianOperator(model, "ce", X, Y)) == 1  # unknown: 1
    one_by_one = C.hutchinson_trace(big, 3, seed=2)
    torch.testing.assert_close(
        one_by_one.samples, C.hutchinson_trace(big, 3, seed=2, block_size=3).samples
    )
    # as few blocks as the block size allows, of even sizes
    for num, block_size, sizes in ((100, 32, [25] * 4), (5, 2, [1, 2, 2]), (3, 8, [3])):
        blocks = _probe_blocks(small, num, _generator(0), "rademacher", block_size)
        assert [vs.shape[1] for vs, _ in blocks] == sizes


def test_hutchinson_stderr_is_honest(tanh_ce):
    model, ref = tanh_ce
    op = C.HessianOperator(model, "ce", (X, Y))
    trace = torch.trace(ref).item()
    z = torch.tensor(
        [
            (e.value - trace) / e.stderr
            for e in (C.hutchinson_trace(op, 10, seed=s) for s in range(100))
        ]
    )
    within2, within1 = (z.abs() <= 2).float().mean(), (z.abs() <= 1).float().mean()
    # Student t with 9 dof: P(|t| <= 2) = 0.92, P(|t| <= 1) = 0.66; binomial sd over 100 ~ 0.03-0.05
    assert 0.82 <= within2 <= 0.99 and 0.5 <= within1 <= 0.82


def test_hutchpp_and_squared_frobenius(tanh_ce):
    model, ref = tanh_ce
    op = C.HessianOperator(model, "ce", (X, Y))
    trace = torch.trace(ref).item()
    est = C.hutchpp_trace(op, 30, seed=2)
    assert abs(est.value - trace) <= 3 * est.stderr and est.num_matvecs == 30
    exact = C.hutchpp_trace(op, 3 * 27, seed=2)  # the sketch spans the whole space
    assert exact.value == pytest.approx(trace, rel=1e-9)
    fro = C.hutchinson_squared_frobenius(op, 200, seed=3)
    assert abs(fro.value - (ref**2).sum().item()) <= 3 * fro.stderr


def test_slq_moments_and_density(mid_problem):
    model, data, evals = mid_problem
    op = C.HessianOperator(model, "ce", data)
    size = len(evals)
    sd = C.spectral_density(op, num_probes=20, num_iters=20, seed=0)
    assert sd.num_matvecs == 400 and sd.nodes.shape == (20, 20)
    assert sd.moment(0).value == pytest.approx(1.0, abs=1e-12)
    for order, exact in ((1, evals.sum() / size), (2, (evals**2).sum() / size)):
        m = sd.moment(order)
        assert abs(m.value - exact.item()) <= 3 * m.stderr, (order, m, exact)
    sigma = 0.02 * (evals[-1] - evals[0]).item()
    grid = torch.linspace(evals[0] - 10 * sigma, evals[-1] + 10 * sigma, 4001, dtype=F64)
    density = sd.density(grid, sigma)
    assert density.min() >= 0
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)
    assert sd.grid(50).shape == (50,)


def test_slq_with_full_krylov_space_finds_the_spectrum(tanh_ce):
    _, ref = tanh_ce
    evals = torch.linalg.eigvalsh(ref)
    op = C.HessianOperator(make_mlp(SIZES, nn.Tanh), "ce", (X, Y))
    sd = C.spectral_density(op, num_probes=2, num_iters=100, seed=0)  # capped at P = 27
    nodes = sd.nodes[sd.weights > 1e-8]
    assert (nodes[:, None] - evals[None, :]).abs().min(dim=1).values.max() < 1e-8
    # with every eigenvalue a node, the moments are exact quadratic forms u^T H^k u / ||u||^2
    us = seeded_probes(2, 0, "rademacher")
    for order in (1, 2, 3):
        power = torch.linalg.matrix_power(ref, order)
        expected = torch.einsum("ip,pq,iq->i", us, power, us) / us.pow(2).sum(1)
        torch.testing.assert_close(sd.moment(order).samples, expected, rtol=1e-9, atol=1e-12)


def test_matmat_is_columnwise_matvec(tanh_ce):
    model, ref = tanh_ce
    vs = torch.randn(27, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    for cls in (C.HessianOperator, C.GGNOperator, C.ResidualOperator):
        for cache in (True, False):
            op = cls(model, "ce", [(X[:8], Y[:8]), (X[8:], Y[8:])], cache=cache)
            expected = torch.stack([op.matvec(v) for v in vs.T], dim=1)
            torch.testing.assert_close(op @ vs, expected, rtol=1e-10, atol=1e-13)
            assert op.num_matvecs == 10
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.zeros(5, 2, dtype=F64))


def test_estimators_reproducible_and_leave_global_rng_alone(tanh_ce):
    model, _ = tanh_ce
    op = C.HessianOperator(model, "ce", (X, Y))
    loader = DataLoader(TensorDataset(X, Y), batch_size=6, shuffle=True)
    state = torch.get_rng_state()
    C.HessianOperator(model, "ce", loader).matvec(torch.ones(27, dtype=F64))
    a = C.hutchinson_trace(op, 5, seed=7)
    b = C.hutchinson_trace(op, 5, seed=7, block_size=2)
    c = C.hutchinson_trace(op, 5, seed=8)
    d1 = C.spectral_density(op, 2, 5, seed=1)
    d2 = C.spectral_density(op, 2, 5, seed=torch.Generator().manual_seed(1))
    C.lanczos(op, k=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a.samples, c.samples)
    assert torch.equal(d1.nodes, d2.nodes)


def test_estimator_bad_arguments(tanh_ce):
    op = C.HessianOperator(tanh_ce[0], "ce", (X, Y))
    for call, word in [
        (lambda: C.hutchinson_trace(op, 0), "num_samples"),
        (lambda: C.hutchinson_trace(op, 5, dist="uniform"), "dist"),
        (lambda: C.hutchinson_squared_frobenius(op, -1), "num_samples"),
        (lambda: C.hutchpp_trace(op, 2), "num_matvecs"),
        (lambda: C.spectral_density(op, 0), "num_probes"),
        (lambda: C.spectral_density(op, 2, 0), "num_iters"),
        (lambda: C.spectral_density(op, 1, 3).density(torch.zeros(3), 0.0), "sigma"),
        (lambda: C.spectral_density(op, 1, 3).moment(-1), "order"),
    ]:
        with pytest.raises(ValueError, match=word):
            call()
    assert math.isinf(C.hutchinson_trace(op, 1).stderr)


def test_batchnorm_without_running_statistics_is_refused_in_eval_mode_too():
    """The shared check of every route: such a BatchNorm uses the batch's statistics in eval
    mode, so the products would depend on how the data are split into batches."""
    from torch import nn

    from gradcourse import curvature, ntk

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(), nn.Linear(5, 3)
    ).eval()
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    for build in (curvature.HessianOperator, curvature.GGNOperator):
        with pytest.raises(ValueError, match="track_running_stats=False: .* curvature"):
            build(net, "ce", (x, y))
    with pytest.raises(ValueError, match="track_running_stats=False: .* NTK"):
        ntk.empirical_ntk(net, x)
