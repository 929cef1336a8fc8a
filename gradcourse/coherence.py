"""Coherence of per-example gradients, and robust averages of them (Chatterjee & Zielinski 2022,
"On the Generalization Mystery in Deep Learning", arXiv 2203.10036; Chatterjee, "Coherent
Gradients", ICLR 2020; Zielinski et al. 2020, "Weak and strong gradient directions",
arXiv 2003.07422).

For the per-example gradients g_1 ... g_m of a sample of m examples (g_i = grad_w l_i, not divided
by m, as in :mod:`gradcourse.pergrad`), the coherence is

    alpha = ||E g||^2 / E ||g||^2 = ||sum_i g_i||^2 / (m sum_i ||g_i||^2),

and the papers report it against its value for pairwise orthogonal gradients, alpha_perp = 1/m:

    alpha / alpha_perp = ||sum_i g_i||^2 / sum_i ||g_i||^2,

which is 1 when the g_i are orthogonal and m when they are all equal (in between, roughly how
many examples of the sample each example's gradient helps). Neither sum needs the g_i: the sum
of squared norms comes from :func:`gradcourse.pergrad.per_example_grad_norms` (the linear trick:
one batched backward pass for the layers it supports), and sum_i g_i is one batch gradient.
``method="vmap"`` materialises the g_i instead (the exact, slower route the tests compare with).

:func:`sign_flip_coherence` is the same ratio for s_i g_i with random signs s_i = +-1: its
expectation is exactly 1 whatever the g_i (the cross terms cancel), the floor a sample of
unrelated gradients sits on. :func:`alignment` is each example's cosine with a direction (by
default the sample's mean gradient), from one forward-mode product: g_i . v is the derivative of
l_i along v, so all m of them come from one ``jvp`` of the per-example losses.

Robust averages replace the mean of the g_i coordinate by coordinate (Zielinski et al. 2020):
:func:`winsorized_mean` clips each coordinate's m values to the (c+1)-th smallest and (c+1)-th
largest of them before averaging (c = 0 is the mean); :func:`median_of_means` splits the sample
into k groups and takes the coordinate-wise median of the k group means (k = 3: "M3").
:func:`robust_gradient` computes either for a model and a batch (the winsorised mean from
materialised per-example gradients, the median of means from k group gradients, which needs no
per-example gradient) and can store it in each parameter's ``.grad`` for any torch optimiser.

Everything runs the model in eval mode (modes restored afterwards), as :mod:`gradcourse.pergrad`
does: l_i must depend on example i alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from .checks import check_int
from .functional import FunctionalModel, flatten
from .losses import LossFn
from .pergrad import (
    _check_batchnorm,
    _check_method,
    _prepare,
    eval_mode,
    per_example_grad_norms,
    per_example_grads,
)

__all__ = [
    "AGGREGATORS",
    "Coherence",
    "alignment",
    "coherence",
    "coherence_of",
    "mean_gradient",
    "median_of_means",
    "robust_gradient",
    "sign_flip_coherence",
    "weighted_gradient",
    "winsorized_mean",
]

AGGREGATORS: tuple[str, ...] = ("mean", "winsorized", "median_of_means")


@dataclass(frozen=True)
class Coherence:
    """The two sums that define coherence on a sample of ``m`` examples."""

    m: int
    sum_sq_norms: float  # sum_i ||g_i||^2
    norm_sq_sum: float  # ||sum_i g_i||^2

    @property
    def alpha(self) -> float:
        """||E g||^2 / E||g||^2, in [0, 1]."""
        return self.ratio / self.m

    @property
    def ratio(self) -> float:
        """alpha / alpha_perp = ||sum g_i||^2 / sum ||g_i||^2, in [0, m] (1: orthogonal)."""
        if self.sum_sq_norms == 0.0:
            return float("nan")
        return self.norm_sq_sum / self.sum_sq_norms


def _as_matrix(grads: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(grads, Mapping):
        if not grads:
            raise ValueError("grads must hold at least one parameter's gradients")
        m = {len(g) for g in grads.values()}
        if len(m) != 1:
            raise ValueError(f"every gradient must hold the same number of examples, got {m}")
        return flatten(grads, batch_dims=1)
    if not isinstance(grads, Tensor) or grads.ndim < 1:
        raise ValueError("grads must be a tensor (m, ...) or a dict name -> (m, ...)")
    return grads.reshape(len(grads), -1)


def coherence_of(grads: Tensor | Mapping[str, Tensor]) -> Coherence:
    """Coherence of materialised per-example gradients: a tensor (m, ...) or a dict
    ``{name: (m, *shape)}`` as :func:`gradcourse.pergrad.per_example_grads` returns."""
    g = _as_matrix(grads)
    if len(g) == 0:
        raise ValueError("grads must hold at least one example, got 0")
    return Coherence(len(g), float(g.pow(2).sum()), float(g.sum(0).pow(2).sum()))


def _example_losses(fm: FunctionalModel):
    """(params, x, y) -> the per-example losses (n,), differentiable in params."""

    def one(params, xi, yi):
        return fm.loss(params, xi.unsqueeze(0), yi.unsqueeze(0))

    return vmap(one, in_dims=(None, 0, 0))


def _check_weights(weights: Tensor, n: int) -> Tensor:
    if not isinstance(weights, Tensor) or weights.shape != (n,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor of shape ({n},), got {shape}")
    if not torch.isfinite(weights).all():
        raise ValueError("weights must be finite")
    return weights


def weighted_gradient(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    weights: Tensor,
    *,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """sum_i w_i g_i for given weights w (n,), as ``{name: tensor}``: one backward pass of
    sum_i w_i l_i per chunk, in eval mode. With w_i = 1 it is sum_i g_i; with w_i = 1/n the mean
    gradient; with random signs the sign-flipped sum."""
    check_int("chunk_size", chunk_size, 1)
    _check_batchnorm(model)
    fm, x, y = _prepare(model, loss, x, y, None)
    w = _check_weights(weights, len(x)).to(
        device=x.device, dtype=next(iter(fm.params.values())).dtype
    )
    losses = _example_losses(fm)
    total = {name: torch.zeros_like(p) for name, p in fm.params.items()}
    with eval_mode(model):
        for start in range(0, len(x), chunk_size):
            stop = min(len(x), start + chunk_size)
            xc, yc, wc = x[start:stop], y[start:stop], w[start:stop]
            g = grad(lambda p, xc=xc, yc=yc, wc=wc: (losses(p, xc, yc) * wc).sum())(fm.params)
            for name in total:
                total[name] += g[name]
    return total


def mean_gradient(model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """(1/n) sum_i g_i, the gradient of the mean loss over (x, y), in eval mode."""
    n = len(x) if isinstance(x, Tensor) and x.ndim else 0
    return weighted_gradient(
        model, loss, x, y, torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    )


def coherence(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    *,
    method: str = "auto",
) -> Coherence:
    """Coherence of the per-example gradients of (x, y) at the model's current parameters.

    ``method``: ``"auto"`` / ``"linear_trick"`` take sum_i ||g_i||^2 from
    :func:`~gradcourse.pergrad.per_example_grad_norms` (the linear trick where the model allows
    it) and sum_i g_i from one batch gradient, never forming the g_i; ``"vmap"`` materialises
    them (:func:`~gradcourse.pergrad.per_example_grads`) and sums them.
    """
    method = _check_method(method)
    if method == "vmap":
        return coherence_of(per_example_grads(model, loss, x, y))
    sq = per_example_grad_norms(model, loss, x, y, method=method, squared=True)
    total = weighted_gradient(model, loss, x, y, torch.ones(len(x)))
    return Coherence(len(x), float(sq.sum()), float(flatten(total).pow(2).sum()))


def sign_flip_coherence(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    *,
    seed: int = 0,
    sum_sq_norms: float | None = None,
) -> float:
    """||sum_i s_i g_i||^2 / sum_i ||g_i||^2 with independent random signs s_i = +-1 drawn from
    ``seed``: the coherence ratio of the same gradients with their agreement destroyed. Its
    expectation over the signs is exactly 1 (the orthogonal floor). ``sum_sq_norms`` reuses a
    sum of squared norms already computed (e.g. :attr:`Coherence.sum_sq_norms`)."""
    check_int("seed", seed, 0)
    n = len(x) if isinstance(x, Tensor) and x.ndim else 0
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    flipped = weighted_gradient(model, loss, x, y, signs)
    if sum_sq_norms is None:
        sum_sq_norms = float(per_example_grad_norms(model, loss, x, y, squared=True).sum())
    return float(flatten(flipped).pow(2).sum()) / sum_sq_norms


def alignment(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    direction: Mapping[str, Tensor] | None = None,
    *,
    chunk_size: int = 1024,
) -> Tensor:
    """cos(g_i, v) for every example of (x, y): v is ``direction`` (a dict of tensors shaped
    like the trainable parameters) or, by default, the mean gradient of (x, y). The products
    g_i . v come from one forward-mode product (jvp) of the per-example losses along v, the norms
    from :func:`~gradcourse.pergrad.per_example_grad_norms`. An example whose gradient is zero
    gets cosine 0."""
    check_int("chunk_size", chunk_size, 1)
    _check_batchnorm(model)
    if direction is None:
        direction = mean_gradient(model, loss, x, y)
    fm, x, y = _prepare(model, loss, x, y, None)
    if set(direction) != set(fm.params):
        raise ValueError(
            f"direction must hold one tensor per trainable parameter {sorted(fm.params)}, "
            f"got {sorted(direction)}"
        )
    for name, p in fm.params.items():
        if direction[name].shape != p.shape:
            raise ValueError(
                f"direction[{name!r}] has shape {tuple(direction[name].shape)}, the parameter "
                f"{tuple(p.shape)}"
            )
    v = {name: direction[name].to(p) for name, p in fm.params.items()}
    v_norm = float(flatten(v).norm())
    if v_norm == 0.0:
        raise ValueError("direction is zero: no cosine is defined")
    losses = _example_losses(fm)
    dots = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(x), chunk_size):
            stop = min(len(x), start + chunk_size)
            xc, yc = x[start:stop], y[start:stop]
            _, d = jvp(lambda p, xc=xc, yc=yc: losses(p, xc, yc), (fm.params,), (v,))
            dots.append(d)
    dot = torch.cat(dots)
    norms = per_example_grad_norms(model, loss, x, y)
    return torch.where(norms > 0, dot / (norms * v_norm).clamp_min(1e-300), torch.zeros_like(dot))


# ----------------------------------------------------------------------------- robust averages


def _check_examples(g: Tensor) -> Tensor:
    if not isinstance(g, Tensor) or g.ndim < 1 or not g.dtype.is_floating_point:
        raise ValueError("g must be a floating tensor (m, ...) of m per-example values")
    if len(g) == 0:
        raise ValueError("g must hold at least one example, got 0")
    return g


def winsorized_mean(g: Tensor, c: int) -> Tensor:
    """The coordinate-wise winsorised mean of ``g`` (m, ...) over its first dimension: in each
    coordinate, the m values are clipped to [v_(c+1), v_(m-c)] (the (c+1)-th smallest and the
    (c+1)-th largest) and averaged. c = 0 is the mean; c must satisfy 0 <= 2c < m."""
    g = _check_examples(g)
    m = len(g)
    check_int("c", c, 0, (m - 1) // 2)
    if c == 0:
        return g.mean(0)
    hi = torch.topk(g, c + 1, dim=0, largest=True, sorted=True).values[-1]
    lo = torch.topk(g, c + 1, dim=0, largest=False, sorted=True).values[-1]
    return torch.minimum(torch.maximum(g, lo), hi).mean(0)


def _median(values: Tensor) -> Tensor:
    """The coordinate-wise median over the first dimension (the mean of the two middle values
    when their number is even)."""
    k = len(values)
    s = values.sort(dim=0).values
    if k % 2:
        return s[k // 2]
    return 0.5 * (s[k // 2 - 1] + s[k // 2])


def median_of_means(g: Tensor, k: int = 3) -> Tensor:
    """The coordinate-wise median of the means of k groups of ``g`` (m, ...): the examples split
    in order into k nearly equal groups (``torch.tensor_split``). k = 1 is the mean; k = 3 is
    Zielinski et al.'s M3. k must be in [1, m]."""
    g = _check_examples(g)
    check_int("k", k, 1, len(g))
    means = torch.stack([part.mean(0) for part in torch.tensor_split(g, k)])
    return _median(means)


