"""Where the course keeps things: the repository root, the dataset cache and build outputs.

Each location can be overridden with an environment variable:
``GRADCOURSE_DATA`` (datasets and cached results, default ``<repo>/data``) and
``GRADCOURSE_BUILD`` (executed notebooks and claim records, default ``<repo>/build``).
Outside a source checkout the defaults fall back to ``~/.cache/gradcourse``.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path | None:
    """The source checkout holding this package (a directory with pyproject.toml), if any."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _writable_dir(candidate: Path) -> bool:
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(candidate, os.W_OK)


def _location(env_var: str, repo_subdir: str) -> Path:
    override = os.environ.get(env_var)
    if override:
        path = Path(override).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = repo_root()
    if root is not None and _writable_dir(root / repo_subdir):
        return root / repo_subdir
    fallback = Path.home() / ".cache" / "gradcourse" / repo_subdir
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def data_root() -> Path:
    """Directory for datasets and cached results (``$GRADCOURSE_DATA`` or ``<repo>/data``)."""
    return _location("GRADCOURSE_DATA", "data")


def build_root() -> Path:
    """Directory for executed notebooks and claim records (``$GRADCOURSE_BUILD`` or
    ``<repo>/build``)."""
    return _location("GRADCOURSE_BUILD", "build")
