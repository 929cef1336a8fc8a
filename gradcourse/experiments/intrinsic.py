"""Notebook 07, the intrinsic dimension of objective landscapes (Li, Farkhoor, Liu & Yosinski
2018, arXiv 1804.08838).

Train only theta_d in theta = theta0 + P theta_d (:class:`gradcourse.subspace.SubspaceModel`)
for a grid of d, and find the smallest d whose accuracy reaches a threshold, d_int90
(:func:`crossing`, with a bootstrap over seeds: :func:`dint_interval`, and for a ratio of two
models :func:`ratio_interval`). One run is one (configuration, seed): :func:`train_run`, cached
by :func:`cached_run`; :func:`cached_runs` runs many under one progress bar. A configuration
(:func:`config`) names the data (Fashion-MNIST, optionally with its pixels shuffled by one fixed
permutation, or with random labels), the model (a fully connected net or LeNet), the
projection and d (``d=None``: direct training of all D parameters) and the training (Adam).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data, models
from ..cache import Cache
from ..checks import check_int, check_ints, check_number, check_positive
from ..stats import Interval, bootstrap
from ..subspace import PROJECTIONS, SubspaceModel
from . import seeded_run, seeded_runs, with_defaults

__all__ = [
    "ARCHS",
    "DEFAULTS",
    "cached_run",
    "cached_runs",
    "config",
    "crossing",
    "dint_interval",
    "he_normal_",
    "load",
    "make_model",
    "mean_curve",
    "num_params",
    "ratio_interval",
    "sweeps_interval",
    "train_run",
    "width_for_params",
]

ARCHS: tuple[str, ...] = ("fc", "lenet")

DEFAULTS: dict[str, Any] = dict(
    n_train=10_000,
    n_test=2_000,
    data_seed=0,
    shuffle_pixels=False,  # one fixed permutation of the 784 pixels, train and test alike
    random_labels=False,  # training labels drawn uniformly at random (memorisation)
    arch="fc",
    widths=(200, 200),  # the paper's MNIST FC net 784-200-200-10
    activation="relu",  # the FC net's (the paper's ReLU; "tanh" for the tiny direct nets)
    projection="sparse",
    d=None,  # None: direct training of all D parameters
    epochs=10,
    batch_size=128,
    lr=1e-3,  # Adam's learning rate for direct training (the paper's)
    subspace_step=3.0,  # Adam's learning rate for theta_d is subspace_step / sqrt(d)
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    check_int("n_train", cfg["n_train"], 10, 60_000)
    check_int("n_test", cfg["n_test"], 10, 10_000)
    check_int("data_seed", cfg["data_seed"], 0)
    for key in ("shuffle_pixels", "random_labels"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key} must be True or False, got {cfg[key]!r}")
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg['arch']!r}")
    cfg["widths"] = check_ints("widths", cfg["widths"], 1, nonempty=True)
    if cfg["activation"] not in ("relu", "tanh"):
        raise ValueError(f"activation must be 'relu' or 'tanh', got {cfg['activation']!r}")
    if cfg["projection"] not in PROJECTIONS:
        raise ValueError(
            f"projection must be one of {sorted(PROJECTIONS)}, got {cfg['projection']!r}"
        )
    if cfg["d"] is not None:
        check_int("d", cfg["d"], 1)
    check_int("epochs", cfg["epochs"], 1)
    check_int("batch_size", cfg["batch_size"], 1, cfg["n_train"])
    check_positive("lr", cfg["lr"])
    check_positive("subspace_step", cfg["subspace_step"])
    return cfg


_DATA: dict[tuple[Any, ...], data.Dataset] = {}


def load(cfg: Mapping[str, Any], device: str | torch.device | None = None) -> data.Dataset:
    """Fashion-MNIST, class-balanced subsets of ``n_train`` and ``n_test`` images under
    ``data_seed`` (standardised with one mean and std), as (n, 1, 28, 28). ``shuffle_pixels``:
    every image's 784 pixels permuted by one fixed permutation (seed 0), the same for training and
    test images; ``random_labels``: the training labels replaced by labels drawn uniformly from
    the ten classes (seed ``data_seed``), the test labels kept. Kept in memory per setting."""
    cfg = config(**cfg)
    key = (cfg["n_train"], cfg["n_test"], cfg["data_seed"], cfg["shuffle_pixels"],
           cfg["random_labels"], str(device))  # fmt: skip
    if key not in _DATA:
        ds = data.fashion_mnist(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=cfg["data_seed"])
        x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        if cfg["shuffle_pixels"]:
            perm = torch.randperm(28 * 28, generator=torch.Generator().manual_seed(0))
            x_tr = x_tr.flatten(1)[:, perm].view_as(x_tr)
            x_te = x_te.flatten(1)[:, perm].view_as(x_te)
        if cfg["random_labels"]:
            g = torch.Generator().manual_seed(cfg["data_seed"])
            y_tr = torch.randint(0, 10, y_tr.shape, generator=g).to(y_tr)
        name = ds.name + ("_shuffled_pixels" if cfg["shuffle_pixels"] else "")
        name += "_random_labels" if cfg["random_labels"] else ""
        _DATA[key] = data.Dataset(x_tr, y_tr, x_te, y_te, 10, name, ds.classes).to(device)
    return _DATA[key]


def he_normal_(model: nn.Module, seed: int) -> nn.Module:
    """Every ``nn.Linear`` and ``nn.Conv2d`` weight ~ N(0, 2 / fan_in) (He et al. 2015) and every
    bias 0, from a seeded generator: the initialisation of the authors' code."""
    g = torch.Generator().manual_seed(check_int("seed", seed, 0))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                w = layer.weight
                fan_in = w[0].numel()
                draw = torch.randn(w.shape, generator=g, dtype=torch.float64)
                w.copy_((draw * math.sqrt(2.0 / fan_in)).to(w.dtype))
                if layer.bias is not None:
                    layer.bias.zero_()
    return model


