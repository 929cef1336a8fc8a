"""Argument checks shared by the library: a bad value raises ValueError naming the argument
and the allowed range (what a reader sees when a slider or a config holds a bad value)."""

from __future__ import annotations

import math


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high] (or >= low when high is None)."""
    bad = isinstance(value, bool) or not isinstance(value, int)
    if bad or value < low or (high is not None and value > high):
        allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
