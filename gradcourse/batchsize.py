"""Batch size, learning rate and gradient noise: the mini-batch Hessian against the full one
(Granziol, Zohren & Roberts, "Learning Rates as a Function of Batch Size: A Random Matrix Theory
Approach to Neural Network Training", JMLR 2022, arXiv 2006.09092), the largest stable learning
rate by bisection, and annealed gradient noise (Neelakantan et al., "Adding Gradient Noise
Improves Learning for Very Deep Networks", arXiv 1511.06807).

**The mini-batch Hessian.** For a batch B of the N training examples, H_B = H_N + E_B: the
fluctuation E_B has mean zero over batches drawn without replacement, and each entry's variance
is proportional to (1/B - 1/N) (the finite-population correction), so its size, and with it how
far the extreme eigenvalues of H_B sit from H_N's, scales like (1/B - 1/N)^(1/2) in Granziol et
al.'s random-matrix model. :func:`minibatch_spectrum` measures lambda_1(H_N), lambda_1(H_B) and
||H_B - H_N||_2 (the largest |eigenvalue| of the difference operator, by Lanczos on both ends of
its spectrum) over random batches of several sizes; :func:`power_law` fits the exponent.

**The largest stable learning rate.** :func:`largest_stable_lr` bisects (in log lr) a yes/no
criterion ``stable(lr)`` that must hold below some threshold and fail above it. The criterion
the course uses (:func:`loss_decreases`): from a fixed starting point, T steps of the optimiser
on batches of size B end at a finite full-batch loss no higher than the start's. On a quadratic
f = lambda/2 ||x||^2 with GD this is exactly lr <= 2/lambda (after T steps the loss is
(1 - lr lambda)^(2T) times the start's), the closed form the tests check.

**One step, to second order.** :func:`one_step_rate` gives the rate at which one step
w -> w - lr P g_B leaves the loss unchanged in expectation over batches, to second order
(McCandlish et al. 2018's expansion with a diagonal preconditioner P): 2 g'Pg / (g'PHPg +
c_B tr(PHP Sigma)), for SGD (P = I) and for Adam's expected preconditioner at batch size B
(:func:`adam_preconditioner`). A model of how the stable rate scales with B, exact for a loss
quadratic in the parameters; :func:`loss_decreases` with a frozen ``preconditioner`` runs the
optimiser it describes.

**Annealed gradient noise.** :class:`GradientNoise` adds N(0, sigma_t^2 I) to every gradient
before the optimiser's step, sigma_t^2 = eta / (1 + t)^gamma (Neelakantan et al.'s schedule:
the *variance* decays, gamma = 0.55; several public ports use the formula as the standard
deviation instead). t counts steps from 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_int, check_ints, check_nonnegative, check_number, check_positive
from .curvature.krylov import lanczos
from .curvature.operators import HessianOperator
from .losses import LossFn, get_loss

__all__ = [
    "PRECONDITIONERS",
    "GradientNoise",
    "OneStepRate",
    "adam_preconditioner",
    "batch_noise_factor",
    "one_step_rate",
    "gradient_moments",
    "noise_fraction",
    "MinibatchSpectrum",
    "PowerLaw",
    "largest_stable_lr",
    "loss_decreases",
    "minibatch_spectrum",
    "power_law",
    "sqrt_scaled_adam",
]


# ----------------------------------------------------------------------------- spectra


@dataclass(frozen=True)
class MinibatchSpectrum:
    """:func:`minibatch_spectrum`'s measurements: ``lambda_full`` (lambda_1(H_N)), and per
    batch size (``batch_sizes``, ascending) one row of ``draws`` values: ``lambda_batch``
    (lambda_1(H_B)) and ``deviation`` (||H_B - H_N||_2)."""

    n: int
    batch_sizes: tuple[int, ...]
    lambda_full: float
    lambda_batch: np.ndarray  # (len(batch_sizes), draws)
    deviation: np.ndarray  # (len(batch_sizes), draws)

    @property
    def noise_scale(self) -> np.ndarray:
        """(1/B - 1/N)^(1/2) for each batch size: the random-matrix model's scale of E_B."""
        b = np.asarray(self.batch_sizes, dtype=np.float64)
        return np.sqrt(1.0 / b - 1.0 / self.n)


