"""gradcourse.subspace against independent references: scipy's Hadamard matrix, each projection's
materialised matrix, an explicit P in autograd, direct training, and the column norms the
paper's construction promises."""

import math

import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import gradcourse as gc
from gradcourse.subspace import (
    DenseProjection,
    FastfoodProjection,
    SparseProjection,
    SubspaceModel,
    fwht,
    make_projection,
)

KINDS = ("dense", "sparse", "fastfood", "coordinates")


@pytest.mark.parametrize("length", [1, 2, 8, 64])
def test_fwht_is_scipys_hadamard_matrix_times_x(length):
    x = torch.randn(3, length, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = torch.from_numpy(scipy.linalg.hadamard(length)).double()
    torch.testing.assert_close(fwht(x), x @ h.T, rtol=1e-12, atol=1e-12)


def test_fwht_refuses_a_length_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.ones(6))


@pytest.mark.parametrize("kind", KINDS)
def test_each_projection_is_linear_and_equals_its_materialised_matrix(kind):
    p = make_projection(kind, 50, 7, seed=3, dtype=torch.float64)
    m = p.matrix()
    assert m.shape == (50, 7)
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(7, dtype=torch.float64, generator=g),
        torch.randn(7, dtype=torch.float64, generator=g),
    )
    torch.testing.assert_close(p(a), m @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p(2 * a - b), 2 * p(a) - p(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_projections_are_seeded(kind):
    a = make_projection(kind, 40, 5, seed=0, dtype=torch.float64).matrix()
    b = make_projection(kind, 40, 5, seed=0, dtype=torch.float64).matrix()
    c = make_projection(kind, 40, 5, seed=1, dtype=torch.float64).matrix()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_dense_and_sparse_columns_have_unit_norm_over_the_whole_network(kind):
    m = make_projection(kind, 300, 20, seed=0, dtype=torch.float64).matrix()
    torch.testing.assert_close(m.norm(dim=0), torch.ones(20, dtype=torch.float64))


def test_coordinates_are_distinct_standard_basis_vectors():
    m = make_projection("coordinates", 30, 12, seed=4, dtype=torch.float64).matrix()
    assert set(m.flatten().tolist()) == {0.0, 1.0}
    assert torch.equal(m.sum(0), torch.ones(12))  # one coordinate per column
    assert float(m.sum(1).max()) == 1.0  # distinct coordinates
    full = make_projection("coordinates", 30, 30, seed=4, dtype=torch.float64).matrix()
    assert torch.equal(full.sum(0), torch.ones(30)) and torch.equal(full.sum(1), torch.ones(30))
    with pytest.raises(ValueError, match="cannot be chosen"):
        make_projection("coordinates", 30, 31)


def test_sparse_density_is_one_over_sqrt_d_and_its_entries_have_equal_magnitude():
    D, d = 10_000, 200  # noqa: N806
    p = SparseProjection(D, d, seed=0, dtype=torch.float64)
    cols = p.weight.col_indices()
    counts = torch.bincount(cols, minlength=d).double()
    # Binomial(D, 1/sqrt(D)) per column: mean sqrt(D) = 100, sd ~ 10; the mean of 200 columns
    assert abs(float(counts.mean()) - 100) < 4 * 10 / math.sqrt(d)
    values = p.weight.values()
    torch.testing.assert_close(values.abs(), 1 / counts[cols].sqrt())  # +-sqrt(s), normalised
    torch.testing.assert_close(p.weight_t.to_dense(), p.weight.to_dense().T)
    assert p.stored_numbers() < 0.05 * D * d  # a few numbers per nonzero, not D d


def test_fastfood_columns_have_unit_squared_norm_in_expectation_and_store_o_of_l():
    D, d = 1000, 600  # noqa: N806  (L = 1024)
    p = FastfoodProjection(D, d, seed=0, dtype=torch.float64)
    assert p.L == 1024
    sq = p.matrix().pow(2).sum(0)
    # each column's squared norm over D of L coordinates: mean one (ours: the sample of 600)
    assert abs(float(sq.mean()) - 1) < 0.05
    assert p.stored_numbers() == 3 * 1024  # signs, permutation, Gaussian: O(L), not D d


def test_fastfood_beyond_l_takes_independent_blocks():
    p = FastfoodProjection(30, 70, seed=0, dtype=torch.float64)  # L = 32: three blocks
    assert p.signs.shape == (3, 32)
    m = p.matrix()
    assert m.shape == (30, 70) and torch.linalg.matrix_rank(m) == 30


def _net(seed=0):
    return gc.models.MLP(5, [8], 3, seed=seed, dtype=torch.float64)


def test_the_subspace_model_starts_at_the_network_and_moves_along_p():
    net, x = _net(), torch.randn(6, 5, dtype=torch.float64)
    before = net(x)
    sub = SubspaceModel(net, "dense", 4, seed=0)
    torch.testing.assert_close(sub(x), before)  # theta_d = 0: theta0
    with torch.no_grad():
        sub.theta_d.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    expected = sub.theta0 + sub.projection.matrix() @ sub.theta_d
    torch.testing.assert_close(sub.flat_params(), expected)
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["theta_d"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_gradient_in_theta_d_is_p_transpose_times_the_full_gradient(kind):
    net = _net(1)
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(3, (9,))
    sub = SubspaceModel(net, kind, 6, seed=2)
    with torch.no_grad():
        sub.theta_d.normal_(generator=torch.Generator().manual_seed(0))
    F.cross_entropy(sub(x), y).backward()
    # reference: autograd through an explicit P, and P^T times the full gradient at theta
    theta = sub.flat_params().detach().requires_grad_(True)
    fm = gc.functional.FunctionalModel(net, params=dict(net.named_parameters()))
    loss = F.cross_entropy(torch.func.functional_call(net, fm.unflatten(theta), (x,)), y)
    (full,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(sub.theta_d.grad, sub.projection.matrix().T @ full)


def test_with_d_equal_to_d_and_p_the_identity_training_equals_direct_training():
    class Identity(DenseProjection):
        def __init__(self, size):
            super().__init__(size, size, dtype=torch.float64)
            self.weight = torch.eye(size, dtype=torch.float64)

    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(3, (20,))
    direct = _net(2)
    size = sum(p.numel() for p in direct.parameters())
    sub = SubspaceModel(_net(2), Identity(size))
    for model in (direct, sub):
        gc.train.train(model, x, y, loss="ce", lr=0.1, steps=25, progress=False)
    torch.testing.assert_close(
        sub.flat_params(), gc.functional.flatten(dict(direct.named_parameters()))
    )


def test_subspace_model_refuses_a_projection_of_the_wrong_size_and_a_name_without_d():
    with pytest.raises(ValueError, match="maps to D=10"):
        SubspaceModel(_net(), DenseProjection(10, 2))
    with pytest.raises(ValueError, match="d is required"):
        SubspaceModel(_net(), "dense")
    with pytest.raises(ValueError, match="kind must be one of"):
        make_projection("gaussian", 10, 2)
    with pytest.raises(ValueError, match="theta_d must have shape"):
        DenseProjection(10, 2)(torch.zeros(3))
