"""Notebook 03, the neural tangent kernel (Jacot, Gabriel & Hongler 2018, arXiv 1806.07572).

The experiment functions of the notebook: configuration in, a dict of tensors and numbers out
(so :class:`gradcourse.cache.Cache` can store them). The kernels themselves come from
:mod:`gradcourse.ntk` (empirical NTK, analytic infinite-width NNGP / NTK, kernel gradient
descent); this module adds what is specific to the paper's section 6:

- :func:`make_net`, :func:`gradient_descent`  the networks of the paper (NTK parameterisation,
  ReLU, beta = 0.1, scalar output) and full-batch GD on C = 1/n sum 1/2 (f - y)^2;
- :func:`kernel_run`, :func:`kernel_runs`, :func:`kernel_statistics`  Fig. 1 and the scaling
  laws: Theta(x0, x) on the unit circle and the Gram matrix of the training inputs, at
  initialisation and after training, against the analytic limit; :func:`init_kernel_runs`,
  :func:`init_statistics`  the same at initialisation only, over many untrained nets (cheap;
  :func:`ensemble_statistics` for any functions against a reference);
  :func:`limit_rivals`  the curves of competing kernels, as distances from the limit;
- :func:`gaussian_limit`, :func:`circle_fit_run`, :func:`circle_fit_runs`  Fig. 2: the
  t -> infinity (or step-k) Gaussian distribution of the trained infinite-width network, against
  trained finite nets; :func:`circle_predictors`, :func:`own_prediction_gaps`  each net against
  its own infinite-width prediction (NTK, or the NNGP posterior as a rival), and the same nets
  with only their readout layer trained (the control);
- :func:`kernel_pcs`, :func:`pc_run`, :func:`pc_runs`  Fig. 3: training towards targets along
  the kernel's principal components, with each net's own linearised prediction;
- :func:`bootstrap_seeds`, :func:`t_interval`, :func:`slope_with_band`, :func:`farthest_end`,
  :func:`window_exponents`, :func:`power_exponents`, :func:`bound_ratio`  intervals over
  initialisations, power laws against width, and a power-law bound checked as a bound;
- :func:`explore_kernel`  the notebook's sliders.

Depth: Jacot's "depth L = 4" counts the linear layers (the network has layers 0..L), so it is
three hidden layers, ``depth=3`` in :func:`gradcourse.ntk.analytic_ntk` and here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import data, losses, models, ntk, stats
from ..cache import Cache, cached  # cached: re-exported for the notebooks
from ..checks import check_int, check_nonnegative, check_number, check_positive
from ..train import Diverged

DTYPE = torch.float64
#: Jacot et al.'s L = 4 linear layers = 3 hidden layers (our ``depth``).
PAPER_DEPTH = 3
PAPER_BETA = 0.1


# ----------------------------------------------------------------------------- nets and data


def make_net(
    in_dim: int,
    width: int,
    depth: int = PAPER_DEPTH,
    *,
    beta: float = PAPER_BETA,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = DTYPE,
) -> nn.Module:
    """The paper's network: ``depth`` hidden ReLU layers of ``width`` in the NTK
    parameterisation, a~ = W a / sqrt(n_in) + beta b with W, b ~ N(0, 1), one output."""
    check_int("width", width, 1)
    check_int("depth", depth, 1)
    check_nonnegative("beta", beta)
    return models.MLP(
        in_dim,
        [width] * depth,
        1,
        parameterization="ntk",
        bias_scale=beta,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def _net_with(
    in_dim: int,
    width: int,
    depth: int,
    beta: float,
    seed: int,
    device: str | torch.device | None,
    *tensors: Tensor,
) -> tuple[Any, ...]:
    """(model, *tensors): :func:`make_net`'s network and ``tensors`` moved to its device."""
    model = make_net(in_dim, width, depth, beta=beta, seed=seed, device=device)
    dev = model.layers[0].weight.device
    return model, *(t.to(dev) for t in tensors)


def _function(model: nn.Module, x: Tensor) -> Tensor:
    """The scalar-output network's function on x, (m,), on the CPU (no autograd graph)."""
    with torch.no_grad():
        return model(x)[:, 0].cpu()


def circle(angles: Tensor | Sequence[float]) -> Tensor:
    """Points x = (cos g, sin g) of the unit circle for the angles g: (m, 2), float64."""
    g = torch.as_tensor(angles, dtype=DTYPE).reshape(-1)
    return torch.stack([torch.cos(g), torch.sin(g)], dim=1)


def angle_grid(n_angles: int) -> Tensor:
    """``n_angles`` angles evenly spaced in [-pi, pi]."""
    check_int("n_angles", n_angles, 2)
    return torch.linspace(-math.pi, math.pi, n_angles, dtype=DTYPE)


