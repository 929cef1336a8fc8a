"""Recorded verdicts at each profile: the course's scorecard.

``python -m gradcourse run --profile P --record`` keeps each notebook's claim verdicts in
``results/<P>/<notebook>.json`` (committed), with the machine, the library versions, the date
and the wall time per notebook and per section. From these files:

- each notebook's closing table (:func:`verdict_table`): claim, the paper's value, this run and
  the recorded ``ci``, ``cpu`` and ``gpu`` runs, each with its verdict;
- the course scorecard (:func:`scorecard`): paper claims required / reproduced per notebook
  and profile, shown in the README;
- the check that a fresh ``ci`` run still matches what is recorded (:func:`compare`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
from collections.abc import Sequence
from html import escape as html_escape
from pathlib import Path
from typing import Any

from .claims import (
    Verdict,
    _fmt,
    check_record,
    counts,
    significant_digits,
    verdict_from_dict,
    write_json_atomic,
)
from .paths import repo_root
from .profile import PROFILES

RESULTS_VAR = "GRADCOURSE_RESULTS"
MARK = {
    "reproduced": "✓",
    "passed": "✓",
    "FAILED": "✗",
    "not reproduced at this scale": "○",
    "not reproduced": "○",
}
LEGEND = (
    "✓ reproduced (a sanity check: passed); ✗ failed where required; ○ not reproduced where "
    "not required; **bold**: required at that profile; † not discriminating there (its control "
    "passed the check too, its rival was not excluded, or its bound did not bind); — not "
    "checked there; not run: no recorded run at that profile. *refuted by*: what would have "
    "refuted the claim, as measured in the first run shown."
)


def results_root() -> Path:
    """``$GRADCOURSE_RESULTS``, else ``<repo>/results`` (else ``./results`` outside a checkout)."""
    override = os.environ.get(RESULTS_VAR)
    if override:
        return Path(override).expanduser()
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "results"


# ---------------------------------------------------------------------------------------------
# Recording a run


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a run is recorded on: CPU model, logical cores, torch's threads and CPU
    kernel, and the GPU's name (``None`` without CUDA)."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(terse=True),
    }


def versions() -> dict[str, str]:
    import numpy
    import torch

    from . import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "gradcourse": __version__,
    }


def section_times(nb: Any) -> list[dict[str, Any]]:
    """Seconds spent per ``## `` section of an executed notebook, from the timestamps nbclient
    stores in each code cell's metadata (cells before the first section count as "setup")."""
    sections: list[dict[str, Any]] = [{"section": "setup", "seconds": 0.0}]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            heading = re.search(r"^##\s+(.+)$", cell.source, flags=re.MULTILINE)
            if heading:
                sections.append({"section": heading.group(1).strip(), "seconds": 0.0})
            continue
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and end:
            seconds = (_parse_time(end) - _parse_time(start)).total_seconds()
            sections[-1]["seconds"] += max(seconds, 0.0)
    for s in sections:
        s["seconds"] = round(s["seconds"], 2)
    return [s for s in sections if s["seconds"] > 0 or s["section"] != "setup"]


def _parse_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def record_run(
    claims_record: dict[str, Any] | None,
    *,
    notebook: str,
    profile: str,
    seconds: float,
    executed: Any = None,
    error: str | None = None,
    root: Path | None = None,
) -> Path:
    """Write ``results/<profile>/<notebook>.json``: the run's claims record (or, when the
    notebook left none, an empty unfinished one carrying ``error``) plus the machine, versions,
    date, wall time and per-section times."""
    record = (
        dict(claims_record)
        if claims_record is not None
        else {
            "paper": "?",
            "notebook": notebook,
            "profile": profile,
            "finished": False,
            "verdicts": [],
        }
    )
    record.update(
        notebook=notebook,
        profile=profile,
        error=error,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=round(seconds, 1),
        sections=section_times(executed) if executed is not None else [],
        machine=machine(),
        versions=versions(),
    )
    if record.get("torch_threads"):  # the notebook's own count (ci runs single-threaded)
        record["machine"]["torch_threads"] = record["torch_threads"]
    path = (root or results_root()) / profile / f"{notebook}.json"
    write_json_atomic(path, record)
    return path


