"""Paper claims, checked in code: measured vs expected, a verdict per claim, a table at the end.

    claims = gc.claims.Claims(paper="Sagun et al. 2017", notebook="01_hessian_spectrum")
    claims.check("outliers = number of classes", measured=n_out, expected=k,
                 kind="paper", holds_at=("cpu", "gpu"))
    ...
    claims.report()   # table, and a JSON record beside the executed notebook

A check prints one line. In the profiles listed in ``holds_at`` a failed check raises
:class:`ClaimFailed` (so nbval fails); in the others it is reported as *not reproduced at this
scale*. Tolerances are arguments of the check, fixed before the result is seen.

The JSON record of a notebook's run is rewritten when the run starts (``Claims(...)``), after
every check, passed or failed, and at :meth:`Claims.report`, which marks it finished. So a run
that stops at a failed claim, or at an error in any cell, leaves a record that says so, never
the verdicts of an earlier run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .paths import build_root, write_text_atomic
from .profile import PROFILES, Profile, resolve_profile_name

COMPARISONS: tuple[str, ...] = ("close", "==", "<=", ">=", "<", ">", "in")
#: ``paper``: a statement of the paper (or of its reproduction), what the course is about.
#: ``sanity``: an identity or a property of the implementation; it belongs in the unit tests,
#: and is shown in a notebook only where seeing it helps. A check that cannot fail is sanity.
KINDS: tuple[str, ...] = ("paper", "sanity")
SYMBOLS = {"close": "≈", "==": "=", "<=": "≤", ">=": "≥", "<": "<", ">": ">", "in": "∈"}


class ClaimFailed(AssertionError):
    """A claim that must hold at the current profile did not."""


def _plain(value: Any) -> Any:
    """Tensors, NumPy scalars and arrays -> Python numbers / lists, so verdicts are JSON."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


@dataclass
class Verdict:
    """The outcome of one claim check."""

    name: str
    measured: Any
    expected: Any
    compare: str
    tol: float
    rtol: float
    holds: bool
    required: bool
    profile: str
    holds_at: list[str]
    note: str = ""
    kind: str = "paper"
    paper_value: Any = None  # the paper's own number or statement, where it gives one
    # how far (relative) the measurement may move between machines: a chaotic run (GD at the
    # edge of stability) amplifies rounding; results.compare allows it when comparing records
    spread: float = 0.0

    @property
    def status(self) -> str:
        if self.holds:
            return "reproduced" if self.kind == "paper" else "passed"
        return "FAILED" if self.required else "not reproduced at this scale"

    @property
    def expected_text(self) -> str:
        symbol = SYMBOLS[self.compare]
        if self.compare == "in":
            lo, hi = self.expected
            return f"{symbol} [{_fmt(lo)}, {_fmt(hi)}]"
        slack = []
        if self.tol:
            slack.append(f"±{_fmt(self.tol)}")
        if self.rtol:
            slack.append(f"±{_fmt(100 * self.rtol)}%")
        return f"{symbol} {_fmt(self.expected)}" + (f" ({' '.join(slack)})" if slack else "")

    def _ipython_display_(self) -> None:
        """Show nothing when a check ends a notebook cell: check() already printed the line."""

    def line(self) -> str:
        mark = {"reproduced": "✓", "passed": "✓", "FAILED": "✗"}.get(self.status, "·")
        kind = "" if self.kind == "paper" else f"({self.kind}) "
        if self.required:
            where = ""
        elif self.holds_at:
            where = f" [required only at {', '.join(self.holds_at)}]"
        else:
            where = " [reported, required at no profile]"
        note = f" — {self.note}" if self.note else ""
        return (
            f"[{mark}] {kind}{self.name}: measured {_fmt(self.measured)}, expected "
            f"{self.expected_text} -> {self.status}{where}{note}"
        )


