"""Interactive panels: ipywidgets controls over plain experiment functions.

    gc.widgets.explore(draw_spectrum, k=IntSlider(2, 1, 10), width=IntSlider(...))

``explore`` redraws the function's figure (or shows its return value) whenever a control moves.
A value the function refuses (``ValueError``) or a diverging run (``gradcourse.train.Diverged``)
is shown as a message in the panel, not a traceback. Any other exception is a bug: it is shown
with its traceback, in the panel, where the reader (and the browser tests) can see it.

For the browser tests, the panel carries the CSS class ``gc-explore``, each control
``gc-control``, messages ``gc-message`` and unexpected errors ``gc-error``.
"""

from __future__ import annotations

import html
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError,)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .train import Diverged

    return (*EXPECTED_ERRORS, Diverged)


@dataclass
class CallResult:
    """What calling an experiment function with a set of control values gave."""

    value: Any = None
    message: str | None = None  # a refused value or a divergence, for the reader
    error: str | None = None  # an unexpected exception (a bug), with traceback

    @property
    def ok(self) -> bool:
        return self.message is None and self.error is None


def call_safely(fn: Callable[..., Any], values: Mapping[str, Any]) -> CallResult:
    """Call ``fn(**values)``; turn refused values and divergence into a message.

    This is what a panel does on every slider move, as a plain function the tests can call.
    """
    try:
        return CallResult(value=fn(**values))
    except _expected_errors() as exc:
        return CallResult(message=str(exc))
    except Exception:  # noqa: BLE001 - shown to the reader instead of lost in the JS console
        return CallResult(error=traceback.format_exc())


def explore(
    fn: Callable[..., Any],
    title: str | None = None,
    **controls: Any,
) -> Any:
    """A panel of ``controls`` (ipywidgets, keyword = argument name of ``fn``) above ``fn``'s
    output; ``fn`` is called once now and again whenever a control's value changes.

    ``fn`` draws with matplotlib (the figure is shown) and/or returns something to display.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    if not controls:
        raise ValueError("explore() needs at least one control, e.g. lr=FloatLogSlider(...)")
    out = w.Output()
    out.add_class("gc-output")

    def render(_change: Any = None) -> None:
        values = {name: control.value for name, control in controls.items()}
        with out:
            out.clear_output(wait=True)
            result = call_safely(fn, values)
            if result.message is not None:
                plt.close("all")
                display(
                    HTML(
                        f"<div class='gc-message'><b>Cannot show this:</b> "
                        f"{html.escape(result.message)}</div>"
                    )
                )
            elif result.error is not None:
                plt.close("all")
                display(HTML(f"<pre class='gc-error'>{html.escape(result.error)}</pre>"))
            else:
                if result.value is not None:
                    display(result.value)
                plt.show()

    for control in controls.values():
        if hasattr(control, "continuous_update"):
            control.continuous_update = False
        control.add_class("gc-control")
        control.observe(render, names="value")
    header = [w.HTML(f"<b>{html.escape(title)}</b>")] if title else []
    panel = w.VBox([*header, w.HBox(list(controls.values())), out])
    panel.add_class("gc-explore")
    render()
    return panel