def make_model(
    cfg: Mapping[str, Any], *, seed: int, device: str | torch.device | None = None
) -> nn.Module:
    """The network theta0 (He-normal from ``seed``): ``arch="fc"``, an MLP 784 -> ``widths`` ->
    10 with ReLU (or ``activation="tanh"``); ``arch="lenet"``, :class:`gradcourse.models.LeNet` (D = 44,426, the paper's). ``d`` set: wrapped in a :class:`SubspaceModel` (``projection``, P drawn from
    ``seed``), whose only trainable parameter is theta_d."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    if cfg["arch"] == "fc":
        net: nn.Module = models.MLP(
            28 * 28, cfg["widths"], 10, activation=cfg["activation"], seed=seed
        )
    else:
        net = models.LeNet(10, seed=seed)
    net = he_normal_(net, seed).to(device)
    if cfg["d"] is None:
        return net
    return SubspaceModel(net, cfg["projection"], cfg["d"], seed=seed)


def num_params(cfg: Mapping[str, Any]) -> int:
    """D, the number of parameters of the configuration's network (before any projection)."""
    cfg = config(**{**cfg, "d": None})
    return models.count_params(make_model(cfg, seed=0))


def width_for_params(d: int, *, depth: int = 1) -> int:
    """The width w of an MLP 784 -> w (x ``depth``) -> 10 whose parameter count is closest to
    ``d`` (at least 1): the directly trained net with as many parameters as a subspace of d."""
    check_int("d", d, 1)
    check_int("depth", depth, 1)

    def count(w: int) -> int:
        return 785 * w + (depth - 1) * (w * w + w) + 10 * w + 10

    best = min(range(1, 4096), key=lambda w: abs(count(w) - d))
    return best


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2_000) -> float:
    with torch.no_grad():
        right = sum(
            int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
            for i in range(0, len(x), batch)
        )
    return right / len(x)


