"""Attributions from gradients, and the adversarial examples that make a model robust.

- :func:`input_gradients`: d f_c(x) / d x for every example, the saliency map (Simonyan,
  Vedaldi & Zisserman 2014), with ``torch.func`` (``vmap`` over examples of ``grad``).
- :func:`smoothgrad`: the same averaged over Gaussian perturbations of the input (Smilkov et
  al. 2017, arXiv 1706.03825).
- :func:`grad_cam`: Grad-CAM (Selvaraju et al., ICCV 2017, arXiv 1610.02391): the activations
  A_k of a named convolutional layer weighted by the spatial mean of d f_c / d A_k, summed over
  channels k, through a ReLU, and resized to the input's spatial size; ``rectify=True`` takes
  A_k after the ReLU that follows the layer, as Selvaraju et al. do, where a model applies
  that ReLU as a function (no module to hook).
- :func:`pgd`: projected gradient ascent on the loss within an l_inf or l_2 ball (Madry et al.
  2018, arXiv 1706.06083); :func:`adversarial_step` trains on its output.
- :func:`mass_on`: the share of an attribution's absolute mass inside a mask (the BlockMNIST
  measure of Shah, Jain & Netrapalli 2021, arXiv 2102.12781).
- :func:`keep_ranked`: each image with only the pixels its attribution ranks highest (or
  lowest) kept, the rest filled: the masked data that ROAR (Hooker et al. 2019, arXiv
  1806.10758) and Shah et al.'s DiffROAR retrain on.

All run the model in eval mode (no BatchNorm statistics or dropout in a gradient) and leave its
parameters' gradients untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from .checks import (
    check_finite,
    check_int,
    check_labels,
    check_nonnegative,
    check_number,
    check_positive,
)
from .functional import FunctionalModel, module_mode, refuse_batch_statistics

__all__ = [
    "NORMS",
    "adversarial_step",
    "grad_cam",
    "input_gradients",
    "keep_ranked",
    "mass_on",
    "pgd",
    "smoothgrad",
]

NORMS: tuple[str, ...] = ("linf", "l2")


def _targets(model: nn.Module, x: Tensor, target: Tensor | int | None) -> Tensor:
    """The class whose logit is explained, per example: given, one int for all, or (None) the
    model's prediction. A given class must be an integer in range of the model's outputs (one
    forward pass of ``x[:1]`` finds how many), checked here rather than inside ``gather``."""
    if len(x) == 0:
        raise ValueError("x must hold at least one example, got 0")
    check_finite("x", x)
    if target is None:
        with torch.no_grad(), module_mode(model, False):
            return model(x).argmax(dim=1)
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise ValueError(
            f"target must be an int, a tensor of class indices or None, got {target!r}"
        )
    if isinstance(target, int):
        target = torch.full((len(x),), target, dtype=torch.long, device=x.device)
    else:
        target = torch.as_tensor(target, device=x.device)
    if target.shape != (len(x),):
        raise ValueError(f"target must have shape ({len(x)},), got {tuple(target.shape)}")
    with torch.no_grad(), module_mode(model, False):
        classes = model(x[:1]).shape[-1]
    check_labels("target", target, classes)
    return target.long()


def input_gradients(model: nn.Module, x: Tensor, target: Tensor | int | None = None) -> Tensor:
    """d f_c(x_i) / d x_i for every example i (same shape as ``x``), f_c the logit of class
    ``target`` (default: the predicted class). One ``vmap`` of ``grad`` over the examples."""
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a batch (n, ...) with n >= 1, got shape {tuple(x.shape)}")
    refuse_batch_statistics(model, "an example's input gradient is not defined")
    c = _targets(model, x, target)
    fm = FunctionalModel(model, params=dict(model.named_parameters()), copy=False)

    def logit(xi: Tensor, ci: Tensor) -> Tensor:
        out = fm.outputs(fm.params, xi.unsqueeze(0))
        return out[0].gather(0, ci.unsqueeze(0)).squeeze(0)

    with module_mode(model, False):
        return vmap(grad(logit))(x.detach(), c)


def smoothgrad(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    *,
    noise_std: float = 0.15,
    samples: int = 25,
    seed: int = 0,
) -> Tensor:
    """SmoothGrad: the mean of :func:`input_gradients` at x + N(0, s^2 I) over ``samples``
    draws, s = ``noise_std`` times each example's range (max - min), as Smilkov et al. scale it.
    The class explained is fixed once, at the clean input. Noise from a generator seeded by
    ``seed``."""
    noise_std = check_nonnegative("noise_std", noise_std)
    check_int("samples", samples, 1)
    check_int("seed", seed, 0)
    c = _targets(model, x, target)
    flat = x.detach().flatten(1)
    spread = (flat.max(dim=1).values - flat.min(dim=1).values).view(-1, *([1] * (x.ndim - 1)))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros_like(x)
    for _ in range(samples):
        eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        total += input_gradients(model, x + noise_std * spread * eps, c)
    return total / samples


def grad_cam(
    model: nn.Module,
    x: Tensor,
    layer: str,
    target: Tensor | int | None = None,
    *,
    resize: bool = True,
    rectify: bool = False,
) -> Tensor:
    """Grad-CAM maps (n, H, W): ReLU(sum_k alpha_k A_k), A = the output (n, K, h, w) of the
    submodule named ``layer`` (a name from ``model.named_modules()``), alpha_k = the mean over
    the h x w positions of d f_c / d A_k, f_c the logit of ``target`` (default: the predicted
    class). With ``resize``, bilinearly resized to the input's (H, W); else (n, h, w).

    ``rectify``: A = ReLU(the layer's output), the rectified maps Selvaraju et al. weight, for a
    layer whose output the model passes through a ReLU as a function (``F.relu``, no module to
    hook). A forward hook replaces the layer's output by its ReLU, which leaves the model's
    output unchanged (a ReLU of a ReLU is the same ReLU); where the output changes (a layer not
    followed by a ReLU), a ValueError says so. d f_c / d A_k is then taken through the
    model's own ReLU, whose derivative PyTorch sets to 0 at 0: it is 0 where A_k is, the same
    alpha_k as without ``rectify``; only the maps they weight change."""
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        conv = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise ValueError(f"layer must name a submodule, e.g. one of {conv}, got {layer!r}")
    if x.ndim != 4:
        raise ValueError(f"x must be images (n, C, H, W), got shape {tuple(x.shape)}")
    refuse_batch_statistics(model, "an image's Grad-CAM map would depend on the batch")
    c = _targets(model, x, target)
    saved: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor):
            saved.append(output)
            return None
        if not output.requires_grad:  # a frozen model (no parameter requires grad): the maps
            output = output.detach().requires_grad_(True)  # are still differentiated against
        if rectify:
            output = F.relu(output)  # the model runs on with the rectified maps
        saved.append(output)
        # the model gets a copy, so an in-place op after the layer (ReLU(inplace=True)) acts on
        # it and not on the maps differentiated against
        return output.clone()

    handle = modules[layer].register_forward_hook(keep)
    try:
        with module_mode(model, False), torch.enable_grad():
            out = model(x.detach())
            if not saved or not isinstance(saved[0], Tensor) or saved[0].ndim != 4:
                shape = None if not saved else tuple(getattr(saved[0], "shape", ()))
                raise ValueError(f"layer {layer!r} must output (n, K, h, w), got {shape}")
            acts = saved[0]
            chosen = out.gather(1, c.view(-1, 1)).sum()
            (dacts,) = torch.autograd.grad(chosen, acts)
    finally:
        handle.remove()
    if rectify:
        with module_mode(model, False), torch.no_grad():
            unchanged = model(x.detach())
        if not torch.allclose(out.detach(), unchanged, rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"rectify=True needs a layer whose output the model passes through a ReLU next; "
                f"rectifying {layer!r}'s output changed the model's output"
            )
    alpha = dacts.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * acts).sum(dim=1)).detach()
    if resize:
        cam = F.interpolate(
            cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        cam = cam.squeeze(1)
    return cam


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.ndim - 1)))
    return delta * torch.clamp(eps / n, max=1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    clamp: tuple[float, float] | None = None,
    seed: int = 0,
) -> Tensor:
    """Adversarial examples x + delta, ||delta|| <= ``eps`` in ``norm`` ("linf" or "l2"), by
    ``steps`` of projected gradient ascent on the cross-entropy of labels ``y`` (Madry et al.
    2018): delta <- project(delta + step * d), d = sign(g) for l_inf, g / ||g|| for l_2, from a
    uniform random start in the ball (``random_start``, seeded) or from 0. ``step_size`` default
    2.5 eps / steps. ``clamp`` = (low, high) keeps x + delta in a value range. Eval mode; the
    model's parameter gradients are untouched."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = check_nonnegative("eps", eps)
    check_int("steps", steps, 0)
    if len(x) == 0 or len(y) != len(x):
        raise ValueError(
            f"x and y must hold the same number (>= 1) of examples, got {len(x)} and {len(y)}"
        )
    check_finite("x", x)
    if clamp is not None:
        low, high = (check_number(f"clamp[{i}]", v) for i, v in enumerate(clamp))
        if not low < high:
            raise ValueError(f"clamp must be (low, high) with low < high, got {tuple(clamp)}")
    step = (
        2.5 * eps / max(steps, 1) if step_size is None else check_positive("step_size", step_size)
    )
    x, y = x.detach(), y.to(x.device)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if random_start and eps > 0:
        if norm == "linf":
            u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * eps
        else:
            g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            r = torch.rand(len(x), generator=gen, device=x.device, dtype=x.dtype)
            delta = _project(g, 1.0, "l2") * eps * r.view(-1, *([1] * (x.ndim - 1)))
    else:
        delta = torch.zeros_like(x)
    with module_mode(model, False), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            adv = x + delta if clamp is None else (x + delta).clamp(*clamp)
            loss = F.cross_entropy(model(adv), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if norm == "linf":
                    d = g.sign()
                else:
                    d = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(
                        -1, *([1] * (x.ndim - 1))
                    )
                delta = _project(delta + step * d, eps, norm)
    adv = x + delta.detach()
    return adv if clamp is None else adv.clamp(*clamp)


def adversarial_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = None,
    seed: int = 0,
) -> float:
    """One step of adversarial training (Madry et al. 2018): :func:`pgd` examples at ``eps``
    (``eps = 0``: the clean batch, plain training), then one ``optimizer`` step on their mean
    cross-entropy, in the model's current mode. Returns that loss."""
    adv = pgd(model, x, y, eps=eps, norm=norm, steps=steps if eps > 0 else 0,
              step_size=step_size, clamp=clamp, seed=seed)  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(adv), y.to(x.device))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def mass_on(attribution: Tensor, mask: Tensor) -> Tensor:
    """Per example, the share of sum |attribution| that falls where ``mask`` is true:
    sum_{mask} |a| / sum |a| (nan when an attribution is all zero). ``mask`` broadcasts to the
    attribution's shape, e.g. (n, 1, H, W) masks for (n, C, H, W) gradients, or (n, H, W) for
    Grad-CAM maps; a mask with the batch as its first dimension is aligned on it, so (n, H, W)
    masks serve (n, C, H, W) gradients too. A mask shared by every example has no batch
    dimension: (H, W), or (1, C, H, W)."""
    a = attribution.detach().abs()
    m = torch.as_tensor(mask, device=a.device).bool()
    if a.ndim < 2:
        raise ValueError(f"attribution must be a batch (n, ...), got shape {tuple(a.shape)}")
    # a mask with a batch dimension is aligned on it: (n, H, W) for (n, C, H, W) masks every
    # channel of example i with mask i (broadcasting from the right would pair mask i with
    # channel i whenever n == C)
    if (
        2 <= m.ndim < a.ndim
        and m.shape[0] == a.shape[0]
        and m.shape[1:] == a.shape[a.ndim - m.ndim + 1 :]
    ):
        m = m.reshape(m.shape[0], *([1] * (a.ndim - m.ndim)), *m.shape[1:])
    try:
        m = torch.broadcast_to(m, a.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(m.shape)} does not broadcast to {tuple(a.shape)}"
        ) from err
    total = a.flatten(1).sum(dim=1)
    inside = (a * m).flatten(1).sum(dim=1)
    return inside / total


