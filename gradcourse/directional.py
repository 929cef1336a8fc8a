"""Why Adam trains transformers faster than SGD, measured along each optimiser's own step
(Pan & Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers",
arXiv 2306.00204; the measures as the authors' code computes them).

**Directional sharpness.** For an update u (the step is ``theta - eta u``), a second-order
expansion gives f(theta - eta u) = f(theta) - eta g.u + (eta^2 / 2) S(u) ||u||^2 + ..., with

    S(u) = u^T H u / ||u||^2,

the curvature of the loss along u (:func:`directional_sharpness`, one Hessian-vector product;
signed: it can be negative). A smaller S allows a larger step along u and a larger decrease.

**Local decrease.** :func:`line_search` walks along the unit direction -u/||u|| in equal steps
from the current point, stops at the first loss above the starting one, and shrinks the spacing
(by 5) when that leaves fewer than 4 points; the decrease is L(0) - min_t L(t). Being along a
unit direction, it compares directions, not step lengths.

**Coordinate-wise clipping.** One global threshold tau over all parameters: the
(floor(rho d) + 1)-th largest |g_i| of the d coordinates, and every coordinate clipped into
[-tau, tau] (:func:`coordinate_threshold`, :func:`clip_coordinates`, and
:func:`clip_coordinates_` in place on ``.grad``, used like ``torch.nn.utils.clip_grad_norm_``
before any optimiser's step; for SGD that is before momentum).

**Pseudo-updates.** :class:`PseudoUpdates` keeps the states of several optimisers fed the same
gradient sequence (one trajectory, whichever optimiser moves it) and returns the direction each
would step in now: SGD (g), SGD with clipping, SGD with momentum (m = beta m + (1 - beta) g, as
the authors' code; the direction is what matters, not its scale), momentum with clipping, Adam
(bias-corrected m / (sqrt(v) + eps)) and Adam with clipped gradients, and a control:
``sgd_shuffled`` scales g by the same clip factors min(1, tau/|g_i|) assigned to randomly
permuted coordinates, so it shrinks as many coordinates by as much as clipping does, but not
the ones with the largest gradients.

Models with attention: PyTorch's fused scaled-dot-product attention on the CPU has neither a
double backward nor forward-mode AD, so every product here, and every curvature operator
(:class:`gradcourse.functional.FunctionalModel`), runs attention under the math kernel
(:func:`gradcourse.functional.math_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .checks import check_int, check_number, check_positive
from .curvature.operators import LiveHessianOperator
from .functional import FunctionalModel, math_attention
from .losses import LossFn

__all__ = [
    "coordinate_threshold",
    "clip_coordinates",
    "clip_coordinates_",
    "directional_sharpness",
    "directional_sharpnesses",
    "LineSearch",
    "line_search",
    "PseudoUpdates",
    "DIRECTIONS",
]


def _check_fraction(fraction: object) -> float:
    return check_number("fraction", fraction, low=0, high=1, high_open=True)


def _flat(tensors: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
    if isinstance(tensors, Tensor):
        return tensors.reshape(-1)
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if not values:
        raise ValueError("tensors must hold at least one tensor")
    return torch.cat([t.detach().reshape(-1) for t in values])


def _check_finite_vector(name: str, v: Tensor) -> None:
    if not v.is_floating_point():
        raise ValueError(f"{name} must be floating, got dtype {v.dtype}")
    if not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).sum())
        raise ValueError(f"{name} must hold finite numbers: {bad} of {v.numel()} are nan or inf")


def coordinate_threshold(
    tensors: Tensor | Sequence[Tensor] | Mapping[str, Tensor], fraction: float
) -> float:
    """The global clipping threshold tau: the (floor(fraction d) + 1)-th largest |g_i| over all
    d coordinates of ``tensors`` (one tensor, a list or a dict). ``fraction`` in [0, 1): about
    that share of the coordinates lies above tau (ties aside); 0 gives max |g_i| (nothing is
    clipped)."""
    fraction = _check_fraction(fraction)
    flat = _flat(tensors)
    _check_finite_vector("tensors", flat)
    d = flat.numel()
    k = d - math.floor(fraction * d)  # the k-th smallest |g| is the (floor(rho d) + 1)-th largest
    return float(torch.kthvalue(flat.abs().double(), k).values)


def clip_coordinates(
    tensors: Tensor | Sequence[Tensor] | Mapping[str, Tensor], fraction: float
) -> Tensor | list[Tensor] | dict[str, Tensor]:
    """``tensors`` with every coordinate clipped into [-tau, tau],
    tau = :func:`coordinate_threshold` (tensors, fraction); same container as given."""
    tau = coordinate_threshold(tensors, fraction)
    if isinstance(tensors, Tensor):
        return tensors.clamp(-tau, tau)
    if isinstance(tensors, Mapping):
        return {k: t.clamp(-tau, tau) for k, t in tensors.items()}
    return [t.clamp(-tau, tau) for t in tensors]


def clip_coordinates_(parameters: Iterable[Tensor] | Tensor, fraction: float) -> float:
    """Clip the gradients of ``parameters`` in place, coordinate-wise at one global threshold
    (:func:`coordinate_threshold` over all their ``.grad``), and return tau. Call it between
    ``backward()`` and the optimiser's ``step()``, as ``torch.nn.utils.clip_grad_norm_``;
    parameters without a gradient are skipped. ``fraction=0`` leaves the gradients as they are."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("no parameter has a gradient: call backward() before clip_coordinates_")
    tau = coordinate_threshold(grads, fraction)
    with torch.no_grad():
        for g in grads:
            g.clamp_(-tau, tau)
    return tau


