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
    size = op.shape[0]
    if dist == "rademacher":
        v = torch.randint(0, 2, (size,), generator=gen, device=gen.device).mul_(2).sub_(1)
    elif dist == "gaussian":
        v = torch.randn(size, generator=gen, device=gen.device, dtype=torch.float64)
    else:
        raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return v.to(device=op.device, dtype=op.dtype)


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm progress bar over ``total`` steps, shown only when ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