def robust_gradient(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    aggregator: str = "mean",
    *,
    c: int = 1,
    k: int = 3,
    set_grad: bool = False,
) -> dict[str, Tensor]:
    """The batch's gradient with the mean over examples replaced by ``aggregator``:

    - ``"mean"``: the gradient of the mean loss;
    - ``"winsorized"``: :func:`winsorized_mean` with ``c`` of the per-example gradients
      (materialised by vmap, n x P numbers);
    - ``"median_of_means"``: :func:`median_of_means` with ``k`` groups, from k group gradients
      (one backward pass each; no per-example gradient is formed).

    Computed in eval mode. With ``set_grad`` each trainable parameter's ``.grad`` is set to its
    part (then ``optimizer.step()`` takes it), and the dict is returned either way.
    """
    if aggregator not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {aggregator!r}")
    n = len(x) if isinstance(x, Tensor) and x.ndim else 0
    if aggregator == "mean":
        out = mean_gradient(model, loss, x, y)
    elif aggregator == "winsorized":
        check_int("c", c, 0, max(0, (n - 1) // 2))
        grads = per_example_grads(model, loss, x, y)
        out = {name: winsorized_mean(g, c) for name, g in grads.items()}
    else:
        check_int("k", k, 1, max(1, n))
        _check_batchnorm(model)
        fm, xs, ys = _prepare(model, loss, x, y, None)
        with eval_mode(model):
            group_means = [
                grad(fm.loss)(fm.params, xs[part], ys[part])
                for part in torch.tensor_split(torch.arange(n, device=xs.device), k)
            ]
        out = {
            name: _median(torch.stack([gm[name] for gm in group_means])) for name in group_means[0]
        }
    if set_grad:
        params = dict(model.named_parameters())
        for name, g in out.items():
            p = params[name]
            p.grad = g.detach().to(p).clone()
    return out
