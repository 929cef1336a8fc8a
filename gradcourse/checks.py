"""Argument checks shared by the library: a bad value raises ValueError naming the argument
and the allowed range (what a reader sees when a slider or a config holds a bad value).

Five checks cover every number argument of the package:

- :func:`check_int`: an int (not a bool) in [low, high], or >= low;
- :func:`check_ints`: a sequence of such ints (seeds, widths, channels), each named by its
  index in a bad-value message, optionally refused when empty;
- :func:`check_number`: an int or float (not a bool, never nan) within optional bounds, each
  end open or closed, finite unless ``allow_inf``;
- :func:`check_positive` and :func:`check_nonnegative`: the two commonest cases of
  :func:`check_number`, a finite number > 0 and a finite number >= 0.

The messages read, for example, ``lr must be a finite number > 0, got 0.0``, ``momentum must
be a number in [0, 1), got 1.0`` or ``threshold must be a number > 0 (inf allowed), got -1``.
"""

from __future__ import annotations

import math


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high] (or >= low when high is None)."""
    bad = isinstance(value, bool) or not isinstance(value, int)
    if bad or value < low or (high is not None and value > high):
        allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_ints(
    name: str, values: object, low: int, high: int | None = None, *, nonempty: bool = False
) -> tuple[int, ...]:
    """``values`` as a tuple if each is an int (not a bool) in [low, high] (or >= low), checked
    as :func:`check_int` names ``name[i]``; an empty sequence is refused when ``nonempty``."""
    values = tuple(values)
    if nonempty and not values:
        allowed = f"int in [{low}, {high}]" if high is not None else f"int >= {low}"
        raise ValueError(f"{name} must hold at least one {allowed}, got ()")
    return tuple(check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(values))


def _allowed(
    low: float | None, high: float | None, low_open: bool, high_open: bool, allow_inf: bool
) -> str:
    """The allowed range in words: "a number in (0, 1]", "a finite number >= 0", ..."""
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"a number in {left}{low:g}, {high:g}{right}"
    kind = "a number" if allow_inf else "a finite number"
    if low is not None:
        bound = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bound = f" {'<' if high_open else '<='} {high:g}"
    else:
        bound = ""
    return f"{kind}{bound} (inf allowed)" if allow_inf else f"{kind}{bound}"


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float if it is an int or float (not a bool), not nan, and within the
    bounds: ``low <= value`` (``low < value`` when ``low_open``) and ``value <= high``
    (``value < high`` when ``high_open``); a bound left as None is not checked. ``+-inf`` is
    refused unless ``allow_inf`` (then it must still lie within the bounds, so ``low=0,
    allow_inf=True`` allows inf but not -inf). With both bounds the message gives the interval,
    e.g. ``keep_fraction must be a number in (0, 1], got 0``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and not math.isnan(value) and (allow_inf or math.isfinite(value))
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        allowed = _allowed(low, high, low_open, high_open, allow_inf)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0 (:func:`check_number` with
    ``low=0, low_open=True``)."""
    return check_number(name, value, low=0, low_open=True)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number >= 0 (:func:`check_number` with
    ``low=0``)."""
    return check_number(name, value, low=0)