def evaluate(measured: Any, expected: Any, compare: str, tol: float, rtol: float) -> bool:
    """Whether ``measured`` satisfies ``compare`` against ``expected`` with the given slack.

    ``close``: |m - e| <= tol + rtol |e|; ``<=``/``<``: m <= e + tol (resp. <);
    ``>=``/``>``: m >= e - tol (resp. >); ``==``: exact equality; ``in``: lo <= m <= hi.
    Non-finite measurements never satisfy a numeric comparison.
    """
    if compare == "==":
        return measured == expected
    if compare == "in":
        lo, hi = expected
        return _finite(measured) and lo <= measured <= hi
    if not _finite(measured):
        return False
    slack = tol + (rtol * abs(expected) if rtol else 0.0)  # 0 * inf would be nan
    if compare == "close":
        return abs(measured - expected) <= slack
    if compare == "<=":
        return measured <= expected + slack
    if compare == "<":
        return measured < expected + slack
    if compare == ">=":
        return measured >= expected - slack
    return measured > expected - slack  # ">"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Claims:
    """The claims of one paper, checked at the current profile.

    Args:
        paper: short citation, e.g. ``"Sagun et al. 2017 (arXiv 1706.04454)"``.
        notebook: the notebook's name (used for the JSON record), e.g. ``"01_hessian_spectrum"``.
        profile: a :class:`~gradcourse.profile.Profile`, a profile name, or ``None`` for
            ``$GRADCOURSE_PROFILE``.
        out_dir: where :meth:`report` writes ``<notebook>.claims.json``; default
            ``$GRADCOURSE_BUILD`` or ``<repo>/build``, where ``python -m gradcourse run`` puts
            the executed notebooks.
        verbose: print one line per check.
        write: keep the JSON record on disk (rewritten at every check, finished by
            :meth:`report`); False writes nothing.
    """

    def __init__(
        self,
        paper: str,
        notebook: str | None = None,
        *,
        profile: Profile | str | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        verbose: bool = True,
        write: bool = True,
    ) -> None:
        self.paper = paper
        self.notebook = notebook
        self.profile = (
            profile.name if isinstance(profile, Profile) else resolve_profile_name(profile)
        )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.verbose = verbose
        self.verdicts: list[Verdict] = []
        self.finished = False
        self.write, self._warned = bool(write), False
        self._save()  # a new run: the previous run's record must not survive as if current

    @property
    def path(self) -> Path | None:
        """Where the JSON record goes (``None`` when no notebook name was given)."""
        if not self.notebook:
            return None
        return (self.out_dir or build_root()) / f"{self.notebook}.claims.json"

    def _save(self) -> None:
        """Rewrite the record; a failure to write (a read-only or full disk, the folder gone)
        is warned about once and never hides a verdict."""
        if self.path is None or not self.write:
            return
        try:
            write_json_atomic(self.path, self.record())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"could not write the claims record {self.path} ({type(exc).__name__}: "
                    f"{exc}); the verdicts are still printed and checked",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def check(
        self,
        name: str,
        measured: Any,
        expected: Any,
        *,
        kind: str,
        compare: str = "close",
        tol: float = 0.0,
        rtol: float = 0.0,
        holds_at: Sequence[str] = PROFILES,
        note: str = "",
        paper_value: Any = None,
        spread: float = 0.0,
    ) -> Verdict:
        """Check one claim; print its verdict; raise :class:`ClaimFailed` if it fails at a
        profile listed in ``holds_at``.

        ``kind`` is ``"paper"`` (a statement of the paper; give its own number or words as
        ``paper_value`` where it has one) or ``"sanity"`` (an identity or implementation
        property, also tested in ``tests/``). There is no default: every check says which."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if compare not in COMPARISONS:
            raise ValueError(f"compare must be one of {COMPARISONS}, got {compare!r}")
        if tol < 0 or rtol < 0:
            raise ValueError(f"tol and rtol must be >= 0, got tol={tol}, rtol={rtol}")
        if not 0 <= spread < 1:
            raise ValueError(f"spread must be in [0, 1), got {spread!r}")
        if isinstance(holds_at, str):
            holds_at = (holds_at,)
        unknown = [p for p in holds_at if p not in PROFILES]
        if unknown:
            raise ValueError(f"holds_at must list profiles from {PROFILES}, got {unknown}")
        measured, expected = _plain(measured), _plain(expected)
        if compare == "in" and not (isinstance(expected, list) and len(expected) == 2):
            raise ValueError(f"compare='in' needs expected=(low, high), got {expected!r}")
        numeric = isinstance(expected, (int, float)) and not isinstance(expected, bool)
        if compare not in ("==", "in") and not numeric:
            raise ValueError(
                f"compare={compare!r} needs a numeric expected value, got {expected!r}"
            )
        verdict = Verdict(
            name=name,
            measured=measured,
            expected=expected,
            compare=compare,
            tol=float(tol),
            rtol=float(rtol),
            holds=bool(evaluate(measured, expected, compare, tol, rtol)),
            required=self.profile in holds_at,
            profile=self.profile,
            holds_at=list(holds_at),
            note=note,
            kind=kind,
            paper_value=_plain(paper_value),
            spread=float(spread),
        )
        self.verdicts = [v for v in self.verdicts if v.name != name] + [verdict]
        self._save()
        if self.verbose:
            print(verdict.line())
        if verdict.status == "FAILED":
            raise ClaimFailed(
                f"{self.paper}: claim {name!r} must hold at profile {self.profile!r} but "
                f"measured {_fmt(measured)}, expected {verdict.expected_text}"
            )
        return verdict

    def table(self) -> str:
        """The verdicts as a plain-text table."""
        return format_table([self.record()])

    def record(self) -> dict[str, Any]:
        """All verdicts as a JSON-ready dict."""
        return {
            "paper": self.paper,
            "notebook": self.notebook,
            "profile": self.profile,
            "python": platform.python_version(),
            "torch_threads": _torch_threads(),
            "finished": self.finished,
            "verdicts": [asdict(v) | {"status": v.status} for v in self.verdicts],
        }

    def report(self) -> list[Verdict]:
        """Print the verdict table and mark the run finished in the JSON record
        ``<out_dir>/<notebook>.claims.json``."""
        print(self.table())
        self.finished = True
        self._save()
        if self.path is not None and self.write and not self._warned:
            print(f"verdicts written to {self.path}")
        return list(self.verdicts)


def _torch_threads() -> int | None:
    """The CPU threads torch computes with in this process (the notebook's kernel, where a
    record is written), or None when torch is not loaded."""
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON to ``path`` (:func:`gradcourse.paths.write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def check_record(obj: Any) -> dict[str, Any]:
    """``obj`` if it is a claims record as :meth:`Claims.record` writes it (a dict with a
    ``verdicts`` list whose items carry every :class:`Verdict` field); else ValueError saying
    what is wrong. Records written before ``finished`` existed count as finished."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    verdicts = obj.get("verdicts")
    if not isinstance(verdicts, list):
        raise ValueError("it has no 'verdicts' list")
    for i, v in enumerate(verdicts):
        missing = [k for k in _REQUIRED_FIELDS if not isinstance(v, dict) or k not in v]
        if missing:
            raise ValueError(f"verdict {i} lacks {', '.join(missing)}")
        if v["compare"] not in COMPARISONS:
            raise ValueError(f"verdict {i} has an unknown comparison {v['compare']!r}")
        if v.get("kind", "paper") not in KINDS:
            raise ValueError(f"verdict {i} has an unknown kind {v['kind']!r}")
    return {"paper": "?", "notebook": None, "profile": "?", "finished": True} | obj


