"""Real Python source as a byte-level language-modelling corpus, offline on every machine.

Pan & Li (2023) fine-tune transformers on, among others, Python source code. Every machine that
runs the course has a corpus of real Python on disk: the standard library's own ``.py`` files
(``sysconfig.get_paths()["stdlib"]``, about 30 MB for CPython 3.11). :func:`python_source`
reads them as bytes (tokens 0..255, no tokenizer to download), split by file, deterministically:

- files are listed in sorted order of their path relative to the stdlib folder, skipping
  ``site-packages`` / ``dist-packages`` (installed packages, not the stdlib) and anything whose
  real path leaves the folder (a symlink);
- a file goes to ``"validation"`` when the SHA-1 of its relative path is 0 mod 10 (about 10% of
  the files), else to ``"train"``: the same split on every machine with the same Python;
- ``max_bytes`` keeps the first files of the split in that order until the budget is reached
  (small profiles read a few MB, not 30).

The corpus differs between Python versions (the stdlib changes), so numbers measured on it are
comparable across machines with the same minor version. :func:`token_windows` draws (x, y)
pairs of ``context`` consecutive tokens and the same window shifted by one, from a seeded
generator.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checks import check_int

__all__ = ["Corpus", "python_source", "stdlib_files", "token_windows", "CORPUS_SPLITS"]

CORPUS_SPLITS = ("train", "validation")
_SKIP = ("site-packages", "dist-packages", "__pycache__")


def _stdlib_root(root: str | Path | None) -> Path:
    path = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not path.is_dir():
        raise FileNotFoundError(f"root must be a folder of Python files, got {str(path)!r}")
    return path.resolve()


def _split_of(relative: str) -> str:
    return (
        "validation" if int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 10 == 0 else "train"
    )


def stdlib_files(split: str = "train", *, root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files of ``split`` under ``root`` (default: this Python's standard library),
    in sorted order of their relative paths; see the module docstring for the rule."""
    if split not in CORPUS_SPLITS:
        raise ValueError(f"split must be one of {CORPUS_SPLITS}, got {split!r}")
    base = _stdlib_root(root)
    chosen = []
    for path in sorted(base.rglob("*.py"), key=lambda p: p.relative_to(base).as_posix()):
        relative = path.relative_to(base)
        if any(part in _SKIP for part in relative.parts) or not path.is_file():
            continue
        if not path.resolve().is_relative_to(base):
            continue
        if _split_of(relative.as_posix()) == split:
            chosen.append(path)
    return chosen


@dataclass
class Corpus:
    """Bytes of a list of files, concatenated with a newline after each, as int64 tokens."""

    tokens: Tensor
    files: list[str]
    split: str
    root: str

    vocab = 256

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"Corpus(split={self.split!r}, files={len(self.files)}, tokens={len(self.tokens):,}, "
            f"root={self.root!r})"
        )


def python_source(
    split: str = "train", *, max_bytes: int | None = None, root: str | Path | None = None
) -> Corpus:
    """The standard library's Python source of ``split`` as byte tokens (see the module
    docstring). ``max_bytes``: stop adding files once this many bytes are read (at least one
    file is always read)."""
    if max_bytes is not None:
        max_bytes = check_int("max_bytes", max_bytes, 1)
    base = _stdlib_root(root)
    files = stdlib_files(split, root=base)
    if not files:
        raise FileNotFoundError(f"no .py files of split {split!r} under {str(base)!r}")
    chunks, names, total = [], [], 0
    for path in files:
        data = path.read_bytes() + b"\n"
        chunks.append(data)
        names.append(path.relative_to(base).as_posix())
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    raw = bytearray(b"".join(chunks))
    tokens = torch.frombuffer(raw, dtype=torch.uint8).to(torch.int64)
    return Corpus(tokens=tokens, files=names, split=split, root=str(base))


def token_windows(
    tokens: Tensor | Corpus, n: int, context: int, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` windows of ``context`` consecutive tokens at uniform random offsets (from
    ``generator``), and the same windows shifted by one: (x, y), both (n, context), y[:, t] the
    token after x[:, t]."""
    if isinstance(tokens, Corpus):
        tokens = tokens.tokens
    n = check_int("n", n, 1)
    context = check_int("context", context, 1)
    if len(tokens) < context + 1:
        raise ValueError(f"context must be below the corpus length {len(tokens)}, got {context}")
    start = torch.randint(0, len(tokens) - context, (n,), generator=generator)
    index = start[:, None] + torch.arange(context + 1)
    window = tokens[index]
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