def gaussian_task(n_train: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fig. 1's least-squares task: x ~ N(0, I_2), target f*(x) = x1 x2; (x (n, 2), y (n, 1))."""
    check_int("n_train", n_train, 1)
    x = torch.randn(n_train, 2, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return x, (x[:, 0] * x[:, 1])[:, None]


def gradient_descent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    record: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """``steps`` steps of full-batch GD with rate ``lr`` on C = 1/n sum_i 1/2 (f(x_i) - y_i)^2
    (:func:`gradcourse.losses.mse`, Jacot's cost), updating ``model`` in place. ``record(k, f)``
    is called with the outputs f (n, 1) at the parameters before step k (and k = steps at the
    end). Returns the loss before each step and at the end, (steps + 1,). Raises
    :class:`gradcourse.train.Diverged` on a non-finite loss.

    The same updates as ``gradcourse.train.train(model, x, y, loss="mse", lr=lr, steps=steps)``
    (to the bit at lr = 1, to rounding otherwise: its optimizer forms p - lr g in one operation;
    a test holds them together), kept as its own loop because here ``steps = 0`` is a run (the
    notebook's slider starts there; ``train`` trains at least one step) and ``record`` sees
    each step's outputs from its own forward pass (``train``'s callback gets the model: a second
    forward pass per step), and so that cached runs keep their numbers."""
    lr = check_positive("lr", lr)
    check_int("steps", steps, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    history = torch.empty(steps + 1, dtype=torch.float64)
    for k in range(steps + 1):
        out = model(x)
        loss = losses.mse(out, y)
        value = float(loss.detach())
        history[k] = value
        if not math.isfinite(value):
            raise Diverged(k, lr, value)
        if record is not None:
            record(k, out.detach())
        if k == steps:
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
    return history


def analytic(
    x1: Tensor, x2: Tensor | None = None, *, depth: int, beta: float
) -> tuple[Tensor, Tensor]:
    """(NNGP, NTK) of the paper's net at infinite width on x1 x x2
    (:func:`gradcourse.ntk.analytic_ntk` with beta as its bias scale)."""
    return ntk.analytic_ntk(x1, x2, depth=depth, bias_scale=beta)


def _probe_circle(n_angles: int) -> tuple[Tensor, Tensor]:
    """Fig. 1's probes: x = (cos g, sin g) on ``n_angles`` angles in [-pi, pi], and x0 = (1, 0)."""
    xs = circle(angle_grid(n_angles))
    return xs, xs.new_tensor([[1.0, 0.0]])


def _fig1_kernels(model: nn.Module, x0: Tensor, xs: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Theta(x0, x) for every x in xs, (m,), and the Gram matrix Theta(X, X) of the training
    inputs, on the CPU (the library's layerwise route: one forward and one backward pass of each
    set, then per-layer Gram products)."""
    return ntk.empirical_ntk(model, xs, x0)[:, 0].cpu(), ntk.empirical_ntk(model, x).cpu()


def _relative_change(before: Tensor, after: Tensor) -> Tensor:
    """||after - before|| / ||before|| per seed (leading dimension), over all other entries."""
    return (after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)


# ----------------------------------------------------------------------------- Fig. 1 / scaling


def kernel_run(
    width: int,
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1.0,
    n_train: int = 16,
    n_angles: int = 61,
    data_seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """One network of Fig. 1: the NTK Theta(x0, x) for x0 = (1, 0) and x = (cos g, sin g) on
    ``n_angles`` angles in [-pi, pi], and the Gram matrix Theta(X, X) of the training inputs,
    at initialisation and after ``steps`` GD steps of rate ``lr`` on the least-squares task of
    :func:`gaussian_task`. Float64."""
    check_int("n_angles", n_angles, 2)
    x, y = gaussian_task(n_train, seed=data_seed)
    model, x, y, xs, x0 = _net_with(
        2, width, depth, beta, seed, device, x, y, *_probe_circle(n_angles)
    )
    curve0, gram0 = _fig1_kernels(model, x0, xs, x)
    loss = gradient_descent(model, x, y, lr=lr, steps=steps)
    curve_t, gram_t = _fig1_kernels(model, x0, xs, x)
    return {"curve0": curve0, "curveT": curve_t, "gram0": gram0, "gramT": gram_t, "loss": loss}


def kernel_runs(
    widths: Sequence[int],
    seeds: Sequence[int],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **config: Any,
) -> dict[int, dict[str, Tensor]]:
    """:func:`kernel_run` for every width and seed (each cached on its own, so experiments that
    share widths share runs): width -> results stacked over seeds (leading dimension)."""
    return _over_widths_and_seeds(
        "ntk-kernel-run", kernel_run, widths, seeds, cache, device, progress, config
    )


def _over_widths_and_seeds(
    name: str,
    fn: Callable[..., dict[str, Tensor]],
    widths: Sequence[int],
    seeds: Sequence[int],
    cache: Cache | None,
    device: str | torch.device | None,
    progress: bool,
    config: Mapping[str, Any],
) -> dict[int, dict[str, Tensor]]:
    """``fn(width=w, seed=s, device=device, **config)`` for every width and seed, each cached
    on its own under ``name``: width -> results stacked over seeds (leading dimension). A
    ``tqdm.auto`` bar over the runs when ``progress``."""
    if not widths or not seeds:
        raise ValueError("widths and seeds must not be empty")
    out = {}
    bar = tqdm(total=len(widths) * len(seeds), desc=name, disable=not progress, leave=False)
    for width in widths:
        runs = []
        for seed in seeds:
            bar.set_postfix(width=int(width), seed=int(seed))
            runs.append(
                cached(cache, name, fn, width=int(width), seed=int(seed), device=device, **config)
            )
            bar.update()
        out[int(width)] = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}
    bar.close()
    return out


def init_kernels(
    width: int,
    seeds: Sequence[int],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    n_train: int = 16,
    n_angles: int = 61,
    data_seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """:func:`kernel_run`'s kernels at initialisation only, for every seed: ``curve0`` (S, m),
    Theta_0(x0, x) on the circle, and ``gram0`` (S, n, n), Theta_0(X, X) on the training inputs
    of :func:`gaussian_task`; float64, CPU. No training, so many initialisations are cheap (the
    statistics of Fig. 1 at initialisation need them)."""
    check_int("width", width, 1)
    check_int("n_angles", n_angles, 2)
    if not seeds:
        raise ValueError("seeds must not be empty")
    x, _ = gaussian_task(n_train, seed=data_seed)
    curves, grams = [], []
    for seed in seeds:
        model, x_on, xs, x0 = _net_with(
            2, width, depth, beta, int(seed), device, x, *_probe_circle(n_angles)
        )
        curve, gram = _fig1_kernels(model, x0, xs, x_on)
        curves.append(curve)
        grams.append(gram)
    return {"curve0": torch.stack(curves), "gram0": torch.stack(grams)}


def init_grams(width: int, seeds: Sequence[int], **config: Any) -> Tensor:
    """The Gram matrices Theta_0(X, X) of :func:`init_kernels`, (S, n, n)."""
    return init_kernels(width, seeds, **config)["gram0"]


def init_kernel_runs(
    widths: Sequence[int],
    seeds: Sequence[int],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **config: Any,
) -> dict[int, dict[str, Tensor]]:
    """:func:`init_kernels` for every width (each width cached on its own, with its seeds):
    width -> ``curve0`` (S, m) and ``gram0`` (S, n, n). A ``tqdm.auto`` bar over the widths."""
    if not widths or not seeds:
        raise ValueError("widths and seeds must not be empty")
    seeds = [int(s) for s in seeds]
    return {
        int(w): cached(
            cache,
            "ntk-init-kernels",
            init_kernels,
            width=int(w),
            seeds=seeds,
            device=device,
            **config,
        )
        for w in tqdm(widths, desc="kernels at initialisation", disable=not progress, leave=False)
    }


def init_statistics(curves: Tensor, limit_curve: Tensor) -> dict[str, float]:
    """Fig. 1's statistics at initialisation over S untrained nets, ``curves`` (S, m) of
    Theta_0(x0, x) against the limit (m,), each relative to RMS(limit)
    (:func:`ensemble_statistics`):

    - ``mean_error``: RMS over angles of (mean over nets - limit);
    - ``mean_stderr``: RMS over angles of the standard error of that mean (its sampling noise);
    - ``spread``: RMS over angles of the standard deviation over nets (the fluctuation).
    """
    return ensemble_statistics(curves, limit_curve)


def ensemble_statistics(
    functions: Tensor, reference: Tensor, *, scale: float | None = None
) -> dict[str, float]:
    """Statistics over S nets of their functions on a grid, ``functions`` (S, m), against a
    reference (m,) (a limit, a predicted mean), each divided by ``scale`` (default RMS of the
    reference): ``mean_error`` RMS over the grid of (mean over nets - reference),
    ``mean_stderr`` RMS over the grid of the standard error of that mean, ``spread`` RMS over
    the grid of the standard deviation over nets."""
    s = functions.shape[0]
    if functions.ndim != 2 or s < 2 or functions.shape[1] != reference.shape[0]:
        raise ValueError(
            f"curves must be (S >= 2, {reference.shape[0]}), got {tuple(functions.shape)}"
        )
    scale = (
        float(reference.pow(2).mean().sqrt()) if scale is None else check_positive("scale", scale)
    )
    rms = lambda t: float(t.pow(2).mean().sqrt()) / scale  # noqa: E731
    std = functions.std(0, correction=1)
    return {
        "mean_error": rms(functions.mean(0) - reference),
        "mean_stderr": rms(std / math.sqrt(s)),
        "spread": rms(std),
    }


def spread(curves: Tensor) -> float:
    """RMS over angles of the standard deviation over nets of ``curves`` (S, m): the kernel's
    fluctuation (not normalised)."""
    return float(curves.std(0, correction=1).pow(2).mean().sqrt())


def limit_rivals(
    *, depth: int = PAPER_DEPTH, beta: float = PAPER_BETA, n_angles: int = 61
) -> dict[str, float]:
    """How far competing kernels' curves Theta(x0, x) on the circle lie from the paper's limit
    (depth ``depth``, bias scale ``beta``), as RMS(rival - limit) / RMS(limit): the value of
    :func:`init_statistics`'s ``mean_error`` if the nets' mean were the rival. Rivals: the limit
    with beta = 0 (no biases), with one hidden layer fewer and one more, and the NNGP kernel
    Sigma (the covariance of the outputs, not the tangent kernel)."""
    xs, x0 = _probe_circle(n_angles)
    nngp, lim = analytic(xs, x0, depth=depth, beta=beta)
    lim, scale = lim[:, 0], float(lim.pow(2).mean().sqrt())
    rivals = {
        "the limit with beta = 0": analytic(xs, x0, depth=depth, beta=0.0)[1][:, 0],
        f"the depth-{depth + 1} limit": analytic(xs, x0, depth=depth + 1, beta=beta)[1][:, 0],
        "the NNGP kernel": nngp[:, 0],
    }
    if depth > 1:
        rivals[f"the depth-{depth - 1} limit"] = analytic(xs, x0, depth=depth - 1, beta=beta)[1][
            :, 0
        ]
    return {k: float((v - lim).pow(2).mean().sqrt()) / scale for k, v in rivals.items()}


def bootstrap_seeds(
    statistic: Callable[..., float],
    *samples: Tensor,
    level: float = 0.9,
    num_resamples: int = 2000,
    seed: int = 0,
) -> stats.Interval:
    """A percentile bootstrap (:func:`gradcourse.stats.bootstrap`) of ``statistic(*samples)``,
    where each sample is a tensor whose leading dimension indexes independent nets (seeds): each
    resample draws, within every sample independently, as many nets as it has, with
    replacement, and passes the resampled tensors to ``statistic``."""
    if not samples:
        raise ValueError("bootstrap_seeds needs at least one sample")
    tensors = [torch.as_tensor(x) for x in samples]
    groups = [np.arange(len(t), dtype=np.float64) for t in tensors]

    def resampled(idx: list[np.ndarray]) -> float:
        picks = [t[torch.as_tensor(i.astype(np.int64))] for t, i in zip(tensors, idx, strict=True)]
        return float(statistic(*picks))

    return stats.bootstrap(resampled, groups, level=level, num_resamples=num_resamples, seed=seed)


def band_distance(band: stats.Interval, value: float) -> float:
    """How far ``value`` lies outside the interval ``band`` (> 0), or, negated, how far inside
    it from the nearer end (<= 0): max(low - value, value - high)."""
    return float(max(band.low - value, value - band.high))


def farthest_end(band: stats.Interval, value: float) -> float:
    """How far the farther end of the interval ``band`` lies from ``value``,
    max(|low - value|, |high - value|): the whole interval lies within ``value`` +- this."""
    return float(max(abs(band.low - value), abs(band.high - value)))


def t_interval(values: Tensor | Sequence[float], *, level: float = 0.9) -> stats.Interval:
    """The mean of independent per-run values (one per initialisation) with Student's
    t-interval at ``level``, mean +- t_{n-1} s / sqrt(n) (:func:`gradcourse.stats.paired_interval`
    against zeros); the interval to use with few runs, where a percentile bootstrap has too few
    distinct resamples (3 runs give 10) to cover its level."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1).numpy()
    return stats.paired_interval(v, np.zeros_like(v), level=level)


def window_exponents(width_ratio: float, factor: float = 2.0) -> tuple[float, float]:
    """The exponents e a window "ratio = width_ratio^(-1/2), within a factor ``factor``"
    accepts, when the ratio is width_ratio^(-e): 1/2 -+ ln(factor) / ln(width_ratio)."""
    if width_ratio <= 1 or factor <= 1:
        raise ValueError(f"width_ratio and factor must exceed 1, got {width_ratio}, {factor}")
    half = math.log(factor) / math.log(width_ratio)
    return 0.5 - half, 0.5 + half


def power_exponents(band: stats.Interval, width_ratio: float) -> tuple[float, float]:
    """The exponents e of a power law quantity ~ width^-e that a ratio of the quantity between
    two widths, quantity(w1) / quantity(w2) with ``width_ratio`` = w1 / w2, implies at the ends of
    its interval ``band``: e = -ln(ratio) / ln(width_ratio), (smaller, larger); an end at or below
    0 gives an infinite exponent."""
    if width_ratio <= 0 or width_ratio == 1:
        raise ValueError(f"need a positive width ratio != 1, got {width_ratio}")
    # an end at or below 0 (a t-interval of a ratio can reach it) implies an unbounded exponent
    ends = [
        -math.log(r) / math.log(width_ratio)
        if r > 0
        else math.copysign(math.inf, math.log(width_ratio))
        for r in (band.low, band.high)
    ]
    return min(ends), max(ends)


def bound_ratio(
    widths: Sequence[int],
    values: Sequence[Tensor],
    *,
    w0: int,
    exponent: float = -0.5,
    level: float = 0.9,
    num_resamples: int = 2000,
    seed: int = 0,
) -> stats.Interval:
    """A power-law bound ``d(w) <= C w^exponent`` for w >= w0 checked as a bound, its constant
    C set at ``w0``: the largest d(w) w^-exponent / (d(w0) w0^-exponent) over the widths
    w > w0 (<= 1 when the bound with that constant holds at every wider width; its inverse is
    the bound's slack at the tightest width). d(w) is the RMS over the initialisations of
    ``values`` (one tensor per width); the interval is a percentile bootstrap that resamples
    the initialisations within each width (:func:`gradcourse.stats.bootstrap`)."""
    widths = [int(w) for w in widths]
    if len(widths) != len(values) or w0 not in widths or max(widths) <= w0:
        raise ValueError(f"w0 must be one of the widths {widths} with a wider one, got {w0!r}")

    def ratio(groups: list) -> float:
        d = {
            w: float((g * g).mean()) ** 0.5 * w**-exponent
            for w, g in zip(widths, groups, strict=True)
        }
        return max(d[w] for w in widths if w > w0) / d[w0]

    groups = [torch.as_tensor(v, dtype=torch.float64).numpy() for v in values]
    return stats.bootstrap(ratio, groups, level=level, num_resamples=num_resamples, seed=seed)


def relative_deviations(grams: Tensor, limit: Tensor) -> Tensor:
    """Per initialisation, RMS(Gram_0 - Gram_inf) / RMS(Gram_inf): the relative distance of
    each initial kernel from the limit, (S,) float64."""
    return ((grams - limit).pow(2).flatten(1).mean(1) / limit.pow(2).mean()).sqrt()


def slope_with_band(
    widths: Sequence[int],
    values: Sequence[Tensor],
    *,
    summary: str = "rms",
    level: float = 0.9,
    num_resamples: int = 2000,
    seed: int = 0,
) -> Any:
    """The log-log slope against width of a per-width summary of per-initialisation values
    (``"rms"``: sqrt of the mean square, for deviations; ``"mean"``), with a percentile
    bootstrap interval that resamples the initialisations within each width
    (:func:`gradcourse.stats.bootstrap`): a :class:`gradcourse.stats.Interval`."""
    from ..plotting import loglog_slope

    if summary not in ("rms", "mean"):
        raise ValueError(f"summary must be 'rms' or 'mean', got {summary!r}")
    if len(widths) != len(values) or len(widths) < 2:
        raise ValueError("need one array of values per width, for at least 2 widths")

    def slope(groups: list) -> float:
        if summary == "rms":
            return loglog_slope(widths, [float((g * g).mean()) ** 0.5 for g in groups])
        return loglog_slope(widths, [float(g.mean()) for g in groups])

    groups = [torch.as_tensor(v, dtype=torch.float64).numpy() for v in values]
    return stats.bootstrap(slope, groups, level=level, num_resamples=num_resamples, seed=seed)


def per_seed_change(runs: Mapping[str, Tensor]) -> Tensor:
    """||Gram_T - Gram_0||_F / ||Gram_0||_F for each seed of one width's runs, (S,)."""
    return _relative_change(runs["gram0"], runs["gramT"])


def per_seed_inflation(runs: Mapping[str, Tensor]) -> Tensor:
    """||Gram_T||_F / ||Gram_0||_F - 1 for each seed: how much the kernel grew in training."""
    return runs["gramT"].flatten(1).norm(dim=1) / runs["gram0"].flatten(1).norm(dim=1) - 1


def per_seed_growth(runs: Mapping[str, Tensor]) -> Tensor:
    """<Gram_T - Gram_0, Gram_0>_F / ||Gram_0||_F^2 for each seed: the signed part of the
    kernel's change along the initial kernel (> 0: the kernel grows; a change orthogonal to
    Gram_0 gives 0, whatever its size)."""
    g0, d = runs["gram0"].flatten(1), (runs["gramT"] - runs["gram0"]).flatten(1)
    return (d * g0).sum(1) / g0.pow(2).sum(1)


def analytic_kernels(
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    n_train: int = 16,
    n_angles: int = 61,
    data_seed: int = 0,
) -> dict[str, Tensor]:
    """The infinite-width limits of :func:`kernel_run`'s kernels (:func:`gradcourse.ntk.analytic_ntk`):
    ``curve`` (m,) Theta(x0, x) on the circle and ``gram`` (n, n) on the training inputs."""
    x, _ = gaussian_task(n_train, seed=data_seed)
    xs, x0 = _probe_circle(n_angles)
    return {
        "angles": angle_grid(n_angles),
        "curve": analytic(xs, x0, depth=depth, beta=beta)[1][:, 0],
        "gram": analytic(x, depth=depth, beta=beta)[1],
    }


def kernel_statistics(runs: Mapping[str, Tensor], limit: Mapping[str, Tensor]) -> dict[str, float]:
    """Summaries of one width's runs (stacked over s seeds) against the analytic limit.

    - ``mean_error``: RMS over angles of (seed-mean of Theta_0(x0, x) - limit), over RMS(limit);
      ``mean_stderr``: the same for the standard error of the seed-mean (its sampling noise);
    - ``spread``: RMS over angles of the standard deviation over seeds of Theta_0(x0, x), over
      RMS(limit) (the fluctuation of the kernel around its mean);
    - ``deviation``: sqrt(mean over seeds and entries of (Gram_0 - Gram_inf)^2) / RMS(Gram_inf),
      the relative distance of the initial kernel from the limit on the training inputs;
    - ``change``: mean over seeds of ||Gram_T - Gram_0||_F / ||Gram_0||_F, the relative change of
      the kernel during training (Lee et al. 2019, Fig. 1: O(1 / sqrt(width))).
    """
    c0, lim = runs["curve0"], limit["curve"]
    s = c0.shape[0]
    if s < 2:
        raise ValueError(f"kernel_statistics needs >= 2 seeds, got {s}")
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    std = c0.std(0, correction=1)
    g0, glim = runs["gram0"], limit["gram"]
    return {
        "mean_error": rms(c0.mean(0) - lim) / rms(lim),
        "mean_stderr": rms(std / math.sqrt(s)) / rms(lim),
        "spread": rms(std) / rms(lim),
        "deviation": rms(g0 - glim) / rms(glim),
        "change": float(per_seed_change(runs).mean()),
        "curve_change": float(_relative_change(c0, runs["curveT"]).mean()),
    }


# ----------------------------------------------------------------------------- Fig. 2


def gaussian_limit(
    nngp_train: Tensor,
    nngp_test_train: Tensor,
    nngp_test_diag: Tensor,
    ntk_train: Tensor,
    ntk_test_train: Tensor,
    y_train: Tensor,
    *,
    lr: float = 1.0,
    steps: float = math.inf,
) -> dict[str, Tensor]:
    """The distribution of the infinite-width network after ``steps`` of GD (inf: the limit
    t -> infinity), over random initialisations (Jacot et al. 2018, section 5; Lee et al. 2019,
    eq. 15-16 with GD in place of gradient flow).

    At initialisation f0 is a centred Gaussian process with covariance K (the NNGP, Sigma^(L));
    training is kernel GD with the fixed NTK Theta, so on a test input x

        f_k(x) = f0(x) - A(x) (f0(X) - Y),   A(x) = Theta(x, X) Theta^{-1} (I - (I - lr Theta/n)^k)

    which is Gaussian with mean A(x) Y and variance K(x, x) - 2 A(x) K(X, x) + A(x) K(X, X) A(x)^T.
    At k = inf, A = Theta(x, X) Theta^{-1} and the mean is kernel regression with the NTK.
    Returns ``mean`` (m,), ``std`` (m,) and ``A`` (m, n) (for a given f0:
    f_k = f0(x) - A (f0(X) - Y)). A comes from the library's kernel gradient descent
    (:func:`gradcourse.ntk.gradient_descent_mse`), eigenvalues below n·eps·lambda_max of Theta
    treated as zero at k = inf.
    """
    n = ntk_train.shape[0]
    if ntk_train.shape != (n, n) or nngp_train.shape != (n, n):
        raise ValueError("ntk_train and nngp_train must be (n, n) matrices of the same n")
    m = ntk_test_train.shape[0]
    if ntk_test_train.shape != (m, n) or nngp_test_train.shape != (m, n):
        raise ValueError(f"ntk_test_train and nngp_test_train must have shape (m, {n})")
    if nngp_test_diag.shape != (m,):
        raise ValueError(f"nngp_test_diag must have shape ({m},)")
    lr = check_positive("lr", lr)
    steps = check_number("steps", steps, low=0, allow_inf=True)
    if not math.isinf(steps) and steps != round(steps):
        raise ValueError(f"steps must be a whole number of GD steps or inf, got {steps!r}")
    # A is linear in the targets: its column j is kernel GD's test prediction from f0 = 0 towards
    # the unit target e_j, so one predictor with the n unit targets as outputs gives all of A.
    # At steps = inf the limit is the same for every lr (the flow's, the pseudo-inverse).
    finite = not math.isinf(steps)
    unit_targets = torch.eye(n, dtype=ntk_train.dtype, device=ntk_train.device)
    predict = ntk.gradient_descent_mse(ntk_train, unit_targets, lr=lr if finite else None)
    a = predict(int(steps) if finite else None, k_test_train=ntk_test_train).test  # (m, n)
    y = y_train.reshape(n).to(a.dtype)
    mean = a @ y
    var = nngp_test_diag - 2 * (a * nngp_test_train).sum(1) + ((a @ nngp_train) * a).sum(1)
    return {"mean": mean, "std": var.clamp_min(0).sqrt(), "A": a}


def circle_task(train_angles: Sequence[float], n_grid: int = 121) -> dict[str, Tensor]:
    """Fig. 2's task: training points on the unit circle at ``train_angles`` with targets
    f*(x) = x1 x2, and a grid of ``n_grid`` test angles in [-pi, pi]."""
    if len(train_angles) < 1:
        raise ValueError("train_angles must hold at least one angle")
    x = circle(train_angles)
    grid = angle_grid(n_grid)
    return {"x": x, "y": (x[:, 0] * x[:, 1])[:, None], "grid": grid, "x_grid": circle(grid)}


def circle_limit(
    train_angles: Sequence[float],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    lr: float = 1.0,
    steps: float = math.inf,
    n_grid: int = 121,
) -> dict[str, Tensor]:
    """:func:`gaussian_limit` for Fig. 2's task with the analytic kernels of the paper's net."""
    task = circle_task(train_angles, n_grid)
    x, xg = task["x"], task["x_grid"]
    k_tt, t_tt = analytic(x, depth=depth, beta=beta)
    k_gt, t_gt = analytic(xg, x, depth=depth, beta=beta)
    k_gg = analytic(xg, depth=depth, beta=beta)[0].diagonal()
    return gaussian_limit(k_tt, k_gt, k_gg, t_tt, t_gt, task["y"], lr=lr, steps=steps)


def circle_fit_run(
    width: int,
    train_angles: Sequence[float],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 1000,
    lr: float = 1.0,
    n_grid: int = 121,
    linearized: bool = False,
    readout: bool = False,
    record_every: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """One network of Fig. 2: trained by GD on the points of :func:`circle_task`; its function
    on the grid at initialisation (``f0_grid``) and after training (``fT_grid``), and its outputs
    on the training points at initialisation (``f0_train``) and the final loss.

    With ``linearized``, also ``flin_grid``: the same ``steps`` of GD on the network linearised
    at its initialisation (Lee et al. 2019), i.e. kernel GD with the net's own empirical NTK at
    initialisation (:func:`gradcourse.ntk.kernel_gradient_descent`), on the grid; and
    ``lin_dist``, the RMS over the grid of f_t - f_lin_t at the steps ``lin_steps``: every
    ``record_every``-th step from 0, and the last (Lee et al. 2019, Theorem 2.1 bound its
    supremum over t; evaluating the net on the grid at every step would cost about as much as
    training it).

    With ``readout``, also ``fro_grid``: the same initial network with only its readout layer
    (the last layer's weights and bias) trained, to convergence, on the same points: least
    squares on fixed random features, i.e. kernel regression from f0 with the readout layer's
    own empirical NTK (the kernel of those two parameters alone), whose limit at infinite
    width is the NNGP kernel: a draw of the NNGP posterior (Lee et al. 2019, section 2.3)."""
    check_int("record_every", record_every, 1)
    task = circle_task(train_angles, n_grid)
    model, x, y, xg = _net_with(
        2, width, depth, beta, seed, device, task["x"], task["y"], task["x_grid"]
    )
    f0_grid, f0_train = _function(model, xg), _function(model, x)
    out: dict[str, Tensor] = {}
    if readout:
        last = len(model.layers) - 1
        params = dict(model.layers[last].named_parameters(prefix=f"layers.{last}"))
        k_xx = ntk.empirical_ntk(model, x, params=params).cpu()
        k_gx = ntk.empirical_ntk(model, xg, x, params=params).cpu()
        out["fro_grid"] = ntk.kernel_regression(
            k_xx, k_gx, task["y"][:, 0], f0_train=f0_train, f0_test=f0_grid
        )
    record = None
    if linearized:
        theta_xx = ntk.empirical_ntk(model, x).cpu()
        theta_gx = ntk.empirical_ntk(model, xg, x).cpu()
        lin = ntk.kernel_gradient_descent(
            theta_xx,
            task["y"][:, 0].cpu(),
            lr,
            torch.arange(steps + 1),
            ntk_test_train=theta_gx,
            f0_train=f0_train,
            f0_test=f0_grid,
        ).test  # (steps + 1, m)
        out["flin_grid"] = lin[-1]
        at = sorted(set(range(0, steps + 1, record_every)) | {steps})
        lin_dist = torch.empty(len(at), dtype=DTYPE)
        slot = {k: i for i, k in enumerate(at)}

        def record(k: int, _: Tensor) -> None:
            if k in slot:
                lin_dist[slot[k]] = (_function(model, xg) - lin[k]).pow(2).mean().sqrt()

        out["lin_dist"], out["lin_steps"] = lin_dist, torch.tensor(at)
    loss = gradient_descent(model, x, y, lr=lr, steps=steps, record=record)
    ft_grid = _function(model, xg)
    return {"f0_grid": f0_grid, "f0_train": f0_train, "fT_grid": ft_grid, "loss": loss[-1:], **out}


def circle_fit_runs(
    widths: Sequence[int],
    seeds: Sequence[int],
    train_angles: Sequence[float],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **config: Any,
) -> dict[int, dict[str, Tensor]]:
    """:func:`circle_fit_run` for every width and seed (each cached on its own): width ->
    results stacked over seeds. A ``tqdm.auto`` bar over the runs when ``progress``."""
    config = {"train_angles": [float(a) for a in train_angles], **config}
    return _over_widths_and_seeds(
        "ntk-circle-fit-v2", circle_fit_run, widths, seeds, cache, device, progress, config
    )


def circle_predictors(
    train_angles: Sequence[float],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    lr: float = 1.0,
    steps: float = math.inf,
    n_grid: int = 121,
) -> dict[str, Tensor]:
    """Two infinite-width predictions of a trained net on Fig. 2's grid from its own initial
    function f0, both of the form f0(x) - A (f0(X) - Y):

    - ``ntk``: A = Theta(x, X) Theta^{-1} (I - (I - lr Theta/n)^steps), kernel GD with the
      limiting NTK (:func:`gaussian_limit`'s A; Jacot et al. 2018, section 5);
    - ``nngp``: A = K(x, X) K^{-1}, the NNGP posterior mean given f0 (the rival: a net that
      learnt like Bayesian inference with its prior covariance K = Sigma^(L)).

    Also ``k_train`` K(X, X), ``y`` the targets (n,), ``std`` (m,) the Gaussian's standard
    deviation after ``steps`` (:func:`circle_limit`) and ``distance``: the RMS over the grid of
    the two predictions' difference, sqrt(E ||(A_ntk - A_nngp)(f0(X) - Y)||^2 / m) over
    f0 ~ GP(0, K), from the kernels alone (no trained net)."""
    task = circle_task(train_angles, n_grid)
    x, xg, y = task["x"], task["x_grid"], task["y"][:, 0]
    k_tt = analytic(x, depth=depth, beta=beta)[0]
    k_gt = analytic(xg, x, depth=depth, beta=beta)[0]
    limit = circle_limit(train_angles, depth=depth, beta=beta, lr=lr, steps=steps, n_grid=n_grid)
    n = x.shape[0]
    a_nngp = ntk.kernel_regression(k_tt, k_gt, torch.eye(n, dtype=DTYPE))
    return {
        "ntk": limit["A"],
        "nngp": a_nngp,
        "k_train": k_tt,
        "y": y,
        "std": limit["std"],
        "distance": prediction_distance(limit["A"], a_nngp, k_tt, y),
    }


def prediction_distance(a1: Tensor, a2: Tensor, k_train: Tensor, y: Tensor) -> float:
    """RMS over the m test points of f_1 - f_2, where f_i = f0(x) - A_i (f0(X) - Y), in
    expectation over f0(X) ~ N(0, K(X, X)): sqrt((||D Y||^2 + tr(D K D^T)) / m), D = A_1 - A_2
    (f0 on the test points cancels)."""
    d = a1 - a2
    m = d.shape[0]
    return math.sqrt(float(((d @ y).pow(2).sum() + ((d @ k_train) * d).sum()) / m))


def own_predictions(runs: Mapping[str, Tensor], a: Tensor, y: Tensor) -> Tensor:
    """Each net's own infinite-width prediction f0(x) - A (f0(X) - Y) from its initial
    function, (S, m), for :func:`circle_fit_runs`' results of one width."""
    return runs["f0_grid"] - (runs["f0_train"] - y) @ a.T


def own_prediction_gaps(runs: Mapping[str, Tensor], a: Tensor, y: Tensor) -> Tensor:
    """Per net, the RMS over the grid of (trained function - its own prediction), (S,)."""
    return (runs["fT_grid"] - own_predictions(runs, a, y)).pow(2).mean(1).sqrt()


def rms_band(values: Tensor, **kwargs: Any) -> stats.Interval:
    """sqrt(mean(values^2)) over nets, with :func:`bootstrap_seeds`' interval."""
    return bootstrap_seeds(lambda v: float(v.pow(2).mean().sqrt()), values, **kwargs)


# ----------------------------------------------------------------------------- Fig. 3


def pc_inputs(
    n: int,
    *,
    dataset: str = "mnist1d",
    seed: int = 0,
    device: str | torch.device | None = None,
    labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """A class-balanced batch of ``n`` training inputs, flattened, float64: ``"fashion_mnist"``
    (offline once installed) or ``"mnist"`` (raises gradcourse.data.DatasetUnavailable when its
    files are not on disk), pixels / 255 and nothing else, as in the paper; or ``"mnist1d"``
    (generated offline). With ``labels``, also their classes: (x, y)."""
    check_int("n", n, 2)
    if dataset == "mnist1d":
        ds = data.mnist1d(seed=42, dtype=DTYPE)
    elif dataset == "mnist":
        ds = data.mnist(n_train=n, n_test=10, standardize="none", seed=seed, dtype=DTYPE)
    elif dataset == "fashion_mnist":
        ds = data.fashion_mnist(n_train=n, n_test=10, standardize="none", seed=seed, dtype=DTYPE)
    else:
        raise ValueError(f"dataset must be 'fashion_mnist', 'mnist' or 'mnist1d', got {dataset!r}")
    idx = data.balanced_subset_indices(ds.y_train, n, seed=seed)
    x = ds.x_train[idx].flatten(1).to(device)
    return (x, ds.y_train[idx].to(device)) if labels else x


#: The top eigenvalues of Theta / N that Jacot et al. 2018 report for Fig. 3 (MNIST, N = 512,
#: depth 4, beta = 0.1), for comparison with ours.
PAPER_FIG3_EIGVALS = (0.0457, 0.00108, 0.00078)


def steps_to_learn(eigval: float, fraction: float = 0.9, *, lr: float = 1.0) -> int:
    """Kernel GD's number of steps to learn ``fraction`` of a component with eigenvalue
    ``eigval`` of Theta / N: the smallest t with 1 - (1 - lr eigval)^t >= fraction, about
    ln(1 / (1 - fraction)) / (lr eigval) (ln 2 / (lr eigval) for half of it)."""
    check_number("fraction", fraction, low=0, high=1)
    if not 0 < lr * eigval < 1:
        raise ValueError(f"lr * eigval must lie in (0, 1), got {lr * eigval!r}")
    if fraction in (0.0, 1.0):
        raise ValueError("fraction must lie strictly between 0 and 1")
    return math.ceil(math.log(1 - fraction) / math.log(1 - lr * eigval))


def kernel_pcs(
    x: Tensor, *, depth: int = PAPER_DEPTH, beta: float = PAPER_BETA, k: int = 8
) -> dict[str, Tensor]:
    """The top ``k`` principal components of the limiting NTK on the batch x (uncentred, as in
    the paper: the eigenvectors of the Gram matrix Theta(X, X)): ``eigvals`` (k,) of Theta / N
    (the eigenvalues of the kernel's integral operator on the empirical distribution) and ``pcs``
    (k, N), normalised as functions, 1/N sum_i pc(x_i)^2 = 1, each signed to have a positive sum."""
    n = x.shape[0]
    check_int("k", k, 1, n)
    theta = analytic(x.cpu(), depth=depth, beta=beta)[1]
    lam, vec = torch.linalg.eigh(theta)
    lam, vec = lam.flip(0)[:k], vec.flip(1)[:, :k].T
    sign = torch.where(vec.sum(1) < 0, -1.0, 1.0).to(vec.dtype)
    return {"eigvals": lam / n, "pcs": vec * sign[:, None] * math.sqrt(n)}


def pc_run(
    width: int,
    x: Tensor,
    pcs: Tensor,
    coeffs: Sequence[float],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1.0,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """One network of Fig. 3: GD towards f* = f_theta0 + sum_k coeffs[k] pcs[k] on the batch x.

    Records, at every step t, the coordinates of f_t - f_0 along the PCs,
    ``proj[t, k] = 1/N sum_i (f_t - f_0)(x_i) pcs[k](x_i)`` (kernel GD predicts
    coeffs[k] (1 - (1 - lr lambda_k)^t), lambda_k the eigenvalue of Theta/N), and ``orth[t]``,
    the RMS over the batch of the part of f_t - f_0 outside the span of the PCs.

    Also, from the net's own empirical NTK Theta_0 on x at initialisation: ``proj_lin``
    (steps + 1, k), the same coordinates for kernel GD with Theta_0, i.e. GD on the net
    linearised at its initialisation (Lee et al. 2019), and the Rayleigh quotients of the
    kernel along each PC, pc^T Theta pc / N^2 (the eigenvalue of Theta/N that a PC would have
    if it were an eigenvector), at initialisation (``quot0``) and after training (``quotT``)."""
    n = x.shape[0]
    if pcs.ndim != 2 or pcs.shape[1] != n or len(coeffs) != pcs.shape[0]:
        raise ValueError(f"pcs must be (k, {n}) with one coefficient per row of pcs")
    model, x, pcs = _net_with(
        x.shape[1], width, depth, beta, seed, device, x.to(DTYPE), pcs.to(DTYPE)
    )
    with torch.no_grad():
        f0 = model(x)[:, 0]
    c = torch.as_tensor(coeffs, dtype=DTYPE, device=x.device)
    target = f0 + c @ pcs
    theta0 = ntk.empirical_ntk(model, x)
    lin = ntk.kernel_gradient_descent(theta0, c @ pcs, lr, torch.arange(steps + 1)).train
    proj_lin = (lin @ pcs.T / n).cpu()
    q = torch.linalg.qr(pcs.T).Q  # orthonormal basis of the PCs' span, (N, k)
    proj = torch.empty(steps + 1, pcs.shape[0], dtype=DTYPE)
    orth = torch.empty(steps + 1, dtype=DTYPE)

    def record(t: int, out: Tensor) -> None:
        d = out[:, 0] - f0
        proj[t] = (pcs @ d / n).cpu()
        orth[t] = float((d - q @ (q.T @ d)).pow(2).mean().sqrt())

    loss = gradient_descent(model, x, target[:, None], lr=lr, steps=steps, record=record)
    theta_t = ntk.empirical_ntk(model, x)
    return {
        "proj": proj,
        "orth": orth,
        "loss": loss,
        "proj_lin": proj_lin,
        "quot0": rayleigh_quotients(theta0, pcs).cpu(),
        "quotT": rayleigh_quotients(theta_t, pcs).cpu(),
    }


def rayleigh_quotients(theta: Tensor, pcs: Tensor) -> Tensor:
    """pc^T Theta pc / N^2 for each row of ``pcs`` (k, N) (normalised as functions, 1/N sum
    pc^2 = 1): for an eigenvector of Theta, its eigenvalue of Theta / N. (k,)"""
    n = pcs.shape[1]
    return ((pcs @ theta) * pcs).sum(1) / n**2


def pc_prediction(eigvals: Tensor, coeffs: Sequence[float], *, lr: float, steps: int) -> Tensor:
    """Kernel GD's prediction for :func:`pc_run`'s ``proj``: (steps + 1, k),
    coeffs[k] (1 - (1 - lr eigvals[k])^t) at step t.

    A closed form over the eigenvalues, on purpose: the targets lie along the kernel's principal
    components, where kernel gradient descent (:func:`gradcourse.ntk.kernel_gradient_descent`)
    is one scalar recursion per component, and ``eigvals`` are already those of Theta / N, so
    there is no kernel left to diagonalise (a test holds the two equal on the PCs)."""
    t = torch.arange(steps + 1, dtype=DTYPE)[:, None]
    c = torch.as_tensor(coeffs, dtype=DTYPE)[None, :]
    return c * (1 - (1 - lr * eigvals.to(DTYPE)[None, :]) ** t)


# ----------------------------------------------------------------------------- explore


def explore_kernel(
    width: int,
    depth: int,
    beta: float,
    steps: int,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    n_train: int = 16,
    n_angles: int = 61,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Fig. 1 for the notebook's sliders: Theta(x0, x) on the circle at initialisation and after
    ``steps`` GD steps (lr 1.0) for a few seeds, and the analytic limit; validated with messages
    a reader can act on, each run cached."""
    check_int("width", width, 2, 8192)
    check_int("depth", depth, 1, 8)
    check_number("beta", beta, low=0, high=2)
    check_int("steps", steps, 0, 2000)
    config = dict(
        depth=depth, beta=float(beta), steps=steps, lr=1.0, n_train=n_train, n_angles=n_angles
    )
    runs = kernel_runs([width], list(seeds), cache=cache, device=device, **config)[width]
    limit = analytic_kernels(depth=depth, beta=float(beta), n_train=n_train, n_angles=n_angles)
    return {**runs, **limit, "stats": kernel_statistics(runs, limit)}


def half_times(proj: Tensor, coeffs: Sequence[float]) -> Tensor:
    """For each column k of ``proj`` (..., steps + 1, k), when proj[t, k] first covers half of
    its target coeffs[k]: the convergence time along PC k, in steps, interpolated linearly
    between the last step below one half and the first at or above it (so a half-time of a few
    steps is resolved to a fraction of a step); 0 if already there at t = 0, inf if never.
    Leading dimensions (e.g. seeds) are kept: (..., k)."""
    c = torch.as_tensor(coeffs, dtype=proj.dtype)
    if proj.ndim < 2 or proj.shape[-1] != c.numel() or bool((c == 0).any()):
        raise ValueError("proj must be (..., steps + 1, k) with k non-zero coefficients")
    frac = proj / c
    reached = frac >= 0.5
    first = reached.int().argmax(-2)  # (..., k): the first step at or above one half
    before = (first - 1).clamp_min(0)
    hi = frac.gather(-2, first.unsqueeze(-2)).squeeze(-2)
    lo = frac.gather(-2, before.unsqueeze(-2)).squeeze(-2)
    step = torch.where(hi > lo, (0.5 - lo) / (hi - lo), torch.zeros_like(hi))
    t = torch.where(first > 0, before.to(proj.dtype) + step, torch.zeros_like(hi))
    return torch.where(reached.any(-2), t, torch.full_like(t, math.inf))


def line_deviation(run: Mapping[str, Tensor], prediction: Tensor) -> Tensor:
    """The distance, at every step, of f_t - f_0 from kernel GD's prediction (a point moving on
    a straight line spanned by the PCs), in the empirical L2 norm:
    sqrt(sum_k (proj_k - pred_k)^2 + orth^2), using that the PCs are orthonormal in that norm.
    Runs stacked over seeds (``proj`` (S, steps + 1, k)) give (S, steps + 1)."""
    return ((run["proj"] - prediction).pow(2).sum(-1) + run["orth"].pow(2)).sqrt()


def pc_experiment(
    width: int,
    coeffs: Sequence[float],
    *,
    dataset: str = "mnist1d",
    n: int = 512,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1.0,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Fig. 3 from its configuration alone (so it can be cached): the batch of :func:`pc_inputs`,
    its top ``len(coeffs)`` limiting-kernel PCs (:func:`kernel_pcs`), and :func:`pc_run`."""
    x, y = pc_inputs(n, dataset=dataset, seed=0, labels=True)
    pc = kernel_pcs(x, depth=depth, beta=beta, k=len(coeffs))
    run = pc_run(
        width,
        x,
        pc["pcs"],
        coeffs,
        depth=depth,
        beta=beta,
        seed=seed,
        steps=steps,
        lr=lr,
        device=device,
    )
    return {**run, **pc, "labels": y.cpu()}


def pc_runs(
    widths: Sequence[int],
    seeds: Sequence[int],
    coeffs: Sequence[float],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **config: Any,
) -> dict[int, dict[str, Tensor]]:
    """:func:`pc_experiment` for every width and seed (each cached on its own): width ->
    results stacked over seeds (``proj`` (S, steps + 1, k), ``proj_lin``, ``quot0``, ...). A
    ``tqdm.auto`` bar over the runs when ``progress``."""
    config = {"coeffs": [float(c) for c in coeffs], **config}
    return _over_widths_and_seeds(
        "ntk-pc-lin-run", pc_experiment, widths, seeds, cache, device, progress, config
    )


def half_time_ratios(measured: Tensor, predicted: Tensor) -> Tensor:
    """measured / predicted half-times, averaged over the leading (seed) dimension of
    ``measured`` (S, k) (``predicted`` (k,) or (S, k), paired with it): (k,)."""
    return (measured / predicted).mean(0)
