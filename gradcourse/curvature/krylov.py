"""Lanczos on a curvature operator: eigenpairs, and the tridiagonals behind quadrature.

- :func:`lanczos`  top-k / bottom-k eigenpairs, thick-restart Lanczos with full
  reorthogonalisation (Lanczos 1950; Wu & Simon 2000), on :class:`_ThickRestartBasis`;
- ``_block_lanczos_tridiagonals``  plain Lanczos from several start vectors in lockstep, one
  block product per step, for the stochastic Lanczos quadrature of :mod:`.slq`.

Both reorthogonalise fully (classical Gram-Schmidt, twice), so the Ritz values carry no ghost
copies; :class:`NonFiniteOperatorError` reports a product that came back inf or NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_int, check_number
from .operators import CurvatureOperator
from .probes import Seed, _generator, _probe, _progress

Which = Literal["largest", "smallest", "both"]

__all__ = ["EigResult", "lanczos", "NonFiniteOperatorError"]


def _orthogonalize_(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``w`` (in place) its components along the orthonormal rows of ``basis``.

    Classical Gram-Schmidt applied twice ("twice is enough", Giraud et al. 2005); returns the
    coefficients basis @ w_original in float64.
    """
    coeffs = basis @ w
    w -= basis.T @ coeffs
    correction = basis @ w
    w -= basis.T @ correction
    return (coeffs + correction).double().cpu()


