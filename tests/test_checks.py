from __future__ import annotations

import math

import pytest

from gradcourse.checks import check_int, check_ints, check_nonnegative, check_number, check_positive


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


def test_check_number_closed_and_open_ends():
    assert check_number("x", 0, low=0, high=1) == 0.0 and check_number("x", 1, low=0, high=1) == 1.0
    assert isinstance(check_number("x", 1, low=0, high=1), float)
    for value, kwargs, message in [
        (0, dict(low_open=True), r"x must be a number in \(0, 1\], got 0"),
        (1, dict(high_open=True), r"x must be a number in \[0, 1\), got 1"),
        (0.0, dict(low_open=True, high_open=True), r"x must be a number in \(0, 1\), got 0.0"),
        (-1e-12, {}, r"x must be a number in \[0, 1\], got -1e-12"),
        (1.5, {}, r"x must be a number in \[0, 1\], got 1.5"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_number("x", value, low=0, high=1, **kwargs)
    assert check_number("x", 0.5, low=0, high=1, low_open=True, high_open=True) == 0.5


def test_check_number_one_bound_or_none():
    assert check_number("x", -3) == -3.0
    with pytest.raises(ValueError, match=r"x must be a finite number >= 1, got 0.5"):
        check_number("x", 0.5, low=1)
    with pytest.raises(ValueError, match=r"x must be a finite number > 1, got 1"):
        check_number("x", 1, low=1, low_open=True)
    with pytest.raises(ValueError, match=r"x must be a finite number <= 2, got 3"):
        check_number("x", 3, high=2)
    with pytest.raises(ValueError, match=r"x must be a finite number < 2, got 2"):
        check_number("x", 2, high=2, high_open=True)
    with pytest.raises(ValueError, match=r"x must be a finite number, got nan"):
        check_number("x", math.nan)


def test_check_number_refuses_bools_strings_nan_and_inf_unless_allowed():
    for bad in (True, False, "0.5", None, [0.5], math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"x must be a number in \[0, 1\]"):
            check_number("x", bad, low=0, high=1)
    for bad in (True, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="x must be a finite number >= 0"):
            check_number("x", bad, low=0)
    # allow_inf lets inf through the bounds that admit it, never nan
    assert check_number("t", math.inf, low=0, low_open=True, allow_inf=True) == math.inf
    assert check_number("t", -math.inf, high=0, allow_inf=True) == -math.inf
    for bad in (-math.inf, math.nan, 0, True):
        with pytest.raises(ValueError, match=r"t must be a number > 0 \(inf allowed\)"):
            check_number("t", bad, low=0, low_open=True, allow_inf=True)
    with pytest.raises(ValueError, match=r"t must be a number in \[0, 1\], got inf"):
        check_number("t", math.inf, low=0, high=1, allow_inf=True)


def test_check_ints_names_the_bad_index_and_refuses_empty_only_when_asked():
    assert check_ints("seeds", [0, 3], 0) == (0, 3)
    assert check_ints("seeds", iter([1, 2]), 0, 2) == (1, 2)  # any iterable, once
    assert check_ints("widths", (), 1) == ()
    with pytest.raises(ValueError, match=r"seeds\[1\] must be an int >= 0, got -1"):
        check_ints("seeds", [0, -1], 0)
    with pytest.raises(ValueError, match=r"classes\[0\] must be an int in \[0, 9\], got 10"):
        check_ints("classes", [10, 1], 0, 9)
    with pytest.raises(ValueError, match=r"widths\[0\] must be an int >= 1, got True"):
        check_ints("widths", [True], 1)
    with pytest.raises(ValueError, match=r"channels must hold at least one int >= 1, got \(\)"):
        check_ints("channels", [], 1, nonempty=True)


def test_check_finite_names_the_first_bad_example():
    import torch

    from gradcourse.checks import check_finite

    check_finite("x", torch.ones(3, 2))
    check_finite("y", torch.arange(3))  # integers have nothing to check
    check_finite("x", torch.full((2,), float("nan"), device="meta"))  # no values on meta
    x = torch.ones(4, 2, 2)
    x[2, 1, 0], x[3, 0, 0] = float("-inf"), float("nan")
    with pytest.raises(
        ValueError, match=r"x must hold finite numbers: example 2 holds inf \(2 of 4"
    ):
        check_finite("x", x)
    with pytest.raises(ValueError, match="it holds nan"):
        check_finite("t", torch.tensor(float("nan")))


def test_check_labels_names_the_range_and_the_dtype():
    import torch

    from gradcourse.checks import check_labels

    check_labels("y", torch.tensor([0, 2, 1]), 3)
    with pytest.raises(ValueError, match=r"integer class labels in \[0, 2\], got torch.float32"):
        check_labels("y", torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="got bool"):
        check_labels("y", torch.tensor([True]), 3)
    with pytest.raises(ValueError, match="got labels from -1 to 1"):
        check_labels("y", torch.tensor([-1, 1]), 3)
