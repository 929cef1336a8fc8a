"""Linear stability of GD and SGD at a minimum, and sharpness tracked along training.

Near a minimum w*, with x_t = w_t - w*, one SGD step with a minibatch B of size B is linearised
to x_{t+1} = (I - eta H_B) x_t, H_B = 1/B sum_{i in B} H_i the minibatch Hessian (H_i: Hessian of
example i's loss). Wu, Ma & E (2018, "How SGD selects the global minima in over-parameterized
learning", NeurIPS, Theorem 1) show, for batches drawn uniformly without replacement,

    E ||x_{t+1}||^2 = E[x_t^T A x_t],
    A = E_B[(I - eta H_B)^2] = (I - eta H)^2 + eta^2 (n - B) / (B (n - 1)) Sigma,
    Sigma = 1/n sum_i H_i^2 - H^2,

so the minimum is linearly stable in mean square when lambda_max(A) <= 1. For B = n this is GD's
condition |1 - eta lambda_i| <= 1, i.e. lambda_max(H) <= 2 / eta when H is PSD.

This module builds these matrices as operators on flat parameter vectors, in the style of
:mod:`gradcourse.curvature` (their eigenvalues come from :func:`gradcourse.curvature.lanczos`):

- :class:`PerExampleCurvature`  H_i v for many (example, vector) pairs at once (``vmap`` of an
  HVP, or of a Gauss-Newton product, of the single-example loss);
- :class:`SigmaOperator`        Sigma v = 1/n sum_i H_i (H_i v) - H (H v);
- :func:`sgd_stability_operator` the Wu-Ma-E matrix A; :func:`wu_ma_e_stable` its verdict;
  :func:`critical_learning_rate` the largest stable eta, by bisection;
- :func:`linearized_sgd_second_moment` a Monte-Carlo simulation of the linearised dynamics;
- :func:`second_moment_map`, :func:`sgd_second_moment`, :func:`mean_square_rate`,
  :func:`mean_square_threshold`: the exact second moment E[x_t x_t^T] of those dynamics on
  explicit matrices (:func:`per_example_matrices` restricts H_i to a subspace), and the learning
  rate where it starts to grow;
- :class:`SharpnessTracker`     a callback for :func:`gradcourse.train.train` that tracks
  lambda_max(H) with warm-started Lanczos and times itself (Cohen et al. 2021);
- :func:`gauss_newton_spectrum` the exact nonzero spectrum of the Gauss-Newton matrix from the
  per-example Jacobians (small n), giving lambda_max, trace and Frobenius norm (Wu & Su 2023).

At a minimum with flat directions (H v = 0 and H_i v = 0 for all i, always the case for an
over-parameterised net at zero loss) A v = v, so lambda_max(A) >= 1: a stable minimum reads
lambda_max(A) = 1 (the flat directions are neutral), an unstable one reads more. The Gauss-Newton
curvature (``curvature="ggn"``) keeps every H_i PSD, which the analysis assumes; the exact Hessian
away from an exact minimum has small negative eigenvalues that read as (spurious) instability.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vjp, vmap

from .checks import check_int, check_positive
from .curvature import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    LiveHessianOperator,
    NonFiniteOperatorError,
    lanczos,
)
from .functional import FunctionalModel, flatten
from .losses import LossFn

Curvature = Literal["hessian", "ggn"]
CURVATURES: tuple[str, ...] = ("hessian", "ggn")

__all__ = [
    "PerExampleCurvature",
    "SigmaOperator",
    "SGDStabilityOperator",
    "sgd_noise_factor",
    "sgd_stability_operator",
    "StabilityCheck",
    "wu_ma_e_stable",
    "critical_learning_rate",
    "linearized_sgd_second_moment",
    "batch_noise_factor",
    "second_moment_map",
    "second_moment_matrix",
    "mean_square_rate",
    "sgd_second_moment",
    "sgd_run_norms",
    "mean_square_threshold",
    "per_example_matrices",
    "SharpnessTracker",
    "gauss_newton_spectrum",
    "trace_bound",
]


# --------------------------------------------------------------------------------------------
# Per-example curvature products
# --------------------------------------------------------------------------------------------


class PerExampleCurvature:
    """Products H_i v of single-example curvatures, many (example, vector) pairs in one ``vmap``.

    ``curvature="hessian"``: H_i = Hessian of the loss of example i alone (forward-over-reverse
    HVP, Pearlmutter 1994). ``curvature="ggn"``: H_i = J_i^T H_out,i J_i, its Gauss-Newton part
    (Schraudolph 2002), PSD for convex losses and equal to the Hessian at a zero-loss minimum of
    the MSE. The mean over examples, 1/n sum_i H_i, is the operator :attr:`mean` (a
    :class:`~gradcourse.curvature.HessianOperator` or :class:`~gradcourse.curvature.GGNOperator`
    of the same data, parameters and flat layout).

    ``chunk_size`` bounds how many pairs one ``vmap`` call evaluates at once (memory).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn,
        data: tuple[Tensor, Tensor],
        *,
        curvature: Curvature = "hessian",
        params: dict[str, Tensor] | None = None,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if not (
            isinstance(data, tuple | list)
            and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)
        ):
            raise ValueError("data must be one (x, y) pair of tensors (a single batch)")
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
        cls = HessianOperator if curvature == "hessian" else GGNOperator
        self.mean: CurvatureOperator = cls(model, loss, tuple(data), params=params, device=device)
        self.curvature = curvature
        self.chunk_size = chunk_size
        self.x, self.y = next(self.mean.batches())
        # one-hot targets made here, once: inside vmap, one_hot could not read the labels
        self.y = self.mean.functional.targets(self.x, self.y)
        self.n = len(self.x)
        self.size = self.mean.shape[0]
        self.dtype, self.device = self.mean.dtype, self.mean.device
        self.num_products = 0

    def _one(self, xi: Tensor, yi: Tensor, v: Tensor) -> Tensor:
        op = self.mean
        params = op.params
        vd = op.unflatten(v)
        xi, yi = xi.unsqueeze(0), yi.unsqueeze(0)
        if self.curvature == "hessian":
            g = lambda p: grad(op.batch_loss)(p, xi, yi)  # noqa: E731
            return flatten(jvp(g, (params,), (vd,))[1])
        model_out = lambda p: op.outputs(p, xi)  # noqa: E731
        out, jac_v = jvp(model_out, (params,), (vd,))
        out_hess_jac_v = jvp(lambda o: grad(op.loss_of_outputs)(o, yi), (out,), (jac_v,))[1]
        return flatten(vjp(model_out, params)[1](out_hess_jac_v)[0])

    def products(self, vectors: Tensor, index: Tensor | None = None) -> Tensor:
        """H_{index[j]} vectors[j] for every j, shape (m, P).

        ``vectors``: (P,) (the same vector for every example) or (m, P); ``index``: (m,) example
        indices (default: all n examples in order, then m = n).
        """
        index = torch.arange(self.n, device=self.device) if index is None else index
        index = index.to(self.device)
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        if vectors.ndim == 1:
            vectors = vectors.expand(len(index), -1)
        if vectors.shape != (len(index), self.size):
            raise ValueError(
                f"vectors must have shape ({self.size},) or ({len(index)}, {self.size}), "
                f"got {tuple(vectors.shape)}"
            )
        self.num_products += len(index)
        fn = vmap(self._one, chunk_size=self.chunk_size)
        return fn(self.x[index], self.y[index], vectors)

    def batch_matvec(self, v: Tensor, index: Tensor) -> Tensor:
        """The minibatch curvature H_B v = 1/|B| sum_{i in B} H_i v for B = ``index``."""
        return self.products(v, index).mean(dim=0)