def minibatch_spectrum(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    batch_sizes: Sequence[int],
    *,
    draws: int = 8,
    seed: int = 0,
    tol: float = 1e-4,
    progress: bool = False,
) -> MinibatchSpectrum:
    """lambda_1 of the full-batch Hessian H_N of (x, y) and, for ``draws`` batches of each size
    in ``batch_sizes`` (drawn without replacement, from ``seed``), lambda_1(H_B) and
    ||H_B - H_N||_2, each by Lanczos to residual ``tol`` (relative). Every batch size must be in
    [1, N); the model must be deterministic (eval mode for BatchNorm or dropout)."""
    n = len(x)
    sizes = tuple(sorted(int(b) for b in batch_sizes))
    if not sizes:
        raise ValueError("batch_sizes must hold at least one size")
    for b in sizes:
        check_int("batch_sizes[i]", b, 1, n - 1)
    check_int("draws", draws, 1)
    check_int("seed", seed, 0)
    check_positive("tol", tol)
    full = HessianOperator(model, loss, (x, y))
    lam_full = float(lanczos(full, k=1, tol=tol, seed=seed).eigenvalues[0])
    gen = torch.Generator().manual_seed(seed)
    lam_b = np.zeros((len(sizes), draws))
    dev = np.zeros((len(sizes), draws))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(sizes) * draws, desc="mini-batch Hessians", disable=not progress, leave=False
    )
    for i, b in enumerate(sizes):
        for j in range(draws):
            idx = torch.randperm(n, generator=gen)[:b].to(x.device)
            hb = HessianOperator(model, loss, (x[idx], y[idx]))
            lam_b[i, j] = float(lanczos(hb, k=1, tol=tol, seed=seed).eigenvalues[0])
            both = lanczos(hb - full, k=1, which="both", tol=tol, seed=seed).eigenvalues
            dev[i, j] = float(both.abs().max())
            bar.update(1)
    bar.close()
    return MinibatchSpectrum(n, sizes, lam_full, lam_b, dev)


@dataclass(frozen=True)
class PowerLaw:
    """y ~ c x^slope fitted by least squares in log-log, with a percentile bootstrap band of the
    slope over the draws (each x's draws resampled)."""

    slope: float
    intercept: float
    low: float
    high: float
    level: float


