"""Driving a notebook in JupyterLab from Playwright: open, run all, read errors, move controls.

Reads the notebook *model* through the exposed ``window.jupyterapp`` (cell outputs, execution
counts, kernel status) rather than scraping rendered text; moves widgets with the keyboard, as a
reader would. The explorable controls are the ones ``gradcourse.widgets.explore`` marks: a panel
``.gc-explore`` holding controls ``.gc-control``, an output ``.gc-output``, and ``.gc-error`` for
an unexpected exception in a callback (``.gc-message`` is a refused value: allowed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from playwright.sync_api import Locator, Page

KERNEL_STATE_JS = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const session = panel && panel.sessionContext && panel.sessionContext.session;
  return session && session.kernel ? session.kernel.status : null;
}"""

ERRORS_JS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    for (let j = 0; j < cell.outputs.length; j++) {
      const out = cell.outputs.get(j).toJSON();
      if (out.output_type === 'error') errors.push({cell: i, ename: out.ename, evalue: out.evalue});
    }
    if (cell.executionCount === null) errors.push({cell: i, ename: 'NotRun', evalue: 'cell did not run'});
  }
  return errors;
}"""


def open_notebook(page: Page, base_url: str, name: str) -> None:
    """Open ``name`` and wait until its kernel is idle."""
    page.goto(f"{base_url}/lab/tree/{name}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget")
    page.wait_for_function(
        """async () => {
          const panel = window.jupyterapp.shell.currentWidget;
          if (!panel.sessionContext) return false;
          await panel.sessionContext.ready;
          return panel.sessionContext.session && panel.sessionContext.session.kernel
              && panel.sessionContext.session.kernel.status === 'idle';
        }""",
        polling=500,
    )
    # A kernel-choice dialog would mean the notebook's kernelspec is unknown: accept the default.
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    if dialog.count():
        dialog.first.click()
    # The kernel may still be (re)connecting right after the first 'idle': wait until it stays so.
    wait_idle(page, settle_s=2.0)


def run_all(page: Page, timeout_s: float = 300) -> list[dict]:
    """Run every cell (JupyterLab's own command); return the error outputs of the model."""
    page.evaluate(
        "async () => { await window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
    )
    wait_idle(page, timeout_s)
    return page.evaluate(ERRORS_JS)


def wait_idle(page: Page, timeout_s: float = 120, settle_s: float = 0.5) -> None:
    """Wait until the kernel has been idle for ``settle_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    idle_since = None
    while time.monotonic() < deadline:
        if page.evaluate(KERNEL_STATE_JS) == "idle":
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= settle_s:
                return
        else:
            idle_since = None
        time.sleep(0.1)
    raise TimeoutError(f"kernel still busy after {timeout_s} s")


@dataclass
class Control:
    """One explorable control: its panel, its label for messages, its interactive element."""

    panel: Locator
    element: Locator
    label: str
    kind: str  # "slider" or "select"


def explorable_controls(page: Page) -> list[Control]:
    controls = []
    panels = page.locator(".gc-explore")
    for p in range(panels.count()):
        panel = panels.nth(p)
        items = panel.locator(".gc-control")
        for i in range(items.count()):
            item = items.nth(i)
            label = (
                item.locator(".widget-label").first.inner_text()
                if item.locator(".widget-label").count()
                else f"control {i}"
            )
            label = f"panel {p} / {label.strip() or f'control {i}'}"
            slider = item.locator("[role='slider']")
            select = item.locator("select")
            if slider.count():
                controls.append(Control(panel, slider.first, label, "slider"))
            elif select.count():
                controls.append(Control(panel, select.first, label, "select"))
    return controls


def output_state(control: Control) -> str:
    """What the panel shows: its output's HTML (figures are inline base64 PNGs)."""
    return control.panel.locator(".gc-output").first.inner_html()


def panel_error(control: Control) -> str | None:
    errors = control.panel.locator(".gc-error")
    return errors.first.inner_text() if errors.count() else None


def move(page: Page, control: Control, where: str) -> None:
    """Move a control one step (``"step"``), to its minimum (``"min"``) or maximum (``"max"``),
    with the keyboard as a reader would; wait for the kernel to redraw."""
    if control.kind == "slider":
        key = {"step": "ArrowRight", "min": "Home", "max": "End"}[where]
        control.element.focus()
        control.element.press(key)
    else:
        options = control.element.locator("option")
        n = options.count()
        current = control.element.evaluate("s => s.selectedIndex")
        index = {"step": (current + 1) % n, "min": 0, "max": n - 1}[where]
        control.element.select_option(index=index)
    page.wait_for_timeout(300)
    wait_idle(page)
