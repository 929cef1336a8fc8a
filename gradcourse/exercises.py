"""Coding exercises a student writes and the notebook checks.

Each notebook poses a few exercises: a short function on its core algorithm (per-example
gradients, a Hessian-vector product, Lanczos, an empirical NTK, EL2N, a DP-SGD step, PGD,
Grad-CAM, subspace training, an intrinsic dimension). :func:`check` calls the student's function on seeded cases (small models, random
inputs, edge cases) beside the library's own implementation (or an independent reference where
the library has no such function) and returns a :class:`Feedback` that says specifically what
is wrong: a wrong shape (transposed? a dimension of size 1 too many?), a constant factor (and
which: the batch size, 1/n, 2), a wrong sign, entries off beyond a stated tolerance (where, by
how much), an exception (which, at which line of the student's function), an input changed in
place, or right (on which cases, to which tolerance). A stub that still raises
``NotImplementedError`` is "not attempted yet". :func:`check` never raises: a notebook keeps
running whatever the student wrote, and :func:`pick` falls back to the library's function until
the student's passes.

>>> fb = check("05.clip", my_clip)          # doctest: +SKIP
>>> fb                                       # doctest: +SKIP
✗ 05.clip: case 'six rows, some below C = 1': the result holds NaN or inf at index [3, 0] ...

:data:`EXERCISES` lists them; ``python -m gradcourse exercises`` prints the list.
"""

from __future__ import annotations

import copy
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Case",
    "EXERCISES",
    "Exercise",
    "Feedback",
    "check",
    "compare",
    "describe",
    "pick",
    "reference",
]

STATUSES = (
    "right",
    "not attempted",
    "wrong type",
    "wrong shape",
    "not finite",
    "wrong factor",
    "wrong sign",
    "wrong",
    "raised",
    "changed its input",
    "unknown exercise",
    "checker error",
)
_MARKS = {"right": "✓", "not attempted": "…"}


@dataclass(frozen=True)
class Case:
    """One call of the student's function: ``fn(*args, **kwargs)``, named by ``label`` in the
    feedback; ``factors`` names constants a wrong answer is often off by on this case (the
    batch size, the number of probes, ...) so that the feedback can say which."""

    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    factors: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Feedback:
    """What :func:`check` found. ``passed`` (and ``bool(feedback)``) is True only when the
    function matched the reference on every case; ``status`` is one of :data:`STATUSES`."""

    exercise: str
    status: str
    message: str
    case: str | None = None
    cases_passed: int = 0
    cases_total: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "right"

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        where = f"case {self.case!r}: " if self.case is not None and not self.passed else ""
        return f"{_MARKS.get(self.status, '✗')} {self.exercise}: {where}{self.message}"

    def __repr__(self) -> str:  # a notebook shows the feedback, not the dataclass
        return str(self)


@dataclass(frozen=True)
class Exercise:
    """An exercise: the function a student writes (``signature``, ``task``), the reference it is
    checked against (the library's implementation, named in ``against``), the seeded cases, and
    the tolerance (``rtol``, ``atol``, as in :func:`torch.allclose`, in float64)."""

    name: str
    signature: str
    task: str
    against: str
    reference: Callable[..., Any]
    cases: Callable[[], list[Case]]
    rtol: float = 1e-6
    atol: float = 1e-9


# --- comparing one output --------------------------------------------------------------------


def _as_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        t = value.detach().cpu()
    elif isinstance(value, np.ndarray | np.generic):
        t = torch.from_numpy(np.asarray(value))
    elif isinstance(value, bool | int | float):
        t = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, list | tuple) and all(
        isinstance(v, bool | int | float | np.generic) for v in value
    ):
        t = torch.tensor([float(v) for v in value], dtype=torch.float64)
    else:
        return None
    if t.is_complex():
        return None
    return t.to(torch.float64)


def _describe(value: Any) -> str:
    if value is None:
        return "None (did you forget `return`?)"
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor"
    return f"a {type(value).__name__}"


def _index(flat_index: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return ""
    idx = np.unravel_index(flat_index, shape)
    return " at index [" + ", ".join(str(int(i)) for i in idx) + "]"


_GENERIC_FACTORS = {"2": 2.0, "1/2": 0.5}


def _named_factor(c: float, factors: Mapping[str, float]) -> str | None:
    for name, value in {**factors, **_GENERIC_FACTORS}.items():
        if value != 0 and math.isclose(c, value, rel_tol=1e-4):
            return name
    return None


def compare(
    got: Any,
    want: Any,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    factors: Mapping[str, float] | None = None,
    what: str = "the result",
) -> tuple[str, str]:
    """(status, message) for one output ``got`` against the expected ``want``.

    Both are compared as float64 tensors. In order: something that is not a tensor, an array
    or a number (None: a forgotten ``return``); a different shape (transposed? a dimension of
    size 1?); NaN or inf where the reference is finite; close (``torch.allclose`` with
    ``rtol``, ``atol``): right; a constant multiple c * want (c = -1: the sign; else which of
    ``factors``, e.g. {"the batch size b": 8}, or 2 or 1/2, c is, when one is); the right
    magnitudes with some signs flipped; else the largest error, where, and the relative error.
    """
    factors = dict(factors or {})
    w = _as_tensor(want)
    if w is None:
        raise TypeError(f"the reference returned {_describe(want)}: a checker bug")
    if isinstance(want, Tensor) and not isinstance(got, Tensor):
        return (
            "wrong type",
            f"{what} should be a torch tensor (the cells below use tensor methods on it); yours "
            f"is {_describe(got)}"
            + (" (torch.as_tensor converts it)" if _as_tensor(got) is not None else ""),
        )
    g = _as_tensor(got)
    if g is None:
        return "wrong type", f"{what} should be a tensor (or a number); yours is {_describe(got)}"
    if g.shape != w.shape:
        hint = ""
        if g.ndim == 2 and g.T.shape == w.shape:
            hint = " (transposed?)"
        elif g.numel() == w.numel() and g.squeeze().shape == w.squeeze().shape:
            hint = " (a dimension of size 1 too many or too few?)"
        elif g.numel() == 1 and w.numel() > 1:
            hint = " (one number where one per entry is expected: did you reduce over a dimension?)"
        elif g.ndim == w.ndim + 1 and g.shape[1:] == w.shape:
            hint = " (an extra leading dimension: did you forget to reduce over it?)"
        return (
            "wrong shape",
            f"{what} should have shape {tuple(w.shape)}; yours has {tuple(g.shape)}{hint}",
        )
    bad = ~torch.isfinite(g) & torch.isfinite(w)
    if bad.any():
        first = int(bad.flatten().nonzero()[0])
        return (
            "not finite",
            f"{what} holds NaN or inf{_index(first, tuple(w.shape))} where the expected value "
            f"is finite ({int(bad.sum())} of {w.numel()} entries)",
        )
    tolerance = f"rtol={rtol:g}, atol={atol:g}"
    if torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
        return "right", f"matches (to {tolerance})"
    rel = float((g - w).norm() / w.norm()) if float(w.norm()) > 0 else math.inf
    low_precision = isinstance(got, Tensor) and got.dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    )
    precision = (
        f"; yours is {got.dtype}, the cases are float64: a tensor made without dtype= somewhere?"
        if low_precision
        else ""
    )
    wn = float((w * w).sum())
    if wn > 0 and torch.isfinite(g).all():
        c = float((g * w).sum()) / wn
        named = _named_factor(c, factors)
        near_one = abs(c - 1.0) < 1e-3  # close but beyond the tolerance: not a factor
        if c != 0 and not near_one and torch.allclose(g, c * w, rtol=rtol, atol=atol):
            if math.isclose(c, -1.0, rel_tol=1e-4):
                return "wrong sign", f"{what} has the wrong sign: yours is minus the expected value"
            if named is None and c < 0:
                minus = _named_factor(-c, factors)
                if minus is not None:
                    return (
                        "wrong sign",
                        f"{what} has the wrong sign and is off by a constant factor: yours is "
                        f"{c:.6g} times the expected value (minus {minus})",
                    )
            # any two numbers differ by a factor: for one number, say so only when it is named
            if named is not None or w.numel() > 1:
                because = f" (= {named})" if named is not None else ""
                return (
                    "wrong factor",
                    f"{what} is off by a constant factor: yours is {c:.6g}{because} times the "
                    "expected value",
                )
        if torch.allclose(g.abs(), w.abs(), rtol=rtol, atol=atol):
            flipped = int(((g * w) < 0).sum())
            return (
                "wrong sign",
                f"{what} has the right magnitudes but {flipped} of {w.numel()} entries have the "
                "wrong sign",
            )
    # the entry that breaks the tolerance most (not merely the largest absolute error)
    excess = (g - w).abs() - (atol + rtol * w.abs())
    excess = torch.where(torch.isnan(excess), torch.full_like(excess, math.inf), excess)
    worst = int(excess.flatten().argmax())
    digits = ".10g" if rel < 1e-4 else ".6g"
    close = " (close, but beyond the tolerance)" if rel < 1e-4 else ""
    return (
        "wrong",
        f"{what} differs from the expected value{close}: the entry{_index(worst, tuple(w.shape))} "
        f"is off by {float((g - w).abs().flatten()[worst]):.3g} (expected "
        f"{float(w.flatten()[worst]):{digits}}, yours {float(g.flatten()[worst]):{digits}}); "
        f"relative error {rel:.2g} (tolerance {tolerance}){precision}",
    )


