"""The student version: nbgrader's ClearSolutions on the solution cells, outputs cleared, and the
`gradcourse student` command that builds it and (with --run) checks every exercise says "not
attempted" while the notebook runs to its end."""

import nbformat
import pytest

from gradcourse import cli
from gradcourse.student import exercise_cells, feedback_lines, student_version

SOLUTION = '''def clip(g, C):
    """Rows of g scaled to norm at most C."""
    ### BEGIN SOLUTION
    norms = g.norm(dim=1, keepdim=True)
    return g * torch.clamp(C / norms.clamp_min(1e-300), max=1.0)
    ### END SOLUTION'''


def _notebook(marked=True):
    solution = nbformat.v4.new_code_cell(SOLUTION)
    if marked:
        solution.metadata["nbgrader"] = {
            "grade": False, "grade_id": "clip", "locked": False, "schema_version": 3,
            "solution": True, "task": False,
        }  # fmt: skip
    check = nbformat.v4.new_code_cell('feedback = gc.exercises.check("05.clip", clip)\nfeedback')
    check.outputs = [nbformat.v4.new_output("stream", text="old output")]
    after = nbformat.v4.new_code_cell(
        "use = gc.exercises.pick(feedback, clip, gc.privacy.clip)\n"
        "print(float(use(torch.ones(2, 4), 1.0).norm(dim=1).max()))"
    )
    return nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("import torch\nimport gradcourse as gc"),
            solution,
            check,
            after,
        ]
    )


def test_the_solution_is_replaced_by_nbgraders_stub_and_outputs_are_cleared():
    nb = _notebook()
    out = student_version(nb)
    (cell,) = exercise_cells(out)
    assert "BEGIN SOLUTION" not in cell.source and "norms" not in cell.source
    assert "raise NotImplementedError()" in cell.source
    assert cell.source.startswith("def clip(g, C):")  # the signature and docstring stay
    assert all(c.outputs == [] for c in out.cells if c.cell_type == "code")
    assert "norms" in exercise_cells(nb)[0].source  # the instructor's notebook is untouched


def test_markers_outside_a_solution_cell_are_refused():
    with pytest.raises(ValueError, match="solution"):
        student_version(_notebook(marked=False))


def test_feedback_lines_are_found_in_stream_and_display_outputs():
    nb = _notebook()
    nb.cells[2].outputs = [
        nbformat.v4.new_output(
            "execute_result", data={"text/plain": "… 05.clip: not attempted yet (stub)"}
        ),
        nbformat.v4.new_output("stream", text="✓ 00.hvp: right: matches\nother text\n"),
    ]
    assert feedback_lines(nb) == [
        ("…", "05.clip", "not attempted yet (stub)"),
        ("✓", "00.hvp", "right: matches"),
    ]


def test_student_command_runs_the_stub_to_the_end_and_checks_not_attempted(tmp_path, capsys):
    src = tmp_path / "99_toy.ipynb"
    nbformat.write(_notebook(), src)
    out = tmp_path / "student"
    assert cli.main(["student", str(src), "--out", str(out), "--run", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "1 exercise(s)" in text and "problem" not in text
    executed = nbformat.read(out / "executed" / "99_toy.ipynb", as_version=4)
    assert [m for m, *_ in feedback_lines(executed)] == ["…"]
    assert "1.0" in executed.cells[3].outputs[-1]["text"]  # the library's clip took over


def test_student_command_reports_a_solution_left_in(tmp_path, capsys):
    nb = _notebook()
    nb.cells[1].metadata["nbgrader"]["solution"] = False  # not marked: nothing removed ...
    lines = nb.cells[1].source.splitlines()
    # ... and no markers left, so the solution runs in the student version
    nb.cells[1].source = "\n".join(line for line in lines if "SOLUTION" not in line)
    src = tmp_path / "99_toy.ipynb"
    nbformat.write(nb, src)
    good = tmp_path / "98_toy.ipynb"  # beside a correct one, two at a time: only this one named
    nbformat.write(_notebook(), good)
    args = ["student", str(good), str(src), "--out", str(tmp_path / "s"), "--run", "--quiet"]
    assert cli.main([*args, "--jobs", "2"]) == 1
    text = capsys.readouterr().out
    assert "1 exercise(s)" in text and "did not say 'not attempted'" in text
    problems = [line for line in text.splitlines() if "problem:" in line]
    assert problems and all("99_toy.ipynb" in line for line in problems), problems


def test_exercises_command_lists_them(capsys):
    assert cli.main(["exercises"]) == 0
    assert "05.clip" in capsys.readouterr().out
    assert cli.main(["exercises", "99.none"]) == 2


def test_building_again_keeps_a_students_work_unless_forced(tmp_path, capsys):
    src = tmp_path / "99_toy.ipynb"
    nbformat.write(_notebook(), src)
    out = tmp_path / "student"
    assert cli.main(["student", str(src), "--out", str(out)]) == 0
    mine = nbformat.read(out / "99_toy.ipynb", as_version=4)
    mine.cells[1].source = mine.cells[1].source.replace("raise NotImplementedError()", "return g")
    nbformat.write(mine, out / "99_toy.ipynb")
    assert cli.main(["student", str(src), "--out", str(out)]) == 0
    assert "kept" in capsys.readouterr().out
    assert "return g" in nbformat.read(out / "99_toy.ipynb", as_version=4).cells[1].source
    assert cli.main(["student", str(src), "--out", str(out), "--force"]) == 0
    assert "return g" not in nbformat.read(out / "99_toy.ipynb", as_version=4).cells[1].source
