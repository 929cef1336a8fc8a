"""Argument checks shared by the library: a bad value raises ValueError naming the argument
and the allowed range (what a reader sees when a slider or a config holds a bad value).

Five checks cover every number argument of the package:

- :func:`check_int`: an int (not a bool) in [low, high], or >= low;
- :func:`check_ints`: a sequence of such ints (seeds, widths, channels), each named by its
  index in a bad-value message, optionally refused when empty;
- :func:`check_number`: an int or float (not a bool, never nan) within optional bounds, each
  end open or closed, finite unless ``allow_inf``;
- :func:`check_positive` and :func:`check_nonnegative`: the two commonest cases of
  :func:`check_number`, a finite number > 0 and a finite number >= 0.

And two for the tensors a user's numbers arrive in:

- :func:`check_finite`: a tensor whose floating entries are all finite; the message names the
  first example (index along dim 0) holding a nan or an infinity;
- :func:`check_labels`: class labels for ``num_classes`` outputs, integers in range.

The messages read, for example, ``lr must be a finite number > 0, got 0.0``, ``momentum must
be a number in [0, 1), got 1.0`` or ``threshold must be a number > 0 (inf allowed), got -1``.
"""

from __future__ import annotations

import math


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high] (or >= low when high is None)."""
    bad = isinstance(value, bool) or not isinstance(value, int)
    if bad or value < low or (high is not None and value > high):
        allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_ints(
    name: str, values: object, low: int, high: int | None = None, *, nonempty: bool = False
) -> tuple[int, ...]:
    """``values`` as a tuple if each is an int (not a bool) in [low, high] (or >= low), checked
    as :func:`check_int` names ``name[i]``; an empty sequence is refused when ``nonempty``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        allowed = f"ints in [{low}, {high}]" if high is not None else f"ints >= {low}"
        raise ValueError(
            f"{name} must be a sequence of {allowed} (a tuple or list), got {values!r}"
        )
    values = tuple(values)
    if nonempty and not values:
        allowed = f"int in [{low}, {high}]" if high is not None else f"int >= {low}"
        raise ValueError(f"{name} must hold at least one {allowed}, got ()")
    return tuple(check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(values))


def _allowed(
    low: float | None, high: float | None, low_open: bool, high_open: bool, allow_inf: bool
) -> str:
    """The allowed range in words: "a number in (0, 1]", "a finite number >= 0", ..."""
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"a number in {left}{low:g}, {high:g}{right}"
    kind = "a number" if allow_inf else "a finite number"
    if low is not None:
        bound = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bound = f" {'<' if high_open else '<='} {high:g}"
    else:
        bound = ""
    return f"{kind}{bound} (inf allowed)" if allow_inf else f"{kind}{bound}"


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float if it is an int or float (not a bool), not nan, and within the
    bounds: ``low <= value`` (``low < value`` when ``low_open``) and ``value <= high``
    (``value < high`` when ``high_open``); a bound left as None is not checked. ``+-inf`` is
    refused unless ``allow_inf`` (then it must still lie within the bounds, so ``low=0,
    allow_inf=True`` allows inf but not -inf). With both bounds the message gives the interval,
    e.g. ``keep_fraction must be a number in (0, 1], got 0``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and not math.isnan(value) and (allow_inf or math.isfinite(value))
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        allowed = _allowed(low, high, low_open, high_open, allow_inf)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0 (:func:`check_number` with
    ``low=0, low_open=True``)."""
    return check_number(name, value, low=0, low_open=True)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number >= 0 (:func:`check_number` with
    ``low=0``)."""
    return check_number(name, value, low=0)


def check_finite(name: str, tensor: object) -> None:
    """Nothing if ``tensor`` is not floating or all its entries are finite; else ValueError
    naming ``name``, the first example (index along dim 0) with a nan or an infinity, and what
    it holds: a nan input otherwise turns every clipped sum, score or gradient nan silently."""
    import torch

    if not isinstance(tensor, torch.Tensor) or not (
        tensor.is_floating_point() or tensor.is_complex()
    ):
        return
    if tensor.device.type == "meta":  # shapes and devices only: no values to check
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    rows = finite.reshape(len(tensor), -1).all(dim=1) if tensor.ndim else finite.reshape(1)
    first = int((~rows).nonzero()[0]) if tensor.ndim else 0
    bad = tensor[first] if tensor.ndim else tensor
    kinds = [k for k, m in (("nan", torch.isnan(bad)), ("inf", torch.isinf(bad))) if bool(m.any())]
    where = f"example {first}" if tensor.ndim else "it"
    raise ValueError(
        f"{name} must hold finite numbers: {where} holds {' and '.join(kinds)} "
        f"({int((~rows).sum())} of {rows.numel()} examples are not finite)"
    )


def check_labels(name: str, labels: object, num_classes: int) -> None:
    """Nothing if ``labels`` is an integer tensor of class indices in [0, num_classes); else
    ValueError naming ``name``, the dtype or the range found, and the range allowed."""
    import torch

    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"{name} must be integer class labels in [0, {num_classes - 1}], got {got} (for "
            "class probabilities pass a float tensor of shape (n, classes))"
        )
    if labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class labels, got bool")
    if labels.device.type == "meta":  # shapes and devices only: no values to check
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
            f"got labels from {int(labels.min())} to {int(labels.max())}"
        )