def keep_ranked(
    x: Tensor, attribution: Tensor, fraction: float, *, highest: bool = True, fill: float = 0.0
) -> Tensor:
    """``x`` with, per example, only the ``round(fraction * d)`` of its d entries that
    ``|attribution|`` ranks highest (``highest=False``: lowest) kept and every other entry set
    to ``fill``. Ties are broken by position (the earlier entry ranks higher), so the result is
    deterministic. ``attribution`` has ``x``'s shape."""
    check_number("fraction", fraction, low=0, high=1, low_open=True)
    if attribution.shape != x.shape:
        raise ValueError(
            f"attribution must have x's shape {tuple(x.shape)}, got {tuple(attribution.shape)}"
        )
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (n, ...), got shape {tuple(x.shape)}")
    flat = attribution.detach().abs().flatten(1).to(x.device)
    d = flat.shape[1]
    k = round(fraction * d)
    if k == 0:
        raise ValueError(f"fraction {fraction!r} of {d} entries rounds to none; raise fraction")
    # one ranking, highest first, the earlier of two equal entries first (a stable sort), so
    # that the top k and the bottom d - k always split the entries between them
    order = torch.sort(-flat, dim=1, stable=True).indices
    order = order[:, :k] if highest else order[:, d - k :]
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return torch.where(keep.view_as(x), x, torch.full_like(x, fill))
