"""Executing a notebook headlessly, as ``python -m gradcourse run`` and the course site do.

One home for what the command line (:mod:`gradcourse.cli`) and the site
(:mod:`gradcourse.site`) share: finding the notebooks, running one in a fresh kernel with a
profile, and writing the executed copy with the digest of what it was made from.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .checks import check_int
from .paths import repo_root, write_text_atomic

__all__ = [
    "POLL_INTERVAL",
    "find_notebooks",
    "notebooks_dir",
    "run_notebook",
    "run_notebooks",
    "source_digest",
    "write_notebook",
]


def notebooks_dir() -> Path:
    root = repo_root()
    return (root / "notebooks") if root is not None else Path.cwd() / "notebooks"


def find_notebooks(directory: Path | None = None) -> list[Path]:
    directory = directory or notebooks_dir()
    return sorted(p for p in directory.glob("*.ipynb") if not p.name.startswith("."))


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: Longest single wait on a kernel channel (s); a longer wait is a loop of these.
POLL_INTERVAL = 1.0


def _repoll(channel: Any, interval: float = POLL_INTERVAL) -> None:
    """Make ``channel.get_msg(timeout)`` wait in slices of at most ``interval`` seconds.

    nbclient waits for a cell's reply with one ``get_msg`` of up to the cell timeout. After a
    cell that displays ipywidgets, that single wait sometimes never wakes although the kernel
    has replied and is idle (nbclient issue #312, nbconvert #2029): we saw ``gradcourse run``
    hang for half an hour after notebook 04's widget cell, twice, on a loaded 2-core machine.
    A fresh poll checks the socket again, so slicing the wait turns that hang into a delay of
    at most ``interval``; the overall timeout is unchanged.
    """
    original = channel.get_msg

    async def get_msg(timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = interval if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await original(timeout=min(interval, left))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


def _kernel_config(socket_dir: str) -> Any:
    """Kernels talk to us over local IPC sockets where the OS has them (not TCP on localhost):
    nothing is reachable from the network, and the kernel has no reason to print its warning
    about unencrypted TCP into the user's terminal. Windows keeps TCP."""
    from traitlets.config import Config

    config = Config()
    if os.name == "posix":
        config.KernelManager.transport = "ipc"
        # the socket files' prefix: absolute (the kernel runs in the notebook's folder) and
        # short (a Unix socket path has ~100 characters at most)
        config.KernelManager.ip = os.path.join(socket_dir, "k")
    return config


def run_notebook(
    path: Path,
    out_dir: Path,
    profile: str,
    *,
    timeout: int = 3600,
    progress: bool = True,
) -> tuple[Path, float, str | None]:
    """Execute one notebook with ``GRADCOURSE_PROFILE=profile`` in its own directory; write the
    executed copy to ``out_dir``. Returns (output path, seconds, error message or None)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from tqdm.auto import tqdm

    nb = nbformat.read(path, as_version=4)
    socket_dir = tempfile.mkdtemp(prefix="gc-kernel-")
    code_cells = sum(c.cell_type == "code" for c in nb.cells)
    bar = tqdm(total=code_cells, desc=path.stem, unit="cell", disable=not progress)

    class Client(NotebookClient):
        async def async_start_new_kernel_client(self) -> Any:
            kc = await super().async_start_new_kernel_client()
            _repoll(kc.shell_channel)
            _repoll(kc.iopub_channel)
            return kc

    client = Client(
        nb,
        config=_kernel_config(socket_dir),
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.resolve())}},
        on_cell_executed=lambda **_: bar.update(1),
    )
    env_before = {k: os.environ.get(k) for k in ("GRADCOURSE_PROFILE", "GRADCOURSE_BUILD")}
    os.environ["GRADCOURSE_PROFILE"] = profile
    os.environ["GRADCOURSE_BUILD"] = str(out_dir.resolve())
    start, error = time.perf_counter(), None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    except Exception as exc:  # kernel died, timeout: report, keep going with other notebooks
        error = f"{type(exc).__name__}: {exc}"
    finally:
        bar.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    seconds = time.perf_counter() - start
    if error is not None:
        error = _ANSI.sub("", error)  # the kernel colours tracebacks for a terminal
    nb.metadata["gradcourse"] = {
        "profile": profile,
        "source_sha256": source_digest(path),
        "error": error,
        "seconds": round(seconds, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / path.name
    write_notebook(nb, out_path)
    return out_path, seconds, error


def run_notebooks(
    paths: Sequence[Path],
    out_dir: Path,
    profile: str,
    *,
    jobs: int = 1,
    timeout: int = 3600,
    progress: bool = True,
) -> Iterator[tuple[Path, tuple[Path, float, str | None]]]:
    """:func:`run_notebook` for each of ``paths``, ``jobs`` at a time; yields ``(path, its
    result)`` in the order of ``paths``, each as soon as it and those before it are done.

    With ``jobs > 1`` each notebook runs from its own process (``run_notebook`` sets the
    environment its kernel inherits, which threads would share) and without progress bars,
    which would interleave; the seconds it reports are then those of a shared machine, so
    ``gradcourse run --record``, whose seconds are checked against the time limits, runs one
    at a time."""
    jobs = check_int("jobs", jobs, 1, 64)
    if jobs == 1 or len(paths) <= 1:
        for path in paths:
            yield path, run_notebook(path, out_dir, profile, timeout=timeout, progress=progress)
        return
    context = multiprocessing.get_context("spawn")  # a forked copy of torch's threads can hang
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [
            pool.submit(run_notebook, path, out_dir, profile, timeout=timeout, progress=False)
            for path in paths
        ]
        for path, future in zip(paths, futures, strict=True):
            yield path, future.result()


def write_notebook(nb: Any, path: Path) -> Path:
    """Write the notebook ``nb`` to ``path`` as ``nbformat.write`` does (validated, ending in a
    newline), atomically (:func:`gradcourse.paths.write_text_atomic`)."""
    import nbformat

    text = nbformat.writes(nb)
    return write_text_atomic(path, text if text.endswith("\n") else text + "\n")


def source_digest(path: Path) -> str:
    """sha256 of what an executed notebook depends on: its source and the library's code (an
    executed copy records it, to tell when it is stale)."""
    digest = hashlib.sha256(path.read_bytes())
    package = Path(__file__).resolve().parent
    for module in sorted(package.rglob("*.py")):
        digest.update(str(module.relative_to(package)).encode())
        digest.update(module.read_bytes())
    return digest.hexdigest()