class SigmaOperator(CurvatureOperator):
    """Sigma = 1/n sum_i H_i^2 - H^2, the covariance of the per-example curvatures (Wu, Ma & E
    2018, eq. for Sigma below Theorem 1), as a linear operator.

    Sigma v = 1/n sum_i H_i (H_i v) - H (H v): three vmapped passes of per-example products. It
    is PSD (a covariance). Arguments as for :class:`PerExampleCurvature`; :attr:`mean` is H.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn,
        data: tuple[Tensor, Tensor],
        *,
        curvature: Curvature = "hessian",
        params: dict[str, Tensor] | None = None,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.per_example = PerExampleCurvature(
            model,
            loss,
            data,
            curvature=curvature,
            params=params,
            device=device,
            chunk_size=chunk_size,
        )
        self.mean = self.per_example.mean
        super().__init__(self.per_example.size, self.per_example.dtype, self.per_example.device)

    def _matvec(self, v: Tensor) -> Tensor:
        pe = self.per_example
        hv_i = pe.products(v)  # (n, P): H_i v
        second = pe.products(hv_i).mean(dim=0)  # 1/n sum_i H_i H_i v
        hv = hv_i.mean(dim=0)
        return second - pe.products(hv).mean(dim=0)


def sgd_noise_factor(batch_size: int, n: int) -> float:
    """(n - B) / (B (n - 1)): the variance factor of a batch mean drawn without replacement
    (Wu, Ma & E 2018, Theorem 1). 1 for B = 1, 0 for B = n (GD)."""
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1, n)
    if n == 1:
        return 0.0
    return (n - batch_size) / (batch_size * (n - 1))


class SGDStabilityOperator(CurvatureOperator):
    """A = (I - lr H)^2 + lr^2 (n - B)/(B (n - 1)) Sigma (Wu, Ma & E 2018, Theorem 1).

    A = E_B[(I - lr H_B)^2] for B drawn uniformly without replacement, so that
    E ||x_{t+1}||^2 = E[x_t^T A x_t] for the linearised SGD x_{t+1} = (I - lr H_B) x_t.
    """

    def __init__(
        self,
        hessian: CurvatureOperator,
        sigma: CurvatureOperator | None,
        lr: float,
        batch_size: int,
        n: int,
    ) -> None:
        self.lr = check_positive("lr", lr)
        self.noise = sgd_noise_factor(batch_size, n)
        self.batch_size, self.n = batch_size, n
        if sigma is None and self.noise > 0:
            raise ValueError(f"sigma is needed for batch_size={batch_size} < n={n}")
        if sigma is not None and sigma.shape != hessian.shape:
            raise ValueError(f"sigma has shape {sigma.shape}, hessian {hessian.shape}")
        self.hessian, self.sigma = hessian, sigma
        super().__init__(hessian.shape[0], hessian.dtype, hessian.device)

    def _matvec(self, v: Tensor) -> Tensor:
        w = v - self.lr * self.hessian.matvec(v)
        out = w - self.lr * self.hessian.matvec(w)
        if self.noise > 0:
            out = out + (self.lr**2 * self.noise) * self.sigma.matvec(v)
        return out


def sgd_stability_operator(
    hessian: CurvatureOperator,
    sigma: CurvatureOperator | None,
    lr: float,
    batch_size: int,
    n: int,
) -> SGDStabilityOperator:
    """The Wu-Ma-E operator (I - lr H)^2 + lr^2 (n - B)/(B (n - 1)) Sigma; ``sigma`` may be None
    for B = n (GD)."""
    return SGDStabilityOperator(hessian, sigma, lr, batch_size, n)


@dataclass
class StabilityCheck:
    """lambda_max of the Wu-Ma-E operator A, the verdict lambda_max <= 1 + tol, and the top
    eigenvector (the direction whose mean-square deviation grows fastest in one step)."""

    lambda_max: float
    stable: bool
    eigenvector: Tensor
    num_matvecs: int

    def __iter__(self):  # allows ``lam, stable = wu_ma_e_stable(...)``
        return iter((self.lambda_max, self.stable))


def wu_ma_e_stable(
    hessian: CurvatureOperator,
    sigma: CurvatureOperator | None,
    lr: float,
    batch_size: int,
    n: int,
    *,
    tol: float = 1e-6,
    lanczos_tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    v0: Tensor | None = None,
) -> StabilityCheck:
    """Is the minimum linearly stable for SGD(lr, B)? lambda_max{(I - lr H)^2 + lr^2 (n - B) /
    (B (n - 1)) Sigma} <= 1 (Wu, Ma & E 2018, Theorem 1), with ``tol`` for rounding.

    ``lam, stable = wu_ma_e_stable(H, Sigma, lr, B, n)``. lambda_max comes from
    :func:`gradcourse.curvature.lanczos` (``v0`` warm-starts it). For B = n and a PSD H this is
    GD's condition lambda_max(H) <= 2 / lr.
    """
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    op = sgd_stability_operator(hessian, sigma, lr, batch_size, n)
    res = lanczos(op, k=1, tol=lanczos_tol, max_matvecs=max_matvecs, seed=seed, v0=v0)
    lam = float(res.eigenvalues[0])
    return StabilityCheck(lam, lam <= 1 + tol, res.eigenvectors[:, 0], res.num_matvecs)


def critical_learning_rate(
    hessian: CurvatureOperator,
    sigma: CurvatureOperator | None,
    batch_size: int,
    n: int,
    *,
    lr_high: float | None = None,
    rel_tol: float = 1e-3,
    tol: float = 1e-6,
    lanczos_tol: float = 1e-5,
    seed: int = 0,
) -> float:
    """The largest lr at which :func:`wu_ma_e_stable` holds, by bisection on [0, lr_high].

    The stable set is an interval [0, lr*] for PSD H and Sigma: v^T A v - |v|^2 =
    lr (lr v^T (H^2 + c Sigma) v - 2 v^T H v), and the bracket only grows with lr. ``lr_high``
    defaults to 2 / lambda_max(H) (slightly widened),
    GD's threshold, which bounds SGD's from above. Returns lr* within ``rel_tol``. Each
    bisection step is one :func:`wu_ma_e_stable`, warm-started from the previous eigenvector;
    ``lanczos_tol`` is its residual tolerance (the eigenvalue error is about its square).
    """
    check_positive("rel_tol", rel_tol)
    if lr_high is None:
        top = float(lanczos(hessian, k=1, seed=seed).eigenvalues[0])
        if not top > 0:
            raise ValueError(f"lambda_max(H) must be > 0 to bound lr, got {top:g}")
        lr_high = 2.0 / top * (1 + 2 * rel_tol)
    lr_high = check_positive("lr_high", lr_high)
    low, high = 0.0, lr_high
    kw = dict(tol=tol, lanczos_tol=lanczos_tol, seed=seed)
    check = wu_ma_e_stable(hessian, sigma, high, batch_size, n, **kw)
    if check.stable:
        return high
    while high - low > rel_tol * high:
        mid = 0.5 * (low + high)
        check = wu_ma_e_stable(hessian, sigma, mid, batch_size, n, v0=check.eigenvector, **kw)
        if check.stable:
            low = mid
        else:
            high = mid
    return low


def linearized_sgd_second_moment(
    curvature: PerExampleCurvature,
    lr: float,
    batch_size: int,
    steps: int,
    *,
    x0: Tensor | None = None,
    num_runs: int = 64,
    seed: int = 0,
) -> Tensor:
    """Monte-Carlo E||x_t||^2 / E||x_0||^2, t = 0..steps, of the linearised SGD at a minimum:
    x_{t+1} = (I - lr H_{B_t}) x_t, each B_t drawn uniformly without replacement, independently
    at every step (the sampling of Wu, Ma & E 2018, Theorem 1).

    ``x0``: (P,) start shared by all runs, or (num_runs, P); default: a Gaussian per run. Runs
    differ in their batches (and default starts), from ``torch.Generator().manual_seed(seed)``.
    Returns float64 (steps + 1,). One step of run r from x: E_B||x_1||^2 = x^T A x.
    """
    lr = check_positive("lr", lr)
    n = curvature.n
    check_int("batch_size", batch_size, 1, n)
    check_int("steps", steps, 0)
    check_int("num_runs", num_runs, 1)
    check_int("seed", seed, 0)
    gen = torch.Generator().manual_seed(seed)
    size = curvature.size
    if x0 is None:
        x = torch.randn(num_runs, size, generator=gen, dtype=torch.float64)
    else:
        x = x0.detach().double().cpu()
        x = x.expand(num_runs, -1).clone() if x.ndim == 1 else x.clone()
        if x.shape != (num_runs, size):
            raise ValueError(f"x0 must have shape ({size},) or ({num_runs}, {size})")
    x = x.to(device=curvature.device, dtype=curvature.dtype)
    moments = [x.double().pow(2).sum(dim=1).mean()]
    for _ in range(steps):
        idx = _draw_batches(gen, n, batch_size, num_runs)
        pairs = x.repeat_interleave(batch_size, dim=0)  # run r repeated for each of its examples
        hx = curvature.products(pairs, idx.reshape(-1)).view(num_runs, batch_size, size).mean(1)
        x = x - lr * hx
        moments.append(x.double().pow(2).sum(dim=1).mean())
    out = torch.stack(moments).cpu()
    return out / out[0]


# --------------------------------------------------------------------------------------------
# The exact second moment of the linearised SGD (explicit matrices, small dimension)
# --------------------------------------------------------------------------------------------


def _draw_batches(gen: torch.Generator, n: int, batch_size: int, num_runs: int) -> Tensor:
    """One SGD step's batches for ``num_runs`` runs: (num_runs, batch_size) indices, each row
    drawn without replacement from range(n) by ``gen``."""
    return torch.stack([torch.randperm(n, generator=gen)[:batch_size] for _ in range(num_runs)])


def _check_hessians(hessians: Tensor) -> Tensor:
    """The per-example matrices as float64 on the CPU (they are small and explicit), checked
    symmetric up to the rounding of their own dtype, then symmetrised exactly."""
    if not isinstance(hessians, Tensor) or hessians.ndim != 3:
        raise ValueError("hessians must be a tensor (n, r, r) of per-example curvature matrices")
    n, r, r2 = hessians.shape
    if r != r2 or n < 1 or r < 1:
        raise ValueError(
            f"hessians must have shape (n, r, r) with n, r >= 1, got {tuple(hessians.shape)}"
        )
    if not hessians.dtype.is_floating_point:
        raise ValueError(f"hessians must be floating point, got {hessians.dtype}")
    h = hessians.detach().to("cpu", torch.float64)
    scale = float(h.abs().max())
    if not math.isfinite(scale):
        raise ValueError("hessians must be finite")
    asymmetry = float((h - h.transpose(1, 2)).abs().max())
    allowed = 1000 * torch.finfo(hessians.dtype).eps * scale
    if asymmetry > allowed:
        raise ValueError(
            f"hessians must be symmetric: max |H_i - H_i^T| = {asymmetry:.3g}, more than the "
            f"{allowed:.3g} that {hessians.dtype} rounding explains"
        )
    return 0.5 * (h + h.transpose(1, 2))


def batch_noise_factor(batch_size: int, n: int, *, replacement: bool = False) -> float:
    """c_B in E[H_B S H_B] = H S H + c_B (1/n sum_i H_i S H_i - H S H): (n - B)/(B (n - 1)) for
    batches drawn uniformly without replacement (Wu, Ma & E 2018), 1/B with replacement."""
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1, None if replacement else n)
    return 1.0 / batch_size if replacement else sgd_noise_factor(batch_size, n)


def second_moment_map(
    hessians: Tensor, lr: float, batch_size: int, *, replacement: bool = False
) -> Callable[[Tensor], Tensor]:
    """The map S_t -> S_{t+1} = E[x_{t+1} x_{t+1}^T] of the linearised SGD x_{t+1} = (I - lr
    H_B) x_t, exactly, for a batch B drawn afresh each step (uniformly without replacement by
    default, as in Wu, Ma & E 2018, Theorem 1):

        T(S) = (I - lr H) S (I - lr H) + lr^2 c_B (1/n sum_i H_i S H_i - H S H).

    ``hessians``: the per-example curvature matrices H_i (n, r, r), e.g. restricted to a
    subspace with :func:`per_example_matrices`. Works in float64."""
    h = _check_hessians(hessians)
    lr = check_positive("lr", lr)
    c = batch_noise_factor(batch_size, len(h), replacement=replacement)
    mean = h.mean(0)
    step = torch.eye(h.shape[1], dtype=h.dtype) - lr * mean

    def apply(s: Tensor) -> Tensor:
        s = s.detach().to("cpu", torch.float64)
        spread = torch.einsum("iab,bc,icd->ad", h, s, h) / len(h) - mean @ s @ mean
        return step @ s @ step + (lr**2 * c) * spread

    return apply


def second_moment_matrix(
    hessians: Tensor, lr: float, batch_size: int, *, replacement: bool = False
) -> Tensor:
    """The map of :func:`second_moment_map` as an (r^2, r^2) matrix acting on vec(S):
    (I - lr H) (x) (I - lr H) + lr^2 c_B (1/n sum_i H_i (x) H_i - H (x) H). Symmetric, since
    every H_i is."""
    h = _check_hessians(hessians)
    lr = check_positive("lr", lr)
    c = batch_noise_factor(batch_size, len(h), replacement=replacement)
    mean = h.mean(0)
    step = torch.eye(h.shape[1], dtype=h.dtype) - lr * mean
    spread = torch.einsum("iab,icd->adbc", h, h) / len(h) - torch.einsum("ab,cd->adbc", mean, mean)
    r = h.shape[1]
    return torch.kron(step, step) + (lr**2 * c) * spread.reshape(r * r, r * r)


def mean_square_rate(
    hessians: Tensor, lr: float, batch_size: int, *, replacement: bool = False
) -> float:
    """The spectral radius of :func:`second_moment_matrix`: E||x_t||^2 grows or decays like
    rate^t for a generic start. Rate <= 1 is mean-square stability; it can exceed 1 while the
    typical run (almost surely) still converges, because the mean of a multiplicative process
    is carried by rare runs."""
    m = second_moment_matrix(hessians, lr, batch_size, replacement=replacement)
    return float(torch.linalg.eigvalsh(m).abs().max())


def sgd_second_moment(
    hessians: Tensor,
    lr: float,
    batch_size: int,
    steps: int,
    *,
    s0: Tensor | None = None,
    replacement: bool = False,
) -> Tensor:
    """E||x_t||^2 / E||x_0||^2 for t = 0..steps, exactly (the recursion of
    :func:`second_moment_map`, no sampling), from E[x_0 x_0^T] = ``s0`` (default: the
    identity, an isotropic start). Returns float64 (steps + 1,)."""
    check_int("steps", steps, 0)
    apply = second_moment_map(hessians, lr, batch_size, replacement=replacement)
    r = hessians.shape[1]
    s = torch.eye(r, dtype=torch.float64) if s0 is None else s0.detach().to("cpu", torch.float64)
    if s.shape != (r, r):
        raise ValueError(f"s0 must have shape ({r}, {r}), got {tuple(s.shape)}")
    if not (torch.allclose(s, s.T) and float(torch.trace(s)) > 0):
        raise ValueError("s0 must be a second moment E[x0 x0^T]: symmetric, with a positive trace")
    traces = [torch.trace(s)]
    for _ in range(steps):
        s = apply(s)
        traces.append(torch.trace(s))
    out = torch.stack(traces)
    return out / out[0]


def sgd_run_norms(
    hessians: Tensor,
    lr: float,
    batch_size: int,
    steps: int,
    *,
    x0: Tensor,
    num_runs: int = 64,
    seed: int = 0,
) -> Tensor:
    """||x_t||^2 / ||x_0||^2 of ``num_runs`` sampled runs of the linearised SGD x_{t+1} =
    (I - lr H_B) x_t on explicit per-example matrices (n, r, r), each B drawn afresh every step
    uniformly without replacement, all runs from ``x0`` (r,). Returns (num_runs, steps + 1)
    float64. Their mean estimates :func:`sgd_second_moment` (with s0 = x0 x0^T); their median
    is the typical run, which can decay while the mean grows (a multiplicative process's mean
    is carried by rare runs)."""
    h = _check_hessians(hessians)
    lr = check_positive("lr", lr)
    n, r = h.shape[0], h.shape[1]
    check_int("batch_size", batch_size, 1, n)
    check_int("steps", steps, 0)
    check_int("num_runs", num_runs, 1)
    x = x0.detach().to("cpu", torch.float64).reshape(-1)
    if x.shape != (r,) or not float(x.norm()) > 0:
        raise ValueError(f"x0 must be a non-zero vector of length {r}")
    gen = torch.Generator().manual_seed(seed)
    xs = x.expand(num_runs, r).clone()
    norms = [xs.pow(2).sum(1)]
    for _ in range(steps):
        idx = _draw_batches(gen, n, batch_size, num_runs)
        h_batch = h[idx].mean(1)  # (num_runs, r, r)
        xs = xs - lr * torch.einsum("kab,kb->ka", h_batch, xs)
        norms.append(xs.pow(2).sum(1))
    out = torch.stack(norms, dim=1)
    return out / out[:, :1]


def mean_square_threshold(
    hessians: Tensor,
    batch_size: int,
    *,
    replacement: bool = False,
    rel_tol: float = 1e-6,
    grid: int = 64,
) -> float:
    """The largest lr at which SGD's linearised second moment does not grow (spectral radius of
    :func:`second_moment_matrix` <= 1, up to rounding), searched on (0, 2 / lambda_max(H)]:
    a grid of ``grid`` points finds the first unstable lr, bisection refines it to ``rel_tol``.

    For PSD H_i it lies between the Wu-Ma-E learning rate (lambda_max(A) <= 1 bounds the growth
    of one step from any start, so it implies this) and GD's 2 / lambda_max(H) (the mean E x_t
    follows GD, and E||x_t||^2 >= ||E x_t||^2). The matrices must be restricted to a subspace
    where H is nonsingular: a direction flat for every H_i is neutral at any lr."""
    h = _check_hessians(hessians)
    check_int("grid", grid, 2)
    check_positive("rel_tol", rel_tol)
    top = float(torch.linalg.eigvalsh(h.mean(0))[-1])
    if not top > 0:
        raise ValueError(f"lambda_max(H) must be > 0, got {top:g}")
    bottom = float(torch.linalg.eigvalsh(h.mean(0))[0])
    if not bottom > 1e-12 * top:
        raise ValueError(
            "H is singular on this subspace (a flat direction is neutral at any lr): restrict "
            "the matrices to the span where H is nonsingular"
        )
    slack = 1e-9

    def stable(lr: float) -> bool:
        return mean_square_rate(h, lr, batch_size, replacement=replacement) <= 1 + slack

    lrs = torch.linspace(0, 2 / top, grid + 1, dtype=torch.float64)[1:].tolist()
    low, high = 0.0, None
    for lr in lrs:
        if stable(lr):
            low = lr
        else:
            high = lr
            break
    if high is None:
        return low
    while high - low > rel_tol * high:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if stable(mid) else (low, mid)
    return low


def per_example_matrices(curvature: PerExampleCurvature, basis: Tensor) -> Tensor:
    """The per-example curvatures restricted to the span of ``basis`` (P, r) with orthonormal
    columns: Q^T H_i Q for every example i, (n, r, r) float64, from n r products H_i q, one
    basis vector at a time (memory: n vectors of length P)."""
    if basis.ndim != 2 or basis.shape[0] != curvature.size:
        raise ValueError(f"basis must have shape ({curvature.size}, r), got {tuple(basis.shape)}")
    q = basis.to(device=curvature.device, dtype=curvature.dtype)
    columns = []
    for j in range(q.shape[1]):  # (n, P) at a time: H_i q_j for every example i
        columns.append((curvature.products(q[:, j]) @ q).double().cpu())  # (n, r): q_a^T H_i q_j
    out = torch.stack(columns, dim=2)
    return 0.5 * (out + out.transpose(1, 2))


# --------------------------------------------------------------------------------------------
# Sharpness measures
# --------------------------------------------------------------------------------------------


class SharpnessTracker:
    """``callback(step, model)`` for :func:`gradcourse.train.train`: lambda_max(H) of the mean
    loss over (x, y) by :func:`~gradcourse.curvature.lanczos`, warm-started from the previous
    top eigenvector (Cohen et al. 2021 track the sharpness the same way, from scratch, with
    scipy's eigsh). Records ``sharpness``, ``sharpness_matvecs`` and ``sharpness_time`` (s);
    :attr:`total_time` sums the time spent here, to compare with the run's wall time.

    ``tol``: Lanczos's relative residual. The relative eigenvalue error is about
    tol^2 lambda / gap when Lanczos finds the top eigenpair; near the edge of stability the top
    eigenvalues cluster (gaps down to 0.1% of lambda) and cross between calls, and a warm start
    can then settle on the runner-up, an error of at most that gap. 1e-3 keeps such misses rare;
    3e-3 saves a quarter of the products but misses more often and by more
    (``benchmarks/stability_tracking.py``).
    ``measure_at(step)``: whether to measure at this call (default: at every call); a skipped
    call returns None, which :func:`~gradcourse.train.train` does not record.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        loss: str | LossFn = "mse",
        tol: float = 1e-3,
        max_matvecs: int = 200,
        seed: int = 0,
        measure_at: Callable[[int], bool] | None = None,
    ) -> None:
        check_positive("tol", tol)
        check_int("max_matvecs", max_matvecs, 1)
        self.x, self.y, self.loss, self.tol = x, y, loss, tol
        self.max_matvecs, self.seed, self.measure_at = max_matvecs, seed, measure_at
        self.v: Tensor | None = None
        self.total_time = 0.0
        self.total_matvecs = 0

    def __call__(self, step: int, model: nn.Module) -> dict[str, float] | None:
        import warnings

        if self.measure_at is not None and not self.measure_at(step):
            return None
        start = time.perf_counter()
        try:
            op = LiveHessianOperator(model, self.loss, self.x, self.y)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # unconverged: recorded
                res = lanczos(
                    op, k=1, tol=self.tol, max_matvecs=self.max_matvecs, seed=self.seed, v0=self.v
                )
        except NonFiniteOperatorError:
            # a run about to diverge: loss still finite, Hessian products already overflow.
            # Recorded as NaN; train() reports the divergence at its next loss check.
            self.v = None
            sharpness, matvecs = math.nan, 0
        else:
            self.v = res.eigenvectors[:, 0].detach()
            sharpness, matvecs = float(res.eigenvalues[0]), res.num_matvecs
        elapsed = time.perf_counter() - start
        self.total_time += elapsed
        self.total_matvecs += matvecs
        return {
            "sharpness": sharpness,
            "sharpness_matvecs": matvecs,
            "sharpness_time": elapsed,
        }