def _compare_outputs(
    got: Any, want: Any, *, rtol: float, atol: float, factors: Mapping[str, float]
) -> tuple[str, str]:
    """Structured outputs: a tuple is compared entry by entry, a dict key by key."""
    if isinstance(want, tuple):
        if not isinstance(got, tuple | list) or len(got) != len(want):
            return (
                "wrong type",
                f"the result should be a tuple of {len(want)} values; yours is {_describe(got)}"
                + (f" of length {len(got)}" if isinstance(got, tuple | list) else ""),
            )
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            status, msg = compare(g, w, rtol=rtol, atol=atol, factors=factors, what=f"output {i}")
            if status != "right":
                return status, msg
        return "right", msg
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or set(got) != set(want):
            keys = sorted(got) if isinstance(got, Mapping) else None
            return (
                "wrong type",
                f"the result should be a dict with keys {sorted(want)}; yours is "
                f"{_describe(got)}" + (f" with keys {keys}" if keys is not None else ""),
            )
        for key in want:
            status, msg = compare(
                got[key], want[key], rtol=rtol, atol=atol, factors=factors, what=f"[{key!r}]"
            )
            if status != "right":
                return status, msg
        return "right", msg
    return compare(got, want, rtol=rtol, atol=atol, factors=factors)


# --- calling the student's function ----------------------------------------------------------


def _where(exc: BaseException, fn: Callable) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    code = getattr(fn, "__code__", None)
    mine = [f for f in frames if code is not None and f.filename == code.co_filename]
    if mine:
        f = mine[-1]
        line = f.lineno - code.co_firstlineno + 1 if f.lineno is not None else "?"
        inside = "" if f is frames[-1] else f", inside {frames[-1].name}()"
        text = f": `{f.line.strip()}`" if f.line else ""
        return f"at line {line} of your function{inside}{text}"
    if len(frames) > 1:
        return f"inside {frames[-1].name}()"
    return ""


def _raised_by(exc: BaseException, fn: Callable) -> bool:
    """Whether ``exc`` was raised by the student's function itself (a stub's ``raise``), not by
    a library function it called (torch raises NotImplementedError for missing kernels)."""
    frames = traceback.extract_tb(exc.__traceback__)
    code = getattr(fn, "__code__", None)
    if not frames or code is None:
        return False
    last = frames[-1]
    return last.filename == code.co_filename and last.name == code.co_name


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def _call(fn: Callable, case: Case) -> tuple[str | None, Any]:
    """(None, output), or (status, message) when the call did not return normally."""
    args, kwargs = copy.deepcopy((case.args, case.kwargs))
    before = [t.detach().clone() for t in _tensors((args, kwargs))]
    modules = [
        m for a in (*args, *kwargs.values()) if isinstance(a, nn.Module) for m in a.modules()
    ]
    hooks = [len(m._forward_hooks) + len(m._backward_hooks) for m in modules]
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:  # the student's code may raise anything; report it, never re-raise
        if isinstance(exc, NotImplementedError) and _raised_by(exc, fn):
            return (
                "not attempted",
                "not attempted yet (the function still raises NotImplementedError)",
            )
        where = _where(exc, fn)
        return "raised", f"raised {type(exc).__name__}: {exc}" + (f" ({where})" if where else "")
    if [len(m._forward_hooks) + len(m._backward_hooks) for m in modules] != hooks:
        return (
            "changed its input",
            "your function left a hook registered on the model: remove it "
            "(handle = module.register_forward_hook(...); ...; handle.remove()), or it runs on "
            "every later forward pass",
        )
    after = _tensors((args, kwargs))
    for old, new in zip(before, after, strict=True):
        if old.shape != new.shape or not torch.equal(old, new.detach()):
            return (
                "changed its input",
                "your function changed one of its input tensors in place (work on a copy, "
                "or use out-of-place operations)",
            )
    return None, out


# --- the registry ----------------------------------------------------------------------------

EXERCISES: dict[str, Exercise] = {}


def _register(exercise: Exercise) -> Exercise:
    EXERCISES[exercise.name] = exercise
    return exercise


