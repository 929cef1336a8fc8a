"""Notebook 00, the toolkit tour: small helpers around ``torch.func`` that the tour calls."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp

from ..checks import check_int, check_positive

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


def taylor_along_direction(
    loss: LossOfParams, params: Params, direction: Params, radius: float, num: int = 41
) -> dict[str, Tensor]:
    """The loss on the line params + t * direction, t in [-radius, radius], against its first- and
    second-order Taylor models L + t g.v and L + t g.v + t^2/2 v.Hv (g from ``grad``, Hv from
    :func:`hvp`)."""
    check_positive("radius", radius)
    check_int("num", num, 3)
    g = grad(loss)(params)
    hv = hvp(loss, params, direction)
    slope = sum((g[k] * direction[k]).sum() for k in params)
    curvature = sum((hv[k] * direction[k]).sum() for k in params)
    device = next(iter(params.values())).device
    ts = torch.linspace(-radius, radius, num, dtype=torch.float64, device=device)
    with torch.no_grad():
        values = torch.stack(
            [loss({k: p + t * direction[k] for k, p in params.items()}).double() for t in ts]
        )
    base = loss(params).detach().double()
    linear = base + ts * slope.detach().double()
    return {
        "t": ts,
        "loss": values,
        "linear": linear,
        "quadratic": linear + 0.5 * ts**2 * curvature.detach().double(),
        "curvature": curvature.detach(),
    }


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
