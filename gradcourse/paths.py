"""Where the course keeps things: the repository root, the dataset cache and build outputs.

Each location can be overridden with an environment variable:
``GRADCOURSE_DATA`` (datasets and cached results, default ``<repo>/data``) and
``GRADCOURSE_BUILD`` (executed notebooks and claim records, default ``<repo>/build``).
Outside a source checkout the defaults fall back to ``~/.cache/gradcourse``.

:func:`write_atomic` (and :func:`write_text_atomic` for text) is the one way the package
writes a file (caches, claim records, generated datasets, executed notebooks, the site's
sources, the README's scorecard): a reader never sees a half-written file, and the file gets
the permissions of any new file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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


class NotWritable(OSError):
    """A folder the course must write into cannot be written: the message names the folder and
    the fix."""


def check_writable(folder: str | os.PathLike[str], what: str, fix: str) -> Path:
    """``folder`` (created if missing) if a file can be written into it now, checked by writing
    and removing a temporary file; else :class:`NotWritable` naming ``what`` would have gone
    there, the folder, the reason and ``fix``. For writers to call before they spend minutes
    computing what they would write."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".gc-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise NotWritable(f"cannot write {what} into {path}: {reason}. {fix}") from exc
    return path


def _umask() -> int:
    """The process's umask: read from /proc where the kernel reports it, else by setting it and
    putting it back at once (not thread-safe, hence only the fallback)."""
    try:
        with open("/proc/self/status") as fh:
            found = re.search(r"^Umask:\s*([0-7]+)$", fh.read(), flags=re.MULTILINE)
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` by calling ``write(fh)`` on a temporary file in the same directory, then
    ``fsync`` and ``os.replace``: readers see the old file or the new one, never a part. The
    file gets mode 0666 & ~umask, like any new file (``mkstemp`` alone would make it 0600).
    On any error the temporary file is removed and the error raised; ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` as UTF-8 with :func:`write_atomic`."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda fh: fh.write(data))
