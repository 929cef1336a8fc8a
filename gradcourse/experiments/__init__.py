"""One module per notebook: the experiment functions it calls (configuration in, results out).

:func:`with_defaults` merges a module's defaults with a configuration's keys (refusing unknown
ones); :func:`seeded_run` and :func:`seeded_runs` are the plumbing the modules built on one
``train_run(cfg, seed, device=...)`` share: a run cached under the full configuration and the seed,
and many runs under one progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["seeded_run", "seeded_runs", "with_defaults"]


def with_defaults(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``overrides``; a key ``defaults`` lacks is refused, with the
    known keys listed (each module's ``config`` then checks the values)."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}; known: {sorted(defaults)}")
    return {**defaults, **overrides}


def seeded_run(
    name: str,
    train_run: Callable[..., dict[str, Any]],
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache: Any = None,
    device: Any = None,
) -> dict[str, Any]:
    """``train_run(cfg, seed, device=device)`` through ``cache`` (a
    :class:`gradcourse.cache.Cache`, or None: computed every time), stored under ``name`` and
    keyed by ``cfg`` (already checked by the module's ``config``) and the seed."""

    def compute() -> dict[str, Any]:
        return train_run(cfg, seed, device=device)

    if cache is None:
        return compute()
    return cache.get_or_compute(name, {**cfg, "seed": seed}, compute)


def seeded_runs(
    run_one: Callable[..., dict[str, Any]],
    jobs: Mapping[Any, tuple[Mapping[str, Any], int]],
    *,
    cache: Any = None,
    device: Any = None,
    progress: bool = True,
    desc: str = "runs",
) -> dict[Any, dict[str, Any]]:
    """``run_one(cfg, seed, cache=cache, device=device)`` for every job ``{key: (cfg, seed)}``
    under one progress bar (``tqdm.auto``; a cached run passes at once). Returns
    ``{key: record}`` in job order."""
    from tqdm.auto import tqdm

    out: dict[Any, dict[str, Any]] = {}
    for key, (cfg, seed) in tqdm(list(jobs.items()), desc=desc, disable=not progress, leave=False):
        out[key] = run_one(cfg, seed, cache=cache, device=device)
    return out
