"""gradcourse.plotting.loglog_slope: exact power laws, a noisy power law against the closed-form
least-squares slope and its standard error, and the inputs it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcourse.plotting import loglog_slope


def ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Closed-form least-squares slope of log y on log x: cov(log x, log y) / var(log x)."""
    lx, ly = np.log(x), np.log(y)
    dx = lx - lx.mean()
    return float((dx * (ly - ly.mean())).sum() / (dx * dx).sum())


@pytest.mark.parametrize(
    ("scale", "exponent"), [(3.0, -0.5), (0.2, 2.0), (5.0, 1.0), (1.0, -1.0), (7.0, 0.0)]
)
def test_exact_power_law_gives_its_exponent(scale, exponent):
    x = np.array([1.0, 2.0, 4.0, 10.0, 32.0, 100.0])
    assert loglog_slope(x, scale * x**exponent) == pytest.approx(exponent, abs=1e-12)
    # the slope does not depend on the prefactor or on the order of the points
    perm = np.array([3, 0, 5, 1, 4, 2])
    assert loglog_slope(x[perm], (scale * x**exponent)[perm]) == pytest.approx(exponent, abs=1e-12)


def test_two_points_and_plain_sequences():
    """Two points: the slope of the line through them, log(y2/y1) / log(x2/x1); lists work."""
    assert loglog_slope([2.0, 8.0], [5.0, 1.25]) == pytest.approx(
        math.log(1.25 / 5.0) / math.log(8.0 / 2.0), abs=1e-12
    )
    assert loglog_slope((1, 10), (1, 1000)) == pytest.approx(3.0, abs=1e-12)
    assert isinstance(loglog_slope([1.0, 2.0], [1.0, 2.0]), float)


def test_noisy_power_law_is_the_least_squares_slope():
    """y = 3 x^-0.5 exp(eps), eps ~ N(0, s^2) i.i.d.: the least-squares slope of log y on log x
    is unbiased with standard error s / sqrt(sum (log x_i - mean log x)^2) (= 0.004 here), so the
    seeded draw must lie within 4 standard errors of -0.5; and it must equal the closed-form
    least-squares slope to rounding."""
    rng = np.random.default_rng(0)
    s = 0.05
    x = np.logspace(0, 3, 40)
    y = 3.0 * x**-0.5 * np.exp(s * rng.standard_normal(40))
    slope = loglog_slope(x, y)
    assert slope == pytest.approx(ols_slope(x, y), abs=1e-12)
    lx = np.log(x)
    se = s / math.sqrt(((lx - lx.mean()) ** 2).sum())
    assert 0.003 < se < 0.005
    assert abs(slope - (-0.5)) < 4 * se
    # not the swapped regression (log x on log y), which gives about 1 / slope = -2
    assert abs(slope - ols_slope(y, x)) > 1.0


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same shape"),
        ([1.0], [1.0], ">= 2 points"),
        ([], [], ">= 2 points"),
        ([0.0, 1.0], [1.0, 2.0], "positive"),
        ([1.0, 2.0], [1.0, -2.0], "positive"),
        ([-1.0, 2.0], [1.0, 2.0], "positive"),
        ([1.0, 2.0], [0.0, 2.0], "positive"),
    ],
)
def test_refuses_bad_inputs(x, y, match):
    with pytest.raises(ValueError, match=match):
        loglog_slope(x, y)
