from __future__ import annotations

import pytest

from gradcourse.train import Diverged
from gradcourse.widgets import call_safely, explore


def test_call_safely_returns_the_value():
    result = call_safely(lambda a, b: a + b, {"a": 1, "b": 2})
    assert result.ok and result.value == 3


def test_refused_value_becomes_a_message():
    def fn(lr):
        raise ValueError(f"lr must be in (0, 10], got {lr}")

    result = call_safely(fn, {"lr": -1})
    assert (
        not result.ok and result.message == "lr must be in (0, 10], got -1" and result.error is None
    )


def test_divergence_becomes_a_message():
    def fn(lr):
        raise Diverged(step=7, lr=lr, loss=float("inf"))

    result = call_safely(fn, {"lr": 5.0})
    assert result.message is not None and "7" in result.message and result.error is None


def test_a_bug_is_shown_with_its_traceback():
    def fn(x):
        return {}[x]

    result = call_safely(fn, {"x": "missing"})
    assert result.message is None and "KeyError" in result.error and "Traceback" in result.error


def test_explore_redraws_when_a_control_moves():
    ipywidgets = pytest.importorskip("ipywidgets")
    calls = []
    slider = ipywidgets.IntSlider(value=1, min=0, max=5)
    panel = explore(lambda k: calls.append(k), title="t", k=slider)
    assert calls == [1]
    slider.value = 4
    assert calls == [1, 4]
    assert "gc-explore" in panel._dom_classes and "gc-control" in slider._dom_classes
    assert slider.continuous_update is False
    with pytest.raises(ValueError, match="at least one control"):
        explore(lambda: None)
