"""Notebook prose carries no hand-typed measured number.

The rule (also in the README, "Adding a notebook"): in a notebook's markdown, a number with a
decimal point (0.88, .5, 1e-3 written as 0.001) or a percentage (57%) may appear only
- inside an inline code span (configuration: `lr = 0.05`, `tol=1e-4`), or
- inside the parentheses of a citation, i.e. parentheses holding an author and year ("Kirsch
  2023", "Sagun et al. 2017") or an arXiv id ("(Wu, Ma & E 2018, Table 2: 19.6 at η = 0.1)"),
  or opening with the year right after the authors ("Lee et al. (2019, Theorem 2.1)"): that is
  the paper's number, with its source.
Measured numbers reach the reader through code output: the verdict tables, printed values and
figures. Integers (widths, steps, seeds, class counts) are configuration and are not checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

CODE_SPAN = re.compile(r"`[^`]*`")
ARXIV_ID = re.compile(r"arXiv:?\s*\d{4}\.\d{4,5}")
# a citation: a capitalised name (or "et al.") right before a year, or an arXiv id
AUTHOR_YEAR = r"[A-Z][\w\-]*\.?(?: et al\.)?,? (?:19|20)\d\d\b"
CITATION = re.compile(rf"\([^()]*(?:{AUTHOR_YEAR}|arXiv)[^()]*\)")
# or the parenthesis after a name: "Lee et al. (2019, Theorem 2.1)", "Kirsch (2023: ...)"
NAME_THEN_YEAR = re.compile(r"((?:[A-Z][\w\-]*|et al\.) )\((?:19|20)\d\d\b[^()]*\)")
NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:\.\d+)?\s*%|(?<![\w.])[-−]?\d*\.\d+")


def measured_numbers(markdown: str) -> list[tuple[str, str]]:
    """(number, line) for every number the rule above does not allow."""
    found = []
    for line in markdown.splitlines():
        text = ARXIV_ID.sub("", CODE_SPAN.sub("", line))
        previous = None
        while previous != text:  # nested parentheses: strip citations inside out
            previous, text = text, NAME_THEN_YEAR.sub(r"\1", CITATION.sub("", text))
        found += [(m.group(0), line.strip()) for m in NUMBER.finditer(text)]
    return found


def test_the_rule_itself():
    assert measured_numbers("the bulk is 0.78 of the spectrum") == [
        ("0.78", "the bulk is 0.78 of the spectrum")
    ]
    assert [n for n, _ in measured_numbers("flipped labels fill 57% of it")] == ["57%"]
    assert measured_numbers("with `lr = 0.05` and `tol=1e-4`, K = 10 classes, 3 seeds") == []
    assert measured_numbers("their table (Wu, Ma & E 2018: 19.6 vs 20 at η = 0.1)") == []
    assert measured_numbers("as in arXiv 1706.04454, section 4") == []
    assert [n for n, _ in measured_numbers("(a slope of -0.96) is steeper")] == ["-0.96"]
    # a year alone does not make a citation
    assert [n for n, _ in measured_numbers("it holds (2000 steps, 0.78) here")] == ["0.78"]
    assert measured_numbers("(Sagun et al. 2017: 0.5 of the spectrum)") == []
    assert measured_numbers("as Lee et al. (2019, Theorem 2.1) prove") == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_has_no_hand_typed_measured_number(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    found = [
        f"cell {i}: {number!r} in: {line[:120]}"
        for i, cell in enumerate(cells)
        if cell["cell_type"] == "markdown"
        for number, line in measured_numbers("".join(cell["source"]))
    ]
    assert not found, (
        f"{path.name}: numbers in markdown must come from the run (print them, or use the "
        "verdict table); configuration goes in `code`, a paper's number inside its citation's "
        "parentheses:\n" + "\n".join(found)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_closing_section_renders_the_generated_verdict_table(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    calls = [c for c in code if f'gc.results.verdict_table("{path.stem}", claims)' in c]
    assert calls, f"{path.name}: no gc.results.verdict_table({path.stem!r}, claims) cell"
    last_check = max(i for i, c in enumerate(code) if "claims.check(" in c)
    assert code.index(calls[0]) > last_check, "the table comes after the last check"