def _as_vector(u: Tensor | Sequence[Tensor] | Mapping[str, Tensor], size: int) -> Tensor:
    v = _flat(u)
    if v.numel() != size:
        raise ValueError(
            f"u must have {size} entries (one per trainable parameter), got {v.numel()}"
        )
    _check_finite_vector("u", v)
    if float(v.norm()) == 0.0:
        raise ValueError("u must be a nonzero direction (its norm is 0)")
    return v


def directional_sharpnesses(
    model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor, directions: Mapping[str, Tensor]
) -> dict[str, float]:
    """S(u) = u^T H u / ||u||^2 for each direction u (flat, length P, or shaped like the
    trainable parameters), H the Hessian of the mean loss over (x, y) at ``model``'s current
    parameters: one graph, one Hessian-vector product per direction (double backward, under the
    math attention kernel). The model must be in a deterministic mode (no dropout, BatchNorm
    with running statistics)."""
    with math_attention():
        op = LiveHessianOperator(model, loss, x, y)
        out = {}
        for name, u in directions.items():
            v = _as_vector(u, op.shape[0]).to(op.dtype)
            out[name] = float(v @ op.matvec(v) / (v @ v))
    return out


def directional_sharpness(
    model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor, u: Tensor
) -> float:
    """S(u) = u^T H u / ||u||^2 of one direction; see :func:`directional_sharpnesses`."""
    return directional_sharpnesses(model, loss, x, y, {"u": u})["u"]


@dataclass
class LineSearch:
    """A line search along -u/||u||: ``losses[i]`` at distance ``i * spacing`` (the last one,
    the first loss above ``losses[0]``, ends the walk unless ``points`` ran out first);
    ``decrease`` = losses[0] - min(losses), reached at distance ``best``; ``shrinks``: how many
    times the spacing was divided by ``shrink`` to get at least ``min_points`` points."""

    losses: list[float]
    spacing: float
    best: float
    decrease: float
    shrinks: int
    distances: list[float] = field(default_factory=list)


def line_search(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    u: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    *,
    spacing: float = 1.0,
    points: int = 20,
    min_points: int = 4,
    shrink: float = 5.0,
    max_shrinks: int = 12,
) -> LineSearch:
    """The best decrease of the mean loss over (x, y) along the unit direction -u/||u|| from
    ``model``'s current parameters (which are not changed): losses at distances 0, s, 2s, ...,
    ``points * s``, stopping after the first one above the start; if that leaves fewer than
    ``min_points`` losses, s is divided by ``shrink`` and the walk redone (at most
    ``max_shrinks`` times), as in Pan & Li's code."""
    spacing = check_positive("spacing", spacing)
    points = check_int("points", points, 1)
    min_points = check_int("min_points", min_points, 2, points + 1)
    shrink = check_number("shrink", shrink, low=1, low_open=True)
    max_shrinks = check_int("max_shrinks", max_shrinks, 0)
    with math_attention():
        fm = FunctionalModel(model, loss, copy=True)
        v = _as_vector(u, fm.size).to(fm.dtype)
        v = v / v.norm()
        theta = fm.flatten(fm.params)
        x, y = fm.place_batch(x, y)

        def at(distance: float) -> float:
            with torch.no_grad():
                value = float(fm.loss(fm.unflatten(theta - distance * v), x, y))
            return value if math.isfinite(value) else math.inf

        start = at(0.0)
        if not math.isfinite(start):
            raise ValueError("the loss at the current parameters is not finite")
        for shrinks in range(max_shrinks + 1):
            losses = [start]
            for i in range(1, points + 1):
                losses.append(at(i * spacing))
                if losses[-1] > start:
                    break
            if len(losses) >= min_points or shrinks == max_shrinks:
                break
            spacing /= shrink
    best = min(range(len(losses)), key=losses.__getitem__)
    return LineSearch(
        losses=losses,
        spacing=spacing,
        best=best * spacing,
        decrease=start - losses[best],
        shrinks=shrinks,
        distances=[i * spacing for i in range(len(losses))],
    )


