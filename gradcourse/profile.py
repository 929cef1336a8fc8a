"""Run profiles: one notebook, three scales.

``ci`` runs in seconds on 2 CPU cores (what CI executes), ``cpu`` in minutes on a laptop,
``gpu`` at (or near) the paper's scale on one GPU. ``auto`` picks ``gpu`` when CUDA is present,
else ``cpu``. The profile comes from an argument or the ``GRADCOURSE_PROFILE`` variable.

    P = gc.profile()
    cfg = P.pick(ci=dict(width=32), cpu=dict(width=256), gpu=dict(width=2048))
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checks import check_int

PROFILES: tuple[str, ...] = ("ci", "cpu", "gpu")
ENV_VAR = "GRADCOURSE_PROFILE"
THREADS_VAR = "GRADCOURSE_THREADS"
_MISSING = object()


def resolve_profile_name(name: str | None = None) -> str:
    """Return ``"ci"``, ``"cpu"`` or ``"gpu"`` from ``name`` or ``$GRADCOURSE_PROFILE``.

    ``None``, ``""`` and ``"auto"`` mean: ``gpu`` if CUDA is available, else ``cpu``.
    """
    raw = os.environ.get(ENV_VAR, "") if name is None else name
    key = raw.strip().lower()
    if key in ("", "auto"):
        return "gpu" if torch.cuda.is_available() else "cpu"
    if key not in PROFILES:
        source = f"${ENV_VAR}" if name is None else "profile"
        raise ValueError(
            f"{source}={raw!r} is not a profile; valid profiles are "
            f"{', '.join(PROFILES)} or auto (gpu if CUDA is available, else cpu)"
        )
    return key


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else CUDA, then Apple MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators (CPU and CUDA).

    Returns a fresh CPU ``torch.Generator`` seeded with ``seed`` for code that takes one.
    """
    check_int("seed", seed, 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeding the legacy global RNG is the point)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def set_cpu_threads(n: int) -> int:
    """Compute on ``n`` CPU threads, unless ``$GRADCOURSE_THREADS`` names another count (which
    wins, so a whole run can be repeated at 1 and 2 threads: ``make test-sweep``). Returns the
    count now in force."""
    raw = os.environ.get(THREADS_VAR, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"${THREADS_VAR}={raw!r} must be a positive integer")
        n = int(raw)
    else:
        check_int("n", n, 1)
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class Profile:
    """A resolved profile: its name and the device it computes on."""

    name: str
    device: torch.device

    def pick(self, ci: Any = _MISSING, cpu: Any = _MISSING, gpu: Any = _MISSING) -> Any:
        """Return the value given for this profile, e.g. ``P.pick(ci=200, cpu=2_000, gpu=20_000)``.

        All three values must be given, so that a notebook shows every scale side by side.
        """
        given = {"ci": ci, "cpu": cpu, "gpu": gpu}
        missing = [k for k, v in given.items() if v is _MISSING]
        if missing:
            raise ValueError(
                f"pick() needs a value for every profile; missing: {', '.join(missing)}"
            )
        return given[self.name]

    @property
    def is_ci(self) -> bool:
        return self.name == "ci"

    def __str__(self) -> str:
        threads = f", {torch.get_num_threads()} CPU thread(s)" if self.device.type == "cpu" else ""
        return f"profile {self.name!r} on {self.device}{threads}"


def profile(name: str | None = None, device: str | torch.device | None = None) -> Profile:
    """Resolve the run profile (argument, else ``$GRADCOURSE_PROFILE``, else auto) and its device.

    The ``ci`` profile always runs on the CPU, and single-threaded: its tensors are so small
    that a second thread only adds synchronisation, which on a loaded 2-core machine made cells
    10-80x slower (measured: a 516x516 ``eigvalsh`` took 3.2 s with 2 threads, 0.04 s with 1),
    and one thread makes its numbers independent of the machine's core count.
    ``$GRADCOURSE_THREADS`` overrides the thread count at every profile.
    """
    resolved = resolve_profile_name(name)
    if resolved == "ci":
        set_cpu_threads(1)
        if device is None:
            device = "cpu"
    elif os.environ.get(THREADS_VAR, "").strip():
        set_cpu_threads(torch.get_num_threads())  # the variable's count
    return Profile(name=resolved, device=get_device(device))
