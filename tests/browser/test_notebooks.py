"""Every notebook in a real browser: JupyterLab in headless Chromium runs all cells, then each
explorable control is moved (one step, then to its minimum and maximum) and must redraw its
output without an unexpected error. New notebooks are picked up automatically."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .conftest import ROOT, SCREENSHOTS
from .lab import explorable_controls, move, open_notebook, output_state, panel_error, run_all

NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def check_notebook(page, lab_url: str, name: str, screenshot: Path | None = None) -> dict:
    """Run ``name`` in the browser and exercise its controls; raise AssertionError naming the
    notebook and the control on any failure. Returns timings."""
    start = time.monotonic()
    open_notebook(page, lab_url, name)
    errors = run_all(page)
    assert not errors, f"{name}: cells failed in the browser: {errors}"
    run_s = time.monotonic() - start
    controls = explorable_controls(page)
    # Phase 1: from the notebook's own settings, one step of each control must redraw its panel.
    for control in controls:
        control.element.scroll_into_view_if_needed()
        before = output_state(control)
        move(page, control, "step")
        problem = panel_error(control)
        assert problem is None, f"{name}: moving {control.label} raised in its callback:\n{problem}"
        after = output_state(control)
        assert after != before, f"{name}: moving {control.label} did not change its output"
    if screenshot is not None:  # the first panel after a step: a figure, not an extreme's message
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        (controls[0].panel if controls else page).screenshot(path=str(screenshot))
    # Phase 2: the extremes (the Neuromatch check). A value that cannot be computed must show a
    # message (.gc-message), never an error; the output need not change (it may already show one).
    for control in controls:
        for where in ("min", "max"):
            move(page, control, where)
            problem = panel_error(control)
            assert problem is None, (
                f"{name}: {control.label} at its {where}imum raised in its callback:\n{problem}"
            )
    return {"run_s": run_s, "total_s": time.monotonic() - start, "controls": len(controls)}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_in_browser(page, lab_url, name):
    shot = SCREENSHOTS / f"{Path(name).stem}.png"
    timings = check_notebook(page, lab_url, name, shot)
    print(
        f"\n{name}: ran in {timings['run_s']:.1f} s, {timings['controls']} controls, "
        f"{timings['total_s']:.1f} s in all; screenshot {shot.relative_to(ROOT)}"
    )


def test_harness_catches_a_broken_widget(page, lab_url):
    """The check must fail, naming the notebook and the control, when a callback is broken
    (tests/browser/fixtures/broken_widget.ipynb raises once its slider passes 2)."""
    with pytest.raises(AssertionError, match=r"broken_widget.ipynb: moving panel 0 / k raised"):
        check_notebook(page, lab_url, "_fixtures/broken_widget.ipynb")
