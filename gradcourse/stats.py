"""Intervals for claims checked on a few seeds: a paired t-interval and a percentile bootstrap.

A claim measured over seeds is checked against a band fixed before looking, e.g. "the pruned
subset loses at most 1 point against full data": the *upper* or *lower* end of an interval
over seeds is compared with the margin, not the mean alone.

    diff = gc.stats.paired_interval(acc_pruned, acc_full)      # per-seed pairs
    claims.check("pruned >= full - 1 point", diff.low, -0.01, compare=">=", kind="paper",
                 refute=gc.claims.control("a random subset", random_diff.low))

    band = gc.stats.bootstrap(lambda g: slope(widths, g), groups, seed=0)   # resample per group
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .checks import check_int, check_number

__all__ = ["Interval", "paired_interval", "bootstrap", "sign_test"]


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided interval at ``level``, from ``n`` samples (pairs, groups)."""

    estimate: float
    low: float
    high: float
    level: float
    n: int

    def __str__(self) -> str:
        return (
            f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] "
            f"({100 * self.level:g}% interval, n = {self.n})"
        )


def _as_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must hold finite numbers, got {a.tolist()}")
    return a


def paired_interval(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, level: float = 0.95
) -> Interval:
    """The mean of the paired differences a_i - b_i (same seed i on both sides) with Student's
    t-interval at ``level``: mean +- t_{n-1} s / sqrt(n). Pairing removes the seed-to-seed
    variation both sides share. Needs n >= 2 pairs."""
    level = check_number("level", level, low=0, high=1, low_open=True, high_open=True)
    x, y = _as_1d("a", a), _as_1d("b", b)
    if len(x) != len(y):
        raise ValueError(f"a and b must be paired (same length), got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError(f"a paired interval needs at least 2 pairs, got {len(x)}")
    from scipy.stats import t

    with np.errstate(over="ignore", invalid="ignore"):
        d = x - y
        mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    if not (np.isfinite(d).all() and math.isfinite(mean) and math.isfinite(se)):
        raise ValueError(
            "the paired differences a - b (or their spread) overflow float64: rescale a and b "
            f"(largest |a| {np.abs(x).max():.3g}, largest |b| {np.abs(y).max():.3g})"
        )
    half = float(t.ppf(0.5 + level / 2, df=len(d) - 1)) * se
    return Interval(mean, mean - half, mean + half, level, len(d))


def bootstrap(
    statistic: Callable[[list[np.ndarray]], float],
    groups: Sequence[Sequence[float] | np.ndarray],
    *,
    level: float = 0.9,
    num_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """A percentile bootstrap (Efron 1979) of ``statistic(groups)``: each resample draws, within
    every group independently, as many values as it has, with replacement (e.g. the
    initialisations measured at each width), and evaluates the statistic on them. The interval
    is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled statistics;
    the estimate is the statistic of the data. Seeded, so a notebook's band is reproducible."""
    level = check_number("level", level, low=0, high=1, low_open=True, high_open=True)
    check_int("num_resamples", num_resamples, 10)
    check_int("seed", seed, 0)
    data = [_as_1d(f"groups[{i}]", g) for i, g in enumerate(groups)]
    if not data or any(len(g) < 2 for g in data):
        raise ValueError("bootstrap needs at least one group, each with at least 2 values")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(data))
    if not math.isfinite(estimate):
        raise ValueError(f"the statistic is not finite on the data ({estimate}): no interval")
    draws = np.empty(num_resamples)
    for r in range(num_resamples):
        draws[r] = statistic([g[rng.integers(0, len(g), len(g))] for g in data])
    bad = np.flatnonzero(~np.isfinite(draws))
    if len(bad):
        raise ValueError(
            f"the statistic is not finite on {len(bad)} of {num_resamples} resamples (first: "
            f"resample {bad[0]}, {draws[bad[0]]}), e.g. a slope fitted to resamples whose values "
            "all coincide: the percentile interval would silently drop them"
        )
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level, min(len(g) for g in data))


def sign_test(
    a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray
) -> tuple[int, int, float]:
    """The one-sided sign test that paired successes ``a`` beat ``b`` (same seed i on both
    sides): among the discordant pairs, ``wins`` (a_i and not b_i) and ``losses`` (b_i and not
    a_i), the probability of at least ``wins`` wins out of wins + losses fair coin flips (the
    exact binomial tail; 1.0 with no discordant pair). Returns (wins, losses, p)."""
    x = np.asarray(a, dtype=bool).ravel()
    y = np.asarray(b, dtype=bool).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a and b must be paired (same length), got {len(x)} and {len(y)}")
    wins, losses = int(np.sum(x & ~y)), int(np.sum(y & ~x))
    n = wins + losses
    p = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0
    return wins, losses, float(p)
