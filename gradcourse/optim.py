"""Optimisers for scale-invariant weights, and what they do to a weight's norm (notebook 08).

A weight w followed by a normalisation layer (BatchNorm, LayerNorm, a cosine classifier) leaves
the loss unchanged when it is rescaled: L(c w) = L(w) for c > 0. Then w . grad L(w) = 0, and the
step that changes the function is the angular one, of size about lr ||update|| / ||w||: the
*effective step* lr / ||w||^2 for plain gradient descent. Each update adds to ||w||, and
momentum adds more (:func:`momentum_norm_prediction`), which shrinks the effective step early
in training (Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021, arXiv 2006.08217).

- :func:`scale_invariant_projection`: AdamP's test (is the gradient nearly orthogonal to the
  weight, per output row or over the whole tensor?) and, when it passes, the update with its
  radial component removed.
- :class:`SGDP` and :class:`AdamP`: SGD with momentum and Adam with that projection and a weight
  decay scaled by ``wd_ratio`` on the projected tensors, with the semantics of the authors'
  ``adamp`` package (tested step by step against it).
- :class:`DiffGrad` (Dubey et al., IEEE TNNLS 2019, arXiv 1909.11015): Adam whose first moment
  is scaled per coordinate by the friction xi = sigmoid(|g_{t-1} - g_t|), as the authors' fixed
  ``diffGrad_v2.py`` computes it; ``aliased=True`` reproduces the published code, whose stored
  previous gradient was the current gradient tensor itself under PyTorch's in-place
  ``zero_grad`` of before 2.0 (xi = 1/2 from the second step on: Adam at half the learning rate).
- Measurements: :func:`weight_norms`, :func:`effective_steps`, :func:`angular_update`,
  :func:`momentum_norm_prediction`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_number

__all__ = [
    "AdamP",
    "DiffGrad",
    "SGDP",
    "angular_update",
    "effective_steps",
    "momentum_norm_prediction",
    "scale_invariant_projection",
    "weight_norms",
]


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _whole(x: Tensor) -> Tensor:
    return x.reshape(1, -1)


def scale_invariant_projection(
    weight: Tensor, grad: Tensor, update: Tensor, *, delta: float = 0.1, eps: float = 1e-8
) -> tuple[Tensor, bool]:
    """AdamP's projection. The weight counts as scale-invariant when, for each output row
    (first dimension) or else for the tensor as a whole, the largest |cos(grad, weight)| is
    below ``delta / sqrt(n)``, n the row's (or the tensor's) size: a random vector's cosine
    with a fixed one is about 1 / sqrt(n), so the test asks for a gradient far more orthogonal
    than chance. Then the radial component of ``update`` along each row of w / (||w|| + eps)
    is removed. Returns the (new) update and whether it was projected; a 1-d tensor (a bias,
    a normalisation's scale) is never projected."""
    if weight.dim() < 2:
        return update, False
    weight, grad = weight.detach(), grad.detach()
    for view in (_rows, _whole):
        w, g = view(weight), view(grad)
        cos = F.cosine_similarity(g, w, dim=1, eps=eps).abs()
        if float(cos.max()) < delta / math.sqrt(w.shape[1]):
            unit = w / (w.norm(dim=1, keepdim=True) + eps)
            u = view(update)
            u = u - unit * (unit * u).sum(dim=1, keepdim=True)
            return u.reshape(update.shape), True
    return update, False


def _check_common(lr: float, weight_decay: float, delta: float, wd_ratio: float) -> None:
    check_number("lr", lr, low=0)
    check_number("weight_decay", weight_decay, low=0)
    check_number("delta", delta, low=0)
    check_number("wd_ratio", wd_ratio, low=0, high=1)


def _check_betas(betas: tuple[float, float]) -> None:
    for i, b in enumerate(betas):
        check_number(f"betas[{i}]", b, low=0, high=1, high_open=True)


def _adam_moments(
    state: dict, p: Tensor, g: Tensor, betas: tuple[float, float]
) -> tuple[int, Tensor, Tensor]:
    """Adam's moment updates in ``state`` (created at the first call): the step count t and the
    moments m, v of g (not bias-corrected), updated in place and returned."""
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    return state["step"], m, v


class SGDP(torch.optim.Optimizer):
    """SGD with momentum and AdamP's projection (Heo et al. 2021): buf = momentum buf +
    (1 - dampening) g; the update is buf (Nesterov: g + momentum buf), projected by
    :func:`scale_invariant_projection` for tensors of two or more dimensions; weight decay
    multiplies the weight by 1 - lr weight_decay r / (1 - momentum), r = ``wd_ratio`` on a
    projected tensor and 1 elsewhere; then w -= lr update. Without Nesterov the projected update
    also replaces the momentum buffer, as in the authors' package (its projection works in place
    on the buffer), so the radial part does not come back through the momentum. ``state[p]["projected"]`` says
    whether the last step projected p."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
    ) -> None:
        _check_common(lr, weight_decay, delta, wd_ratio)
        check_number("momentum", momentum, low=0, high=1, high_open=True)
        check_number("dampening", dampening, low=0, high=1)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            m = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(m).add_(g, alpha=1 - group["dampening"])
                update = g + m * buf if group["nesterov"] else buf
                update, projected = scale_invariant_projection(
                    p, g, update, delta=group["delta"], eps=group["eps"]
                )
                if projected and not group["nesterov"]:
                    buf.copy_(update)  # the package projects the momentum buffer in place
                state["projected"] = projected
                if group["weight_decay"] > 0:
                    ratio = group["wd_ratio"] if projected else 1.0
                    p.mul_(1 - group["lr"] * group["weight_decay"] * ratio / (1 - m))
                p.add_(update, alpha=-group["lr"])
        return loss


class AdamP(torch.optim.Optimizer):
    """Adam with AdamP's projection (Heo et al. 2021): the Adam direction m_hat / (sqrt(v_hat) +
    eps) (Nesterov: with beta1 m + (1 - beta1) g in place of m), projected by
    :func:`scale_invariant_projection` for tensors of two or more dimensions; decoupled weight
    decay w *= 1 - lr weight_decay r, r = ``wd_ratio`` on a projected tensor and 1 elsewhere;
    then w -= lr direction. ``state[p]["projected"]`` says whether the last step projected p."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
    ) -> None:
        _check_common(lr, weight_decay, delta, wd_ratio)
        _check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        delta=delta, wd_ratio=wd_ratio, nesterov=nesterov)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                t, m, v = _adam_moments(state, p, g, group["betas"])
                denom = v.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
                first = beta1 * m + (1 - beta1) * g if group["nesterov"] else m
                update = first / denom
                update, projected = scale_invariant_projection(
                    p, g, update, delta=group["delta"], eps=group["eps"]
                )
                state["projected"] = projected
                if group["weight_decay"] > 0:
                    ratio = group["wd_ratio"] if projected else 1.0
                    p.mul_(1 - group["lr"] * group["weight_decay"] * ratio)
                p.add_(update, alpha=-group["lr"] / (1 - beta1**t))
        return loss