def load(profile: str, notebook: str, root: Path | None = None) -> dict[str, Any] | None:
    """The recorded run of ``notebook`` at ``profile``, or ``None`` when there is none."""
    path = (root or results_root()) / profile / f"{notebook}.json"
    if not path.is_file():
        return None
    try:
        return check_record(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a results record ({err}); record it again with `python -m "
            f"gradcourse run {notebook} --profile {profile} --record`"
        ) from err


# ---------------------------------------------------------------------------------------------
# A notebook's closing table


def _cell(v: Verdict | None, recorded: bool) -> str:
    if v is None:
        return "—" if recorded else "not run"
    mark = MARK.get(v.status, "?") + ("†" if v.discriminating is False else "")
    return f"{v.measured_text} **{mark}**" if v.required else f"{v.measured_text} {mark}"


def split_claim_name(name: str) -> tuple[str, str]:
    """(short name, detail) of a claim named "what it says (how it is tested)": the detail is the
    last parenthesis when it closes the name (not one inside the statement); ("name", "")
    otherwise."""
    if not name.endswith(")"):
        return name, ""
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            short = name[:i].rstrip()
            return (short, name[i + 1 : -1]) if short and name[i - 1 : i] == " " else (name, "")
    return name, ""


class VerdictTable:
    """The closing table of a notebook: one row per claim, the paper's value, this run and the
    recorded runs at each profile. Shown as Markdown in Jupyter, as text by ``print``."""

    def __init__(self, header: Sequence[str], rows: list[list[str]], footer: list[str]):
        self.header, self.rows, self.footer = list(header), rows, footer

    def _markdown(self, *, html: bool) -> str:
        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        def claim(name: str) -> str:
            if not html:
                return esc(name)
            short, detail = split_claim_name(name)
            detail_html = html_escape(detail)
            return esc(html_escape(short)) + (
                f"<br><small>{esc(detail_html)}</small>" if detail else ""
            )

        lines = ["| " + " | ".join(self.header) + " |"]
        lines.append("|" + "---|" * len(self.header))
        lines += [
            "| " + " | ".join([claim(row[0]), *(esc(c) for c in row[1:])]) + " |"
            for row in self.rows
        ]
        return "\n".join(lines + [""] + [f"{line}  " for line in self.footer])

    def _repr_markdown_(self) -> str:
        """In Jupyter and on the site: each claim's name, with its test in small type below."""
        return self._markdown(html=True)

    def __str__(self) -> str:
        return self._markdown(html=False)


def verdict_table(notebook: str, current: Any = None, *, root: Path | None = None) -> VerdictTable:
    """The verdicts of ``notebook``: this run (``current``: a :class:`gradcourse.claims.Claims`
    or its record, optional) beside the recorded ``ci`` / ``cpu`` / ``gpu`` runs under
    ``results/``."""
    recorded = {p: load(p, notebook, root) for p in PROFILES}
    columns: dict[str, dict[str, Verdict]] = {}
    if isinstance(current, dict):
        columns["this run"] = {v["name"]: verdict_from_dict(v) for v in current["verdicts"]}
    elif current is not None:
        columns["this run"] = {v.name: v for v in current.verdicts}
    for p, rec in recorded.items():
        columns[p] = (
            {} if rec is None else {v["name"]: verdict_from_dict(v) for v in rec["verdicts"]}
        )
    names: list[str] = []
    for col in columns.values():
        names += [n for n in col if n not in names]
    this_run = columns.get("this run")
    rows = []
    for name in names:
        first = next(col[name] for col in columns.values() if name in col)
        paper = "" if first.paper_value is None else _fmt(first.paper_value)  # as the paper has it
        # a claim this run no longer checks: a record made by an older version of the notebook
        shown = (
            name if this_run is None or name in this_run else f"{name} (not checked by this run)"
        )
        with significant_digits(3):  # measured values, at a page's width
            row = [shown, first.kind, paper, first.expected_text, first.refutation_text]
            for label, col in columns.items():
                ran = label == "this run" or recorded[label] is not None
                row.append(_cell(col.get(name), ran))
        rows.append(row)
    footer = [LEGEND]
    for p, rec in recorded.items():
        if rec is None:
            footer.append(f"{p}: not run yet (no results/{p}/{notebook}.json).")
        else:
            m = rec.get("machine") or {}
            where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('torch_threads', '?')} thread(s)"
            state = "" if rec.get("finished", True) else " — the run did not finish"
            footer.append(
                f"{p}: {rec.get('date', '?')[:10]}, {rec.get('wall_seconds', '?')} s on {where}"
                f"{state}."
            )
    header = ["claim", "kind", "paper", "expected", "refuted by", *columns]
    return VerdictTable(header, rows, footer)


