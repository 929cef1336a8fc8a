"""The course without a browser: ``python -m gradcourse list | run | report``.

- ``list``: every notebook with its paper and the claims it checks.
- ``run NOTEBOOK... [--profile P]``: execute notebooks headlessly into ``build/`` (the executed
  ``.ipynb`` is kept, next to the JSON record of its claim verdicts), with a progress bar.
- ``run ... --record``: also keep the verdicts in ``results/<profile>/`` (committed).
- ``report``: one table of every claim of every executed notebook; ``report --results``: the
  course scorecard across profiles from ``results/``.
- ``compare FRESH --profile ci``: a fresh run's verdicts against the recorded ones.
- ``site [--profile P]``: the course as a static site in ``build/site/<P>/``.
- ``data [--download]``: check that Fashion-MNIST is on disk (and valid), or download it.
- ``exercises``: every coding exercise: its function, its task, what it is checked against.
- ``student [--out DIR] [--run]``: the student version (exercise solutions removed by nbgrader) in
  ``build/student/``; ``--run`` executes it and checks that every exercise says "not attempted".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .claims import check_record, format_table
from .paths import build_root, check_writable, write_text_atomic
from .profile import PROFILES, resolve_profile_name
from .runner import find_notebooks, notebooks_dir, run_notebook, run_notebooks


@dataclass
class NotebookInfo:
    """What the first markdown cell of a notebook says: title, paper, claims."""

    path: Path
    title: str
    paper: str
    claims: list[str] = field(default_factory=list)


def describe(path: Path) -> NotebookInfo:
    """Read a notebook's header cell. The convention (see README, "Adding a notebook"):
    a ``# Title`` line, a ``**Paper**: ...`` line, and a ``## Claims`` section with a
    numbered list."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    header = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    title = next((ln[2:].strip() for ln in header.splitlines() if ln.startswith("# ")), path.stem)
    paper_match = re.search(r"^\*\*Paper\*\*:?\s*(.+)$", header, flags=re.MULTILINE)
    claims: list[str] = []
    in_claims = False
    for line in header.splitlines():
        if line.startswith("#"):
            in_claims = line.lstrip("#").strip().lower().startswith("claims")
            continue
        item = re.match(r"^\s*\d+\.\s+(.+)$", line)
        if in_claims and item:
            claims.append(item.group(1).strip())
    return NotebookInfo(path, title, paper_match.group(1).strip() if paper_match else "", claims)


def cmd_list(args: argparse.Namespace) -> int:
    paths = find_notebooks(Path(args.dir) if args.dir else None)
    if not paths:
        print(f"no notebooks found in {args.dir or notebooks_dir()}")
        return 1
    for path in paths:
        info = describe(path)
        print(f"{path.name}: {info.title}")
        if info.paper:
            print(f"    paper: {info.paper}")
        for i, claim in enumerate(info.claims, 1):
            print(f"    claim {i}: {claim}")
    return 0


