"""Figure settings in one place, and the few plotting helpers notebooks share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COURSE_STYLE = {
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
    "legend.frameon": False,
}


def use_course_style() -> None:
    """Apply the course's matplotlib settings (call once at the top of a notebook)."""
    import matplotlib as mpl

    mpl.rcParams.update(COURSE_STYLE)


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (the exponent of a power law y ~ x^slope)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"x and y need the same shape and >= 2 points, got {x.shape}, {y.shape}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("loglog_slope needs positive x and y")
    slope, _ = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope)
