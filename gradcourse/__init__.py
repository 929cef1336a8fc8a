"""gradcourse: the support library of a hands-on course on how gradients shape deep learning.

Notebooks import it as ``import gradcourse as gc``; the submodules hold the algorithms
(``gc.curvature``, ``gc.ntk``, ...) and the experiment helpers (``gc.data``, ``gc.models``,
``gc.train``, ``gc.claims``). Submodules are imported on first use, so ``import gradcourse``
stays cheap.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

from .profile import PROFILES, Profile, get_device, profile, seed_everything, set_cpu_threads

__version__ = "0.1.0"

# torch 2.14 warns from its own forward-mode AD internals (torch/_decomp) the first time jvp runs;
# it is not actionable for readers of the course, so it is hidden here (and only this warning).
warnings.filterwarnings(
    "ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning
)

_SUBMODULES = (
    "attribution",
    "batchsize",
    "cache",
    "claims",
    "cli",
    "coherence",
    "curvature",
    "data",
    "directional",
    "distributed",
    "exercises",
    "experiments",
    "functional",
    "layers",
    "losses",
    "models",
    "ntk",
    "optim",
    "paths",
    "pergrad",
    "plotting",
    "privacy",
    "results",
    "scores",
    "stability",
    "stats",
    "subspace",
    "train",
    "widgets",
)

__all__ = [
    "PROFILES",
    "Profile",
    "get_device",
    "profile",
    "seed_everything",
    "set_cpu_threads",
    *_SUBMODULES,
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradcourse' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from . import cache, claims, cli, curvature, data, models, train  # noqa: F401