_REQUIRED_FIELDS = [f.name for f in fields(Verdict) if f.default is MISSING]


def verdict_from_dict(v: dict[str, Any]) -> Verdict:
    """A :class:`Verdict` from its JSON form (fields added later take their defaults)."""
    return Verdict(**{f.name: v[f.name] for f in fields(Verdict) if f.name in v})


def counts(verdicts: Sequence[Verdict]) -> dict[str, tuple[int, int]]:
    """(held, checked) for the paper claims required at the run's profile (``required``), the
    paper claims reported there (``report_only``) and the sanity checks (``sanity``)."""
    groups = {
        "required": [v for v in verdicts if v.kind == "paper" and v.required],
        "report_only": [v for v in verdicts if v.kind == "paper" and not v.required],
        "sanity": [v for v in verdicts if v.kind == "sanity"],
    }
    return {k: (sum(v.holds for v in vs), len(vs)) for k, vs in groups.items()}


def summary(verdicts: Sequence[Verdict]) -> str:
    """One line counting paper claims and sanity checks separately, e.g. "paper claims: 12
    required here, 12 reproduced; 3 report-only (1 reproduced); sanity checks: 4 of 4 passed"."""
    c = counts(verdicts)
    line = (
        f"paper claims: {c['required'][1]} required here, {c['required'][0]} reproduced; "
        f"{c['report_only'][1]} report-only ({c['report_only'][0]} reproduced); "
        f"sanity checks: {c['sanity'][0]} of {c['sanity'][1]} passed"
    )
    failed = sum(v.status == "FAILED" for v in verdicts)
    return line + (f"; {failed} FAILED" if failed else "")


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """One table of every claim in ``records`` (as produced by :meth:`Claims.record`), with the
    :func:`summary` line of all of them."""
    header = ("paper", "kind", "claim", "measured", "expected", "verdict", "profile")
    rows, verdicts = [], []
    for rec in records:
        for v in rec["verdicts"]:
            verdict = verdict_from_dict(v)
            verdicts.append(verdict)
            rows.append(
                (
                    rec["paper"],
                    verdict.kind,
                    verdict.name,
                    _fmt(verdict.measured),
                    verdict.expected_text,
                    verdict.status,
                    verdict.profile,
                )
            )
    if not rows:
        return "(no claims checked)"
    widths = [min(48, max(len(str(r[i])) for r in [header, *rows])) for i in range(len(header))]

    def fmt_row(row: Sequence[str]) -> str:
        cells = []
        for text, width in zip(row, widths, strict=True):
            text = str(text)
            cells.append(text if len(text) <= width else text[: width - 1] + "…")
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [fmt_row(header), fmt_row(["-" * w for w in widths])]
    lines += [fmt_row(r) for r in rows]
    lines.append(summary(verdicts))
    return "\n".join(lines)
