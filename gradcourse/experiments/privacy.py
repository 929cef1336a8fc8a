"""Notebook 05, clipping's bias in DP-SGD and DiceSGD's error feedback (Zhang, Bu, Wu & Hong,
ICLR 2024, arXiv 2311.14632; DP-SGD: Abadi et al. 2016, arXiv 1607.00133).

Two experiments:

- **Mean estimation in one dimension** (:func:`mean_data`, :func:`mean_trajectories`): the loss
  l_i(theta) = (theta - y_i)^2 / 2 on generated data with a few heavy examples, where the
  optimum (the mean) and the fixed point of clipped gradient descent
  (:func:`gradcourse.privacy.clipped_mean`) are known in closed form. Generated on purpose: the
  paper's point is a distance to a known optimum.
  :func:`mirror` (the same data made symmetric: no bias) and :func:`largest_biased_clip` (up to
  which threshold the closed form's bias stays above a level) are its controls.
- **Fashion-MNIST** (:func:`fashion_run`, :func:`cached_run`, :func:`cached_runs`): test accuracy
  of SGD, DP-SGD and DiceSGD at a target epsilon (delta from the configuration), Poisson
  sampling, the noise multiplier from Opacus's RDP accountant; DiceSGD's noise as the authors'
  code calibrates it (:func:`gradcourse.privacy.dice_noise_multiplier`). Runs at different
  thresholds are compared at the same lr * C1 (the authors' code divides the learning rate by
  C1), where the noise on the parameters (:func:`parameter_noise`) is the same too; each run
  records how long the clipped gradients are against C1 (``length``), which that noise does not
  follow. :func:`cached_runs` trains several runs at a time in worker processes if asked, with
  the same results bit for bit.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import data, models, pergrad, train
from .. import privacy as pv
from ..cache import Cache
from ..checks import check_int, check_ints, check_nonnegative, check_number, check_positive
from ..stats import Interval
from . import with_defaults

__all__ = [
    "ARCHS",
    "DEFAULTS",
    "cached_run",
    "cached_runs",
    "config",
    "farther_end",
    "fashion_run",
    "largest_biased_clip",
    "load_data",
    "make_model",
    "mean_data",
    "mean_trajectories",
    "mirror",
    "parameter_noise",
    "sample_rate",
    "sigma_for",
    "steps_for",
]

ARCHS: tuple[str, ...] = ("mlp", "tanh_cnn")

DEFAULTS: dict[str, Any] = dict(
    n_train=60_000,
    n_test=10_000,
    data_seed=0,
    arch="mlp",
    widths=(128,),
    epochs=5,
    batch_size=256,  # the expected Poisson batch, q = batch_size / n_train
    lr=0.5,
    schedule="constant",  # or "cosine", "step": gradcourse.train.lr_factor
    delta=1e-5,
    feedback_ratio=1.0,  # DiceSGD's C2 / C1, as in the authors' default
    feedback_scale="sum",  # DiceSGD's error clipped on the summed update, as the authors' code
    # the calibrated noise multiplier times this (1: as calibrated; > 1 a control with more
    # noise, whose privacy only improves; < 1, e.g. DiceSGD's update at DP-SGD's noise: not private)
    noise_factor=1.0,
    records=5,  # test accuracy and the clipped share recorded this many times per run (+ start)
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    cfg["widths"] = check_ints("widths", cfg["widths"], 1)
    check_int("n_train", cfg["n_train"], 10, 60_000)
    check_int("n_test", cfg["n_test"], 1, 10_000)
    check_int("data_seed", cfg["data_seed"], 0)
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg['arch']!r}")
    check_ints("widths", cfg["widths"], 1)
    check_int("epochs", cfg["epochs"], 1)
    check_int("batch_size", cfg["batch_size"], 1, cfg["n_train"])
    check_int("records", cfg["records"], 1)
    check_positive("lr", cfg["lr"])
    if cfg["schedule"] not in train.SCHEDULES:
        raise ValueError(f"schedule must be one of {train.SCHEDULES}, got {cfg['schedule']!r}")
    if check_positive("delta", cfg["delta"]) > 0.5:
        raise ValueError(f"delta must be a finite number > 0, at most 0.5, got {cfg['delta']!r}")
    check_number("feedback_ratio (C2 / C1)", cfg["feedback_ratio"], low=1)
    check_positive("noise_factor", cfg["noise_factor"])
    if cfg["feedback_scale"] not in pv.FEEDBACK_SCALES:
        raise ValueError(
            f"feedback_scale must be one of {pv.FEEDBACK_SCALES}, got {cfg['feedback_scale']!r}"
        )
    return cfg


# ----------------------------------------------------------------------------- 1-D mean estimation


def mean_data(
    n: int = 41, heavy: tuple[float, ...] = (8.0, 10.0, 12.0, 15.0), *, seed: int = 0
) -> Tensor:
    """``n`` standard normal values (float64, seeded) of which the first ``len(heavy)`` are
    shifted by ``heavy``: a few examples whose gradients clipping cuts short."""
    check_int("n", n, max(len(heavy), 2))
    check_int("seed", seed, 0)
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    y[: len(heavy)] += torch.tensor(heavy, dtype=torch.float64)
    return y


def mirror(y: Tensor | np.ndarray) -> Tensor:
    """``y`` and its reflection about its mean, 2n values (float64) with the same mean: every
    gradient theta - y_i at the mean has its mirror image, so clipping them is unbiased there
    (symmetric gradients: Chen, Wu & Hong 2020) and the clipped fixed point is the mean. A
    control for the clipping bias."""
    y = torch.as_tensor(np.asarray(y, dtype=np.float64)).flatten()
    if len(y) == 0 or not torch.isfinite(y).all():
        raise ValueError("y must hold at least one finite number")
    return torch.cat([y, 2 * y.mean() - y])


def largest_biased_clip(y: Tensor | np.ndarray, level: float, *, points: int = 2000) -> float:
    """The largest threshold C at which the clipped fixed point is still at least ``level``
    from the mean: |clipped_mean(y, C) - mean(y)| >= level (the closed form,
    :func:`gradcourse.privacy.clipped_mean`). Searched on ``points`` thresholds spaced
    geometrically from 1e-3 to max |y_i - mean| (where the gap is 0), the last crossing then
    bisected to 1e-9 relative. 0.0 when the gap never reaches ``level`` on that grid."""
    y = torch.as_tensor(np.asarray(y, dtype=np.float64)).flatten()
    level = check_positive("level", level)
    check_int("points", points, 2)
    mean = float(y.mean())
    top = float((y - mean).abs().max())
    if top == 0:
        return 0.0

    def gap(c: float) -> float:
        return abs(pv.clipped_mean(y, c) - mean)

    grid = np.geomspace(min(1e-3, top / 2), top, points)
    above = np.array([gap(c) >= level for c in grid])
    if not above.any():
        return 0.0
    lo = float(grid[np.nonzero(above)[0][-1]])
    hi = float(grid[min(np.nonzero(above)[0][-1] + 1, points - 1)])
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) >= level else (lo, mid)
    return lo


def farther_end(interval: Interval) -> float:
    """max(|low|, |high|) of ``interval``: both of its ends lie within +- m of 0 exactly when
    this is at most m (an equivalence test against a margin m fixed in advance)."""
    return max(abs(interval.low), abs(interval.high))


def mean_trajectories(
    y: Tensor | np.ndarray,
    method: str,
    clip: float,
    *,
    lr: float,
    steps: int,
    noise_multiplier: float = 0.0,
    feedback_ratio: float = 1.0,
    feedback_scale: str = "mean",
    theta0: float = 0.0,
    seeds: tuple[int, ...] = (0,),
) -> np.ndarray:
    """theta_0, ..., theta_steps, one row per seed, of full-batch ``method`` (``"dpsgd"`` or
    ``"dice"``, C1 = ``clip``, C2 = ``feedback_ratio * clip``, the error clipped on the mean
    update or on the summed one as ``feedback_scale`` says) on l_i = (theta - y_i)^2 / 2:
    the updates of :func:`gradcourse.privacy.dp_train` with every example in every batch,
    written out for a scalar (g_i = theta - y_i) and vectorised over seeds, with noise of
    standard deviation ``noise_multiplier * clip / n`` on the mean update drawn from
    ``numpy.random.default_rng(seed)``. A test checks it against ``dp_train``. Full batches, so
    no sampling and no privacy accounting: this is the optimisation, not the privacy."""
    if method not in ("dpsgd", "dice"):
        raise ValueError(f"method must be 'dpsgd' or 'dice', got {method!r}")
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(y) == 0:
        raise ValueError("y must hold at least one value, got none")
    if not np.isfinite(y).all():
        first = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"y must hold finite numbers: y[{first}] is {y[first]}")
    check_number("theta0", theta0)
    check_int("steps", steps, 1)
    lr, clip = check_positive("lr", lr), check_positive("clip", clip)
    check_number("feedback_ratio (C2 / C1)", feedback_ratio, low=1, allow_inf=True)
    check_nonnegative("noise_multiplier", noise_multiplier)
    if feedback_scale not in pv.FEEDBACK_SCALES:
        raise ValueError(
            f"feedback_scale must be one of {pv.FEEDBACK_SCALES}, got {feedback_scale!r}"
        )
    check_ints("seeds", seeds, 0, nonempty=True)
    n = len(y)
    c2 = feedback_ratio * clip / (1 if feedback_scale == "mean" else n)
    noise = np.stack([np.random.default_rng(s).standard_normal(steps) for s in seeds])
    noise *= noise_multiplier * clip / n
    theta = np.full(len(seeds), float(theta0))
    error = np.zeros(len(seeds))
    out = np.empty((len(seeds), steps + 1))
    out[:, 0] = theta
    for t in range(steps):
        g = theta[:, None] - y[None, :]
        v = np.clip(g, -clip, clip).mean(axis=1)
        if method == "dice":
            v = v + np.clip(error, -c2, c2)
            error = error + g.mean(axis=1) - v
        theta = theta - lr * (v + noise[:, t])
        out[:, t + 1] = theta
    return out


# ----------------------------------------------------------------------------- Fashion-MNIST


def sample_rate(cfg: Mapping[str, Any]) -> float:
    """q = batch_size / n_train, the Poisson sampling rate."""
    cfg = config(**cfg)
    return cfg["batch_size"] / cfg["n_train"]


def steps_for(cfg: Mapping[str, Any]) -> int:
    """epochs * round(1 / q): the expected number of examples seen is epochs * n_train."""
    cfg = config(**cfg)
    return cfg["epochs"] * round(cfg["n_train"] / cfg["batch_size"])


def sigma_for(cfg: Mapping[str, Any], method: str, clip: float, epsilon: float) -> float:
    """The noise multiplier of ``method`` at ``epsilon`` (delta of ``cfg``) for ``cfg``'s
    q and steps: 0 for ``"sgd"``; DP-SGD's from Opacus's RDP accountant
    (:func:`gradcourse.privacy.noise_multiplier`); for ``"dice"`` that times
    sqrt(1 + 2 C2 / C1) (:func:`gradcourse.privacy.dice_noise_multiplier`, the authors'
    calibration, not an independent accountant); times ``noise_factor`` (1 as calibrated; a
    control may ask for more noise, whose privacy only improves, or for less, which is then
    not a private run)."""
    cfg = config(**cfg)
    if method not in pv.METHODS:
        raise ValueError(f"method must be one of {pv.METHODS}, got {method!r}")
    if method == "sgd":
        return 0.0
    epsilon = check_positive("epsilon", epsilon)
    clip = check_positive("clip", clip)
    sigma = _noise_multiplier(epsilon, sample_rate(cfg), steps_for(cfg), cfg["delta"])
    if method == "dice":
        sigma = pv.dice_noise_multiplier(sigma, clip, cfg["feedback_ratio"] * clip)
    return sigma * cfg["noise_factor"]


@functools.lru_cache(maxsize=64)
def _noise_multiplier(epsilon: float, q: float, steps: int, delta: float) -> float:
    """:func:`gradcourse.privacy.noise_multiplier`, remembered: the accountant's search takes
    about a second, as long as a whole training run at ``ci``."""
    return pv.noise_multiplier(epsilon, q, steps, delta)


def parameter_noise(lr: float, sigma: float, clip: float, batch_size: int) -> float:
    """lr * sigma * C1 / b: the standard deviation of the Gaussian noise one update adds to each
    parameter at the start of the schedule (DP-SGD's and DiceSGD's, :func:`gradcourse.privacy.dp_train`:
    noise sigma C1 on the sum, divided by the expected batch b, times the step). Two runs with the
    same lr * C1 and sigma have the same."""
    check_positive("lr", lr)
    check_nonnegative("sigma", sigma)
    check_positive("clip", clip)
    check_int("batch_size", batch_size, 1)
    return lr * sigma * clip / batch_size


def load_data(cfg: Mapping[str, Any], device: str | torch.device | None = None) -> data.Dataset:
    """Fashion-MNIST: ``n_train`` training images (class-balanced subset under ``data_seed``,
    all 60,000 by default), the first ``n_test`` test images; flattened for the MLP."""
    cfg = config(**cfg)
    return _fashion(cfg["n_train"], cfg["n_test"], cfg["data_seed"], cfg["arch"] == "mlp").to(
        device
    )


@functools.lru_cache(maxsize=2)
def _fashion(n_train: int, n_test: int, seed: int, flatten: bool) -> data.Dataset:
    """The CPU copy :func:`load_data` moves, kept for the next run (training never writes into
    it)."""
    return data.fashion_mnist(n_train=n_train, n_test=n_test, seed=seed, flatten=flatten)


class TanhCNN(nn.Module):
    """The tanh CNN of Papernot et al. (AAAI 2021, "Tempered Sigmoid Activations for Deep
    Learning with Differential Privacy", Table 1, MNIST/Fashion-MNIST): conv 16 8x8 stride 2
    padding 2, max-pool 2 stride 1, conv 32 4x4 stride 2, max-pool 2 stride 1, dense 32, dense
    10, tanh after every hidden layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)
        h = nn.functional.max_pool2d(torch.tanh(self.conv2(h)), 2, 1)
        return self.fc2(torch.tanh(self.fc1(h.flatten(1))))


