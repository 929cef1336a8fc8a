"""Repository hygiene: notebooks stored clean, dependency lists in agreement, CI = README."""

from __future__ import annotations

import json
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_runtime_dependencies_agree_between_pyproject_and_environment_yml():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = {_name(r) for r in pyproject["project"]["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"], "conda-forge only (no -c pytorch: it stopped at 2.5)"
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(r) for r in dep["pip"] if not r.startswith("-e")}
            assert any(r.startswith("-e .") for r in dep["pip"]), "pip section installs the package"
        else:
            conda.add(_name(dep))
    conda -= {"python", "pip"}
    assert conda | pip == runtime, (
        f"only in pyproject: {sorted(runtime - conda - pip)}; "
        f"only in environment.yml: {sorted((conda | pip) - runtime)}"
    )


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    commands = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]
    assert commands[-2:] == ["make test", "make test-browser"]
    for command in ("make test", "make lab", "make test-browser"):
        assert command in readme


def test_readme_scorecard_matches_the_recorded_results():
    from gradcourse import results

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = results.scorecard(ROOT / "results")
    assert results.replace_scorecard(readme, table) == readme, (
        "the README's scorecard is out of date with results/: run `make scorecard`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_recorded_ci_and_cpu_results(path):
    from gradcourse import results

    for profile in ("ci", "cpu"):
        record = results.load(profile, path.stem, ROOT / "results")
        assert record is not None, f"{path.name}: nothing in results/{profile}/ (make reproduce)"
        assert record["finished"], f"{path.name}: the recorded {profile} run did not finish"
        assert record["verdicts"], f"{path.name}: the recorded {profile} run checked no claim"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_recorded_paper_claim_says_what_would_have_refuted_it(path):
    """The course's rule: a paper claim states a control, a rival or a bound, and one that does
    not discriminate at a recorded profile carries the reason (its note) in the record."""
    from gradcourse import results
    from gradcourse.claims import verdict_from_dict

    for profile in ("ci", "cpu"):
        record = results.load(profile, path.stem, ROOT / "results")
        if record is None:
            continue
        for v in map(verdict_from_dict, record["verdicts"]):
            if v.kind != "paper":
                continue
            assert v.refutations, f"{path.name} ({profile}): {v.name!r} states no refutation"
            if v.discriminating is False:
                assert v.note.strip(), (
                    f"{path.name} ({profile}): {v.name!r} does not discriminate and gives no reason "
                    "(note=)"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_raises_the_thread_count_at_ci(path):
    """`gc.profile()` runs ci on one thread: with two, a second busy process on a 2-core machine
    made notebook 09's cells 80x slower (OpenMP's barriers wait for a thread that cannot run).
    A notebook may choose more threads at its other profiles: `set_cpu_threads(1 if P.is_ci
    else n)`."""
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for call in re.findall(r"set_(?:cpu|num)_threads\(([^)\n]*)\)", code):
        arg = call.strip()
        assert arg == "1" or re.match(r"1 if P\.is_ci else ", arg), (
            f"{path.name}: set_cpu_threads({arg}) can raise the thread count at ci; "
            "write set_cpu_threads(1 if P.is_ci else n)"
        )
