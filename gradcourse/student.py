"""The student version of the course: every exercise's solution removed by nbgrader.

The committed notebooks are the instructor's version: each coding exercise's solution sits
between nbgrader's ``### BEGIN SOLUTION`` and ``### END SOLUTION`` markers in a cell marked as a
solution cell (``metadata.nbgrader.solution``), so CI runs the solutions. The student version
replaces each marked region with nbgrader's stub (``raise NotImplementedError()``), using
nbgrader's own ``ClearSolutions`` preprocessor, and clears the outputs. In it each check prints
"not attempted yet" and every later cell runs on with the library's implementation
(:func:`gradcourse.exercises.pick`).

``python -m gradcourse student`` writes it to ``build/student/``; ``make student`` too;
``make test-student`` also executes it at ``ci`` and checks that every exercise reports "not
attempted" and nothing fails. Instructors with nbgrader's full set-up can instead run
``nbgrader generate_assignment`` on the notebooks: the cells carry the metadata it expects.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

__all__ = [
    "FEEDBACK_LINE",
    "exercise_cells",
    "feedback_lines",
    "student_version",
    "write_student_version",
]

#: A line printed by a :class:`gradcourse.exercises.Feedback`: mark, exercise name, message.
FEEDBACK_LINE = re.compile(r"^([✓✗…]) (\d\d\.[A-Za-z_0-9]+): (.*)$", re.MULTILINE)


def exercise_cells(nb: Any) -> list[Any]:
    """The cells marked as nbgrader solution cells."""
    return [c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("solution")]


def student_version(nb: Any) -> Any:
    """A copy of the notebook ``nb`` with every solution region replaced by nbgrader's stub and
    all outputs cleared. Raises ValueError when a cell holds solution markers without being
    marked as a solution cell (nbgrader would refuse it too)."""
    from nbconvert.exporters.exporter import ResourcesDict
    from nbgrader.preprocessors import ClearSolutions

    out = copy.deepcopy(nb)
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    resources = ResourcesDict()
    resources["language"] = "python"
    try:
        out, _ = ClearSolutions(enforce_metadata=True).preprocess(out, resources)
    except RuntimeError as exc:  # nbgrader's error for markers in an unmarked cell
        raise ValueError(f"solution markers outside a solution cell: {exc}") from exc
    for cell in exercise_cells(out):
        if "BEGIN SOLUTION" in cell.source or "END SOLUTION" in cell.source:
            raise ValueError(f"a solution region was not removed from cell:\n{cell.source}")
    return out


def write_student_version(
    notebooks: list[Path], out_dir: Path, *, force: bool = False
) -> tuple[list[Path], list[Path]]:
    """The student version of each notebook, written to ``out_dir`` under the same name.
    Returns (written, kept): a notebook already there whose cells differ from a fresh student
    version holds a student's work and is kept, unless ``force``."""
    import nbformat

    from .runner import write_notebook

    out_dir.mkdir(parents=True, exist_ok=True)
    written, kept = [], []
    for path in notebooks:
        fresh = student_version(nbformat.read(path, as_version=4))
        target = out_dir / path.name
        if target.exists() and not force:
            old = nbformat.read(target, as_version=4)
            if [(c.cell_type, c.source) for c in old.cells] != [
                (c.cell_type, c.source) for c in fresh.cells
            ]:
                kept.append(target)
                continue
        written.append(write_notebook(fresh, target))
    return written, kept


def feedback_lines(executed_nb: Any) -> list[tuple[str, str, str]]:
    """(mark, exercise, message) of every exercise feedback in an executed notebook's outputs."""
    found = []
    for cell in executed_nb.cells:
        for output in cell.get("outputs", []):
            texts = []
            if output.get("output_type") == "stream":
                texts.append(output.get("text", ""))
            data = output.get("data", {})
            if "text/plain" in data:
                texts.append(data["text/plain"])
            for text in texts:
                text = "".join(text) if isinstance(text, list) else text
                found.extend(FEEDBACK_LINE.findall(text))
    return found