def gauss_newton_spectrum(
    model: nn.Module,
    x: Tensor,
    *,
    params: dict[str, Tensor] | None = None,
    max_size: int = 4_000,
) -> Tensor:
    """The nonzero spectrum of the Gauss-Newton matrix G = 1/n sum_i J_i^T J_i of the MSE
    loss 1/n sum_i 1/2 ||f(x_i) - y_i||^2 (output Hessian I), exactly, from the per-example
    Jacobians: G and the (n k x n k) Gram matrix J J^T / n share their nonzero eigenvalues.

    Returns them descending (float64, CPU). Then lambda_max(G) = eig[0], tr(G) = eig.sum(),
    ||G||_F = eig.norm(): the sharpness measures of Wu & Su (2023), equal to those of the
    Hessian at a zero-loss minimum.
    """
    fm = FunctionalModel(model, params=params, copy=False)

    def f(p: dict[str, Tensor]) -> Tensor:
        return fm.outputs(p, x).reshape(len(x), -1)

    flat = flatten(jacrev(f)(fm.params), batch_dims=2)
    rows = flat.reshape(-1, flat.shape[-1]).double()
    if rows.shape[0] > max_size:
        raise ValueError(f"n * outputs must be <= max_size={max_size}, got {rows.shape[0]}")
    gram = rows @ rows.T / len(x)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).cpu()


