"""The command line: list, run and report, on the tour notebook (executed for real, ci profile)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from gradcourse import cli
from gradcourse.claims import ClaimFailed, Claims, rival

# what would refute the test claims: a rival value outside its band (discriminating)
REFUTE = rival("no effect", 0.0, band=(1.0, 2.0))

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "notebooks" / "00_tour.ipynb"


def test_list_shows_paper_and_claims(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "00_tour.ipynb" in out and "paper:" in out and "claim 1:" in out


def test_every_notebook_declares_title_paper_and_claims():
    for path in cli.find_notebooks():
        info = cli.describe(path)
        assert info.title != path.stem, f"{path.name}: no '# Title' line in the first cell"
        assert info.paper, f"{path.name}: no '**Paper**:' line in the first cell"
        assert len(info.claims) >= 1, f"{path.name}: no numbered list under '## Claims'"


@pytest.fixture(scope="module")
def executed_tour(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    code = cli.main(["run", "00_tour", "--profile", "ci", "--out", str(out), "--quiet"])
    return code, out


def test_running_twice_gives_identical_verdicts_and_numbers(executed_tour, tmp_path):
    _, out = executed_tour
    assert cli.main(["run", "00_tour", "--profile", "ci", "--out", str(tmp_path), "--quiet"]) == 0
    first = json.loads((out / "00_tour.claims.json").read_text())["verdicts"]
    second = json.loads((tmp_path / "00_tour.claims.json").read_text())["verdicts"]
    assert first == second


def test_run_executes_the_tour_into_build(executed_tour):
    code, out = executed_tour
    assert code == 0
    nb = nbformat.read(out / "00_tour.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells), "every cell ran"
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert not errors
    record = json.loads((out / "00_tour.claims.json").read_text())
    assert record["profile"] == "ci" and record["notebook"] == "00_tour"
    assert record["verdicts"] and record["finished"]
    assert {(v["kind"], v["status"]) for v in record["verdicts"]} == {("sanity", "passed")}
    assert json.loads(TOUR.read_text())["cells"][1]["outputs"] == [], "source left untouched"


def test_report_prints_the_scorecard(executed_tour, capsys):
    _, out = executed_tour
    assert cli.main(["report", "--dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "torch.func toolkit tour" in text and "sanity checks:" in text and "FAILED" not in text


def test_report_fails_when_a_claim_failed(tmp_path, capsys):
    record = {
        "paper": "P",
        "notebook": "x",
        "profile": "ci",
        "verdicts": [
            dict(
                name="c",
                measured=2,
                expected=1,
                compare="==",
                tol=0,
                rtol=0,
                holds=False,
                required=True,
                profile="ci",
                holds_at=["ci"],
                note="",
                status="FAILED",
            )
        ],
    }
    (tmp_path / "x.claims.json").write_text(json.dumps(record))
    (tmp_path / "broken.claims.json").write_text("{not json")
    assert cli.main(["report", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "broken.claims.json: skipped" in captured.err
    assert "x (profile ci): claim failed: c" in captured.out


def test_a_failed_run_replaces_the_previous_record(tmp_path, capsys):
    # run 1 passes and reports; run 2 fails a required claim before report(): `report` must
    # show run 2's failure, not run 1's verdicts as current
    first = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    first.check("c", 1.0, 1.0, kind="paper", refute=REFUTE)
    first.report()
    assert cli.main(["report", "--dir", str(tmp_path)]) == 0
    second = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    with pytest.raises(ClaimFailed):
        second.check("c", 2.0, 1.0, holds_at=("ci",), kind="paper", refute=REFUTE)
    capsys.readouterr()
    assert cli.main(["report", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 required here, 0 reproduced" in out and "1 FAILED" in out
    assert "1 run(s) failed" in out and "nb (profile ci): claim failed: c" in out


def test_a_run_that_stopped_in_another_cell_is_reported(tmp_path, capsys):
    old = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    old.check("a", 1.0, 1.0, kind="paper", refute=REFUTE)
    old.check("b", 1.0, 1.0, kind="paper", refute=REFUTE)
    old.report()
    new = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path, verbose=False)
    new.check(
        "a", 1.0, 1.0, kind="paper", refute=REFUTE
    )  # ... then a cell raised, before claim b and report()
    assert cli.main(["report", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 required here, 1 reproduced" in out
    assert "nb (profile ci): the run stopped before its verdict table, after 1 check(s)" in out
    started = Claims("P", notebook="nb", profile="ci", out_dir=tmp_path)  # nothing checked yet
    assert json.loads(started.path.read_text()) == started.record()
    assert started.record()["verdicts"] == [] and not started.record()["finished"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"[]", "expected a JSON object, got list"),
        (b'{"paper": "P", "verdicts": [{"name": "c"}]}', "verdict 0 lacks measured"),
        (b"\xff\xfe not utf-8 \x80", "utf-8"),
        (b'{"paper": "P"}', "no 'verdicts' list"),
    ],
)
def test_report_names_and_skips_a_bad_file(tmp_path, capsys, content, why):
    good = Claims("P", notebook="good", profile="ci", out_dir=tmp_path, verbose=False)
    good.check("c", 1.0, 1.0, kind="paper", refute=REFUTE)
    good.report()
    capsys.readouterr()
    (tmp_path / "bad.claims.json").write_bytes(content)
    assert cli.main(["report", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert str(tmp_path / "bad.claims.json") in captured.err and why in captured.err
    assert "1 required here, 1 reproduced" in captured.out  # the good record is still shown


def test_report_with_nothing_to_report(tmp_path, capsys):
    assert cli.main(["report", "--dir", str(tmp_path)]) == 1
    assert "no claim records" in capsys.readouterr().out


def test_run_reports_a_failing_notebook(tmp_path, capsys):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('boom')")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    assert (
        cli.main(["run", str(path), "--profile", "ci", "--out", str(tmp_path / "o"), "--quiet"])
        == 1
    )
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: boom" in out
    assert "\x1b[" not in out, "no terminal colour codes when the output is not a terminal"
    assert (tmp_path / "o" / "bad.ipynb").exists(), "the partly executed notebook is kept"


def test_run_notebooks_two_at_a_time_keeps_their_order_profile_and_errors(tmp_path):
    """Two processes, each running its own kernel: the results come back in the order of the
    paths, each kernel saw the profile, a failure is reported for its own notebook only, and
    every executed copy is written."""
    from gradcourse.runner import run_notebooks

    paths = []
    for name, code in (
        ("a", "import os\nprint(os.environ['GRADCOURSE_PROFILE'])"),
        ("b", "raise RuntimeError('boom')"),
        ("c", "print(6 * 7)"),
    ):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    runs = list(run_notebooks(paths, tmp_path / "o", "ci", jobs=2, progress=False))
    assert [path for path, _ in runs] == paths
    assert [out.parent for _, (out, _, _) in runs] == [tmp_path / "o"] * 3
    assert [error is None for _, (_, _, error) in runs] == [True, False, True]
    assert "boom" in runs[1][1][2]
    texts = [
        [o.get("text") for o in nbformat.read(out, as_version=4).cells[0].outputs]
        for _, (out, _, _) in runs
    ]
    assert texts[0] == ["ci\n"] and texts[2] == ["42\n"]
    with pytest.raises(ValueError, match="jobs"):
        list(run_notebooks(paths, tmp_path / "o0", "ci", jobs=0))


def test_run_prints_progress_and_verdicts_not_kernel_transport_warnings(tmp_path):
    import subprocess
    import sys

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "small.ipynb"
    nbformat.write(nb, path)
    done = subprocess.run(
        [sys.executable, "-m", "gradcourse", "run", str(path), "--profile", "ci"]
        + ["--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "small.ipynb: ok" in done.stdout
    assert "without encryption" not in done.stderr and "WARNING" not in done.stderr
    executed = nbformat.read(tmp_path / "o" / "small.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "42\n"


def test_bad_profile_and_unknown_notebook(capsys):
    assert cli.main(["run", "00_tour", "--profile", "laptop"]) == 2
    assert "valid profiles" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["run", "99_nothing"])


def test_module_entry_point():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "gradcourse", "list"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "00_tour" in done.stdout
    script = Path(sys.executable).parent / "gradcourse"
    done = subprocess.run([str(script), "list"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "00_tour" in done.stdout


def test_repoll_slices_long_waits_and_keeps_the_overall_timeout(monkeypatch) -> None:
    """A long get_msg becomes a loop of short polls (a missed wake-up then costs one slice),
    and the caller's timeout still ends the wait with queue.Empty.

    Runs on a fake clock (cli's ``time.monotonic``): each poll that times out advances it by
    exactly its timeout, so the slices are deterministic however loaded the machine is (times
    are binary fractions, so the clock arithmetic is exact)."""
    import asyncio
    import queue
    import types

    from gradcourse import runner
    from gradcourse.runner import _repoll

    clock = [1000.0]
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    class Channel:
        def __init__(self, ready_after: int | None) -> None:
            self.waits: list[float | None] = []
            self.ready_after = ready_after

        async def get_msg(self, timeout: float | None = None) -> dict:
            self.waits.append(timeout)
            if len(self.waits) > 50:  # a wrapper that never gives up fails instead of hanging
                raise RuntimeError("too many polls")
            await asyncio.sleep(0)  # a real coroutine that yields to the loop
            if self.ready_after is not None and len(self.waits) > self.ready_after:
                return {"msg": "reply"}
            clock[0] += timeout  # the poll used up its whole slice
            raise queue.Empty

    ready = Channel(ready_after=3)
    _repoll(ready, interval=0.25)
    assert asyncio.run(ready.get_msg(timeout=3600)) == {"msg": "reply"}
    assert ready.waits == [0.25] * 4
    assert clock[0] == 1000.75
    # no timeout: poll in slices of the interval until the reply
    no_timeout = Channel(ready_after=2)
    _repoll(no_timeout, interval=0.25)
    assert asyncio.run(no_timeout.get_msg()) == {"msg": "reply"}
    assert no_timeout.waits == [0.25] * 3
    # a timeout of 0.625 = two full slices and a last one of the 0.125 left, then queue.Empty
    forever = Channel(ready_after=None)
    _repoll(forever, interval=0.25)
    start = clock[0]
    with pytest.raises(queue.Empty):
        asyncio.run(forever.get_msg(timeout=0.625))
    assert forever.waits == [0.25, 0.25, 0.125]
    assert clock[0] - start == 0.625


def test_update_readme_rewrites_only_the_scorecard_block(tmp_path, capsys):
    from gradcourse import results

    readme = tmp_path / "README.md"
    text = f"intro é\n{results.SCORECARD_START}\nold\n{results.SCORECARD_END}\nrest\n"
    readme.write_text(text, encoding="utf-8")
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    argv = ["report", "--results", "--dir", str(results_dir), "--update-readme", str(readme)]
    assert cli.main(argv) == 0
    updated = readme.read_text(encoding="utf-8")
    assert updated.startswith("intro é\n") and updated.endswith(f"{results.SCORECARD_END}\nrest\n")
    assert "old" not in updated and "| notebook |" in updated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results"]


def test_the_runner_is_shared_and_the_cli_and_site_do_not_import_each_other():
    import ast
    from pathlib import Path

    import gradcourse

    package = Path(gradcourse.__file__).parent

    def imports(name):
        tree = ast.parse((package / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                found.add(node.module)
        return found

    assert "cli" not in imports("site") and "runner" in imports("site")
    assert "runner" in imports("cli") and "cli" not in imports("runner")
    assert "site" not in imports("runner")


def test_run_refuses_an_unwritable_folder_before_running_anything(tmp_path, monkeypatch):
    from gradcourse import runner

    ran = []
    monkeypatch.setattr(cli, "run_notebook", lambda *a, **k: ran.append(a))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # root can write anywhere: a file in the way stops it
    with pytest.raises(SystemExit, match=r"cannot write the executed notebooks .* --out"):
        cli.main(["run", "00_tour", "--profile", "ci", "--out", str(blocked / "out")])
    monkeypatch.setenv("GRADCOURSE_RESULTS", str(blocked / "results"))
    with pytest.raises(SystemExit, match=r"recorded verdicts of profile 'ci'.*GRADCOURSE_RESULTS"):
        cli.main(["run", "00_tour", "--profile", "ci", "--out", str(tmp_path / "ok"), "--record"])
    with pytest.raises(SystemExit, match=r"cannot write the executed notebooks and the site"):
        cli.main(["site", "--profile", "ci", "--build", str(blocked / "b")])
    assert ran == [] and runner.find_notebooks()


def test_check_writable_names_the_folder_and_leaves_nothing(tmp_path):
    from gradcourse.paths import NotWritable, check_writable

    assert check_writable(tmp_path / "new" / "sub", "x", "fix") == tmp_path / "new" / "sub"
    assert list((tmp_path / "new" / "sub").iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(NotWritable, match=r"cannot write records into .*f/d: .*Do this\."):
        check_writable(tmp_path / "f" / "d", "records", "Do this.")
