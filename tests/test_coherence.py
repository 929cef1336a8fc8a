"""gradcourse.coherence against per-example loops, hand-computed medians and winsorised means,
and the two limits of the coherence ratio (identical gradients: m; orthogonal: 1)."""

import math

import pytest
import torch
from reference import loop_grads
from torch import nn

import gradcourse as gc
from gradcourse import coherence as co


def _model(seed=0):
    return gc.models.MLP(5, [7, 6], 3, seed=seed).double()


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


@pytest.mark.parametrize("method", ["auto", "linear_trick", "vmap"])
def test_coherence_equals_a_per_example_loop(method):
    model, (x, y) = _model(), _data()
    g = loop_grads(model, x, y)
    c = co.coherence(model, "ce", x, y, method=method)
    assert c.m == len(x)
    assert math.isclose(c.sum_sq_norms, float(g.pow(2).sum()), rel_tol=1e-12)
    assert math.isclose(c.norm_sq_sum, float(g.sum(0).pow(2).sum()), rel_tol=1e-12)
    assert math.isclose(c.ratio, float(g.sum(0).pow(2).sum() / g.pow(2).sum()), rel_tol=1e-12)
    assert math.isclose(c.alpha, c.ratio / len(x), rel_tol=1e-15)


def test_the_two_limits_identical_gives_m_orthogonal_gives_one():
    v = torch.randn(1, 40, dtype=torch.float64)
    assert math.isclose(co.coherence_of(v.repeat(7, 1)).ratio, 7.0, rel_tol=1e-12)
    q, _ = torch.linalg.qr(torch.randn(40, 9, dtype=torch.float64))
    scales = torch.rand(9, 1, dtype=torch.float64) + 0.1
    assert math.isclose(co.coherence_of(q.T * scales).ratio, 1.0, rel_tol=1e-12)
    assert math.isclose(co.coherence_of(q.T * scales).alpha, 1 / 9, rel_tol=1e-12)


def test_coherence_of_a_dict_of_gradients_equals_the_flattened_matrix():
    model, (x, y) = _model(), _data(10)
    grads = gc.pergrad.per_example_grads(model, "ce", x, y)
    flat = loop_grads(model, x, y)
    assert math.isclose(co.coherence_of(grads).ratio, co.coherence_of(flat).ratio, rel_tol=1e-12)


def test_sign_flip_coherence_is_the_ratio_of_the_signed_sum_and_averages_to_one():
    model, (x, y) = _model(), _data(30)
    g = loop_grads(model, x, y)
    signs = torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(4)).double() * 2 - 1
    want = float((signs[:, None] * g).sum(0).pow(2).sum() / g.pow(2).sum())
    assert math.isclose(co.sign_flip_coherence(model, "ce", x, y, seed=4), want, rel_tol=1e-10)
    # E over signs of ||sum s_i g_i||^2 = sum ||g_i||^2 exactly: the mean over many draws is ~1
    draws = [co.sign_flip_coherence(model, "ce", x, y, seed=s) for s in range(300)]
    assert abs(sum(draws) / len(draws) - 1.0) < 0.2
    # and below the unsigned ratio (2.35 here: the examples share a direction)
    assert co.coherence(model, "ce", x, y).ratio > 1.5


def test_alignment_is_the_cosine_with_the_mean_gradient_or_a_given_direction():
    model, (x, y) = _model(), _data(16)
    g = loop_grads(model, x, y)
    mean = g.mean(0)
    want = (g @ mean) / (g.norm(dim=1) * mean.norm())
    assert torch.allclose(co.alignment(model, "ce", x, y), want, rtol=1e-10, atol=1e-12)
    v = torch.randn(g.shape[1], dtype=torch.float64)
    direction = gc.functional.unflatten(v, dict(model.named_parameters()))
    want = (g @ v) / (g.norm(dim=1) * v.norm())
    got = co.alignment(model, "ce", x, y, direction, chunk_size=5)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_alignment_refuses_a_zero_or_misshaped_direction():
    model, (x, y) = _model(), _data(4)
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="direction is zero"):
        co.alignment(model, "ce", x, y, zero)
    bad = dict(zero)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        co.alignment(model, "ce", x, y, bad)