def check(name: str, fn: Callable) -> Feedback:
    """Check ``fn`` against exercise ``name`` (a key of :data:`EXERCISES`) on every seeded case;
    the first case where it goes wrong is named in the feedback. Never raises."""
    exercise = EXERCISES.get(name)
    if exercise is None:
        known = ", ".join(sorted(EXERCISES))
        return Feedback(str(name), "unknown exercise", f"no exercise {name!r}; known: {known}")
    if not callable(fn):
        return Feedback(name, "wrong type", f"expected a function, got {_describe(fn)}")
    try:
        cases = exercise.cases()
        for done, case in enumerate(cases):
            status, out = _call(fn, case)
            if status is not None:
                return Feedback(name, status, out, case.label, done, len(cases))
            want = exercise.reference(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
            status, msg = _compare_outputs(
                out, want, rtol=exercise.rtol, atol=exercise.atol, factors=case.factors
            )
            if status != "right":
                return Feedback(name, status, msg, case.label, done, len(cases))
        labels = "; ".join(c.label for c in cases)
        return Feedback(
            name,
            "right",
            f"right: matches {exercise.against} on all {len(cases)} cases ({labels}) to "
            f"rtol={exercise.rtol:g}, atol={exercise.atol:g}",
            None,
            len(cases),
            len(cases),
        )
    except Exception as exc:  # a bug of ours must not stop the student's notebook
        return Feedback(
            name,
            "checker error",
            f"the checker itself failed ({type(exc).__name__}: {exc}); this is a gradcourse "
            "bug, please report it",
        )


def reference(name: str) -> Callable:
    """The function exercise ``name`` is checked against, with the student's signature (the
    library's implementation, or the independent reference where the library has none)."""
    if name not in EXERCISES:
        raise ValueError(f"no exercise {name!r}; known: {', '.join(sorted(EXERCISES))}")
    return EXERCISES[name].reference


def pick(feedback: Feedback, mine: Callable, library: Callable, *, quiet: bool = False) -> Callable:
    """``mine`` when ``feedback`` passed, else ``library``: the notebook goes on with the
    student's function once it is right, and with the library's until then."""
    chosen = mine if feedback.passed else library
    if not quiet:
        who = (
            "your function" if feedback.passed else "the library's function (yours is not done yet)"
        )
        print(f"{feedback.exercise}: the cells below use {who}")
    return chosen


# --- seeded inputs ---------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(d_in: int, hidden: Sequence[int], d_out: int, seed: int, activation: str = "tanh"):
    from .models import MLP

    return MLP(d_in, list(hidden), d_out, activation=activation, seed=seed).double()


def _cnn(seed: int):
    from .models import SmallCNN

    return SmallCNN(1, 3, channels=(4,), hidden=8, pool_size=2, seed=seed, dtype=torch.float64)


def _classification(n: int, d: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(k, (n,), generator=g)


def _symmetric(eigenvalues: Sequence[float], seed: int) -> Tensor:
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


class _Matvec:
    """A symmetric matrix as the function v -> A v a student's estimator calls (a class, so a
    case deep-copies cleanly)."""

    def __init__(self, a: Tensor) -> None:
        self.a = a

    def __call__(self, v: Tensor) -> Tensor:
        return self.a @ v


# --- 00: the toolkit -------------------------------------------------------------------------


def _ref_grad_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    from .pergrad import per_example_grad_norms

    return per_example_grad_norms(model, "ce", x, y, method="vmap")


def _cases_grad_norms() -> list[Case]:
    out = []
    for label, hidden, n, seed in (
        ("MLP 5-7-3, 6 examples", [7], 6, 0),
        ("MLP 4-6-6-3, 9 examples", [6, 6], 9, 1),
        ("one example", [5], 1, 2),
    ):
        x, y = _classification(n, 5 if hidden == [7] or n == 1 else 4, 3, seed)
        model = _mlp(x.shape[1], hidden, 3, seed)
        factors = {"n, the number of examples": n, "1/n: the gradient of the mean loss": 1 / n}
        out.append(Case(label, (model, x, y), factors=factors))
    return out


_register(
    Exercise(
        "00.per_example_grad_norms",
        "per_example_grad_norms(model, x, y) -> Tensor (n,)",
        "the norm of each example's own gradient of the cross-entropy loss, over all of the "
        "model's parameters, with vmap(grad) of a one-example loss (torch.func.functional_call)",
        "gc.pergrad.per_example_grad_norms",
        _ref_grad_norms,
        _cases_grad_norms,
    )
)


def _ref_hvp(model: nn.Module, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    from .curvature import HessianOperator

    return HessianOperator(model, "ce", (x, y), cache=False).matvec(v)


def _cases_hvp() -> list[Case]:
    out = []
    for label, hidden, n, seed in (
        ("MLP 4-6-3, 8 examples", [6], 8, 0),
        ("MLP 4-5-5-3, 5 examples", [5, 5], 5, 1),
        ("one example", [6], 1, 2),
    ):
        x, y = _classification(n, 4, 3, seed)
        model = _mlp(4, hidden, 3, seed)
        v = torch.randn(_flat_params(model).numel(), generator=_gen(seed + 10), dtype=torch.float64)
        out.append(Case(label, (model, x, y, v), factors={"n, the number of examples": n}))
    return out


_register(
    Exercise(
        "00.hvp",
        "hvp(model, x, y, v) -> Tensor (P,)",
        "the Hessian of the mean cross-entropy loss over (x, y) times the flat vector v "
        "(parameters in the order of model.parameters()), forward-over-reverse: jvp of grad",
        "gc.curvature.HessianOperator",
        _ref_hvp,
        _cases_hvp,
        rtol=1e-6,
        atol=1e-10,
    )
)


# --- 01: Hessian spectra ---------------------------------------------------------------------


def _ref_hutchinson(matvec: Callable[[Tensor], Tensor], probes: Tensor) -> tuple[float, float]:
    from .curvature.trace import _estimate

    samples = torch.stack([p @ matvec(p) for p in probes])
    est = _estimate(samples, 0.0, len(probes))
    return est.value, est.stderr


def _rademacher(m: int, p: int, seed: int) -> Tensor:
    return torch.randint(2, (m, p), generator=_gen(seed)).double() * 2 - 1


def _cases_hutchinson() -> list[Case]:
    out = []
    for label, eig, m, seed in (
        (
            "P = 12, 30 probes",
            [3.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1, 0.0, -0.1, -0.3, -0.5, -1.0],
            30,
            0,
        ),
        ("P = 6, 4 probes", [5.0, 1.0, 1.0, 0.5, 0.0, -2.0], 4, 1),
    ):
        a = _symmetric(eig, seed)
        out.append(
            Case(
                label,
                (_Matvec(a), _rademacher(m, len(eig), seed + 1)),
                factors={
                    "m, the number of probes": m,
                    "sqrt(m)": math.sqrt(m),
                    "1/sqrt(m)": 1 / math.sqrt(m),
                    "sqrt((m-1)/m): the population std (ddof=0), not the sample std": math.sqrt(
                        (m - 1) / m
                    ),
                },
            )
        )
    return out


_register(
    Exercise(
        "01.hutchinson",
        "hutchinson(matvec, probes) -> (estimate, standard_error)",
        "Hutchinson's estimate of the trace of A from the probes v_1..v_m (rows of `probes`): "
        "the mean of v_i . (A v_i), and its standard error (the sample standard deviation of "
        "the m terms over sqrt(m))",
        "gc.curvature.hutchinson_trace's estimate",
        _ref_hutchinson,
        _cases_hutchinson,
    )
)


def _ref_ritz(matvec: Callable[[Tensor], Tensor], v0: Tensor, k: int) -> Tensor:
    """An independent reference: an orthonormal basis of the Krylov space K_k(A, v0) by QR of
    [v0, A v0, ..., A^{k-1} v0] (no Lanczos recurrence), and the eigenvalues of Q^T A Q."""
    cols = [v0 / v0.norm()]
    for _ in range(k - 1):
        w = matvec(cols[-1])
        cols.append(w / w.norm())
    q, _ = torch.linalg.qr(torch.stack(cols, dim=1))
    aq = torch.stack([matvec(c) for c in q.T], dim=1)
    return torch.linalg.eigvalsh(q.T @ aq)


def _cases_ritz() -> list[Case]:
    out = []
    for label, eig, k, seed in (
        ("P = 10, k = 4", [4.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0], 4, 0),
        ("P = 6, k = 6 (the whole spectrum)", [3.0, 1.0, 0.5, -0.2, -1.0, -4.0], 6, 1),
        ("k = 1 (the Rayleigh quotient)", [2.0, 1.0, 0.0, -1.0], 1, 2),
    ):
        a = _symmetric(eig, seed)
        v0 = 2.0 * torch.randn(len(eig), generator=_gen(seed + 1), dtype=torch.float64)
        out.append(Case(label, (_Matvec(a), v0, k), factors={"||v0||^2": float(v0 @ v0)}))
    return out


_register(
    Exercise(
        "01.ritz_values",
        "ritz_values(matvec, v0, k) -> Tensor (k,), ascending",
        "k steps of Lanczos from v0 (normalised first), with full reorthogonalisation: the "
        "eigenvalues of the k x k tridiagonal matrix T (alpha on its diagonal, beta beside it)",
        "the eigenvalues of Q^T A Q, Q an orthonormal basis of the Krylov space (by QR)",
        _ref_ritz,
        _cases_ritz,
        rtol=1e-8,
        atol=1e-9,
    )
)


# --- 02: SGD stability -----------------------------------------------------------------------


def _ref_power(matvec: Callable[[Tensor], Tensor], v0: Tensor, iters: int) -> float:
    """The eigenvalue of largest magnitude, signed (exact, by eigvalsh of the matrix)."""
    lam = torch.linalg.eigvalsh(matvec.a)
    return float(lam[lam.abs().argmax()])


def _cases_power() -> list[Case]:
    out = []
    for label, eig, seed in (
        ("a positive top eigenvalue", [5.0, 2.0, 1.0, 0.5, -1.0, -0.5, 0.0, 0.2], 0),
        ("a negative top eigenvalue (a saddle)", [1.0, 0.5, -0.2, -4.0, 0.1, 2.0], 1),
    ):
        v0 = torch.randn(len(eig), generator=_gen(seed + 1), dtype=torch.float64)
        out.append(Case(label, (_Matvec(_symmetric(eig, seed)), v0, 200)))
    return out


_register(
    Exercise(
        "02.power_iteration",
        "power_iteration(matvec, v0, iters) -> float",
        "the eigenvalue of largest magnitude of A (signed) after `iters` steps of power "
        "iteration from v0: the Rayleigh quotient v . A v of the normalised last iterate",
        "the exact eigenvalues (torch.linalg.eigvalsh)",
        _ref_power,
        _cases_power,
        rtol=1e-8,
        atol=1e-9,
    )
)


def _ref_second_moment(hessians: Tensor, lr: float, batch_size: int, s: Tensor) -> Tensor:
    from .stability import second_moment_map

    return second_moment_map(hessians, lr, batch_size)(s)


def _cases_second_moment() -> list[Case]:
    out = []
    for label, n, r, b, seed in (
        ("n = 5 examples, batch 2", 5, 3, 2, 0),
        ("n = 4, batch 1", 4, 2, 1, 1),
        ("batch = n (gradient descent)", 4, 3, 4, 2),
    ):
        g = _gen(seed)
        a = torch.randn(n, r, r, generator=g, dtype=torch.float64)
        hessians = a @ a.transpose(1, 2) / r
        m = torch.randn(r, r, generator=g, dtype=torch.float64)
        out.append(Case(label, (hessians, 0.3, b, m @ m.T), factors={"the batch size": b}))
    return out


_register(
    Exercise(
        "02.second_moment_map",
        "second_moment_map(hessians, lr, batch_size, S) -> Tensor (r, r)",
        "E[(I - lr H_B) S (I - lr H_B)] over batches B of `batch_size` distinct examples drawn "
        "uniformly (H_B the mean of the batch's H_i): by enumerating the batches (tiny n), or "
        "with E[H_B S H_B] = H S H + c_B (1/n sum_i H_i S H_i - H S H), "
        "c_B = (n - B) / (B (n - 1))",
        "gc.stability.second_moment_map",
        _ref_second_moment,
        _cases_second_moment,
        rtol=1e-9,
        atol=1e-12,
    )
)


# --- 03: the neural tangent kernel -----------------------------------------------------------


def _ref_ntk(model: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    from .ntk import empirical_ntk

    return empirical_ntk(model, x1, x2, method="jacobian")


def _cases_ntk() -> list[Case]:
    out = []
    for label, hidden, n1, n2, seed in (
        ("MLP 3-16-1, 5 x 4 inputs", [16], 5, 4, 0),
        ("MLP 3-8-8-1, 3 x 3 inputs", [8, 8], 3, 3, 1),
        ("one input each", [16], 1, 1, 2),
    ):
        g = _gen(seed)
        x1 = torch.randn(n1, 3, generator=g, dtype=torch.float64)
        x2 = torch.randn(n2, 3, generator=g, dtype=torch.float64)
        out.append(Case(label, (_mlp(3, hidden, 1, seed, "relu"), x1, x2)))
    return out


_register(
    Exercise(
        "03.empirical_ntk",
        "empirical_ntk(model, x1, x2) -> Tensor (n1, n2)",
        "the empirical NTK J(x1) J(x2)^T of a scalar-output model, J the Jacobian of the "
        "outputs with respect to all parameters (vmap of jacrev, then a contraction per "
        "parameter)",
        "gc.ntk.empirical_ntk",
        _ref_ntk,
        _cases_ntk,
    )
)


def _ref_flow(kernel: Tensor, y: Tensor, f0: Tensor, t: float) -> Tensor:
    from .ntk import kernel_gradient_flow

    return kernel_gradient_flow(kernel, y, t, f0_train=f0).train


def _cases_flow() -> list[Case]:
    out = []
    for label, n, t, seed in (
        ("n = 6, t = 3", 6, 3.0, 0),
        ("n = 4, t = 0.5", 4, 0.5, 1),
        ("t = 0 (nothing trained yet)", 5, 0.0, 2),
    ):
        g = _gen(seed)
        a = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
        kernel = a @ a.T
        y = torch.randn(n, generator=g, dtype=torch.float64)
        f0 = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        out.append(Case(label, (kernel, y, f0, t), factors={"n": n}))
    return out


_register(
    Exercise(
        "03.kernel_flow",
        "kernel_flow(kernel, y, f0, t) -> Tensor (n,)",
        "the training outputs at time t of gradient flow on the mean squared error "
        "1/n sum 1/2 (f_i - y_i)^2 under a fixed kernel Theta (n, n): "
        "f_t = y + exp(-t Theta / n) (f0 - y), a matrix exponential",
        "gc.ntk.kernel_gradient_flow",
        _ref_flow,
        _cases_flow,
        rtol=1e-8,
        atol=1e-10,
    )
)


# --- 04: data diet ---------------------------------------------------------------------------


def _ref_el2n(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    from .scores import el2n_scores

    return el2n_scores(model, x, y)


def _cases_el2n() -> list[Case]:
    out = []
    for label, k, n, seed in (
        ("10 classes, 12 examples", 10, 12, 0),
        ("2 classes, 5 examples", 2, 5, 1),
        ("one example", 4, 1, 2),
        ("10 classes, labels 0-6 only (the classes are the model's outputs)", 10, 9, 3),
    ):
        x, y = _classification(n, 6, k, seed)
        if seed == 3:
            y = y % 7
        out.append(Case(label, (_mlp(6, [8], k, seed), x, y)))
    return out


_register(
    Exercise(
        "04.el2n",
        "el2n(model, x, y) -> Tensor (n,)",
        "EL2N of each example: the norm of softmax(f(x_i)) minus the one-hot vector of y_i",
        "gc.scores.el2n_scores",
        _ref_el2n,
        _cases_el2n,
    )
)


def _ref_forgetting(correct: Tensor) -> Tensor:
    from .scores import forgetting_events

    return forgetting_events(correct)


def _cases_forgetting() -> list[Case]:
    g = _gen(0)
    random = torch.rand(8, 20, generator=g) < 0.6
    hand = torch.tensor(
        [[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0]],
        dtype=torch.bool,
    ).T
    return [
        Case("8 records x 20 examples", (random,), factors={"T, the number of records": 8}),
        Case(
            "4 records, by hand, one example never right",
            (hand,),
            factors={"T, the number of records": 4},
        ),
    ]


_register(
    Exercise(
        "04.forgetting_events",
        "forgetting_events(correct) -> Tensor (n,)",
        "from correct (T, n) booleans (example i right at record t), the number of forgetting "
        "events of each example (right at t, wrong at t + 1); an example never right gets T",
        "gc.scores.forgetting_events",
        _ref_forgetting,
        _cases_forgetting,
    )
)


# --- 05: DP-SGD ------------------------------------------------------------------------------


def _ref_clip(g: Tensor, threshold: float) -> Tensor:
    from .privacy import clip

    return clip(g, threshold)


def _cases_clip() -> list[Case]:
    gen = _gen(0)
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    g[1] *= 0.05  # below the threshold: unchanged
    g[3] = 0.0  # a zero gradient stays zero
    return [
        Case("six rows, some below C = 1", (g, 1.0)),
        Case(
            "every row above C = 0.1", (torch.randn(4, 3, generator=gen, dtype=torch.float64), 0.1)
        ),
        Case(
            "every row below C = 100",
            (torch.randn(3, 7, generator=gen, dtype=torch.float64), 100.0),
        ),
    ]


_register(
    Exercise(
        "05.clip",
        "clip(g, C) -> Tensor (n, P)",
        "each row g_i of g scaled to norm at most C: exactly g_i min(1, C / ||g_i||), with no "
        "small constant added to the norm; a zero row stays zero",
        "gc.privacy.clip",
        _ref_clip,
        _cases_clip,
    )
)


def _ref_dp_step(
    model: nn.Module, x: Tensor, y: Tensor, threshold: float, sigma: float, z: Tensor
) -> Tensor:
    from .privacy import clipped_sum

    return (clipped_sum(model, "ce", x, y, threshold) + sigma * threshold * z) / len(x)


def _cases_dp_step() -> list[Case]:
    out = []
    for label, n, c, sigma, seed in (
        ("no noise (sigma = 0), batch 8, C = 0.5", 8, 0.5, 0.0, 0),
        ("sigma = 1, batch 6, C = 0.2", 6, 0.2, 1.0, 1),
        ("sigma = 2, one example, C = 3", 1, 3.0, 2.0, 2),
    ):
        x, y = _classification(n, 4, 3, seed)
        model = _mlp(4, [5], 3, seed)
        z = torch.randn(_flat_params(model).numel(), generator=_gen(seed + 5), dtype=torch.float64)
        out.append(
            Case(label, (model, x, y, c, sigma, z), factors={"the batch size b": n, "1/b": 1 / n})
        )
    return out


_register(
    Exercise(
        "05.dp_sgd_direction",
        "dp_sgd_direction(model, x, y, C, sigma, z) -> Tensor (P,)",
        "one DP-SGD update direction: the per-example gradients of the cross-entropy, each "
        "clipped to norm C, summed, plus the noise sigma C z (z given), divided by the batch "
        "size b; flat, in the order of model.parameters()",
        "gc.privacy.clipped_sum",
        _ref_dp_step,
        _cases_dp_step,
        rtol=1e-6,
        atol=1e-10,
    )
)


# --- 06: input gradients ---------------------------------------------------------------------


def _ref_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int
) -> Tensor:
    from .attribution import pgd

    adv = pgd(
        model, x, y, eps=eps, norm="linf", steps=steps, step_size=step_size, random_start=False
    )
    return adv - x


def _cases_pgd() -> list[Case]:
    out = []
    for label, steps, eps, step, seed in (
        ("one step, eps = 0.1", 1, 0.1, 0.1, 0),
        ("five steps of 0.05, eps = 0.1 (the projection binds)", 5, 0.1, 0.05, 1),
    ):
        g = _gen(seed)
        x = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(3, (4,), generator=g)
        out.append(Case(label, (_cnn(seed), x, y, eps, step, steps), factors={"eps": eps}))
    return out


_register(
    Exercise(
        "06.pgd_linf",
        "pgd_linf(model, x, y, eps, step_size, steps) -> Tensor, the perturbation delta",
        "`steps` steps of projected gradient ascent on the cross-entropy in the l-infinity ball "
        "of radius eps, from delta = 0: delta <- clamp(delta + step_size sign(grad), -eps, eps)",
        "gc.attribution.pgd",
        _ref_pgd,
        _cases_pgd,
        rtol=1e-9,
        atol=1e-12,
    )
)


def _ref_grad_cam(model: nn.Module, x: Tensor, layer: str, target: Tensor) -> Tensor:
    from .attribution import grad_cam

    return grad_cam(model, x, layer, target, resize=False)


def _cases_grad_cam() -> list[Case]:
    from .models import SmallCNN

    out = []
    for label, n, seed in (("three images", 3, 0), ("one image", 1, 1)):
        g = _gen(seed)
        model = _cnn(seed)
        layer = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
        x = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
        target = torch.randint(3, (n,), generator=g)
        # the feature map is 8 x 8 at a conv layer of SmallCNN (same padding)
        out.append(Case(label, (model, x, layer, target), factors={"h w, the positions": 64}))
    g = _gen(2)
    deeper = SmallCNN(1, 3, channels=(4, 4), hidden=8, pool_size=2, seed=2, dtype=torch.float64)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    target = torch.randint(3, (2,), generator=g)
    out.append(
        Case(
            "the second convolution, after pooling (a 4 x 4 map: not resized)",
            (deeper, x, "convs.1", target),
            factors={"h w, the positions": 16},
        )
    )
    return out


_register(
    Exercise(
        "06.grad_cam",
        "grad_cam(model, x, layer, target) -> Tensor (n, h, w)",
        "Grad-CAM at the submodule named `layer`: A its output (n, K, h, w), alpha_k the mean "
        "over positions of d logit_target / d A_k, the map ReLU(sum_k alpha_k A_k), not resized",
        "gc.attribution.grad_cam",
        _ref_grad_cam,
        _cases_grad_cam,
    )
)


# --- 07: intrinsic dimension -----------------------------------------------------------------


def _ref_subspace_forward(
    model: nn.Module,
    theta0: Tensor,
    P: Tensor,
    theta_d: Tensor,
    x: Tensor,  # noqa: N803
) -> Tensor:
    from .subspace import Projection, SubspaceModel

    class _Matrix(Projection):
        def __init__(self, matrix: Tensor) -> None:
            super().__init__(*matrix.shape)
            self.register_buffer("p", matrix)

        def forward(self, v: Tensor) -> Tensor:
            return self.p @ v

    net = copy.deepcopy(model)
    for p in net.parameters():  # a model already wrapped (its parameters frozen) is fine too
        p.requires_grad_(True)
    with torch.no_grad():  # theta0 as the network's own parameters, as SubspaceModel takes it
        torch.nn.utils.vector_to_parameters(theta0, [p for p in net.parameters()])
    sub = SubspaceModel(net, _Matrix(P))
    # theta_d as SubspaceModel's parameter, differentiably (the notebook's fallback needs the
    # gradient with respect to theta_d)
    return torch.func.functional_call(sub, {"theta_d": theta_d}, (x,))


def _cases_subspace_forward() -> list[Case]:
    out = []
    for label, net, x_shape, d, seed, zero in (
        ("MLP 5-7-3, d = 4", _mlp(5, [7], 3, 0), (6, 5), 4, 0, False),
        ("MLP 5-7-6-2, d = 1", _mlp(5, [7, 6], 2, 1), (3, 5), 1, 1, False),
        ("CNN (convolution and linear layers), d = 6", _cnn(2), (4, 1, 8, 8), 6, 2, False),
        ("MLP 5-7-3, theta_d = 0: the network at theta0", _mlp(5, [7], 3, 3), (6, 5), 3, 3, True),
    ):
        g = _gen(seed)
        D = sum(p.numel() for p in net.parameters())  # noqa: N806
        theta0 = torch.randn(D, generator=g, dtype=torch.float64)  # not the net's own values
        P = torch.randn(D, d, generator=g, dtype=torch.float64) / math.sqrt(D)  # noqa: N806
        theta_d = (
            torch.zeros(d, dtype=torch.float64)
            if zero
            else torch.randn(d, generator=g, dtype=torch.float64)
        )
        x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
        out.append(Case(label, (net, theta0, P, theta_d, x)))
    return out


_register(
    Exercise(
        "07.subspace_forward",
        "subspace_forward(model, theta0, P, theta_d, x) -> Tensor, the model's output",
        "the model's output on x with its parameters set to theta0 + P theta_d (theta0 flat (D,), "
        "P (D, d), flat in the order of model.named_parameters()), differentiable in theta_d",
        "gc.subspace.SubspaceModel",
        _ref_subspace_forward,
        _cases_subspace_forward,
    )
)


def _ref_d_int(ds: Sequence[int], acc: Sequence[float], threshold: float) -> float:
    from .experiments.intrinsic import crossing

    return crossing(ds, acc, threshold)


def _cases_d_int() -> list[Case]:
    grid = [100, 200, 400, 800, 1600]
    return [
        Case("crossing between 200 and 400", (grid, [0.5, 0.6, 0.75, 0.85, 0.9], 0.7)),
        Case("crossing between 800 and 1600", (grid, [0.3, 0.4, 0.5, 0.6, 0.9], 0.8)),
        Case("the threshold met exactly at 400", (grid, [0.5, 0.6, 0.7, 0.85, 0.9], 0.7)),
        Case(
            "a curve that dips after its first crossing", (grid, [0.5, 0.8, 0.7, 0.9, 0.95], 0.75)
        ),
        Case("the first grid d already reaches it", (grid, [0.8, 0.85, 0.9, 0.9, 0.9], 0.7)),
        Case("an uneven grid", ([50, 75, 300, 1000], [0.2, 0.55, 0.65, 0.8], 0.6)),
        Case("a curve that never reaches it (inf)", (grid, [0.5, 0.6, 0.7, 0.75, 0.78], 0.8)),
    ]


_register(
    Exercise(
        "07.d_int",
        "d_int(ds, acc, threshold) -> float",
        "the smallest d at which the accuracy curve reaches threshold: the first grid d with "
        "acc >= threshold, interpolated linearly in log d from the grid point before it (the "
        "first grid d when it already reaches it, math.inf when no grid d does)",
        "gc.experiments.intrinsic.crossing",
        _ref_d_int,
        _cases_d_int,
    )
)


# --- 08: scale-invariant weights -------------------------------------------------------------


def _ref_project_radial(w: Tensor, update: Tensor) -> Tensor:
    from .optim import scale_invariant_projection

    # a gradient orthogonal to every row of w passes AdamP's test per row, so the library
    # projects each row: the same operation the exercise asks for (eps = 0: no regulariser)
    unit = w / w.norm(dim=1, keepdim=True)
    g = torch.randn(w.shape, generator=_gen(99), dtype=w.dtype)
    g = g - unit * (unit * g).sum(dim=1, keepdim=True)
    out, projected = scale_invariant_projection(w, g, update, eps=0.0)
    if not projected:
        raise RuntimeError("the reference did not project: a checker bug")
    return out


def _cases_project_radial() -> list[Case]:
    g = _gen(0)
    out = []
    for label, shape in (
        ("a 5 x 8 weight", (5, 8)),
        ("a 1 x 6 weight (one row)", (1, 6)),
        ("a 4 x 30 weight", (4, 30)),
    ):
        w = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
        out.append(Case(label, (w, torch.randn(*shape, generator=g, dtype=torch.float64))))
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    out.append(Case("an update along the rows of w (all radial: the result is 0)", (w, 2 * w)))
    return out


_register(
    Exercise(
        "08.project_radial",
        "project_radial(w, update) -> Tensor, the shape of update",
        "each row of update minus its component along the same row of w: u - (u . w_hat) w_hat "
        "with w_hat = w_row / ||w_row|| (AdamP's projection, per output row)",
        "gc.optim.scale_invariant_projection",
        _ref_project_radial,
        _cases_project_radial,
        atol=1e-12,
    )
)


def _ref_norm_prediction(
    norm0_sq: float, update_norms_sq: Sequence[float], lr: float, beta: float
) -> Tensor:
    from .optim import momentum_norm_prediction

    return momentum_norm_prediction(norm0_sq, update_norms_sq, lr, beta)


def _cases_norm_prediction() -> list[Case]:
    g = _gen(1)
    p = (torch.rand(12, generator=g, dtype=torch.float64) + 0.5).tolist()
    return [
        Case("12 steps, beta = 0.9", (4.0, p, 0.1, 0.9)),
        Case("12 steps, beta = 0 (plain SGD)", (4.0, p, 0.1, 0.0)),
        Case("12 steps, beta = 0.99, lr = 0.5", (1.0, p, 0.5, 0.99)),
        Case("one step", (2.0, p[:1], 0.3, 0.9)),
    ]


_register(
    Exercise(
        "08.norm_prediction",
        "norm_prediction(norm0_sq, update_norms_sq, lr, beta) -> Tensor (T + 1,)",
        "||w_t||^2 for t = 0..T of heavy-ball SGD on a scale-invariant weight, from ||w_0||^2 "
        "and the momentum buffers' squared norms ||p_t||^2: ||w_{t+1}||^2 = ||w_t||^2 + "
        "lr^2 ||p_t||^2 + 2 lr^2 sum_{k<t} beta^(t-k) ||p_k||^2",
        "gc.optim.momentum_norm_prediction",
        _ref_norm_prediction,
        _cases_norm_prediction,
    )
)


# --- 10: coherent gradients -----------------------------------------------------------------


def _ref_coherence_ratio(grads: Tensor) -> Tensor:
    from .coherence import coherence_of

    return coherence_of(grads).ratio


def _cases_coherence_ratio() -> list[Case]:
    g = _gen(10)
    shared = torch.randn(1, 30, generator=g, dtype=torch.float64)
    return [
        Case(
            "8 random gradients in 50 dimensions",
            (torch.randn(8, 50, generator=g, dtype=torch.float64),),
        ),
        Case(
            "5 identical gradients (the ratio is m = 5)",
            (shared.repeat(5, 1),),
            factors={"m": 5.0},
        ),
        Case(
            "4 orthogonal gradients (the ratio is 1)", (torch.eye(4, 6, dtype=torch.float64) * 3,)
        ),
        Case(
            "20 gradients sharing a common part",
            (shared + 0.5 * torch.randn(20, 30, generator=g, dtype=torch.float64),),
            factors={"m": 20.0},
        ),
        Case(
            "a (6, 3, 4) stack: each example's gradient is a 3 x 4 matrix",
            (torch.randn(6, 3, 4, generator=g, dtype=torch.float64) + 1,),
            factors={"m": 6.0},
        ),
    ]


_register(
    Exercise(
        "10.coherence_ratio",
        "coherence_ratio(grads) -> float",
        "alpha / alpha_perp = ||sum_i g_i||^2 / sum_i ||g_i||^2 for per-example gradients given "
        "as a tensor (m, ...) (example i's gradient is grads[i], of any shape)",
        "gc.coherence.coherence_of(grads).ratio",
        _ref_coherence_ratio,
        _cases_coherence_ratio,
        rtol=1e-9,
    )
)


def _ref_median_of_means(g: Tensor, k: int) -> Tensor:
    from .coherence import median_of_means

    return median_of_means(g, k)


def _cases_median_of_means() -> list[Case]:
    g = _gen(11)
    return [
        Case(
            "9 examples, 4 coordinates, k = 3 (M3)",
            (torch.randn(9, 4, generator=g, dtype=torch.float64), 3),
        ),
        Case(
            "10 examples, k = 3 (groups of 4, 3 and 3)",
            (torch.randn(10, 5, generator=g, dtype=torch.float64), 3),
        ),
        Case(
            "8 examples, k = 4 (an even number of groups)",
            (torch.randn(8, 3, generator=g, dtype=torch.float64), 4),
        ),
        Case(
            "7 examples, k = 1 (the mean)", (torch.randn(7, 2, generator=g, dtype=torch.float64), 1)
        ),
        Case(
            "one outlier among 12 examples, k = 3",
            (
                torch.cat(
                    [
                        torch.randn(11, 3, generator=g, dtype=torch.float64),
                        torch.full((1, 3), 100.0, dtype=torch.float64),
                    ]
                ),
                3,
            ),
        ),
        Case(
            "6 examples of 2 x 3 gradients, k = 3",
            (torch.randn(6, 2, 3, generator=g, dtype=torch.float64), 3),
        ),
    ]


_register(
    Exercise(
        "10.median_of_means",
        "median_of_means(g, k) -> Tensor, the shape of g[0]",
        "split the m examples of g (m, ...) in order into k groups (torch.tensor_split), take "
        "each group's mean, then the coordinate-wise median of the k means (for an even k, the "
        "mean of the two middle values)",
        "gc.coherence.median_of_means",
        _ref_median_of_means,
        _cases_median_of_means,
        rtol=1e-9,
        atol=1e-12,
    )
)


# --- 11: batch size and gradient noise ------------------------------------------------------


def _ref_log_bisection(
    stable: Callable[[float], bool], low: float, high: float, iters: int
) -> float:
    from .batchsize import largest_stable_lr

    return largest_stable_lr(stable, low, high, iters=iters)


def _threshold(c: float) -> Callable[[float], bool]:
    def stable(lr: float) -> bool:
        return lr <= c

    return stable


def _cases_log_bisection() -> list[Case]:
    return [
        Case("threshold 0.37 in [1e-3, 10], 20 halvings", (_threshold(0.37), 1e-3, 10.0, 20)),
        Case("threshold 2.0 in [1e-3, 1e3], 12 halvings", (_threshold(2.0), 1e-3, 1e3, 12)),
        Case("threshold 5e-5 in [1e-6, 10], 8 halvings", (_threshold(5e-5), 1e-6, 10.0, 8)),
        Case("one halving", (_threshold(0.5), 0.01, 100.0, 1)),
        Case("stable everywhere: the answer is high", (_threshold(1e9), 0.01, 100.0, 10)),
    ]


_register(
    Exercise(
        "11.log_bisection",
        "log_bisection(stable, low, high, iters) -> float",
        "the largest lr in [low, high] with stable(lr) True, by bisection of log(lr): return high "
        "if stable(high); otherwise iters times test the midpoint of [log lo, log hi] and keep the "
        "half that brackets the threshold; return exp(log lo), the last stable rate",
        "gc.batchsize.largest_stable_lr",
        _ref_log_bisection,
        _cases_log_bisection,
        rtol=1e-12,
    )
)


def _ref_noise_std(eta: float, gamma: float, t: int) -> float:
    from .batchsize import GradientNoise

    return math.sqrt(GradientNoise(eta, gamma).variance(t))


def _cases_noise_std() -> list[Case]:
    return [
        Case("eta = 0.01, gamma = 0.55, t = 0", (0.01, 0.55, 0)),
        Case("eta = 0.3, gamma = 0.55, t = 10", (0.3, 0.55, 10)),
        Case("eta = 1.0, gamma = 0.55, t = 999", (1.0, 0.55, 999)),
        Case("eta = 0.3, gamma = 0 (no annealing), t = 50", (0.3, 0.0, 50)),
    ]


_register(
    Exercise(
        "11.noise_std",
        "noise_std(eta, gamma, t) -> float",
        "the standard deviation of Neelakantan et al.'s gradient noise at step t: its variance "
        "is eta / (1 + t)^gamma",
        "gc.batchsize.GradientNoise(eta, gamma).variance(t) ** 0.5",
        _ref_noise_std,
        _cases_noise_std,
        rtol=1e-12,
    )
)


# --- 12: sending less than the gradient -----------------------------------------------------


def _ref_dgc_compress(
    g: Tensor, u: Tensor, v: Tensor, momentum: float, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    from .distributed import dgc_compress

    return dgc_compress(g, u, v, momentum, k)


def _cases_dgc_compress() -> list[Case]:
    gen = _gen(12)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return [
        Case("a vector of 20, k = 3, momentum 0.9", (r(20), r(20), r(20), 0.9, 3)),
        Case("a 4 x 6 matrix, k = 5 (flat top-k)", (r(4, 6), r(4, 6), r(4, 6), 0.9, 5)),
        Case(
            "the first step: u = v = 0, k = 2",
            (
                r(10),
                torch.zeros(10, dtype=torch.float64),
                torch.zeros(10, dtype=torch.float64),
                0.9,
                2,
            ),
        ),
        Case("momentum 0: v accumulates g alone, k = 4", (r(12), r(12), r(12), 0.0, 4)),
        Case("k = the whole tensor: everything is sent", (r(7), r(7), r(7), 0.5, 7)),
        Case(
            "large negative accumulations: top-k by magnitude",
            (r(15), r(15), -10.0 * r(15).abs(), 0.9, 3),
        ),
    ]


_register(
    Exercise(
        "12.dgc_compress",
        "dgc_compress(g, u, v, momentum, k) -> (sent, u_new, v_new)",
        "momentum correction u_new = momentum * u + g, accumulation v_new = v + u_new; sent holds "
        "v_new at its k largest |entries| (over the flattened tensor) and 0 elsewhere; then v_new "
        "and u_new are set to 0 where sent (momentum-factor masking); do not modify the inputs",
        "gc.distributed.dgc_compress",
        _ref_dgc_compress,
        _cases_dgc_compress,
        rtol=1e-12,
        atol=1e-12,
    )
)


def _ref_quantise_byte(x: Tensor) -> Tensor:
    from .distributed import quantise_byte

    return quantise_byte(x)


def _cases_quantise_byte() -> list[Case]:
    gen = _gen(13)
    return [
        Case("values of either sign around 1", (torch.randn(12, generator=gen),)),
        Case(
            "magnitudes over nine decades (both ends clamp)",
            (torch.tensor([1e-6, -1e-3, 0.02, -0.3, 1.0, -7.0, 50.0, 1e3]),),
        ),
        Case("zero (its code is the smallest magnitude, sign +)", (torch.tensor([0.0, 0.5]),)),
        Case(
            "just either side of halfway between two codes: round to the nearest",
            (torch.exp(torch.tensor([0.45 / 16, 0.55 / 16, -1.55 / 16, 2.45 / 16])),),
        ),
    ]


_register(
    Exercise(
        "12.quantise_byte",
        "quantise_byte(x) -> uint8 tensor, the shape of x",
        "code = clamp(round(16 * ln|x|) + 64, 0, 127) in the low 7 bits, the sign (1 for x < 0) "
        "in the top bit: code | (sign << 7), as torch.uint8",
        "gc.distributed.quantise_byte",
        _ref_quantise_byte,
        _cases_quantise_byte,
        rtol=0,
        atol=0,
    )
)


# --- 09: Adam against SGD on transformers ----------------------------------------------------


def _ref_clip_top(g: Tensor, fraction: float) -> Tensor:
    from .directional import clip_coordinates

    return clip_coordinates(g, fraction)


def _heavy(n: int, seed: int) -> Tensor:
    """Coordinates with a heavy tail: Gaussian times a log-normal scale."""
    gen = _gen(seed)
    scale = torch.exp(2.0 * torch.randn(n, generator=gen, dtype=torch.float64))
    return torch.randn(n, generator=gen, dtype=torch.float64) * scale


def _cases_clip_top() -> list[Case]:
    skew = _heavy(50, 3)
    skew[skew.abs().argmax()] = -1e3  # the largest coordinate negative
    return [
        Case("1000 heavy-tailed coordinates, fraction 0.1", (_heavy(1000, 0), 0.1)),
        Case("1000 coordinates, fraction 0.5 (Pan & Li's rho for Adam)", (_heavy(1000, 1), 0.5)),
        Case(
            "37 coordinates, fraction 0.25 (floor(9.25) = 9 above the threshold)",
            (_heavy(37, 2), 0.25),
        ),
        Case("fraction 0: nothing is clipped", (_heavy(20, 4), 0.0)),
        Case("the largest coordinate is negative: it keeps its sign", (skew, 0.1)),
    ]


_register(
    Exercise(
        "09.clip_top",
        "clip_top(g, fraction) -> Tensor, the shape of g",
        "clip every coordinate of the flat gradient g into [-tau, tau], tau the "
        "(floor(fraction * d) + 1)-th largest |g_i| of its d coordinates (one global threshold)",
        "gc.directional.clip_coordinates",
        _ref_clip_top,
        _cases_clip_top,
        rtol=1e-12,
    )
)


def _ref_adam_direction(grads: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    from .directional import PseudoUpdates

    pseudo = PseudoUpdates(betas=(beta1, beta2), eps=eps)
    for g in grads:
        pseudo.update(g)
    return pseudo.directions()["adam"]


def _cases_adam_direction() -> list[Case]:
    def grads(t: int, p: int, seed: int) -> Tensor:
        return torch.stack([_heavy(p, seed + i) for i in range(t)])

    return [
        Case("one gradient: about sign(g)", (grads(1, 30, 0), 0.9, 0.999, 1e-8)),
        Case("5 gradients, betas (0.9, 0.999)", (grads(5, 30, 10), 0.9, 0.999, 1e-8)),
        Case("20 gradients, betas (0.5, 0.9)", (grads(20, 12, 20), 0.5, 0.9, 1e-8)),
        Case(
            "8 gradients, beta1 = 0 (RMSprop with bias correction)",
            (grads(8, 12, 40), 0.0, 0.99, 1e-8),
        ),
        Case("6 gradients, a large eps = 0.1", (grads(6, 12, 50), 0.9, 0.999, 0.1)),
    ]


_register(
    Exercise(
        "09.adam_direction",
        "adam_direction(grads, beta1, beta2, eps) -> Tensor (P,)",
        "feed the gradients grads[0], grads[1], ... (shape (T, P)) to Adam's moments "
        "m = beta1 m + (1 - beta1) g and v = beta2 v + (1 - beta2) g^2 (both from 0), and return "
        "Adam's direction m_hat / (sqrt(v_hat) + eps) with m_hat = m / (1 - beta1^T), "
        "v_hat = v / (1 - beta2^T)",
        "gc.directional.PseudoUpdates(...).directions()['adam'] (torch.optim.Adam's step / lr)",
        _ref_adam_direction,
        _cases_adam_direction,
        rtol=1e-9,
        atol=1e-12,
    )
)


def describe(name: str | None = None) -> str:
    """The exercises (or one of them) as text: name, signature, task, what it is checked against."""
    names = sorted(EXERCISES) if name is None else [name]
    lines = []
    for key in names:
        e = EXERCISES[key]
        lines.append(f"{e.name}: {e.signature}\n    {e.task}\n    checked against {e.against}")
    return "\n".join(lines)