def trace_bound(lr: float, batch_size: int, n: int) -> float:
    """The bound tr(H) <= 2 / (lr (n - B)/(B (n - 1))) on a minimum that is linearly stable for
    SGD(lr, B) in the mean-square sense of Wu, Ma & E (2018, Theorem 1), when every
    H_i = g_i g_i^T has rank one (square loss, scalar output, zero loss).

    Our derivation, not a theorem quoted from Wu & Su (2023): their abstract states the B = 1
    form, tr(H) <= 2 / lr at a global minimum linearly stable for SGD, under their own
    definition of linear stability (their Section 3, not checked here). For B > 1 this bound is
    weaker by 1 / c.

    Derivation: stability is lr (H^2 + c Sigma) <= 2 H in the PSD order, c = (n - B)/(B (n - 1));
    taking the trace, lr ((1 - c) tr H^2 + c mean_i ||g_i||^4) <= 2 tr H, and
    mean_i ||g_i||^4 >= (tr H)^2 (Jensen), so c lr (tr H)^2 <= 2 tr H. For B = 1:
    tr(H) <= 2 / lr. Infinite for B = n.

    It also follows from exact mean-square stability, the weaker premise: the second-moment map
    T(S) = E[(I - lr H_B) S (I - lr H_B)] is self-adjoint and positive, so a spectral radius
    <= 1 gives <I, T(I)> <= <I, I>, that is lr E tr H_B^2 <= 2 tr H, and
    E tr H_B^2 >= c mean_i ||g_i||^4 >= c (tr H)^2 as above. Two inequalities are dropped, so the
    bound can hold with room at a minimum on the edge of stability.
    """
    lr = check_positive("lr", lr)
    c = sgd_noise_factor(batch_size, n)
    return math.inf if c == 0 else 2.0 / (lr * c)
