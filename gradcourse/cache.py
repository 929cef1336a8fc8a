"""A results cache keyed by a hash of the configuration that produced them.

    cache = gc.cache.Cache()
    result = cache.get_or_compute("spectrum", config, lambda: run_experiment(**config))

Results are dicts of arrays, tensors, numbers, strings, lists and nested dicts. They are stored as
``.npz`` (no pickles: loading never executes code) written atomically (temporary file, then
rename), so an interrupted run never leaves a half-written entry; entries get the permissions of
any new file (0666 minus the umask). Dict keys are stored as strings and must not contain "/",
which joins nested keys. An entry that cannot be read is recomputed with a warning, never a
crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .paths import data_root, write_atomic

_META_KEY = "__meta__"
_SEP = "/"  # joins the keys of nested results into the names of the npz arrays
# a cache entry, ``<name>-<config_key>.npz``; temporary files of writers start with "."
#: cache folders already warned about a failed write (one warning each per process)
_WARNED_UNWRITABLE: set[Path] = set()
_ENTRY = re.compile(r"(?P<name>[^.].*)-[0-9a-f]{16}\.npz")


def _canonical(value: Any, where: str) -> Any:
    """A JSON-serialisable form of a configuration value (errors name the offending key)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in sorted(value.items(), key=str)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and nan/inf safe
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return _canonical(value.item(), where)
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(
        f"config value at {where} has type {type(value).__name__}, which cannot be hashed into a "
        "cache key; use numbers, strings, bools, None, lists, tuples or dicts"
    )


def config_key(name: str, config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit key for ``(name, config)``; key order does not matter."""
    payload = json.dumps({"name": name, "config": _canonical(config, "config")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """Split a result into NumPy arrays (stored in the npz) and a JSON skeleton that refers to
    them, remembering which arrays were torch tensors."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        for key in keys:
            if _SEP in key:
                raise ValueError(
                    f"result key {key!r} at {prefix or _SEP} contains {_SEP!r}, which joins nested "
                    "keys in the cache file; use a key without it (or a nested dict)"
                )
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"result keys at {prefix or _SEP} must be distinct as strings (they are stored as "
                f"strings), got {list(obj)!r}: two give the same string"
            )
        items = zip(keys, obj.values(), strict=True)
        return {"dict": {k: _flatten(v, f"{prefix}{_SEP}{k}", arrays) for k, v in items}}
    if isinstance(obj, torch.Tensor):
        arrays[prefix] = obj.detach().cpu().numpy()
        return {"tensor": prefix, "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"result at {prefix or '/'} is an object array, which needs pickle")
        arrays[prefix] = obj
        return {"array": prefix}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}{_SEP}{i}", arrays) for i, v in enumerate(obj)]
        return {"list" if isinstance(obj, list) else "tuple": items}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"float": repr(obj)}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return {"value": obj}
    raise TypeError(f"result at {prefix or '/'} has type {type(obj).__name__}, not cacheable")


def _unflatten(node: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
    (kind, payload), *_ = node.items()
    if kind == "dict":
        return {k: _unflatten(v, arrays) for k, v in payload.items()}
    if kind == "tensor":
        return torch.from_numpy(np.array(arrays[payload])).to(getattr(torch, node["dtype"]))
    if kind == "array":
        return np.array(arrays[payload])
    if kind in ("list", "tuple"):
        items = [_unflatten(v, arrays) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "float":
        return float(payload)
    return payload


def save_results(path: Path, results: Any) -> None:
    """Write ``results`` to ``path`` (.npz) atomically (:func:`gradcourse.paths.write_atomic`)."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = _flatten(results, "", arrays)
    arrays[_META_KEY] = np.array(json.dumps(skeleton))
    write_atomic(path, lambda fh: np.savez(fh, **arrays))


def load_results(path: Path) -> Any:
    """Read results written by :func:`save_results`; never unpickles."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    skeleton = json.loads(str(arrays.pop(_META_KEY)))
    return _unflatten(skeleton, arrays)


class Cache:
    """Results on disk under ``root/<name>-<key>.npz``, keyed by the configuration.

    Args:
        root: directory; default ``<data root>/cache`` (``$GRADCOURSE_DATA`` or ``<repo>/data``).
        enabled: when False every lookup misses and nothing is written (e.g. for timing runs).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, enabled: bool = True):
        self.root = Path(root) if root is not None else data_root() / "cache"
        self.enabled = enabled

    @staticmethod
    def _check_name(name: object) -> str:
        if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name[0] == ".":
            raise ValueError(
                f"name must be a plain, non-empty file stem (no '/' or '\\', not starting with "
                f"'.'), got {name!r}"
            )
        return name

    def path(self, name: str, config: Mapping[str, Any]) -> Path:
        name = self._check_name(name)
        return self.root / f"{name}-{config_key(name, config)}.npz"

    def load(self, name: str, config: Mapping[str, Any]) -> Any | None:
        """The cached result, or None when missing or unreadable (with a warning)."""
        path = self.path(name, config)
        if not self.enabled or not path.exists():
            return None
        try:
            return load_results(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            warnings.warn(
                f"cache entry {path} is unreadable ({type(exc).__name__}: {exc}); recomputing",
                RuntimeWarning,
                stacklevel=2,
            )
            return None

    def save(self, name: str, config: Mapping[str, Any], results: Any) -> Path:
        path = self.path(name, config)
        if self.enabled:
            save_results(path, results)
        return path

    def get_or_compute(
        self,
        name: str,
        config: Mapping[str, Any],
        compute: Callable[[], Any],
        *,
        refresh: bool = False,
    ) -> Any:
        """Return the cached result for ``(name, config)``, computing and storing it on a miss.

        ``refresh=True`` recomputes and overwrites. Only a complete result is ever stored: if
        ``compute`` raises, the cache is left as it was. If storing fails (a read-only or full
        disk, the cache folder removed or replaced), the computed result is still returned and
        the failure is warned about once per cache folder: a result is never lost to its cache.
        """
        if not refresh:
            cached = self.load(name, config)
            if cached is not None:
                return cached
        results = compute()
        try:
            self.save(name, config, results)
        except OSError as exc:
            if self.root not in _WARNED_UNWRITABLE:
                _WARNED_UNWRITABLE.add(self.root)
                warnings.warn(
                    f"could not store results in the cache {self.root} ({type(exc).__name__}: "
                    f"{exc}); they are kept in memory for this run, and will be recomputed next "
                    "time. (Warned once per folder.)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return results

    def clear(self, name: str | None = None) -> int:
        """Delete cached entries, ``<name>-<16 hex digits>.npz`` files (all of them, or those of
        exactly ``name``); returns how many were removed. Other files, among them the temporary
        files of writers still at work, are left alone."""
        if name is not None:
            name = self._check_name(name)
        if not self.root.is_dir():
            return 0
        removed = 0
        for path in self.root.iterdir():
            match = _ENTRY.fullmatch(path.name)
            if match is None or (name is not None and match["name"] != name):
                continue
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def cached(cache: Cache | None, name: str, fn: Callable[..., Any], **config: Any) -> Any:
    """``fn(**config)`` through ``cache`` (None: computed every time); the ``device`` is not
    part of the key, so a result computed on one device is found from another."""
    if cache is None:
        return fn(**config)
    key = {k: v for k, v in config.items() if k != "device"}
    return cache.get_or_compute(name, key, lambda: fn(**config))