def train_run(
    cfg: Mapping[str, Any], seed: int, *, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Train :func:`make_model` from ``seed`` with Adam (``lr`` for direct training,
    ``subspace_step / sqrt(d)`` for theta_d: Adam moves every coordinate of theta_d by about
    its rate per step, and P's columns are unit vectors in nearly orthogonal directions, so
    theta moves by about ``subspace_step`` per step whatever d), a cosine decay of the rate to 0 over ``epochs`` of batches
    reshuffled each epoch (from ``seed``), cross-entropy. Returns the test and training accuracy,
    the last epoch's mean training loss, D, d (= D for direct training), the trained norm of
    theta_d (0 for direct training) and the seconds it took."""
    cfg = config(**cfg)
    ds = load(cfg, device)
    model = make_model(cfg, seed=seed, device=device)
    D = num_params(cfg)  # noqa: N806 (the paper's name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = cfg["lr"] if cfg["d"] is None else cfg["subspace_step"] / math.sqrt(cfg["d"])
    opt = torch.optim.Adam(trainable, lr=lr)
    steps_per_epoch = math.ceil(ds.n_train / cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    )
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses: list[float] = []
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(ds.n_train, generator=gen).to(ds.x_train.device)
        losses = []
        for i in range(0, ds.n_train, cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    seconds = time.perf_counter() - t0
    model.eval()
    theta_norm = 0.0 if cfg["d"] is None else float(model.theta_d.detach().norm())
    return {
        "accuracy": _accuracy(model, ds.x_test, ds.y_test),
        "train_accuracy": _accuracy(model, ds.x_train, ds.y_train),
        "train_loss": float(np.mean(losses)),
        "D": D,
        "d": D if cfg["d"] is None else cfg["d"],
        "theta_d_norm": theta_norm,
        "seconds": seconds,
        "steps": total,
    }


def cached_run(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """:func:`train_run` through ``cache`` (keyed by the full configuration and the seed)."""
    return seeded_run("intrinsic-run", train_run, config(**cfg), seed, cache=cache, device=device)


def cached_runs(
    jobs: Mapping[Any, tuple[Mapping[str, Any], int]],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "runs",
) -> dict[Any, dict[str, Any]]:
    """:func:`cached_run` for every job ``{key: (cfg, seed)}`` under one progress bar
    (``tqdm.auto``; a cached run passes at once). Returns ``{key: record}`` in job order."""
    return seeded_runs(cached_run, jobs, cache=cache, device=device, progress=progress, desc=desc)


def mean_curve(acc: Any) -> np.ndarray:
    """The mean over seeds of accuracies given as (grid, seeds) (or a list of per-d lists)."""
    return np.array([np.mean(a) for a in acc], dtype=np.float64)


def crossing(ds: Sequence[int], curve: Sequence[float], threshold: float) -> float:
    """Where ``curve`` (accuracy at each d of an increasing grid ``ds``) first reaches
    ``threshold``: the first grid d with curve >= threshold, interpolated linearly in log d from
    the grid point before it. The first grid d if it already reaches it (the true value may be
    lower: censored below); ``inf`` if no grid d does (censored above)."""
    d = np.asarray(ds, dtype=np.float64)
    a = np.asarray(curve, dtype=np.float64)
    if d.ndim != 1 or d.shape != a.shape or len(d) < 1:
        raise ValueError(f"ds and curve must be 1-d of one length, got {d.shape} and {a.shape}")
    if np.any(d <= 0) or np.any(np.diff(d) <= 0):
        raise ValueError(f"ds must be positive and increasing, got {d.tolist()}")
    check_number("threshold", threshold)
    above = np.flatnonzero(a >= threshold)
    if not len(above):
        return math.inf
    k = int(above[0])
    if k == 0:
        return float(d[0])
    frac = (threshold - a[k - 1]) / (a[k] - a[k - 1])
    return float(np.exp(np.log(d[k - 1]) + frac * (np.log(d[k]) - np.log(d[k - 1]))))


def _censored_log(ds: Sequence[int], value: float) -> float:
    # a curve that never crosses counts as one grid step above the grid (log scale), so that a
    # resample's statistic stays finite; dint_interval reports when that happened
    if math.isfinite(value):
        return math.log(value)
    step = math.log(ds[-1]) - math.log(ds[-2]) if len(ds) > 1 else math.log(2.0)
    return math.log(ds[-1]) + step


def dint_interval(
    ds: Sequence[int],
    acc: Any,
    threshold: float,
    *,
    level: float = 0.9,
    seed: int = 0,
) -> tuple[Interval, bool]:
    """d_int at ``threshold`` of the mean curve of ``acc`` (one list of per-seed accuracies per
    grid d) with a percentile bootstrap over seeds (each grid d's seeds resampled, as the
    authors' results notebook does). Returns the interval and whether the data's own curve
    never reaches the threshold (censored: the estimate is then one grid step above the
    grid)."""
    groups = [np.asarray(a, dtype=np.float64) for a in acc]
    if len(groups) != len(ds):
        raise ValueError(f"acc needs one group per grid d ({len(ds)}), got {len(groups)}")
    value = crossing(ds, mean_curve(groups), threshold)

    def stat(g: list[np.ndarray]) -> float:
        return _censored_log(ds, crossing(ds, mean_curve(g), threshold))

    band = bootstrap(stat, groups, level=level, seed=seed)
    out = Interval(math.exp(band.estimate), math.exp(band.low), math.exp(band.high), level, band.n)
    return out, not math.isfinite(value)


def sweeps_interval(
    sweeps: Sequence[tuple[Sequence[int], Any, float]],
    statistic: Callable[[np.ndarray], float],
    *,
    level: float = 0.9,
    seed: int = 0,
) -> Interval:
    """``statistic`` of the d_int of several sweeps (each ``(ds, acc, threshold)``, ``acc`` one
    list of per-seed accuracies per grid d), e.g. the ratio ``v[0] / v[1]`` or the spread
    ``v.max() / v.min()``, with a percentile bootstrap resampling every sweep's seeds (censored
    curves count one grid step above their grid, as in :func:`dint_interval`)."""
    groups: list[np.ndarray] = []
    bounds = []
    for ds, acc, _ in sweeps:
        if len(acc) != len(ds):
            raise ValueError(f"a sweep needs one group per grid d ({len(ds)}), got {len(acc)}")
        bounds.append((len(groups), len(groups) + len(acc)))
        groups += [np.asarray(a, dtype=np.float64) for a in acc]

    def stat(g: list[np.ndarray]) -> float:
        values = [
            math.exp(_censored_log(ds, crossing(ds, mean_curve(g[lo:hi]), thr)))
            for (ds, _, thr), (lo, hi) in zip(sweeps, bounds, strict=True)
        ]
        return float(statistic(np.array(values)))

    return bootstrap(stat, groups, level=level, seed=seed)


def ratio_interval(
    ds_a: Sequence[int],
    acc_a: Any,
    ds_b: Sequence[int],
    acc_b: Any,
    threshold_a: float,
    threshold_b: float | None = None,
    *,
    level: float = 0.9,
    seed: int = 0,
) -> Interval:
    """d_int(a) / d_int(b), a :func:`sweeps_interval` of two sweeps (``threshold_b`` defaults to
    ``threshold_a``)."""
    threshold_b = threshold_a if threshold_b is None else threshold_b
    return sweeps_interval(
        [(ds_a, acc_a, threshold_a), (ds_b, acc_b, threshold_b)],
        lambda v: v[0] / v[1],
        level=level,
        seed=seed,
    )
