"""Seeded random probes for the estimators of :mod:`gradcourse.curvature`.

All random draws come from a seeded ``torch.Generator`` on the CPU (so results do not depend on
the device) and never touch the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .operators import CurvatureOperator

Seed = int | torch.Generator


def _generator(seed: Seed) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a generator passed in is used as it is)."""
    if isinstance(seed, torch.Generator):
        return seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or a torch.Generator, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _probe(op: CurvatureOperator, gen: torch.Generator, dist: str) -> Tensor:
    """A random vector with E[v v^T] = I: Rademacher (+-1) or standard Gaussian entries."""
    return _probes(op, gen, dist, 1)[:, 0]


def _probes(op: CurvatureOperator, gen: torch.Generator, dist: str, num: int) -> Tensor:
    """``num`` probes as the columns of a (P, num) matrix, the same as ``num`` calls of
    :func:`_probe` in a row: Rademacher entries 2 randint(0, 2) - 1, Gaussian ones randn in
    float64, then the operator's dtype.

    A CPU generator fills a draw element by element, so one (num, P) Rademacher draw holds the
    ``num`` draws of P in a row; it is taken at once, directly in the operator's dtype (which
    holds 0 and 1 exactly). Other probes are drawn one at a time.
    """
    size = op.shape[0]
    if dist == "rademacher" and gen.device.type == "cpu":
        draw = torch.randint(0, 2, (num, size), generator=gen, dtype=op.dtype).mul_(2).sub_(1)
    else:
        draw = torch.stack([_draw(size, gen, dist) for _ in range(num)])
    return draw.T.to(device=op.device, dtype=op.dtype)


def _draw(size: int, gen: torch.Generator, dist: str) -> Tensor:
    """One probe of length ``size`` on the generator's device."""
    if dist == "rademacher":
        return torch.randint(0, 2, (size,), generator=gen, device=gen.device).mul_(2).sub_(1)
    if dist == "gaussian":
        return torch.randn(size, generator=gen, device=gen.device, dtype=torch.float64)
    raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {dist!r}")


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm progress bar over ``total`` steps, shown only when ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