# ---------------------------------------------------------------------------------------------
# The course scorecard


def _counts(rec: dict[str, Any]) -> str:
    c = counts([verdict_from_dict(v) for v in rec["verdicts"]])
    text = "{}/{} required, {}/{} other; discriminating {}/{}; sanity {}/{}".format(
        *c["required"], *c["report_only"], *c["discriminating"], *c["sanity"]
    )
    return text if rec.get("finished", True) else f"{text} (unfinished)"


def scorecard(root: Path | None = None, notebooks: Sequence[str] | None = None) -> str:
    """The course's scorecard as a Markdown table: per notebook and profile, paper claims
    reproduced / required there, and reproduced / checked among the report-only ones."""
    root = root or results_root()
    if notebooks is None:
        names = {p.stem for prof in PROFILES for p in (root / prof).glob("*.json")}
        notebooks = sorted(names)
    lines = [
        "| notebook | " + " | ".join(f"`{p}`" for p in PROFILES) + " |",
        "|---|" + "---|" * len(PROFILES),
    ]
    for nb in notebooks:
        cells = []
        for prof in PROFILES:
            rec = load(prof, nb, root)
            cells.append("not run" if rec is None else _counts(rec))
        lines.append(f"| `{nb}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Per notebook and profile: paper claims *reproduced/required* there; then "
        "*reproduced/checked* among the paper claims reported there but required only at a "
        "larger scale (or nowhere, with the measured reason in the notebook); then how many of "
        "all its paper claims are *discriminating* there (the claim's control failed the same "
        "check, its rival value lay outside the measured band, or its bound bound); then the "
        "sanity checks (identities and implementation properties) passed/checked."
    )
    return "\n".join(lines)


SCORECARD_START = "<!-- scorecard: generated by `make scorecard`; do not edit -->"
SCORECARD_END = "<!-- /scorecard -->"


def replace_scorecard(text: str, table: str) -> str:
    """``text`` (the README) with the block between the scorecard markers replaced."""
    start, end = text.find(SCORECARD_START), text.find(SCORECARD_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {SCORECARD_START!r} ... {SCORECARD_END!r} block")
    return text[: start + len(SCORECARD_START)] + "\n" + table + "\n" + text[end:]


# ---------------------------------------------------------------------------------------------
# A fresh run against the recorded one


def _numbers(value: Any) -> list[float] | None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, list):
        out = []
        for v in value:
            sub = _numbers(v)
            if sub is None:
                return None
            out += sub
        return out
    return None


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    na, nb = _numbers(a), _numbers(b)
    if na is None or nb is None:
        return a == b
    if len(na) != len(nb):
        return False
    for x, y in zip(na, nb, strict=True):
        if (math.isnan(x) and math.isnan(y)) or x == y:  # x == y: equal infinities too
            continue
        if math.isinf(x) or math.isinf(y):  # an infinity is close only to itself
            return False
        if not abs(x - y) <= atol + rtol * max(abs(x), abs(y)):
            return False
    return True


#: How far apart the numbers of the same seeded run may be on two machines whose matrix products
#: round differently: torch's CPU products go through Intel's MKL, which picks its kernels by the
#: processor's maker, so an Intel and an AMD machine differ in the last bits of every product,
#: and training amplifies that. Measured: every notebook at ``ci`` on an Intel Xeon against
#: ``results/ci`` recorded on an AMD EPYC (same torch, same AVX-512 kernels of torch's own): the
#: verdicts, kinds and required profiles all agreed, and 20 numbers of 6 notebooks differed by up
#: to 0.60 relative (notebook 06's lower end of a band over 2 seeds; notebooks 08 and 11 up to 0.58
#: and 0.5). Across makers the numbers are compared within this, everything else exactly.
CROSS_MAKER_RTOL = 0.75


