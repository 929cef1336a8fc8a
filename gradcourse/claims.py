"""Paper claims, checked in code: measured vs expected, a verdict per claim, a table at the end.

    claims = gc.claims.Claims(paper="Sagun et al. 2017", notebook="01_hessian_spectrum")
    claims.check("outliers = number of classes", measured=n_out, expected=k,
                 kind="paper", holds_at=("cpu", "gpu"))
    ...
    claims.report()   # table, and a JSON record beside the executed notebook

A check prints one line. In the profiles listed in ``holds_at`` a failed check raises
:class:`ClaimFailed` (so nbval fails); in the others it is reported as *not reproduced at this
scale*. Tolerances are arguments of the check, fixed before the result is seen.

A paper claim must also say what would have refuted it, and show that the check can produce
it (``refute=``, required for ``kind="paper"``):

- :func:`control`: the same check applied to a measurement where the effect must be absent (a
  random ranking, an untrained net, GD instead of SGD, the other variant); the check must
  *fail* on it;
- :func:`rival`: the value a competing explanation predicts; the measured band must exclude it
  (or, with no band, the check must fail on it);
- :func:`bound`: a bound that binds: its slack (bound / measured at the tightest case) within
  a stated factor, or a violation the bound predicts, seen.

A claim whose refutation does not discriminate (its control passes too) is reported as *not
discriminating*, in the printed line, the JSON record, the verdict table and the scorecard.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
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


#: Significant digits of the numbers in verdict texts: 4 in the printed verdicts, 3 in the
#: verdict tables (:func:`significant_digits`), where many columns share a page's width.
_DIGITS = [4]


@contextmanager
def significant_digits(digits: int) -> Iterator[None]:
    """Within the block, verdict texts (measured, expected, refutations) show ``digits``
    significant digits."""
    _DIGITS.append(int(digits))
    try:
        yield
    finally:
        _DIGITS.pop()


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{_DIGITS[-1]}g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


REFUTATIONS: tuple[str, ...] = ("control", "rival", "bound")
SOURCES: tuple[str, ...] = ("ours", "paper", "theory")


@dataclass(frozen=True)
class Refutation:
    """What would have refuted a paper claim: a control, a rival value, or a bound's slack.

    Made by :func:`control`, :func:`rival` or :func:`bound`; :meth:`Claims.check` decides
    whether it discriminates and keeps that in the verdict."""

    kind: str  # "control", "rival" or "bound"
    label: str  # what it is, in words: "a random 50%", "Dyer & Gur-Ari: slope -1"
    value: Any  # control: its measured value; rival: the rival's value; bound: the slack
    band: Any = None  # rival: the measured interval that must exclude the value
    near: float | None = None  # bound: it binds when the slack is at most this
    violation: bool | None = None  # bound: a violation it predicts was seen (True) or not

    def discriminates(self, compare: str, expected: Any, tol: float, rtol: float) -> bool:
        """Whether this refutation shows that the check could have failed.

        control: the same check fails on the control's (finite) value; rival: the rival's value
        lies outside the band (without a band: the check fails on it); bound: the slack is finite
        and at most ``near``, or a predicted violation was seen."""
        if self.kind == "bound":
            slack_binds = _finite(self.value) and self.value <= self.near
            return bool(slack_binds or self.violation is True)
        if self.kind == "rival" and self.band is not None:
            lo, hi = self.band
            return (
                _finite(self.value) and _finite(lo) and _finite(hi) and not lo <= self.value <= hi
            )
        if compare == "==":
            return self.value is not None and self.value != expected
        if not _finite(self.value):  # a control that could not be measured shows nothing
            return False
        return not evaluate(self.value, expected, compare, tol, rtol)

    def text(self, unit: str = "") -> str:
        """One phrase: what it is and what was measured (values in ``unit``; a bound's slack is
        a ratio)."""
        u = f" {unit}" if unit else ""
        if self.kind == "bound":
            seen = {True: "; a predicted violation was seen", False: "; no predicted violation"}
            return (
                f"bound {self.label}: slack {_fmt(self.value)} (binds at <= {_fmt(self.near)})"
                + seen.get(self.violation, "")
            )
        if self.kind == "rival" and self.band is not None:
            lo, hi = self.band
            return (
                f"rival {self.label}: {_fmt(self.value)}{u} against the band "
                f"[{_fmt(lo)}, {_fmt(hi)}]{u}"
            )
        what = "measured" if self.kind == "control" else "predicts"
        return f"{self.kind} {self.label}: {what} {_fmt(self.value)}{u}"


def control(label: str, measured: Any) -> Refutation:
    """A control: ``measured`` is the same quantity the claim checks, measured where the effect
    must be absent (a random ranking, an untrained net, shuffled labels, GD instead of SGD, the
    other variant). The claim discriminates when the same check *fails* on it."""
    return Refutation("control", _label(label), _plain(measured))


def rival(label: str, value: Any, band: Sequence[float] | None = None) -> Refutation:
    """A rival: ``value`` is what a competing explanation predicts for the measured quantity.
    With ``band`` (the measured interval, low and high), the claim discriminates when the band
    excludes the value; without one, when the check fails on the value."""
    if band is not None:
        band = _plain(band)
        if not (isinstance(band, list) and len(band) == 2):
            raise ValueError(f"band must be (low, high), got {band!r}")
    return Refutation("rival", _label(label), _plain(value), band=band)


def bound(label: str, slack: Any, *, near: float, violation: bool | None = None) -> Refutation:
    """A bound that binds: ``slack`` is the bound divided by the measured value at the case
    closest to it (>= 1 when the bound holds). The claim discriminates when the slack is at most
    ``near`` (a measured case near the bound) or when ``violation`` is True (a case where the
    bound predicts a violation showed it)."""
    if not (isinstance(near, (int, float)) and not isinstance(near, bool) and near >= 1):
        raise ValueError(f"near must be a number >= 1 (a slack factor), got {near!r}")
    if violation is not None and not isinstance(violation, (bool,)):
        violation = bool(violation)
    return Refutation("bound", _label(label), _plain(slack), near=float(near), violation=violation)


def _label(label: Any) -> str:
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a refutation needs a label saying what it is, got {label!r}")
    return label.strip()


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
    # what would have refuted a paper claim (Refutation fields, plus whether it discriminates)
    refutations: list[dict[str, Any]] = field(default_factory=list)
    # where the expected value comes from: "ours" (a margin the course fixed in advance),
    # "paper" (the paper's own number) or "theory" (a bound or identity derived exactly)
    source: str = "ours"
    unit: str = ""  # the unit of measured and expected values, for display ("points", "ratio")

    @property
    def discriminating(self) -> bool | None:
        """For a paper claim: whether every refutation it states shows that the check could
        have failed (False when it states none: a record from before refutations existed).
        None for a sanity check."""
        if self.kind != "paper":
            return None
        return bool(self.refutations) and all(r.get("discriminates") for r in self.refutations)

    @property
    def status(self) -> str:
        if self.holds:
            return "reproduced" if self.kind == "paper" else "passed"
        if self.required:
            return "FAILED"
        # required at a larger scale: a miss here is the scale's; required nowhere: the note
        # gives the measured cause (the variant, the paper, or the scale)
        return "not reproduced at this scale" if self.holds_at else "not reproduced"

    @property
    def expected_text(self) -> str:
        symbol = SYMBOLS[self.compare]
        unit = f" {self.unit}" if self.unit else ""
        source = f" ({self.source})" if self.kind == "paper" and self.source != "ours" else ""
        if self.compare == "in":
            lo, hi = self.expected
            return f"{symbol} [{_fmt(lo)}, {_fmt(hi)}]{unit}{source}"
        slack = []
        if self.tol:
            slack.append(f"±{_fmt(self.tol)}")
        if self.rtol:
            slack.append(f"±{_fmt(100 * self.rtol)}%")
        return (
            f"{symbol} {_fmt(self.expected)}{unit}"
            + (f" ({' '.join(slack)})" if slack else "")
            + source
        )

    @property
    def measured_text(self) -> str:
        return _fmt(self.measured) + (f" {self.unit}" if self.unit else "")

    @property
    def refutation_text(self) -> str:
        """What would have refuted the claim and whether it discriminates, in one phrase
        (empty for a sanity check)."""
        if self.kind != "paper":
            return ""
        if not self.refutations:
            return "no refutation stated: not discriminating"
        parts = []
        for r in self.refutations:
            ref = Refutation(**{k: r.get(k) for k in _REFUTATION_FIELDS})
            outcome = "discriminates" if r.get("discriminates") else "does NOT discriminate"
            parts.append(f"{ref.text(self.unit)} -> {outcome}")
        return "; ".join(parts)

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
        line = (
            f"[{mark}] {kind}{self.name}: measured {self.measured_text}, expected "
            f"{self.expected_text} -> {self.status}{where}{note}"
        )
        if self.kind == "paper":
            line += f"\n    refuted by: {self.refutation_text}"
        return line


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
        refute: Refutation | Sequence[Refutation] | None = None,
        source: str = "ours",
        unit: str = "",
    ) -> Verdict:
        """Check one claim; print its verdict; raise :class:`ClaimFailed` if it fails at a
        profile listed in ``holds_at``.

        ``kind`` is ``"paper"`` (a statement of the paper; give its own number or words as
        ``paper_value`` where it has one) or ``"sanity"`` (an identity or implementation
        property, also tested in ``tests/``). There is no default: every check says which.

        ``refute`` (required for a paper claim): what would have refuted it, one or more of
        :func:`control`, :func:`rival` and :func:`bound`; the claim is *discriminating* when
        every one of them shows the check could have failed. ``source`` says where the expected
        value comes from: ``"ours"`` (a margin fixed in advance by the course), ``"paper"`` or
        ``"theory"``. ``unit`` is shown beside the numbers ("points", "ratio", "share")."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not isinstance(unit, str):
            raise ValueError(f"unit must be a string, got {unit!r}")
        refutations = _refutations(refute)
        if kind == "paper" and not refutations:
            raise ValueError(
                f"claim {name!r}: a paper claim must say what would have refuted it: pass "
                "refute=gc.claims.control(...), rival(...) or bound(...) (or make it a sanity "
                "check if it is an identity or a property of the implementation)"
            )
        if kind == "sanity" and refutations:
            raise ValueError(f"claim {name!r}: refute= is for paper claims, not sanity checks")
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
            refutations=[
                asdict(r) | {"discriminates": r.discriminates(compare, expected, tol, rtol)}
                for r in refutations
            ],
            source=source,
            unit=unit,
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
            "verdicts": [
                asdict(v) | {"status": v.status, "discriminating": v.discriminating}
                for v in self.verdicts
            ],
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


