"""Notebook 00, the toolkit tour: small helpers around ``torch.func`` that the tour calls, and the
measurements that show each of its checks can fail (error scaling laws, a symmetry test, and the
replay of a check on a wrong computation)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp

from ..checks import check_int, check_positive
from ..claims import Verdict, evaluate
from ..plotting import loglog_slope

Params = dict[str, Tensor]
LossOfParams = Callable[[Params], Tensor]


def random_direction(params: Params, seed: int) -> Params:
    """A random direction in parameter space with unit norm over all tensors together."""
    gen = torch.Generator().manual_seed(seed)
    direction = {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
        for k, v in params.items()
    }
    norm = torch.sqrt(sum((d**2).sum() for d in direction.values()))
    return {k: d / norm for k, d in direction.items()}


def hvp(loss: LossOfParams, params: Params, v: Params) -> Params:
    """Hessian-vector product H v, forward-over-reverse: the directional derivative (``jvp``) of
    the gradient (``grad``) along v. Costs about one gradient and one forward-mode pass."""
    return jvp(grad(loss), (params,), (v,))[1]


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in b)


def _norm(a: Params) -> Tensor:
    return torch.sqrt(_dot(a, a))


def taylor_models(
    loss: LossOfParams,
    params: Params,
    direction: Params,
    ts: Tensor,
    curvature: float | None = None,
) -> dict[str, Tensor]:
    """The loss on the line params + t * direction at the given ``ts``, against its first- and
    second-order Taylor models L + t g.v and L + t g.v + t^2/2 v.Hv (g from ``grad``, Hv from
    :func:`hvp`). ``curvature`` replaces v.Hv in the second-order model (to see what a wrong
    curvature, e.g. the Gauss-Newton v.Gv, does to it); all values in float64."""
    g = grad(loss)(params)
    if curvature is None:
        curvature = _dot(hvp(loss, params, direction), direction).detach()
    curvature = torch.as_tensor(curvature, dtype=torch.float64).detach().cpu()
    slope = _dot(g, direction).detach().double().cpu()
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    with torch.no_grad():
        values = torch.stack(
            [
                loss({k: p + float(t) * direction[k] for k, p in params.items()}).double().cpu()
                for t in ts
            ]
        )
        base = loss(params).detach().double().cpu()
    linear = base + ts * slope
    return {
        "t": ts,
        "loss": values,
        "linear": linear,
        "quadratic": linear + 0.5 * ts**2 * curvature,
        "curvature": curvature,
    }


def taylor_along_direction(
    loss: LossOfParams,
    params: Params,
    direction: Params,
    radius: float,
    num: int = 41,
    curvature: float | None = None,
) -> dict[str, Tensor]:
    """:func:`taylor_models` on ``num`` points t evenly spaced in [-radius, radius]."""
    check_positive("radius", radius)
    check_int("num", num, 3)
    ts = torch.linspace(-radius, radius, num, dtype=torch.float64)
    return taylor_models(loss, params, direction, ts, curvature)


def taylor_error_slopes(
    loss: LossOfParams,
    params: Params,
    direction: Params,
    ts: Tensor,
    curvature: float | None = None,
) -> dict[str, Any]:
    """How fast the Taylor models' errors shrink as t -> 0: the errors |L(theta + t v) - model|
    at ``ts`` (all > 0) and their log-log slopes (least squares). For a smooth loss the
    first-order model's error is t^2/2 v'Hv + O(t^3) (slope 2) and the second-order model's
    t^3/6 D^3L[v, v, v] + O(t^4) (slope 3), as long as these leading terms stand above float64
    rounding of L and above the next order over the range of ``ts``. A wrong curvature leaves
    an error (v'Hv - curvature) t^2/2 in the second-order model: slope 2."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.numel() < 2 or bool((ts <= 0).any()):
        raise ValueError(f"ts must hold >= 2 positive steps, got {ts.tolist()}")
    r = taylor_models(loss, params, direction, ts, curvature)
    linear_error = (r["loss"] - r["linear"]).abs()
    quadratic_error = (r["loss"] - r["quadratic"]).abs()
    return {
        "t": r["t"],
        "linear_error": linear_error,
        "quadratic_error": quadratic_error,
        "linear_slope": _slope(r["t"], linear_error),
        "quadratic_slope": _slope(r["t"], quadratic_error),
        "curvature": r["curvature"],
    }


def _slope(x: Tensor, y: Tensor) -> float:
    """The log-log slope; NaN where an error is exactly zero (a slope cannot be fitted)."""
    if bool((y <= 0).any()):
        return float("nan")
    return loglog_slope(x.tolist(), y.tolist())


def central_difference(loss: LossOfParams, params: Params, v: Params, eps: float) -> Params:
    """(grad L(theta + eps v) - grad L(theta - eps v)) / (2 eps): the finite-difference
    approximation of H v (error eps^2/6 D^3L[v, v, .] + O(eps^4), plus rounding)."""
    check_positive("eps", eps)
    g_plus = grad(loss)({k: p + eps * v[k] for k, p in params.items()})
    g_minus = grad(loss)({k: p - eps * v[k] for k, p in params.items()})
    return {k: (g_plus[k] - g_minus[k]) / (2 * eps) for k in params}


def finite_difference_sweep(
    loss: LossOfParams,
    params: Params,
    v: Params,
    product: Params,
    epsilons: Sequence[float],
) -> dict[str, Tensor]:
    """The :func:`relative_error` of :func:`central_difference` against ``product`` (H v, or a
    candidate for it) for each step in ``epsilons``, beside a model of the rounding error: each
    entry of a gradient carries an absolute rounding error of at least u max|g| (u = 2^-53,
    float64's unit roundoff; more in practice, an entry being a sum of many rounded terms),
    which the difference divides by eps, so in units of max|H v| (those of
    :func:`relative_error`) the rounding part is about u max|g| / (eps max|H v|), growing as
    1/eps while the truncation error falls as eps^2.

    Returns ``eps``, ``error`` and ``rounding_model`` (float64 tensors, one entry per step)."""
    if len(epsilons) < 1:
        raise ValueError("epsilons must hold at least one step")
    eps = torch.tensor([check_positive("epsilons", e) for e in epsilons], dtype=torch.float64)
    errors = [relative_error(central_difference(loss, params, v, float(e)), product) for e in eps]
    g_max = max(t.abs().max().item() for t in grad(loss)(params).values())
    scale = max(t.abs().max().item() for t in product.values())
    unit_roundoff = torch.finfo(torch.float64).eps / 2
    return {
        "eps": eps,
        "error": torch.tensor(errors, dtype=torch.float64),
        "rounding_model": unit_roundoff * g_max / (eps * scale),
    }


def symmetry_error(u: Params, hv: Params, v: Params, hu: Params) -> float:
    """|u'(Hv) - v'(Hu)| / max(||u|| ||Hv||, ||v|| ||Hu||): the asymmetry of a candidate
    Hessian-vector product, relative to the largest value either inner product can take
    (Cauchy-Schwarz), so one tolerance fits every scale. Zero for any symmetric linear map
    (the Hessian, but also the zero map, c H or the Gauss-Newton matrix): necessary, not
    sufficient."""
    a, b = _dot(u, hv).item(), _dot(v, hu).item()
    scale = max(_norm(u).item() * _norm(hv).item(), _norm(v).item() * _norm(hu).item())
    if scale == 0:
        return 0.0 if a == b else float("inf")
    return abs(a - b) / scale


def relative_error(a: Tensor | Params, b: Tensor | Params) -> float:
    """max |a - b| / max |b| over all entries (of all tensors, for dicts): the error of ``a``
    against the reference ``b`` in units of the reference's largest entry, so that one tolerance
    fits every scale of a float64 computation."""
    if isinstance(b, dict):
        a = torch.cat([a[k].flatten() for k in b])
        b = torch.cat([b[k].flatten() for k in b])
    scale = b.abs().max().item()
    if scale == 0:
        raise ValueError("relative_error: the reference b is all zeros")
    return (a - b).abs().max().item() / scale


def time_median(fn: Callable[[], Any], repeats: int = 5) -> float:
    """The median wall time of ``repeats`` calls of ``fn``, in seconds, after one untimed call
    (which pays one-off costs: allocations, lazy initialisation, caches)."""
    check_int("repeats", repeats, 1)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recheck(verdict: Verdict, measured: Any, label: str) -> bool:
    """Apply the check behind ``verdict`` (same comparison, expected value and tolerances) to
    ``measured``, a wrong computation's value; print one line saying whether the check catches
    it; return True when it does (the check fails on it)."""
    holds = bool(evaluate(measured, verdict.expected, verdict.compare, verdict.tol, verdict.rtol))
    value = f"{measured:.3g}" if isinstance(measured, float) else str(measured)
    outcome = "caught:     fails" if not holds else "NOT caught: passes"
    print(
        f"{outcome} {verdict.name!r} on {label}: measured {value}, expected {verdict.expected_text}"
    )
    return not holds
