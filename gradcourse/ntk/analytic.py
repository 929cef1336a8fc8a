"""The infinite-width NNGP and NTK of a fully connected ReLU network, layer by layer.

The kernels of a fully connected ReLU net in the NTK parameterisation as its width tends to
infinity (:class:`gradcourse.models.MLP` with ``parameterization="ntk"``), built layer by layer
from small pure functions of a :class:`Kernel` (Jacot et al. 2018, Proposition 1 and Theorem 1):

    Sigma^(1)(x, x') = sigma_w^2 x.x'/n0 + beta^2,                  Theta^(1) = Sigma^(1)
    Sigma^(l+1)      = sigma_w^2 E[relu(u) relu(v)] + beta^2,         (u, v) ~ N(0, Sigma^(l))
    Theta^(l+1)      = Theta^(l) dotSigma^(l+1) + Sigma^(l+1),  dotSigma^(l+1) = sigma_w^2 E[relu'(u) relu'(v)]

with the arc-cosine expectations of Cho & Saul (2009). See :func:`analytic_ntk`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int, check_nonnegative, check_positive
from ._checks import _check_inputs

__all__ = ["Kernel", "input_kernel", "dense_kernel", "relu_kernel", "analytic_ntk"]


@dataclass(frozen=True)
class Kernel:
    """The infinite-width kernels of one layer's pre-activations (or activations) on x1 x x2.

    ``nngp`` (n1, n2): Sigma(x, x'), the covariance of the Gaussian process the layer's units
    tend to (Jacot et al. 2018, Proposition 1); ``ntk`` (n1, n2): Theta(x, x') (Theorem 1);
    ``var1`` (n1,), ``var2`` (n2,): Sigma(x, x) and Sigma(x', x'), needed by nonlinearities.
    """

    nngp: Tensor
    ntk: Tensor
    var1: Tensor
    var2: Tensor


def input_kernel(
    x1: Tensor, x2: Tensor | None = None, *, dtype: torch.dtype = torch.float64
) -> Kernel:
    """The kernel of the inputs, Sigma^(0)(x, x') = x.x'/n0 (inputs flattened from dim 1), and
    Theta^(0) = 0 (an input has no parameters)."""
    x1 = _check_inputs("x1", x1).flatten(1).to(dtype)
    x2 = x1 if x2 is None else _check_inputs("x2", x2).flatten(1).to(device=x1.device, dtype=dtype)
    if x2.shape[1] != x1.shape[1]:
        raise ValueError(f"x2 must have n0 = {x1.shape[1]} features, got {x2.shape[1]}")
    n0 = x1.shape[1]
    nngp = x1 @ x2.T / n0
    return Kernel(nngp, torch.zeros_like(nngp), x1.pow(2).sum(1) / n0, x2.pow(2).sum(1) / n0)


def dense_kernel(k: Kernel, weight_scale: float = 1.0, bias_scale: float = 0.1) -> Kernel:
    """A layer a~ = sigma_w W a / sqrt(n) + beta b, W, b ~ N(0, 1) (NTK parameterisation):

        Sigma' = sigma_w^2 Sigma + beta^2,    Theta' = sigma_w^2 Theta + Sigma'

    (Jacot et al. 2018, proof of Proposition 1 and Theorem 1: the gradient w.r.t. W gives
    sigma_w^2 a.a'/n -> sigma_w^2 Sigma, w.r.t. b gives beta^2, the earlier layers sigma_w^2 Theta).
    """
    sw2 = check_positive("weight_scale", weight_scale) ** 2
    b2 = check_nonnegative("bias_scale", bias_scale) ** 2
    nngp = sw2 * k.nngp + b2
    return Kernel(nngp, sw2 * k.ntk + nngp, sw2 * k.var1 + b2, sw2 * k.var2 + b2)


def relu_kernel(k: Kernel) -> Kernel:
    """The ReLU: Sigma' = E[relu(u) relu(v)], Theta' = Theta E[relu'(u) relu'(v)] for
    (u, v) ~ N(0, [[Sigma(x,x), Sigma(x,x')], [., Sigma(x',x')]]) (Jacot et al. 2018, Theorem 1).

    Arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009, eq. 6): with cos(phi) = rho the
    correlation, E[relu relu] = sqrt(s s')/(2 pi) (sin phi + (pi - phi) cos phi) and
    E[relu' relu'] = (pi - phi)/(2 pi); on the diagonal E[relu(u)^2] = s/2.
    """
    norm = torch.sqrt(k.var1[:, None] * k.var2[None, :])
    tiny = torch.finfo(norm.dtype).tiny
    rho = (k.nngp / norm.clamp_min(tiny)).clamp(-1.0, 1.0)
    phi = torch.arccos(rho)
    nngp = norm * (torch.sin(phi) + (math.pi - phi) * rho) / (2 * math.pi)
    ntk = k.ntk * (math.pi - phi) / (2 * math.pi)
    return Kernel(nngp, ntk, k.var1 / 2, k.var2 / 2)


ANALYTIC_ACTIVATIONS: dict[str, Callable[[Kernel], Kernel]] = {
    "relu": relu_kernel,
    "linear": lambda k: k,
}


def analytic_ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    weight_scale: float = 1.0,
    bias_scale: float = 0.1,
    activation: str = "relu",
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The infinite-width (NNGP, NTK) of ``MLP(n0, [width] * depth, 1, parameterization="ntk",
    activation=activation, weight_scale=sigma_w, bias_scale=beta)`` as width -> infinity.

    ``depth`` is the number of *hidden* layers (``len(MLP.widths)``): depth = 0 is the linear
    model, depth = 1 one hidden ReLU layer; the net has depth + 1 linear layers, Jacot's L.
    Returns (Sigma^(L)(x1, x2), Theta^(L)(x1, x2)), each (n1, n2), computed by Jacot et al. (2018)
    Proposition 1 / Theorem 1 as ``input -> (dense -> relu) x depth -> dense``:

        Sigma^(1) = sigma_w^2 x.x'/n0 + beta^2,  Theta^(1) = Sigma^(1)
        Sigma^(l+1) = sigma_w^2 E[relu(u) relu(v)] + beta^2
        Theta^(l+1) = Theta^(l) sigma_w^2 E[relu'(u) relu'(v)] + Sigma^(l+1)

    Sigma is the covariance of each output at initialisation; Theta is the limit of the empirical
    NTK w.r.t. all weights and biases (each output; the O x O block is Theta I_O).
    """
    check_int("depth", depth, 0)
    if activation not in ANALYTIC_ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {tuple(ANALYTIC_ACTIVATIONS)}, got {activation!r}"
        )
    act = ANALYTIC_ACTIVATIONS[activation]
    k = dense_kernel(input_kernel(x1, x2, dtype=dtype), weight_scale, bias_scale)
    for _ in range(depth):
        k = dense_kernel(act(k), weight_scale, bias_scale)
    return k.nngp, k.ntk