class DiffGrad(torch.optim.Optimizer):
    """diffGrad (Dubey et al. 2019) as the authors' ``diffGrad_v2.py`` computes it: g = grad +
    weight_decay w (an L2 term); Adam's moments m, v of g; the friction xi = sigmoid(|g_prev -
    g|) per coordinate (g_prev = 0 at the first step); w -= lr sqrt(1 - beta2^t) / (1 - beta1^t)
    xi m / (sqrt(v) + eps). ``aliased=True``: the published ``diffGrad.py``, whose stored
    previous gradient (zeros at the start) was afterwards the live gradient tensor itself (with
    PyTorch's in-place ``zero_grad`` of before 2.0, the next backward pass writes into it), so
    |g_prev - g| = 0 and xi = 1/2 from the second step on. ``state[p]["xi"]`` keeps the last step's friction."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        aliased: bool = False,
    ) -> None:
        check_number("lr", lr, low=0)
        check_number("eps", eps, low=0)
        check_number("weight_decay", weight_decay, low=0)
        _check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        aliased=aliased)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g + group["weight_decay"] * p
                state = self.state[p]
                if "previous_grad" not in state:
                    state["previous_grad"] = torch.zeros_like(p)
                t, m, v = _adam_moments(state, p, g, group["betas"])
                # the published code's stored gradient starts at 0, then is the live gradient
                previous = g if group["aliased"] and t > 1 else state["previous_grad"]
                xi = torch.sigmoid((previous - g).abs())
                state["previous_grad"] = g.clone()
                state["xi"] = xi
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(m * xi, v.sqrt() + group["eps"], value=-step_size)
        return loss


def weight_norms(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, float]:
    """||w|| of each named parameter (all parameters of two or more dimensions by default)."""
    params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.dim() >= 2]
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"no parameters named {unknown}; the model has {sorted(params)}")
    return {n: float(params[n].detach().norm()) for n in names}


def angular_update(before: Tensor, after: Tensor) -> float:
    """The angle in radians between a weight before and after a step (flattened): how far the
    step turned it, which is all that matters for a scale-invariant weight."""
    a, b = before.detach().reshape(-1).double(), after.detach().reshape(-1).double()
    if a.shape != b.shape:
        raise ValueError(
            f"before and after must have one shape, got {tuple(before.shape)} and {tuple(after.shape)}"
        )
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        raise ValueError("the angle of a zero weight is not defined")
    # 2 atan2(|a/|a| - b/|b||, |a/|a| + b/|b||) (Kahan): accurate for tiny angles too, where
    # arccos of a cosine and the cross product through |a|^2 |b|^2 - (a . b)^2 are not
    ua, ub = a / na, b / nb
    return 2 * math.atan2(float((ua - ub).norm()), float((ua + ub).norm()))


def effective_steps(lr: float, norms: dict[str, float]) -> dict[str, float]:
    """lr / ||w||^2 per weight: the step size gradient descent takes on the sphere of a
    scale-invariant weight (its gradient scales as 1 / ||w||, its angle moves as 1 / ||w||)."""
    check_number("lr", lr, low=0)
    return {n: lr / w**2 for n, w in norms.items()}


def momentum_norm_prediction(
    norm0_sq: float, update_norms_sq: Sequence[float], lr: float, beta: float
) -> Tensor:
    """||w_t||^2 for t = 0..T predicted for heavy-ball SGD without weight decay on a
    scale-invariant weight (w . g_t = 0 at every step), from ||w_0||^2 and the momentum
    buffers' squared norms ||p_t||^2 (p_t = beta p_{t-1} + g_t, w_{t+1} = w_t - lr p_t):

        ||w_{t+1}||^2 = ||w_t||^2 + lr^2 ||p_t||^2 + 2 lr^2 sum_{k<t} beta^(t-k) ||p_k||^2,

    exact, since w_t . p_t = -lr sum_{k<t} beta^(t-k) ||p_k||^2 (Heo et al. 2021, section 3).
    The last term is what momentum adds: with beta = 0 only lr^2 ||g_t||^2 remains. Returns a
    float64 tensor of T + 1 values."""
    check_number("lr", lr, low=0)
    check_number("beta", beta, low=0, high=1, high_open=True)
    p = torch.as_tensor(list(update_norms_sq), dtype=torch.float64)
    out = torch.empty(len(p) + 1, dtype=torch.float64)
    out[0] = norm0_sq
    carry = 0.0  # sum_{k<t} beta^(t-k) ||p_k||^2
    for t in range(len(p)):
        out[t + 1] = out[t] + lr**2 * p[t] + 2 * lr**2 * carry
        carry = beta * (carry + p[t])
    return out