def _resolve_notebook(name: str) -> Path:
    """Accept a path, a file name in notebooks/, or a prefix such as ``00`` or ``00_tour``."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    matches = [p for p in find_notebooks() if p.name == name or p.stem.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(p.name for p in find_notebooks()) or "none"
    raise SystemExit(
        f"notebook {name!r} {'is ambiguous' if matches else 'not found'}; notebooks: {known}"
    )


#: How far a fresh run's measured numbers may sit from the recorded ones (``compare``): the
#: ``ci`` profile is single-threaded and seeded, so numbers differ only through the rounding of
#: the CPU's vector kernels (plain, AVX2, AVX-512) and the thread count, amplified by training.
#: Measured over those kernels with 1 and 2 threads: at most 4e-4 relative on trained
#: quantities (notebook 02), one test example in 1,000 (0.001) on accuracy differences
#: (notebook 04), rounding level on identities. Verdicts must match exactly.
RTOL = 1e-2
ATOL = 5e-3


def cmd_run(args: argparse.Namespace) -> int:
    profile = resolve_profile_name(args.profile)
    paths = [_resolve_notebook(n) for n in args.notebooks] or find_notebooks()
    # every folder this run writes into, checked before the first notebook runs for minutes
    try:
        out_dir = Path(args.out) if args.out else build_root()
        check_writable(
            out_dir, "the executed notebooks and their claim records",
            "Pass another folder with --out (or set GRADCOURSE_BUILD), or make this one writable.",
        )  # fmt: skip
        if args.record:
            from .results import results_root

            check_writable(
                results_root() / profile, f"the recorded verdicts of profile {profile!r}",
                "Set GRADCOURSE_RESULTS to a writable folder, or make this one writable.",
            )  # fmt: skip
    except OSError as exc:
        raise SystemExit(f"gradcourse run: {exc}") from exc
    failures = 0
    for path in paths:
        print(f"running {path.name} (profile {profile}) ...", flush=True)
        record_path = out_dir / f"{path.stem}.claims.json"
        record_path.unlink(missing_ok=True)  # a notebook that fails early must not leave an old one
        out_path, seconds, error = run_notebook(
            path, out_dir, profile, timeout=args.timeout, progress=not args.quiet
        )
        status = "ok" if error is None else f"FAILED: {error}"
        print(f"  {path.name}: {status} in {seconds:.1f} s -> {out_path}", flush=True)
        failures += error is not None
        if args.record:
            import nbformat

            from . import results

            claims_record = None
            if record_path.is_file():
                claims_record = check_record(json.loads(record_path.read_text(encoding="utf-8")))
            kept = results.record_run(
                claims_record,
                notebook=path.stem,
                profile=profile,
                seconds=seconds,
                executed=nbformat.read(out_path, as_version=4),
                error=error,
            )
            print(f"  recorded -> {kept}", flush=True)
    return 1 if failures else 0


def load_records(directory: Path) -> tuple[list[dict], list[str]]:
    """The claim records in ``directory`` and, for each file that is not one, a line naming it
    and saying why (unreadable, not UTF-8, not JSON, not a record); those files are skipped."""
    records, problems = [], []
    for path in sorted(directory.glob("*.claims.json")):
        try:
            records.append(check_record(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is one
            problems.append(f"{path}: skipped, not a claims record ({exc})")
    return records, problems


def cmd_results(args: argparse.Namespace) -> int:
    """The course scorecard from results/ (``report --results``), optionally written into the
    README between its scorecard markers."""
    from . import results

    table = results.scorecard(Path(args.dir) if args.dir else None)
    if args.update_readme:
        readme = Path(args.update_readme)
        write_text_atomic(
            readme, results.replace_scorecard(readme.read_text(encoding="utf-8"), table)
        )
        print(f"scorecard written into {readme}")
    else:
        print(table)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """A fresh run's claim records (``FRESH``, e.g. the nbval run's build folder) against the
    recorded ones of ``--profile``: claims, kinds, verdicts, and numbers within tolerance."""
    from . import results

    fresh_records, problems = load_records(Path(args.fresh))
    if not fresh_records:
        problems.append(f"no claim records in {args.fresh}")
    root = Path(args.results) if args.results else None
    here = results.machine()  # the fresh records were made on this machine
    makers = set()
    for fresh in fresh_records:
        name = fresh.get("notebook")
        recorded = results.load(args.profile, name, root) if name else None
        if recorded is None:
            problems.append(
                f"{name}: nothing recorded at {args.profile}; run "
                f"`python -m gradcourse run {name} --profile {args.profile} --record`"
            )
            continue
        problems += results.compare(
            fresh, recorded, rtol=args.rtol, atol=args.atol, fresh_machine=here
        )
        maker = results.cpu_maker((recorded.get("machine") or {}).get("cpu"))
        if maker != results.cpu_maker(here["cpu"]):
            makers.add(maker)
    if makers:
        print(
            f"this CPU ({here['cpu']}) is not of the maker some of results/{args.profile} was "
            f"recorded on ({', '.join(sorted(makers))}): MKL's products round differently, so "
            f"those numbers are compared within rtol {results.CROSS_MAKER_RTOL:g}; verdicts, "
            "kinds and required profiles exactly"
        )
    for line in problems:
        print(line)
    if problems:
        print(
            f"{len(problems)} difference(s) from results/{args.profile}/: if a notebook changed, "
            f"re-record it (python -m gradcourse run NOTEBOOK --profile {args.profile} --record)"
        )
        return 1
    print(f"{len(fresh_records)} notebook(s) match results/{args.profile}/")
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    """Build the course site (what ``make site`` runs)."""
    from .site import build

    profile = resolve_profile_name(args.profile)
    start = time.perf_counter()
    try:
        build_dir = check_writable(
            Path(args.build) if args.build else build_root(), "the executed notebooks and the site",
            "Pass another folder with --build (or set GRADCOURSE_BUILD), or make this one writable.",
        )  # fmt: skip
    except OSError as exc:
        raise SystemExit(f"gradcourse site: {exc}") from exc
    out, failed = build(profile, build_dir, quiet=args.quiet, jobs=args.jobs)
    print(f"site at profile {profile}: {out / 'index.html'} ({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"these notebooks failed to execute (their pages show the error): {failed}")
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.results:
        return cmd_results(args)
    directory = Path(args.dir) if args.dir else build_root()
    records, problems = load_records(directory)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    if not records:
        print(f"no claim records in {directory}; run `python -m gradcourse run` first")
        return 1
    print(format_table(records))
    failed_runs = []
    for rec in records:
        name = f"{rec['notebook'] or rec['paper']} (profile {rec['profile']})"
        failed = [v["name"] for v in rec["verdicts"] if v["status"] == "FAILED"]
        if failed:
            failed_runs.append(f"{name}: claim failed: {'; '.join(failed)}")
        elif not rec["finished"]:
            count = len(rec["verdicts"])
            failed_runs.append(
                f"{name}: the run stopped before its verdict table, after {count} check(s): "
                "a cell raised (see the executed notebook)"
            )
    if failed_runs:
        print(f"\n{len(failed_runs)} run(s) failed:")
        for line in failed_runs:
            print(f"  {line}")
    return 1 if failed_runs or problems else 0


def cmd_data(args: argparse.Namespace) -> int:
    """Check that Fashion-MNIST is on disk and valid (downloading it with ``--download``)."""
    from . import data

    try:
        folder = data.fashion_mnist_files(download=args.download)
    except data.DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: the four files in {folder} are valid")
    return 0


def cmd_exercises(args: argparse.Namespace) -> int:
    from .exercises import EXERCISES, describe

    if args.name is not None and args.name not in EXERCISES:
        print(f"error: no exercise {args.name!r}; known: {', '.join(sorted(EXERCISES))}")
        return 2
    print(describe(args.name))
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    """Write the student version of the notebooks; with ``--run``, execute it and check that
    every exercise reports "not attempted" and that every notebook runs to its end."""
    import nbformat

    from .student import exercise_cells, feedback_lines, write_student_version

    paths = [_resolve_notebook(n) for n in args.notebooks] or find_notebooks()
    try:
        out_dir = check_writable(
            Path(args.out) if args.out else build_root() / "student", "the student version",
            "Pass another folder with --out (or set GRADCOURSE_BUILD), or make this one writable.",
        )  # fmt: skip
    except OSError as exc:
        raise SystemExit(f"gradcourse student: {exc}") from exc
    written, kept = write_student_version(paths, out_dir, force=args.force)
    count = sum(len(exercise_cells(nbformat.read(p, as_version=4))) for p in written)
    print(f"student version of {len(written)} notebook(s), {count} exercise(s): {out_dir}")
    for path in kept:
        print(f"  kept {path}: it holds your work (--force replaces it with a fresh copy)")
    if not args.run:
        return 0
    profile = resolve_profile_name(args.profile)
    problems = []
    print(f"running the student version at profile {profile}, {args.jobs} at a time ...")
    runs = run_notebooks(
        written, out_dir / "executed", profile, jobs=args.jobs, timeout=args.timeout,
        progress=not args.quiet,
    )  # fmt: skip
    for path, (out_path, seconds, error) in runs:
        executed = nbformat.read(out_path, as_version=4)
        lines = feedback_lines(executed)
        expected = len(exercise_cells(nbformat.read(path, as_version=4)))
        print(f"  {path.name}: {'ok' if error is None else 'FAILED: ' + error} in {seconds:.1f} s")
        if error is not None:
            problems.append(f"{path.name}: {error}")
        if len(lines) != expected:
            problems.append(
                f"{path.name}: {len(lines)} exercise feedback line(s), {expected} exercises"
            )
        for mark, name, message in lines:
            if mark != "…":
                problems.append(
                    f"{path.name}: exercise {name} did not say 'not attempted': {message}"
                )
    for line in problems:
        print(f"  problem: {line}")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradcourse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="notebooks with their paper and claims")
    p_list.add_argument("--dir", help="notebook directory (default: notebooks/)")
    p_list.set_defaults(func=cmd_list)
    p_run = sub.add_parser("run", help="execute notebooks headlessly into build/")
    p_run.add_argument("notebooks", nargs="*", help="paths or name prefixes (default: all)")
    p_run.add_argument(
        "--profile", default=None, help=f"one of {', '.join(PROFILES)}, auto (default: env/auto)"
    )
    p_run.add_argument("--out", help="output directory (default: build/)")
    p_run.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    p_run.add_argument("--quiet", action="store_true", help="no progress bar")
    p_run.add_argument(
        "--record", action="store_true", help="keep the verdicts in results/<profile>/ (committed)"
    )
    p_run.set_defaults(func=cmd_run)
    p_report = sub.add_parser("report", help="scorecard of every executed notebook's claims")
    p_report.add_argument(
        "--dir", help="directory of *.claims.json (default: build/; with --results: results/)"
    )
    p_report.add_argument(
        "--results",
        action="store_true",
        help="the course scorecard across profiles, from the recorded results/",
    )
    p_report.add_argument(
        "--update-readme", metavar="README", help="with --results: write it into README"
    )
    p_report.set_defaults(func=cmd_report)
    p_compare = sub.add_parser(
        "compare", help="a fresh run's claim records against the recorded results of a profile"
    )
    p_compare.add_argument("fresh", help="directory of the fresh run's *.claims.json")
    p_compare.add_argument("--profile", default="ci", choices=PROFILES)
    p_compare.add_argument("--results", help="results folder (default: results/)")
    p_compare.add_argument("--rtol", type=float, default=RTOL, help=f"default {RTOL:g}")
    p_compare.add_argument("--atol", type=float, default=ATOL, help=f"default {ATOL:g}")
    p_compare.set_defaults(func=cmd_compare)
    p_site = sub.add_parser("site", help="build the course site (executes what is not current)")
    p_site.add_argument("--profile", default="cpu", help="profile of the executed notebooks")
    p_site.add_argument("--build", help="build folder (default: build/)")
    p_site.add_argument("--quiet", action="store_true", help="no progress bars")
    p_site.add_argument(
        "--jobs", type=int, default=1,
        help="notebooks executed at a time (default: 1; each computes on 1 thread at ci and up "
        "to 2 at cpu: keep jobs x threads within the machine's cores)",
    )  # fmt: skip
    p_site.set_defaults(func=cmd_site)
    p_data = sub.add_parser("data", help="check that the course's dataset (Fashion-MNIST) is here")
    p_data.add_argument(
        "--download", action="store_true", help="download it with torchvision when it is missing"
    )
    p_data.set_defaults(func=cmd_data)
    p_ex = sub.add_parser("exercises", help="the coding exercises and what each is checked against")
    p_ex.add_argument("name", nargs="?", help="one exercise, e.g. 05.clip (default: all)")
    p_ex.set_defaults(func=cmd_exercises)
    p_student = sub.add_parser(
        "student", help="the student version: exercise solutions removed (nbgrader)"
    )
    p_student.add_argument("notebooks", nargs="*", help="paths or name prefixes (default: all)")
    p_student.add_argument("--out", help="output folder (default: build/student/)")
    p_student.add_argument(
        "--run", action="store_true", help="execute it and check every exercise is 'not attempted'"
    )
    p_student.add_argument(
        "--force", action="store_true", help="replace notebooks that hold a student's work"
    )
    p_student.add_argument("--profile", default="ci", help="profile of --run (default: ci)")
    p_student.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    p_student.add_argument(
        "--jobs", type=int, default=1,
        help="notebooks --run executes at a time (default: 1; each computes on 1 thread at ci "
        "and up to 2 at cpu: keep jobs x threads within the machine's cores)",
    )  # fmt: skip
    p_student.add_argument("--quiet", action="store_true", help="no progress bar")
    p_student.set_defaults(func=cmd_student)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # e.g. an unknown profile name
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