def cpu_maker(cpu: str | None) -> str:
    """``"intel"``, ``"amd"`` or ``"other"``, from a CPU model string (:func:`machine`'s
    ``"cpu"``); MKL's choice of kernels depends on it."""
    text = (cpu or "").lower()
    if "intel" in text:
        return "intel"
    if "amd" in text:
        return "amd"
    return "other"


def compare(
    fresh: dict[str, Any],
    recorded: dict[str, Any],
    *,
    rtol: float,
    atol: float,
    fresh_machine: dict[str, Any] | None = None,
) -> list[str]:
    """What differs between a fresh claims record and the recorded one: claim names and their
    order, kinds, where each is required, verdicts, and measured numbers beyond
    ``atol + rtol * max(|a|, |b|)`` (rtol raised to a claim's declared ``spread``, for the
    measurements of a chaotic run, and to :data:`CROSS_MAKER_RTOL` when the fresh run's CPU,
    ``fresh_machine`` or the record's own ``"machine"``, is known and of another maker than the
    recorded run's). Empty when they agree."""
    label = recorded.get("notebook") or fresh.get("notebook") or "?"
    cpus = ((fresh_machine or fresh.get("machine") or {}).get("cpu"),
            (recorded.get("machine") or {}).get("cpu"))  # fmt: skip
    across = None not in cpus and cpu_maker(cpus[0]) != cpu_maker(cpus[1])
    fv = [verdict_from_dict(v) for v in fresh["verdicts"]]
    rv = [verdict_from_dict(v) for v in recorded["verdicts"]]
    if [v.name for v in fv] != [v.name for v in rv]:
        return [
            f"{label}: the claims differ: fresh {[v.name for v in fv]}, "
            f"recorded {[v.name for v in rv]}"
        ]
    problems = []
    if not fresh.get("finished", True):
        problems.append(f"{label}: the fresh run did not finish")
    for a, b in zip(fv, rv, strict=True):
        for field in ("kind", "holds_at", "status", "compare", "discriminating"):
            if getattr(a, field) != getattr(b, field):
                problems.append(
                    f"{label}: {a.name!r}: {field} {getattr(a, field)!r} now, "
                    f"{getattr(b, field)!r} recorded"
                )
        # an expected value can be measured too (a standard error, an exact trace): both are
        # compared within the tolerance
        # a claim that declares a spread (a chaotic run) is allowed that much, relative
        allowed = max(rtol, a.spread, b.spread, CROSS_MAKER_RTOL if across else 0.0)
        for field in ("measured", "expected"):
            now, then = getattr(a, field), getattr(b, field)
            if not _close(now, then, allowed, atol):
                problems.append(
                    f"{label}: {a.name!r}: {field} {_fmt(now)} now, {_fmt(then)} recorded "
                    f"(beyond rtol {allowed:g}, atol {atol:g})"
                )
        # what would have refuted it: the same controls, rivals and bounds, their values within
        # the same tolerance
        ra, rb = a.refutations, b.refutations
        if [(r["kind"], r["label"]) for r in ra] != [(r["kind"], r["label"]) for r in rb]:
            problems.append(
                f"{label}: {a.name!r}: refuted by {[r['label'] for r in ra]} now, "
                f"{[r['label'] for r in rb]} recorded"
            )
            continue
        for x, y in zip(ra, rb, strict=True):
            for key in ("value", "band"):
                if not _close(x.get(key), y.get(key), allowed, atol):
                    problems.append(
                        f"{label}: {a.name!r}: {x['kind']} {x['label']!r}: {key} "
                        f"{_fmt(x.get(key))} now, {_fmt(y.get(key))} recorded "
                        f"(beyond rtol {allowed:g}, atol {atol:g})"
                    )
    return problems