@dataclass
class EigResult:
    """Eigenpairs from :func:`lanczos`.

    ``eigenvalues`` (float64, CPU): descending for ``which="largest"`` and ``"both"`` (top k
    first, bottom k last), ascending for ``"smallest"``. ``eigenvectors``: (P, k) columns in the
    operator's dtype and device. ``residual_norms``: ||A x - theta x|| of each pair; a pair has
    ``converged`` when that is <= tol * (largest |Ritz value|).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual_norms: Tensor
    converged: Tensor
    num_matvecs: int
    num_restarts: int


def _wanted_indices(theta: Tensor, count: int, which: Which) -> Tensor:
    """Indices (into ascending ``theta``) of the ``count`` Ritz values to keep or report."""
    n = len(theta)
    count = min(count, n)
    if which == "largest":
        return torch.arange(n - count, n).flip(0)
    if which == "smallest":
        return torch.arange(count)
    top = count - count // 2
    return torch.cat([torch.arange(n - top, n).flip(0), torch.arange(count - top).flip(0)])


def _default_tol(dtype: torch.dtype) -> float:
    """eps^(2/3): 2.4e-5 in float32, 3.7e-11 in float64; the eigenvalue error is then about
    eps^(4/3) ||A||^2 / gap, and the residual stays well above the rounding floor of a matvec."""
    return torch.finfo(dtype).eps ** (2 / 3)


def _start_vector(op: CurvatureOperator, v0: Tensor | None, gen: torch.Generator) -> Tensor:
    if v0 is None:
        v = _probe(op, gen, "gaussian")
    else:
        if v0.ndim == 2:  # several previous eigenvectors: start from their sum
            v0 = v0.sum(dim=1)
        if v0.shape != (op.shape[0],):
            raise ValueError(f"v0 must have shape (P,) or (P, j) with P={op.shape[0]}")
        v = v0.detach().to(device=op.device, dtype=op.dtype).clone()
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("v0 must be a finite, non-zero vector")
    return v / norm


def lanczos(
    op: CurvatureOperator,
    k: int = 10,
    *,
    which: Which = "largest",
    tol: float | None = None,
    basis_size: int | None = None,
    max_matvecs: int | None = None,
    seed: Seed = 0,
    v0: Tensor | None = None,
    progress: bool = False,
) -> EigResult:
    """The k largest (or smallest, or both) eigenpairs of a symmetric operator.

    Lanczos (1950) with full reorthogonalisation, thick-restarted (Wu & Simon 2000, SIAM J.
    Matrix Anal. Appl. 22(2)): the Krylov basis grows to ``basis_size`` vectors; the projected
    matrix T = V^T A V (float64) gives Ritz pairs (theta_i, V s_i) with residual norm
    |beta_m s_{m,i}|; on restart the best Ritz vectors are kept and the iteration continues.
    Stops when every wanted pair has residual <= ``tol`` * max|theta| (default eps^(2/3) of the
    operator's dtype: 2.4e-5 in float32, 3.7e-11 in float64; the eigenvalue error is then about
    residual^2 / gap) or after ``max_matvecs``, with a warning. With TF32 convolutions or
    matmuls (a GPU default for convolutions) a matvec is only accurate to ~1e-3: pass
    ``tol=1e-3``.

    ``v0`` warm-starts the iteration from a previous estimate (a vector, or eigenvectors (P, j)
    whose sum is used), e.g. to track the sharpness along training. Raises
    :class:`NonFiniteOperatorError` when a product comes back inf/NaN. Memory: basis_size + 1
    vectors of length P (default basis_size = max(2 k' + 20, 40) capped at P, k' = k or 2k).
    """
    size = op.shape[0]
    check_int("k", k, 1)
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    num_wanted = 2 * k if which == "both" else k
    if num_wanted > size:
        raise ValueError(f"k must be <= P={size} (<= P/2 for which='both'), got k={k}")
    tol = _default_tol(op.dtype) if tol is None else tol
    # a relative residual: tol >= 1 (or inf, or NaN) would accept any vector as converged
    check_number("tol", tol, low=0, high=1, low_open=True, high_open=True)
    m = min(size, max(2 * num_wanted + 20, 40)) if basis_size is None else basis_size
    check_int("basis_size", m, num_wanted + 1 if size > num_wanted else size)
    if m > size:
        raise ValueError(f"basis_size must be <= P={size}, got {m}")
    max_matvecs = max(20 * m, 1_000) if max_matvecs is None else max_matvecs
    check_int("max_matvecs", max_matvecs, 1)
    gen = _generator(seed)
    krylov = _ThickRestartBasis(op, m, _start_vector(op, v0, gen), gen)
    num_keep = min(num_wanted + (m - num_wanted) // 2, m - 1)
    bar = _progress(max_matvecs, "lanczos", progress)
    while True:
        krylov.expand()
        bar.update()
        too_few = krylov.size < min(num_wanted, m) and krylov.beta > 0
        if too_few and krylov.num_matvecs < max_matvecs:
            continue  # fewer Ritz values than wanted: nothing to check yet
        theta, vecs, residuals = krylov.ritz()
        wanted = _wanted_indices(theta, num_wanted, which)
        converged = residuals[wanted] <= tol * float(theta.abs().max())
        if (len(wanted) == num_wanted and bool(converged.all())) or krylov.size == size:
            break
        if krylov.num_matvecs >= max_matvecs:
            warnings.warn(
                f"lanczos: {int((~converged).sum())} of {len(wanted)} eigenpairs did not reach "
                f"tol={tol:g} within max_matvecs={max_matvecs}",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        if krylov.size == m:
            krylov.restart(_wanted_indices(theta, num_keep, which), theta, vecs)
    bar.close()
    eigvecs = krylov.ritz_vectors(vecs[:, wanted])
    return EigResult(
        theta[wanted], eigvecs, residuals[wanted], converged, krylov.num_matvecs, krylov.restarts
    )


class NonFiniteOperatorError(FloatingPointError):
    """A curvature operator returned inf or NaN: the parameters or the loss have overflowed
    (typically a training run about to diverge), so no eigenvalue can be computed."""


class _ThickRestartBasis:
    """The Krylov basis V (rows) and projected matrix T = V^T A V of thick-restart Lanczos.

    Invariant: A V_j = V_j T_j + beta v_{j+1} e_j^T, so a Ritz pair (theta, V s) has residual
    norm |beta s_j| (Wu & Simon 2000, eq. 2.4). T is filled from the Gram-Schmidt coefficients,
    so after a restart (T = diag(theta_kept) plus the coupling row) nothing changes.
    """

    def __init__(self, op: CurvatureOperator, m: int, start: Tensor, gen: torch.Generator):
        self.op, self.gen = op, gen
        self.basis = torch.empty(m + 1, op.shape[0], dtype=op.dtype, device=op.device)
        self.basis[0] = start
        self.proj = torch.zeros(m, m, dtype=torch.float64)
        self.size, self.beta, self.num_matvecs, self.restarts = 0, 0.0, 0, 0

    def expand(self) -> None:
        """One matvec: column ``size`` of T, then the next basis vector and its coupling beta."""
        j, dim = self.size, self.op.shape[0]
        w = self.op.matvec(self.basis[j])
        self.num_matvecs += 1
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteOperatorError(
                f"lanczos: the operator returned inf/NaN at product {self.num_matvecs} "
                "(overflowing parameters or loss: a diverging run?)"
            )
        av_norm = w.norm()
        coeffs = _orthogonalize_(w, self.basis[: j + 1])
        self.proj[: j + 1, j] = coeffs
        self.proj[j, : j + 1] = coeffs
        self.size = j = j + 1
        beta = w.norm()
        invariant = beta <= max(dim**0.5, 10) * torch.finfo(self.op.dtype).eps * av_norm
        self.beta = 0.0 if (invariant or j == dim) else float(beta)
        if j == dim:
            return
        if invariant:  # the Krylov space is invariant: go on from a fresh direction, coupling 0
            w = _probe(self.op, self.gen, "gaussian")
            _orthogonalize_(w, self.basis[:j])
        self.basis[j] = w / w.norm()

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), their vectors in basis coordinates, and residual norms."""
        theta, vecs = torch.linalg.eigh(self.proj[: self.size, : self.size])
        return theta, vecs, self.beta * vecs[-1].abs()

    def ritz_vectors(self, coords: Tensor) -> Tensor:
        """Ritz vectors V^T s, as columns (P, k), for basis coordinates ``coords`` (size, k)."""
        return self.basis[: self.size].T @ coords.to(device=self.op.device, dtype=self.op.dtype)

    def restart(self, keep: Tensor, theta: Tensor, vecs: Tensor) -> None:
        """Keep the Ritz vectors ``keep`` and the residual direction; T becomes diag(theta)."""
        num_keep = len(keep)
        kept = self.ritz_vectors(vecs[:, keep]).T
        self.basis[num_keep] = self.basis[self.size]
        self.basis[:num_keep] = kept
        self.proj.zero_()
        self.proj[:num_keep, :num_keep] = torch.diag(theta[keep])
        self.size, self.restarts = num_keep, self.restarts + 1


def _block_lanczos_tridiagonals(
    op: CurvatureOperator, starts: Tensor, num_iters: int
) -> list[Tensor]:
    """Run Lanczos with full reorthogonalisation from each column of ``starts`` (P, b) in
    lockstep, one block product per step; return each column's tridiagonal T = V^T A V
    (float64), cut short where that column's Krylov space became invariant."""
    size, width = starts.shape
    basis = torch.zeros(num_iters, size, width, dtype=op.dtype, device=op.device)
    basis[0] = starts / starts.norm(dim=0)
    alphas = torch.zeros(num_iters, width, dtype=torch.float64)
    betas = torch.zeros(num_iters, width, dtype=torch.float64)
    lengths = torch.full((width,), num_iters)
    threshold = max(size**0.5, 10) * torch.finfo(op.dtype).eps
    for j in range(num_iters):
        w = op.matmat(basis[j])
        av_norm = w.norm(dim=0)
        for _ in range(2):  # classical Gram-Schmidt, twice, per column
            coeffs = torch.einsum("jpb,pb->jb", basis[: j + 1], w)
            w -= torch.einsum("jpb,jb->pb", basis[: j + 1], coeffs)
            alphas[j] += coeffs[j].double().cpu()
        beta = w.norm(dim=0)
        lengths[(beta <= threshold * av_norm).cpu() & (lengths > j)] = j + 1  # invariant
        if j + 1 == num_iters or bool((lengths <= j + 1).all()):
            break
        active = (lengths > j + 1).to(op.device)
        betas[j] = torch.where(active, beta, 0).double().cpu()
        basis[j + 1] = torch.where(active, w / beta.clamp_min(torch.finfo(op.dtype).tiny), 0)
    return [
        torch.diag(alphas[:n, c])
        + torch.diag(betas[: n - 1, c], 1)
        + torch.diag(betas[: n - 1, c], -1)
        for c, n in enumerate(lengths.tolist())
    ]
