"""The spectral density of a curvature operator by stochastic Lanczos quadrature.

:func:`spectral_density` (Golub & Meurant 1994; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan &
Xiao 2019; Papyan 2020) returns a :class:`SpectralDensity`: per random probe, the nodes and
weights of a Gauss quadrature rule for the spectral measure, which give moments tr(A^k) / P and
a density with Gaussian broadening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int, check_positive
from .krylov import _block_lanczos_tridiagonals
from .operators import CurvatureOperator
from .probes import Seed, _generator, _probe, _progress
from .trace import Estimate, _check_estimator_args, _estimate

__all__ = ["SpectralDensity", "spectral_density"]


@dataclass
class SpectralDensity:
    """Gauss quadrature nodes and weights of the spectral density, one row per probe.

    For a unit probe u, sum_j weights[l, j] f(nodes[l, j]) = u^T f(A) u exactly for polynomials f
    of degree < 2 num_iters (Golub & Meurant 1994); averaged over probes it estimates
    tr(f(A)) / P (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019, eq. 3; Papyan 2020). Rows that
    stopped early (an invariant subspace) are padded with zero weights.
    """

    nodes: Tensor
    weights: Tensor
    dimension: int
    num_matvecs: int

    def moment(self, order: int) -> Estimate:
        """tr(A^order) / P, estimated as the mean over probes of sum_j w_j theta_j^order."""
        check_int("order", order, 0)
        samples = (self.weights * self.nodes.pow(order)).sum(dim=1)
        return _estimate(samples, 0.0, self.num_matvecs)

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """The density on ``grid``, each node broadened to a Gaussian of std ``sigma``.

        phi(t) = mean_l sum_j w_lj N(t; theta_lj, sigma^2) (Ghorbani et al. 2019, eq. 5);
        it integrates to 1 over the real line.
        """
        check_positive("sigma", sigma)
        grid = torch.as_tensor(grid, dtype=torch.float64)
        z = (grid.reshape(-1, 1, 1) - self.nodes) / sigma
        kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return (self.weights * kernel).sum(dim=2).mean(dim=1).reshape(grid.shape)

    def grid(self, num_points: int = 1_000, margin: float = 0.05) -> Tensor:
        """An evenly spaced grid over [min node, max node], widened by ``margin`` of the range."""
        check_int("num_points", num_points, 2)
        used = self.nodes[self.weights > 0]
        low, high = float(used.min()), float(used.max())
        pad = margin * max(high - low, 1e-12)
        return torch.linspace(low - pad, high + pad, num_points, dtype=torch.float64)


def spectral_density(
    op: CurvatureOperator,
    num_probes: int = 10,
    num_iters: int = 80,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int = 8,
    progress: bool = False,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019, Sec. 2; Papyan 2020).

    For each of ``num_probes`` unit probes u, ``num_iters`` Lanczos steps (full
    reorthogonalisation) give T = S diag(theta) S^T; the nodes are theta and the weights
    S[0, :]^2, a Gauss quadrature rule for the spectral measure of u. Costs
    num_probes x num_iters matvecs, ``block_size`` probes advancing together; memory
    num_iters x block_size vectors of length P.
    """
    check_int("num_probes", num_probes, 1)
    check_int("num_iters", num_iters, 1)
    _check_estimator_args(op, 1, dist, block_size)
    gen = _generator(seed)
    num_iters = min(num_iters, op.shape[0])
    nodes = torch.zeros(num_probes, num_iters, dtype=torch.float64)
    weights = torch.zeros(num_probes, num_iters, dtype=torch.float64)
    start_count = op.num_matvecs
    bar = _progress(num_probes, "SLQ probes", progress)
    for first in range(0, num_probes, block_size):
        width = min(block_size, num_probes - first)
        starts = torch.stack([_probe(op, gen, dist) for _ in range(width)], dim=1)
        for row, tri in enumerate(_block_lanczos_tridiagonals(op, starts, num_iters), first):
            theta, vecs = torch.linalg.eigh(tri)
            nodes[row, : len(theta)] = theta
            weights[row, : len(theta)] = vecs[0] ** 2
        bar.update(width)
    bar.close()
    return SpectralDensity(nodes, weights, op.shape[0], op.num_matvecs - start_count)