#: The directions :class:`PseudoUpdates` returns, in order.
DIRECTIONS = (
    "sgd",
    "sgd_clip",
    "sgd_shuffled",
    "momentum",
    "momentum_clip",
    "adam",
    "adam_clip",
)


class PseudoUpdates:
    """The update direction each of several optimisers would take, all fed the same gradients.

    Call :meth:`update` with each new gradient (flat, or a list / dict of tensors), then
    :meth:`directions` for the directions u (the step is -lr u) named in :data:`DIRECTIONS`:

    - ``sgd``: g;  ``sgd_clip``: clip(g, ``sgd_fraction``);
    - ``sgd_shuffled`` (control): g_i times the clip factor min(1, tau/|g_pi(i)|) of a random
      permutation pi (drawn anew at each update from ``seed``): the same set of factors as
      clipping, put on coordinates chosen blind to the gradient;
    - ``momentum``: m <- beta m + (1 - beta) g (``momentum`` = beta; the first m is g);
      ``momentum_clip``: the same on clip(g, ``sgd_fraction``), clipping before momentum;
    - ``adam``: m_hat / (sqrt(v_hat) + eps) with torch.optim.Adam's bias corrections;
      ``adam_clip``: Adam fed clip(g, ``adam_fraction``) (both moments), which is what
      :func:`clip_coordinates_` before ``torch.optim.Adam.step`` trains with. (Pan & Li's code
      feeds the clipped gradient to the first moment only.)
    """

    def __init__(
        self,
        *,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        sgd_fraction: float = 0.1,
        adam_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = tuple(
            check_number(f"betas[{i}]", b, low=0, high=1, high_open=True)
            for i, b in enumerate(betas)
        )
        self.eps = check_positive("eps", eps)
        self.sgd_fraction = check_number(
            "sgd_fraction", sgd_fraction, low=0, high=1, high_open=True
        )
        self.adam_fraction = check_number(
            "adam_fraction", adam_fraction, low=0, high=1, high_open=True
        )
        self._gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        self.steps = 0
        self._g: Tensor | None = None

    def update(self, grad: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> None:
        """Feed one gradient to every optimiser's state."""
        g = _flat(grad).detach().clone()
        _check_finite_vector("grad", g)
        if self._g is not None and g.numel() != self._g.numel():
            raise ValueError(f"grad must have {self._g.numel()} entries, got {g.numel()}")
        clip_sgd = clip_coordinates(g, self.sgd_fraction)
        clip_adam = clip_coordinates(g, self.adam_fraction)
        factors = torch.ones_like(g)
        nonzero = g != 0
        factors[nonzero] = clip_sgd[nonzero] / g[nonzero]
        perm = torch.randperm(g.numel(), generator=self._gen).to(g.device)
        self._shuffled = g * factors[perm]
        b, (b1, b2) = self.momentum, self.betas
        if self.steps == 0:
            self._m, self._m_clip = g.clone(), clip_sgd.clone()
            self._adam = [torch.zeros_like(g) for _ in range(4)]
        else:
            self._m.mul_(b).add_(g, alpha=1 - b)
            self._m_clip.mul_(b).add_(clip_sgd, alpha=1 - b)
        for (m, v), gg in ((self._adam[:2], g), (self._adam[2:], clip_adam)):
            m.mul_(b1).add_(gg, alpha=1 - b1)
            v.mul_(b2).addcmul_(gg, gg, value=1 - b2)
        self._g, self._g_clip = g, clip_sgd
        self.steps += 1

    def _adam_direction(self, m: Tensor, v: Tensor) -> Tensor:
        b1, b2 = self.betas
        m_hat = m / (1 - b1**self.steps)
        return m_hat / ((v / (1 - b2**self.steps)).sqrt() + self.eps)

    def directions(self) -> dict[str, Tensor]:
        """Each optimiser's current direction u (flat), named as in :data:`DIRECTIONS`."""
        if self._g is None:
            raise RuntimeError("call update(grad) at least once before directions()")
        return {
            "sgd": self._g.clone(),
            "sgd_clip": self._g_clip.clone(),
            "sgd_shuffled": self._shuffled.clone(),
            "momentum": self._m.clone(),
            "momentum_clip": self._m_clip.clone(),
            "adam": self._adam_direction(*self._adam[:2]),
            "adam_clip": self._adam_direction(*self._adam[2:]),
        }