def test_winsorized_mean_against_a_hand_computed_example():
    g = torch.tensor(
        [[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]], dtype=torch.float64
    )
    # c = 1: column 0 clipped to [2, 4] -> 2, 2, 3, 4, 4; column 1 to [0, 2] -> 0, 0, 1, 2, 2
    assert torch.allclose(co.winsorized_mean(g, 1), torch.tensor([3.0, 1.0], dtype=torch.float64))
    # c = 2: both columns clipped to their medians
    assert torch.allclose(co.winsorized_mean(g, 2), torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.allclose(co.winsorized_mean(g, 0), g.mean(0))


def test_winsorized_mean_against_a_sorting_loop():
    g = torch.randn(11, 3, 4, dtype=torch.float64)
    for c in range(6):
        s = g.sort(0).values
        want = torch.minimum(torch.maximum(g, s[c]), s[len(g) - 1 - c]).mean(0)
        assert torch.allclose(co.winsorized_mean(g, c), want, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="c must be an int in \\[0, 5\\]"):
        co.winsorized_mean(g, 6)


def test_median_of_means_against_hand_computed_values():
    g = torch.tensor([[1.0], [3.0], [10.0], [20.0], [-4.0], [0.0]], dtype=torch.float64)
    # groups (1, 3), (10, 20), (-4, 0): means 2, 15, -2, median 2
    assert torch.allclose(co.median_of_means(g, 3), torch.tensor([2.0], dtype=torch.float64))
    # k = 2: means 14/3 and 16/3, the median of two is their mean, 5
    assert torch.allclose(co.median_of_means(g, 2), torch.tensor([5.0], dtype=torch.float64))
    assert torch.allclose(co.median_of_means(g, 1), g.mean(0))
    # k = m: the coordinate-wise median of the examples (even m: the two middle values' mean)
    assert torch.allclose(co.median_of_means(g, 6), torch.tensor([2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="k must be an int in \\[1, 6\\]"):
        co.median_of_means(g, 7)


def test_median_of_means_resists_one_outlier_the_mean_does_not():
    g = torch.randn(30, 5, dtype=torch.float64)
    g[0] = 1e6
    assert co.median_of_means(g, 3).abs().max() < 10
    assert co.winsorized_mean(g, 1).abs().max() < 10
    assert g.mean(0).abs().min() > 1e4


@pytest.mark.parametrize("aggregator", co.AGGREGATORS)
def test_robust_gradient_equals_the_aggregate_of_per_example_loop_gradients(aggregator):
    model, (x, y) = _model(), _data(13)
    g = loop_grads(model, x, y)
    want = {
        "mean": g.mean(0),
        "winsorized": co.winsorized_mean(g, 2),
        "median_of_means": co.median_of_means(g, 3),
    }[aggregator]
    got = co.robust_gradient(model, "ce", x, y, aggregator, c=2, k=3, set_grad=True)
    flat = torch.cat([got[n].flatten() for n, _ in model.named_parameters()])
    assert torch.allclose(flat, want, rtol=1e-10, atol=1e-13)
    stored = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.equal(stored, flat)


def test_robust_gradient_refuses_bad_arguments_by_name():
    model, (x, y) = _model(), _data(6)
    with pytest.raises(ValueError, match="aggregator must be one of"):
        co.robust_gradient(model, "ce", x, y, "trimmed")
    with pytest.raises(ValueError, match="c must be"):
        co.robust_gradient(model, "ce", x, y, "winsorized", c=3)
    with pytest.raises(ValueError, match="k must be"):
        co.robust_gradient(model, "ce", x, y, "median_of_means", k=7)


def test_weighted_gradient_refuses_weights_of_the_wrong_shape_or_not_finite():
    model, (x, y) = _model(), _data(6)
    with pytest.raises(ValueError, match="weights must be a tensor of shape \\(6,\\)"):
        co.weighted_gradient(model, "ce", x, y, torch.ones(5))
    with pytest.raises(ValueError, match="finite"):
        co.weighted_gradient(model, "ce", x, y, torch.tensor([1.0, math.nan, 1, 1, 1, 1]))


def test_coherence_runs_in_eval_mode_and_restores_the_modes():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = _data(12)
    model.train()
    model(x)  # running statistics away from their defaults
    c = co.coherence(model, "ce", x, y)
    assert model.training and model[1].training
    model.eval()
    g = loop_grads(model, x, y)
    assert math.isclose(c.ratio, float(g.sum(0).pow(2).sum() / g.pow(2).sum()), rel_tol=1e-10)