def make_model(
    cfg: Mapping[str, Any], *, seed: int, device: str | torch.device | None = None
) -> nn.Module:
    """``cfg["arch"]``, with PyTorch's default initialisation drawn from ``seed``: a tanh MLP
    784 -> ``widths`` -> 10, or :class:`TanhCNN`."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    if cfg["arch"] == "mlp":
        net: nn.Module = models.MLP(784, cfg["widths"], 10, activation="tanh", seed=seed)
    else:
        net = TanhCNN()
    return models.torch_default_init_(net, seed).to(device)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def fashion_run(
    cfg: Mapping[str, Any],
    method: str,
    clip: float,
    epsilon: float,
    seed: int,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``method`` (``"sgd"``, ``"dpsgd"`` or ``"dice"``) at clipping threshold ``clip``
    (C1; ignored by SGD) and target ``epsilon`` (ignored by SGD) from seed ``seed`` (weights,
    batches, noise). Returns the final test ``accuracy``, the noise multiplier ``sigma``,
    ``steps``, and at ``records`` + 1 evenly spaced steps (``step``) the test accuracy
    (``curve``) and, on a fixed probe of 512 training images, the share of per-example gradient
    norms above ``clip`` (``clipped``) and the mean length of the clipped gradients as a
    fraction of ``clip``, mean_i min(||g_i||, C) / C (``length``: 1 when every gradient is
    clipped; the noise, sigma C on the sum, does not shrink with it); ``seconds``, the wall time
    of the training and its records."""
    cfg = config(**cfg)
    sigma = sigma_for(cfg, method, clip, epsilon)
    ds = load_data(cfg, device)
    model = make_model(cfg, seed=seed, device=device)
    steps = steps_for(cfg)
    probe = torch.arange(min(512, ds.n_train), device=ds.x_train.device)
    c1 = math.inf if method == "sgd" else float(clip)

    def callback(step: int, net: nn.Module) -> dict[str, float]:
        norms = pergrad.per_example_grad_norms(net, "ce", ds.x_train[probe], ds.y_train[probe])
        return {
            "accuracy": _accuracy(net, ds.x_test, ds.y_test),
            "clipped": (norms > float(clip)).double().mean().item(),
            "length": (norms.double().clamp(max=float(clip)) / float(clip)).mean().item(),
        }

    start = time.perf_counter()
    rec = pv.dp_train(
        model,
        ds.x_train,
        ds.y_train,
        method=method,
        lr=cfg["lr"],
        steps=steps,
        batch_size=cfg["batch_size"],
        clip_norm=c1,
        feedback_clip=None if method != "dice" else cfg["feedback_ratio"] * c1,
        feedback_scale=cfg["feedback_scale"],
        noise_multiplier=sigma,
        sampling="poisson",
        seed=seed,
        callback=callback,
        every=max(1, steps // cfg["records"]),
        schedule=cfg["schedule"],
        progress=progress,
    )
    return {
        "accuracy": rec[-1]["accuracy"],
        "sigma": sigma,
        "steps": steps,
        "step": np.array([r["step"] for r in rec]),
        "curve": np.array([r["accuracy"] for r in rec]),
        "clipped": np.array([r["clipped"] for r in rec]),
        "length": np.array([r["length"] for r in rec]),
        "seconds": time.perf_counter() - start,
    }


#: bumped when :func:`fashion_run` returns something new, so older cache entries are not read
RESULT_VERSION = 2


def _cache_key(
    cfg: Mapping[str, Any], method: str, clip: float, epsilon: float, seed: int
) -> dict[str, Any]:
    if method == "sgd":  # SGD ignores clip and epsilon: one entry for all of them
        clip, epsilon = 1.0, 1.0
    return {
        **cfg,
        "method": method,
        "clip": float(clip),
        "epsilon": float(epsilon),
        "seed": seed,
        "result": RESULT_VERSION,
    }


def cached_run(
    cfg: Mapping[str, Any],
    method: str,
    clip: float,
    epsilon: float,
    seed: int,
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`fashion_run` through ``cache`` (None: computed every time). SGD's runs are keyed
    without clip and epsilon, which it ignores."""
    cfg = config(**cfg)

    def compute() -> dict[str, Any]:
        return fashion_run(cfg, method, clip, epsilon, seed, device=device, progress=progress)

    if cache is None:
        return compute()
    return cache.get_or_compute(
        "privacy-fashion", _cache_key(cfg, method, clip, epsilon, seed), compute
    )


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_job(job: tuple[Mapping[str, Any], str, float, float, int]) -> dict[str, Any]:
    cfg, method, clip, epsilon, seed = job
    return fashion_run(cfg, method, clip, epsilon, seed, device="cpu")


def cached_runs(
    jobs: Mapping[Any, tuple[Mapping[str, Any], str, float, float, int]],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "runs",
    workers: int = 1,
) -> dict[Any, dict[str, Any]]:
    """:func:`cached_run` for every job, ``{key: (cfg, method, clip, epsilon, seed)}``, with one
    progress bar over the jobs (``tqdm.auto``; a cached job passes at once). Returns
    ``{key: result}`` in the order of ``jobs``.

    ``workers`` > 1 (on the CPU only) trains that many jobs at a time, each in its own process
    with this process's thread count: the runs are seeded and single-threaded, so the results
    are the same bits as one at a time (a test checks it); this process reads and writes the
    cache."""
    from tqdm.auto import tqdm

    workers = check_int("workers", workers, 1)
    checked = {key: (config(**cfg), m, c, e, s) for key, (cfg, m, c, e, s) in jobs.items()}
    out: dict[Any, dict[str, Any]] = {}
    todo = dict(checked)
    if cache is not None:
        for key, job in checked.items():
            hit = cache.load("privacy-fashion", _cache_key(*job))
            if hit is not None:
                out[key] = hit
                del todo[key]
    on_cpu = device is None or torch.device(device).type == "cpu"
    bar = tqdm(total=len(checked), initial=len(out), desc=desc, disable=not progress, leave=False)
    if workers > 1 and on_cpu and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # no forked torch or OpenMP state
        with ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=context,
            initializer=_start_worker, initargs=(torch.get_num_threads(),),
        ) as pool:  # fmt: skip
            futures = {pool.submit(_run_job, job): key for key, job in todo.items()}
            for future in as_completed(futures):
                key = futures[future]
                result = future.result()
                out[key] = (
                    result
                    if cache is None
                    else cache.get_or_compute(
                        "privacy-fashion", _cache_key(*todo[key]), lambda r=result: r
                    )
                )
                bar.update()
    else:
        for key, (cfg, method, clip, epsilon, seed) in todo.items():
            out[key] = cached_run(cfg, method, clip, epsilon, seed, cache=cache, device=device)
            bar.update()
    bar.close()
    return {key: out[key] for key in jobs}
