from __future__ import annotations

import math

import pytest

from gradcourse.checks import check_int, check_nonnegative, check_positive


def test_check_int_accepts_ints_in_range_and_names_the_argument():
    assert check_int("steps", 5, 1) == 5
    assert check_int("k", 3, 1, 3) == 3
    for bad in (0, 4, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
            check_int("k", bad, 1, 3)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        check_int("steps", -1, 1)


def test_check_positive_refuses_zero_negative_and_non_finite():
    assert check_positive("lr", 3) == 3.0
    for bad in (0, -1.0, math.inf, math.nan, False, "1"):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            check_positive("lr", bad)


def test_check_nonnegative_accepts_zero_and_refuses_negative_and_non_finite():
    assert check_nonnegative("eps", 0) == 0.0 and check_nonnegative("eps", 0.5) == 0.5
    for bad in (-1e-9, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            check_nonnegative("eps", bad)