def power_law(
    x: Sequence[float], ys: np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> PowerLaw:
    """Fit log(mean_j ys[i, j]) = intercept + slope log(x[i]) by least squares; ``ys`` holds one
    row of draws per x. The band resamples each row's draws with replacement (``resamples``
    times) and refits."""
    xs = np.asarray(x, dtype=np.float64)
    data = np.asarray(ys, dtype=np.float64)
    if data.ndim != 2 or len(data) != len(xs) or len(xs) < 2:
        raise ValueError(f"ys must be (len(x) >= 2, draws), got {data.shape} for {len(xs)} x's")
    if np.any(xs <= 0) or np.any(data <= 0):
        raise ValueError("x and ys must be positive for a log-log fit")
    check_number("level", level, low=0, high=1, low_open=True, high_open=True)
    check_int("resamples", resamples, 10)
    lx = np.log(xs)

    def fit(rows: np.ndarray) -> tuple[float, float]:
        slope, intercept = np.polyfit(lx, np.log(rows.mean(axis=1)), 1)
        return float(slope), float(intercept)

    slope, intercept = fit(data)
    rng = np.random.default_rng(seed)
    k = data.shape[1]
    boot = np.array(
        [
            fit(np.take_along_axis(data, rng.integers(0, k, data.shape), axis=1))[0]
            for _ in range(resamples)
        ]
    )
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return PowerLaw(slope, intercept, float(lo), float(hi), level)


# ----------------------------------------------------------------------------- gradient noise per coordinate


def gradient_moments(
    model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor, *, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Per coordinate, the mean gradient g_bar = (1/N) sum_i g_i and the per-example variance
    s^2 = (1/N) sum_i (g_i - g_bar)^2 over the N examples of (x, y), as flat (P,) tensors:
    per-example gradients (``gc.pergrad.per_example_grads``, eval mode) accumulated chunk by
    chunk, so memory is ``chunk_size`` x P."""
    from .functional import flatten
    from .pergrad import per_example_grads

    check_int("chunk_size", chunk_size, 1)
    total = sq = None
    for start in range(0, len(x), chunk_size):
        g = flatten(
            per_example_grads(
                model, loss, x[start : start + chunk_size], y[start : start + chunk_size]
            ),
            batch_dims=1,
        ).double()
        total = g.sum(0) if total is None else total + g.sum(0)
        sq = g.pow(2).sum(0) if sq is None else sq + g.pow(2).sum(0)
    n = len(x)
    mean = total / n
    return mean, (sq / n - mean.pow(2)).clamp_min(0.0)


def noise_fraction(mean: Tensor, variance: Tensor, batch_size: int, n: int) -> float:
    """How much of Adam's second moment is batch noise at batch size B: the mean over
    coordinates of v_noise / (v_noise + g_bar^2), with v_noise = s^2 (1/B - 1/N) N/(N-1), the
    variance of a coordinate of a batch gradient drawn without replacement. Near 1 the second
    moment measures the noise (the regime of the square-root rule for adaptive methods); near 0
    it measures the mean gradient."""
    check_int("n", n, 2)
    check_int("batch_size", batch_size, 1, n)
    v_noise = variance * (1.0 / batch_size - 1.0 / n) * n / (n - 1)
    denom = v_noise + mean.pow(2)
    frac = torch.where(denom > 0, v_noise / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return float(frac.mean())


# ----------------------------------------------------------------------------- one step, to second order

PRECONDITIONERS: tuple[str, ...] = ("sgd", "adam", "adam-noise")


@dataclass(frozen=True)
class OneStepRate:
    """:func:`one_step_rate`'s terms per batch size B, each an array over ``batch_sizes``:
    ``signal`` = g_bar' P g_bar (the first-order decrease per unit rate), ``mean_curvature`` =
    g_bar' P H P g_bar and ``noise_curvature`` = c_B tr(P H P Sigma) (the second-order rise of the
    mean step and of the batch's noise), and ``rate`` = 2 signal / (mean_curvature +
    noise_curvature), the rate at which the expected change of the loss after one step is zero
    to second order. ``examples`` is how many examples the noise's trace was averaged over."""

    preconditioner: str
    batch_sizes: tuple[int, ...]
    n: int
    examples: int
    signal: np.ndarray
    mean_curvature: np.ndarray
    noise_curvature: np.ndarray

    @property
    def rate(self) -> np.ndarray:
        return 2.0 * self.signal / (self.mean_curvature + self.noise_curvature)

    @property
    def noise_share(self) -> np.ndarray:
        """noise_curvature / (mean_curvature + noise_curvature): near 1 the batch's noise sets
        the rate (B below the noise scale), near 0 the mean step's curvature does."""
        return self.noise_curvature / (self.mean_curvature + self.noise_curvature)


def batch_noise_factor(batch_size: int, n: int) -> float:
    """c_B = (1/B - 1/N) N/(N - 1): the covariance of a batch's mean gradient, for a batch of B
    of N examples drawn without replacement, is c_B Sigma, with Sigma = (1/N) sum_i (g_i - g_bar)
    (g_i - g_bar)' the per-example covariance. 0 at B = N."""
    check_int("n", n, 2)
    check_int("batch_size", batch_size, 1, n)
    return (1.0 / batch_size - 1.0 / n) * n / (n - 1)


def adam_preconditioner(
    mean: Tensor,
    variance: Tensor,
    batch_size: int,
    n: int,
    *,
    eps: float = 1e-8,
    noise_only: bool = False,
) -> Tensor:
    """Adam's expected preconditioner at batch size B: diag 1 / (sqrt(v_B) + eps), v_B = g_bar^2 +
    c_B s^2 the expected square of a batch gradient's coordinate (:func:`gradient_moments`'
    ``mean`` and ``variance``, c_B :func:`batch_noise_factor`); with ``noise_only``, v_B = c_B s^2
    (every coordinate's second moment the batch's noise). A flat vector like ``mean``."""
    check_positive("eps", eps)
    c = batch_noise_factor(batch_size, n)
    v = c * variance if noise_only else mean.pow(2) + c * variance
    return 1.0 / (v.sqrt() + eps)


def one_step_rate(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    batch_sizes: Sequence[int],
    *,
    preconditioner: str = "sgd",
    eps: float = 1e-8,
    examples: int | None = None,
    seed: int = 0,
    chunk_size: int = 32,
) -> OneStepRate:
    """The rate at which one step w -> w - lr P g_B from ``model``'s parameters leaves the mean
    loss over (x, y) unchanged in expectation over batches of B examples drawn without
    replacement, to second order (McCandlish et al. 2018's expansion, with a diagonal
    preconditioner P):

        E L(w - lr P g_B) ~ L(w) - lr g_bar' P g_bar + lr^2/2 (g_bar' P H P g_bar + c_B tr(P H P Sigma)),

    H the Hessian of the mean loss, g_bar its gradient, Sigma the per-example gradients'
    covariance and c_B :func:`batch_noise_factor`. Exact for a loss quadratic in the parameters.

    ``preconditioner``: ``"sgd"``, P = I; ``"adam"``, P = diag(1 / (sqrt(v_B) + eps)) with v_B =
    g_bar^2 + c_B s^2 the expected square of a batch gradient's coordinate (Adam's second moment
    at batch size B, s^2 the per-example variance); ``"adam-noise"``, v_B = c_B s^2 alone (a
    counterfactual: every coordinate's second moment is the batch's noise). Adam's momentum and
    the bias correction's first steps are outside the model.

    tr(P H P Sigma) = (1/N) sum_i u_i' H u_i with u_i = P (g_i - g_bar) is averaged over
    ``examples`` of the N examples (default all; a subset drawn without replacement from
    ``seed``, the same for every B, is an unbiased estimate), ``chunk_size`` Hessian-vector
    products at a time. Every batch size must be in [1, N]."""
    from .functional import flatten
    from .pergrad import per_example_grads

    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    n = len(x)
    check_int("n (len(x))", n, 2)
    sizes = check_ints(
        "batch_sizes",
        [int(b) if isinstance(b, np.integer) else b for b in batch_sizes],
        1,
        n,
        nonempty=True,
    )
    check_positive("eps", eps)
    m = n if examples is None else check_int("examples", examples, 1, n)
    check_int("seed", seed, 0)
    check_int("chunk_size", chunk_size, 1)
    mean, var = gradient_moments(model, loss, x, y)
    hess = HessianOperator(model, loss, (x, y))
    chosen = (
        torch.arange(n)
        if m == n
        else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values
    ).to(x.device)
    factors = [batch_noise_factor(b, n) for b in sizes]
    if preconditioner == "sgd":
        diag = [torch.ones_like(mean)] * len(sizes)
    else:
        only = preconditioner == "adam-noise"
        diag = [adam_preconditioner(mean, var, b, n, eps=eps, noise_only=only) for b in sizes]

    def quadratic(u: Tensor) -> Tensor:  # u' H u per column of u (P, k): H u in H's dtype
        # (the model's: float32 for a float32 model), the products summed in float64
        hu = hess @ u.to(hess.dtype)
        return (u * hu.double()).sum(0)

    signal = np.array([float((d * mean.pow(2)).sum()) for d in diag])
    mean_curv = np.array([float(quadratic((d * mean)[:, None])[0]) for d in diag])
    trace = np.zeros(len(sizes))
    distinct = 1 if preconditioner == "sgd" else len(sizes)
    for start in range(0, m, chunk_size):
        idx = chosen[start : start + chunk_size]
        g = flatten(per_example_grads(model, loss, x[idx], y[idx]), batch_dims=1).double()
        centred = (g - mean).T  # (P, k)
        for i in range(distinct):
            trace[i] += float(quadratic(diag[i][:, None] * centred).sum())
    if distinct == 1:
        trace[:] = trace[0]
    noise_curv = np.array(factors) * trace / m
    return OneStepRate(preconditioner, sizes, n, m, signal, mean_curv, noise_curv)


# ----------------------------------------------------------------------------- stable learning rate


def largest_stable_lr(
    stable: Callable[[float], bool],
    low: float,
    high: float,
    *,
    iters: int = 12,
) -> float:
    """The largest lr in [low, high] at which ``stable(lr)`` holds, by bisection in log lr:
    ``iters`` halvings of the log bracket, so the result is within a factor
    (high/low)^(2^-iters) below the threshold. Assumes the criterion holds below a threshold and
    fails above it. Returns ``high`` if ``stable(high)`` holds (the threshold is then at least
    ``high``: widen the bracket); raises ValueError if ``stable(low)`` fails."""
    low, high = check_positive("low", low), check_positive("high", high)
    if not low < high:
        raise ValueError(f"low must be < high, got low={low}, high={high}")
    check_int("iters", iters, 1)
    if not stable(low):
        raise ValueError(f"stable(low) fails at low={low:g}: lower the bracket")
    if stable(high):
        return high
    lo, hi = math.log(low), math.log(high)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if stable(math.exp(mid)):
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def loss_decreases(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    *,
    optimizer: str,
    batch_size: int,
    steps: int,
    seed: int = 0,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    preconditioner: Tensor | None = None,
) -> Callable[[float], bool]:
    """The stability criterion ``stable(lr)``: a copy of ``model`` takes ``steps`` steps of
    ``optimizer`` (``"sgd"``: plain SGD; ``"adam"``: ``torch.optim.Adam`` with its defaults, or
    with ``optimizer_kwargs`` such as ``betas`` and ``eps``) at rate lr, each on a batch of
    ``batch_size`` examples drawn anew without replacement (the same batches for every lr, from
    ``seed``); stable when the mean loss over all of (x, y) is then finite and at most its value
    at the start. ``model`` itself is not changed.

    ``preconditioner`` (SGD only): a fixed positive vector P of one entry per parameter (in the
    order of ``model.parameters()``, as :func:`gradient_moments` returns them); each step is then
    w <- w - lr P g_B, a preconditioned SGD whose preconditioner does not adapt (for instance
    Adam's expected one at the start, as :func:`one_step_rate` models it)."""
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    kwargs = dict(optimizer_kwargs or {})
    if "lr" in kwargs:
        raise ValueError("optimizer_kwargs must not hold lr: it is the argument of stable(lr)")
    pieces = None
    if preconditioner is not None:
        if optimizer != "sgd":
            raise ValueError(f"preconditioner is for optimizer 'sgd', got {optimizer!r}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        size = sum(p.numel() for p in trainable)
        if preconditioner.shape != (size,):
            raise ValueError(
                f"preconditioner must have shape ({size},), one entry per parameter, got "
                f"{tuple(preconditioner.shape)}"
            )
        if not bool(torch.isfinite(preconditioner).all()) or bool((preconditioner <= 0).any()):
            raise ValueError("preconditioner must be finite and positive")
        pieces = [
            c.reshape(p.shape).to(device=p.device, dtype=p.dtype)
            for c, p in zip(
                preconditioner.split([p.numel() for p in trainable]), trainable, strict=True
            )
        ]
    n = len(x)
    check_int("batch_size", batch_size, 1, n)
    check_int("steps", steps, 1)
    check_int("seed", seed, 0)
    fn = get_loss(loss)
    with torch.no_grad():
        start = float(fn(model(x), y))
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randperm(n, generator=gen)[:batch_size].to(x.device) for _ in range(steps)]

    def stable(lr: float) -> bool:
        m = copy.deepcopy(model)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = (
            torch.optim.SGD(params, lr=lr, **kwargs)
            if optimizer == "sgd"
            else torch.optim.Adam(params, lr=lr, **kwargs)
        )
        for idx in batches:
            value = fn(m(x[idx]), y[idx])
            if not torch.isfinite(value):
                return False
            opt.zero_grad(set_to_none=True)
            value.backward()
            if pieces is not None:
                with torch.no_grad():
                    for p, c in zip(params, pieces, strict=True):
                        if p.grad is not None:  # a parameter the loss does not reach
                            p.grad.mul_(c)
            opt.step()
        with torch.no_grad():
            end = float(fn(m(x), y))
        return math.isfinite(end) and end <= start

    return stable


def sqrt_scaled_adam(
    batch_size: int,
    base_batch: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> dict[str, Any]:
    """Adam's ``betas`` and ``eps`` at ``batch_size`` by the square root scaling rule of Malladi
    et al. (2022), as it is applied from a base batch size ``base_batch`` whose hyperparameters
    are ``betas`` and ``eps``: with kappa = batch_size / base_batch, each 1 - beta becomes
    kappa (1 - beta) and eps becomes eps / sqrt(kappa) (the rate, sqrt(kappa) times the base
    rate, is what the caller measures or sets). Refused where a beta would leave [0, 1)."""
    check_int("batch_size", batch_size, 1)
    check_int("base_batch", base_batch, 1)
    check_positive("eps", eps)
    kappa = batch_size / base_batch
    scaled = []
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, low=0, high=1, high_open=True)
        new = 1 - kappa * (1 - beta)
        if not 0 <= new < 1:
            raise ValueError(
                f"batch_size {batch_size} is {kappa:g} times base_batch {base_batch}: betas[{i}] "
                f"= {beta} would become {new:g}, outside [0, 1); kappa must be at most "
                f"{1 / (1 - beta):g}"
            )
        scaled.append(new)
    return {"betas": (scaled[0], scaled[1]), "eps": eps / math.sqrt(kappa)}


# ----------------------------------------------------------------------------- gradient noise


class GradientNoise:
    """Annealed Gaussian gradient noise (Neelakantan et al. 2015): :meth:`add_` adds
    N(0, sigma_t^2 I) to the ``.grad`` of every parameter that has one, with
    sigma_t^2 = ``eta`` / (1 + t)^``gamma`` at step t (counted by the calls, from 0). The noise
    is drawn from its own generator (``seed``), on each gradient's device and dtype, so it does
    not touch the global random state. ``eta = 0`` adds nothing. ``until`` (not the paper's; a
    control): no noise from step ``until`` on, the draws before it unchanged."""

    def __init__(
        self, eta: float, gamma: float = 0.55, *, seed: int = 0, until: int | None = None
    ) -> None:
        self.eta = check_nonnegative("eta", eta)
        self.gamma = check_nonnegative("gamma", gamma)
        check_int("seed", seed, 0)
        self.until = None if until is None else check_int("until", until, 0)
        self.seed = seed
        self.step = 0
        self._gen: dict[torch.device, torch.Generator] = {}

    def variance(self, t: int) -> float:
        """sigma_t^2 = eta / (1 + t)^gamma (0 from step ``until`` on)."""
        check_int("t", t, 0)
        if self.until is not None and t >= self.until:
            return 0.0
        return self.eta / (1 + t) ** self.gamma

    def displacement_std(self, lr: float, momentum: float, steps: int) -> float:
        """The standard deviation, per coordinate, that the noise alone moves a parameter over
        ``steps`` steps of SGD with heavy-ball momentum (``torch.optim.SGD``, dampening 0):
        noise added at step t reaches the final parameter with the factor
        lr (1 - momentum^(steps - t)) / (1 - momentum), so the variance is
        lr^2 sum_t sigma_t^2 ((1 - momentum^(steps - t)) / (1 - momentum))^2. The gradient's own
        steps are left out: it is the spread a noise-only run would give the weights."""
        check_positive("lr", lr)
        check_number("momentum", momentum, low=0, high=1, high_open=True)
        check_int("steps", steps, 0)
        t = np.arange(steps, dtype=np.float64)
        reach = (1 - momentum ** (steps - t)) / (1 - momentum)
        var = self.eta / (1 + t) ** self.gamma
        if self.until is not None:
            var = np.where(t < self.until, var, 0.0)
        return float(lr * np.sqrt(np.sum(var * reach**2)))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gen:
            self._gen[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen[device]

    def add_(self, params: Iterable[nn.Parameter]) -> float:
        """Add this step's noise to each parameter's ``.grad``; returns sigma_t and advances t."""
        sd = math.sqrt(self.variance(self.step))
        self.step += 1
        if sd == 0.0:
            return 0.0
        for p in params:
            if p.grad is None:
                continue
            noise = torch.randn(
                p.grad.shape,
                generator=self._generator(p.grad.device),
                device=p.grad.device,
                dtype=p.grad.dtype,
            )
            p.grad.add_(noise, alpha=sd)
        return sd
