"""The exercises as posed in the notebooks: each solution cell (nbgrader's metadata) defines a
function that its check cell passes to gc.exercises.check; the solution passes; nbgrader's
student version of the same cell reports "not attempted" and does not raise."""

import re
from pathlib import Path

import nbformat
import pytest

from gradcourse.exercises import EXERCISES, check
from gradcourse.student import exercise_cells, student_version

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHECK = re.compile(r'gc\.exercises\.check\(\s*"([^"]+)",\s*(\w+)\s*\)')
# what the notebooks import before their exercises
PRELUDE = """
import itertools, math
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap
import gradcourse as gc
"""


def _posed():
    """(notebook, exercise name, solution cell source, student cell source) per exercise."""
    out = []
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        student = student_version(nb)
        for cell, stub in zip(exercise_cells(nb), exercise_cells(student), strict=True):
            following = nb.cells[nb.cells.index(cell) + 1].source
            match = CHECK.search(following)
            assert match, f"{path.name}: the cell after a solution cell must check it:\n{following}"
            name, fn = match.groups()
            out.append((path.name, name, fn, cell.source, stub.source))
    return out


POSED = _posed()


def test_every_notebook_poses_at_least_two_exercises_and_every_exercise_is_posed_once():
    names = [p[1] for p in POSED]
    # an exercise written ahead of its notebook (the notebook's file not there yet) waits for
    # it; once the notebook exists, every one of its exercises must be posed in it, once
    written = {path.name[:2] for path in NOTEBOOKS}
    due = sorted(name for name in EXERCISES if name[:2] in written)
    assert sorted(names) == due, "an exercise is posed twice, or not at all"
    for path in NOTEBOOKS:
        count = sum(p[0] == path.name for p in POSED)
        assert count >= 2, f"{path.name} poses {count} exercise(s)"
    for notebook, name, *_ in POSED:
        assert notebook.startswith(name[:2]), f"{name} is posed in {notebook}"


def _define(source: str, fn: str):
    namespace: dict = {}
    exec(PRELUDE + source, namespace)
    return namespace[fn]


@pytest.mark.parametrize(
    ("notebook", "name", "fn", "solution", "stub"), POSED, ids=[p[1] for p in POSED]
)
def test_the_notebooks_solution_passes_and_its_student_stub_is_not_attempted(
    notebook, name, fn, solution, stub
):
    assert "### BEGIN SOLUTION" in solution and "### END SOLUTION" in solution
    fb = check(name, _define(solution, fn))
    assert fb.passed, f"{notebook}: {fb}"
    assert "BEGIN SOLUTION" not in stub and "raise NotImplementedError" in stub
    fb = check(name, _define(stub, fn))
    assert fb.status == "not attempted", f"{notebook}: {fb}"
    lines = [line for line in solution.splitlines() if line.strip()]
    assert len(lines) <= 22, f"{notebook}: {name}'s solution cell is {len(lines)} lines"
