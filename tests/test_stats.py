"""Intervals over seeds: the paired t-interval against scipy's paired t-test and by its coverage,
and the percentile bootstrap against a hand-written resampling and by its coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from gradcourse import stats


def test_paired_interval_agrees_with_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    a = rng.normal(0.80, 0.02, size=6)
    b = a - rng.normal(0.01, 0.005, size=6)
    iv = stats.paired_interval(a, b, level=0.95)
    ref = sps.ttest_rel(a, b).confidence_interval(confidence_level=0.95)
    assert iv.estimate == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high), rel=1e-10)
    assert iv.n == 6 and "95% interval, n = 6" in str(iv)


def test_paired_interval_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(1)
    trials, hits = 4000, 0
    for _ in range(trials):
        shared = rng.normal(0, 5, size=4)  # seed effect shared by both sides: pairing removes it
        a = shared + rng.normal(0.3, 1, size=4)
        b = shared + rng.normal(0.0, 1, size=4)
        iv = stats.paired_interval(a, b, level=0.9)
        hits += iv.low <= 0.3 <= iv.high
    # binomial standard error of the coverage: sqrt(0.9 * 0.1 / 4000) = 0.0047; 4 of them
    assert abs(hits / trials - 0.9) < 4 * 0.0047


def test_bootstrap_is_the_percentiles_of_a_hand_written_resampling():
    groups = [np.array([1.0, 2.0, 4.0]), np.array([10.0, 11.0, 15.0, 12.0])]

    def statistic(g):
        return float(g[1].mean() - g[0].mean())

    iv = stats.bootstrap(statistic, groups, level=0.8, num_resamples=500, seed=3)
    rng = np.random.default_rng(3)
    draws = [statistic([g[rng.integers(0, len(g), len(g))] for g in groups]) for _ in range(500)]
    assert iv.estimate == pytest.approx(statistic(groups))
    assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(draws, [0.1, 0.9])))
    assert iv.n == 3
    again = stats.bootstrap(statistic, groups, level=0.8, num_resamples=500, seed=3)
    assert again == iv  # seeded


def test_bootstrap_coverage_of_a_mean():
    rng = np.random.default_rng(2)
    trials, hits = 400, 0
    for t in range(trials):
        sample = rng.normal(1.0, 1.0, size=40)
        iv = stats.bootstrap(
            lambda g: float(g[0].mean()), [sample], level=0.9, num_resamples=400, seed=t
        )
        hits += iv.low <= 1.0 <= iv.high
    # percentile bootstrap of a mean at n = 40: close to nominal; s.e. of the coverage 0.015
    assert abs(hits / trials - 0.9) < 0.06


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: stats.paired_interval([1.0], [2.0]), "at least 2 pairs"),
        (lambda: stats.paired_interval([1.0, 2.0], [1.0]), "paired"),
        (lambda: stats.paired_interval([1.0, np.nan], [1.0, 2.0]), "finite"),
        (lambda: stats.paired_interval([1.0, 2.0], [1.0, 2.0], level=95), "level"),
        (lambda: stats.bootstrap(np.mean, [[1.0]]), "at least 2 values"),
        (lambda: stats.bootstrap(np.mean, [[1.0, 2.0]], num_resamples=5), "num_resamples"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_paired_interval_refuses_differences_that_overflow():
    big = np.array([1e308, -1e308, 1e308])
    with pytest.raises(ValueError, match="overflow float64"):
        stats.paired_interval(big, -big)


def test_bootstrap_refuses_a_statistic_that_is_not_finite_on_a_resample():
    # the slope of a line through resampled points: a resample whose x values all coincide
    # has no slope (0/0); dropping it silently would bias the percentiles
    def slope(groups):
        x = groups[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.polyfit(x, 2 * x, 1)[0]) if np.ptp(x) > 0 else float("nan")

    with pytest.raises(ValueError, match="not finite on .* resamples"):
        stats.bootstrap(slope, [np.array([0.0, 1.0])], num_resamples=50)
    with pytest.raises(ValueError, match="not finite on the data"):
        stats.bootstrap(lambda g: float("inf"), [np.array([0.0, 1.0])], num_resamples=50)


def test_sign_test_against_scipy_binomtest():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.random(25) < 0.7, rng.random(25) < 0.4
        wins, losses, p = stats.sign_test(a, b)
        assert wins == int(np.sum(a & ~b)) and losses == int(np.sum(b & ~a))
        if wins + losses:
            want = sps.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue
            assert math.isclose(p, want, rel_tol=1e-12)
    assert stats.sign_test([True, False], [True, False]) == (0, 0, 1.0)
    assert stats.sign_test([True] * 5, [False] * 5) == (5, 0, 1 / 32)
    with pytest.raises(ValueError, match="paired"):
        stats.sign_test([True], [True, False])