def _refutations(refute: Any) -> list[Refutation]:
    if refute is None:
        return []
    items = [refute] if isinstance(refute, Refutation) else list(refute)
    for r in items:
        if not isinstance(r, Refutation):
            raise ValueError(f"refute must be made by gc.claims.control, rival or bound, got {r!r}")
    return items


_REFUTATION_FIELDS = [f.name for f in fields(Refutation)]


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


_REQUIRED_FIELDS = [
    f.name for f in fields(Verdict) if f.default is MISSING and f.default_factory is MISSING
]


def verdict_from_dict(v: dict[str, Any]) -> Verdict:
    """A :class:`Verdict` from its JSON form (fields added later take their defaults)."""
    return Verdict(**{f.name: v[f.name] for f in fields(Verdict) if f.name in v})


def counts(verdicts: Sequence[Verdict]) -> dict[str, tuple[int, int]]:
    """(held, checked) for the paper claims required at the run's profile (``required``), the
    paper claims reported there (``report_only``) and the sanity checks (``sanity``); and
    (discriminating, all) for the paper claims (``discriminating``)."""
    groups = {
        "required": [v for v in verdicts if v.kind == "paper" and v.required],
        "report_only": [v for v in verdicts if v.kind == "paper" and not v.required],
        "sanity": [v for v in verdicts if v.kind == "sanity"],
    }
    out = {k: (sum(v.holds for v in vs), len(vs)) for k, vs in groups.items()}
    paper = [v for v in verdicts if v.kind == "paper"]
    out["discriminating"] = (sum(bool(v.discriminating) for v in paper), len(paper))
    return out


def summary(verdicts: Sequence[Verdict]) -> str:
    """One line counting paper claims and sanity checks separately, e.g. "paper claims: 12
    required here, 12 reproduced; 3 report-only (1 reproduced); 15 of 15 discriminating; sanity
    checks: 4 of 4 passed"."""
    c = counts(verdicts)
    line = (
        f"paper claims: {c['required'][1]} required here, {c['required'][0]} reproduced; "
        f"{c['report_only'][1]} report-only ({c['report_only'][0]} reproduced); "
        f"{c['discriminating'][0]} of {c['discriminating'][1]} discriminating; "
        f"sanity checks: {c['sanity'][0]} of {c['sanity'][1]} passed"
    )
    failed = sum(v.status == "FAILED" for v in verdicts)
    return line + (f"; {failed} FAILED" if failed else "")


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """One table of every claim in ``records`` (as produced by :meth:`Claims.record`), with the
    :func:`summary` line of all of them."""
    header = (
        "paper",
        "kind",
        "claim",
        "measured",
        "expected",
        "verdict",
        "discriminating",
        "profile",
    )
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
                    verdict.measured_text,
                    verdict.expected_text,
                    verdict.status,
                    {True: "yes", False: "NO", None: ""}[verdict.discriminating],
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
