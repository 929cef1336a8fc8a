"""curvature.class_decomposition against an explicit construction: per-example Jacobians from
``torch.autograd.functional.jacobian`` in a Python loop, the output Hessian written out, and the
class / cross-class means summed by hand (Papyan 2019, 2020)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from gradcourse import curvature, models

D = torch.float64


def _data(n=30, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = torch.arange(n) % k
    return x, y


def _jacobians(model, x):
    """(n, K, P) output Jacobians, one example at a time."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(w, xi):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = w[start : start + size].view(shape)
            start += size
        return torch.func.functional_call(model, params, (xi[None],))[0]

    return torch.stack([jacobian(lambda w, xi=xi: out(w, xi), flat) for xi in x])


def _reference(model, x, y, loss, k):
    jac = _jacobians(model, x)
    n, num_out, size = jac.shape
    with torch.no_grad():
        p = model(x).softmax(1)
    ggn = torch.zeros(size, size, dtype=D)
    between = torch.zeros(size, size, dtype=D)
    for i in range(n):
        h_out = torch.diag(p[i]) - torch.outer(p[i], p[i]) if loss == "ce" else torch.eye(num_out)
        ggn += jac[i].T @ h_out.to(D) @ jac[i] / n
    for c in range(k):
        rows = (y == c).nonzero().flatten()
        for cp in range(num_out):
            e = torch.zeros(num_out, dtype=D)
            e[cp] = 1
            vecs, ws = [], []
            for i in rows:
                if loss == "ce":
                    vecs.append(jac[i].T @ (e - p[i]))
                    ws.append(p[i, cp])
                else:
                    vecs.append(jac[i].T @ e)
                    ws.append(torch.tensor(1.0, dtype=D))
            w = torch.stack(ws)
            mean = (w[:, None] * torch.stack(vecs)).sum(0) / w.sum()
            between += (w.sum() / n) * torch.outer(mean, mean)
    return ggn, between


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_decomposition_matches_the_explicit_construction(loss):
    x, y = _data()
    model = models.MLP(4, (5,), 3, activation="tanh", seed=1, dtype=D)
    parts = curvature.class_decomposition(model, loss, (x, y), chunk_size=7)
    ggn, between = _reference(model, x, y, loss, 3)
    torch.testing.assert_close(parts.ggn, ggn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts.between, between, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts.within, ggn - between, rtol=1e-10, atol=1e-12)
    # and G is the library's matrix-free Gauss-Newton operator, another route
    dense = curvature.GGNOperator(model, loss, (x, y)).dense()
    torch.testing.assert_close(parts.ggn, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("loss", "rank"), [("ce", 3 * 2), ("mse", 3 * 3)])
def test_between_rank_bound_and_within_is_psd(loss, rank):
    x, y = _data(n=60, d=6)
    model = models.MLP(6, (12,), 3, seed=2, dtype=D)
    parts = curvature.class_decomposition(model, loss, (x, y))
    eig_b = torch.linalg.eigvalsh(parts.between)
    assert int((eig_b > 1e-10 * eig_b.max()).sum()) == rank  # K(K-1) for ce, K^2 for mse
    assert torch.linalg.eigvalsh(parts.within).min() > -1e-12 * eig_b.max()
    if loss == "ce":  # for each class, the weighted means sum to zero
        torch.testing.assert_close(
            (parts.weights[..., None] * parts.means).sum(1), torch.zeros(3, parts.means.shape[-1],
            dtype=D), atol=1e-12, rtol=0,
        )  # fmt: skip
    torch.testing.assert_close(parts.weights.sum(), torch.tensor(1.0 if loss == "ce" else 3.0,
                               dtype=D))  # fmt: skip


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_planted_classes_without_spread_have_no_within_part(loss):
    """Every example of a class is the same point: the within part vanishes and G = between."""
    centres = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=D)
    y = torch.arange(24) % 3
    x = centres[y]
    model = models.MLP(4, (5,), 3, seed=0, dtype=D)
    parts = curvature.class_decomposition(model, loss, (x, y))
    assert parts.within.abs().max() < 1e-12 * parts.ggn.abs().max()


def test_decomposition_refuses_bad_arguments():
    x, y = _data()
    model = models.MLP(4, (5,), 3, seed=0, dtype=D)
    with pytest.raises(ValueError, match="loss must be"):
        curvature.class_decomposition(model, "nll", (x, y))
    with pytest.raises(ValueError, match="max_params"):
        curvature.class_decomposition(model, "ce", (x, y), max_params=10)
    with pytest.raises(ValueError, match="labels must lie"):
        curvature.class_decomposition(model, "ce", (x, y + 5))
    with pytest.raises(ValueError, match="integer class labels"):
        curvature.class_decomposition(model, "ce", (x, y.double()))
    with pytest.raises(ValueError, match="chunk_size"):
        curvature.class_decomposition(model, "ce", (x, y), chunk_size=0)
