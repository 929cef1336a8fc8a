"""Layer rules: what the per-layer routes know about each supported layer type, in one place.

The linear trick of :mod:`gradcourse.pergrad` and the layerwise route of
:mod:`gradcourse.ntk` both use that a layer's parameter gradients are built from two per-example
factors: its input, captured by a forward hook, and the gradient w.r.t. its output, taken by
autograd. For a layer z = w_scale W a + b_scale b applied at L positions (a Linear on
sequences, a convolution after ``unfold``), with A_i (K, L) the inputs of example i and
E_i (O, L) the gradients w.r.t. its outputs,

    grad_W l_i = w_scale E_i A_i^T,      grad_b l_i = b_scale E_i 1

(Goodfellow 2015, "Efficient per-example gradient computations", arXiv 1510.01799). Each layer
type's rule says how to read A and E from the captured tensors, what the scales are, and what
the per-example squared gradient norm is, and (``weighted_grads``) the gradient of a weighted sum
of the losses, sum_i w_i grad l_i, from the same two factors; the consumers look the rule up here:

- :class:`LayerRule`  the interface; :class:`ProductRule` the rule of a layer of the form
  above (``patches``, ``errors``, ``scales``, ``sq_norms``), :class:`LinearRule` its dense case;
- :func:`register`  the decorator that files a rule under one or more layer types;
- :func:`rule_for`  the rule of a module (by its exact type: a subclass that changes
  ``forward`` needs a rule of its own), or None;
- :class:`capture_layers`  the one hook helper: a context manager recording each layer's input
  and the output node to differentiate against, per forward call.

Registered: ``nn.Linear`` and :class:`gradcourse.models.NTKLinear` (dense; the NTK's layerwise
route takes them when they run once on (n, in) inputs), ``nn.Conv1d`` / ``nn.Conv2d`` with
``groups=1`` and zero padding given as ints, affine ``BatchNorm1d`` / ``BatchNorm2d`` in eval
mode (per-example norms only). A convolution's per-example norms do not unfold its input unless
its output positions are few: its weight gradients come from one grouped convolution-weight
gradient, the n examples as n groups (:meth:`ConvRule.sq_norms`); with L (K + O) < O K the
Gram route <A_i^T A_i, E_i^T E_i> on unfolded patches is cheaper (:func:`sq_norm_of_product`).

**A new layer type.** Subclass the closest rule and register it, before calling
:func:`gradcourse.pergrad.per_example_grad_norms` or :func:`gradcourse.ntk.empirical_ntk`::

    class Scaled(nn.Linear):  # z = s (W a + b)
        def __init__(self, n_in, n_out, s):
            super().__init__(n_in, n_out)
            self.s = s

        def forward(self, a):
            return self.s * super().forward(a)

    @gc.layers.register(Scaled)
    class ScaledRule(gc.layers.LinearRule):
        def scales(self, m):
            return m.s, m.s

A layer that is not a product of its input and output gradient overrides
:meth:`LayerRule.sq_norms` instead (see :class:`BatchNormRule`). A rule must be exact: the
per-layer routes trust it, and only a whole-model route (vmap, Jacobians) checks nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight

from .models import NTKLinear

__all__ = [
    "BatchNormRule",
    "ConvRule",
    "LayerRule",
    "LinearRule",
    "NTKLinearRule",
    "ProductRule",
    "capture_layers",
    "register",
    "rule_for",
    "supports_weighted_grads",
]

_RULES: dict[type[nn.Module], LayerRule] = {}


class LayerRule:
    """The rule of one layer type: whether a module is supported, and the per-example squared
    norm of its trainable parameters' gradients. ``dense`` marks layers z = w_scale W a +
    b_scale b with ``in_features`` / ``out_features``, which the NTK's layerwise route may take."""

    dense: bool = False

    def unsupported(self, name: str, m: nn.Module) -> str | None:
        """Why the module ``name`` cannot be handled by this rule, or None when it can."""
        return None

    def sq_norms(self, m: nn.Module, a: Tensor, e: Tensor) -> Tensor:
        """sum over the layer's trainable parameters of ||grad l_i||^2, (n,), from its input a and
        the gradient e of sum_i l_i w.r.t. its output."""
        raise NotImplementedError

    def weighted_grads(
        self, m: nn.Module, a: Tensor, e: Tensor, w: Tensor
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """The gradient of sum_i w_i l_i w.r.t. each trainable parameter of the layer, as
        (parameter, gradient) pairs, from its input a, the gradient e of sum_i l_i w.r.t. its
        output and the weights w (n,): in eval mode e_i depends on example i alone, so the
        weighted gradient is the layer's batch weight gradient of the rescaled errors w_i e_i,
        with no second backward pass through the network ("book-keeping": Bu, Wang, Zha &
        Karypis 2023). A rule without it (the default raises ``NotImplementedError``) leaves
        the caller to backpropagate the reweighted loss instead."""
        raise NotImplementedError


def _defined_by(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in c.__dict__)


def supports_weighted_grads(rule: LayerRule | None) -> bool:
    """Whether ``rule`` has a :meth:`LayerRule.weighted_grads` that agrees with its
    ``sq_norms``: one defined by the class that defines ``sq_norms`` or by a subclass of it. A
    rule that overrides ``sq_norms`` (a new kind of layer) but inherits ``weighted_grads`` from
    a rule of another kind is not trusted with it."""
    if rule is None:
        return False
    cls = type(rule)
    weighted = _defined_by(cls, "weighted_grads")
    return weighted is not LayerRule and issubclass(weighted, _defined_by(cls, "sq_norms"))


def _rescaled(e: Tensor, w: Tensor) -> Tensor:
    """w_i e_i: the errors of example i times its weight."""
    return e * w.to(e.dtype).view(-1, *(1,) * (e.ndim - 1))


def _weigh_smaller(e: Tensor, a: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(E, A) with the per-example weights on whichever of the two is smaller: the product
    sum_i w_i E_i A_i^T is the same, the rescaled copy cheaper."""
    return (_rescaled(e, w), a) if e.numel() <= a.numel() else (e, _rescaled(a, w))


class ProductRule(LayerRule):
    """A layer z = w_scale W a + b_scale b applied at L positions: grad_W l_i = w_scale E_i A_i^T
    and grad_b l_i = b_scale E_i 1, with A (n, K, L) from :meth:`patches` and E (n, O, L) from
    :meth:`errors`."""

    def scales(self, m: nn.Module) -> tuple[float, float]:
        """(w_scale, b_scale), the factors the forward pass puts on W and b."""
        return 1.0, 1.0

    def patches(self, m: nn.Module, a: Tensor) -> Tensor:
        """The input as A (n, K, L)."""
        raise NotImplementedError

    def errors(self, m: nn.Module, e: Tensor) -> Tensor:
        """The output gradient as E (n, O, L)."""
        return e.reshape(e.shape[0], e.shape[1], -1)

    def sq_norms(self, m: nn.Module, a: Tensor, e: Tensor) -> Tensor:
        w_scale, b_scale = self.scales(m)
        e2 = self.errors(m, e)
        total = torch.zeros(a.shape[0], dtype=e.dtype, device=e.device)
        if m.weight.requires_grad:
            total += w_scale**2 * sq_norm_of_product(e2, self.patches(m, a))
        if m.bias is not None and m.bias.requires_grad:
            total += b_scale**2 * e2.sum(2).pow(2).sum(1)
        return total

    def weighted_grads(
        self, m: nn.Module, a: Tensor, e: Tensor, w: Tensor
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """w_scale sum_i w_i E_i A_i^T and b_scale sum_i w_i E_i 1."""
        w_scale, b_scale = self.scales(m)
        e2 = self.errors(m, _rescaled(e, w))
        out = []
        if m.weight.requires_grad:
            g = torch.einsum("nol,nkl->ok", e2, self.patches(m, a))
            out.append((m.weight, (w_scale * g).reshape(m.weight.shape)))
        if m.bias is not None and m.bias.requires_grad:
            out.append((m.bias, b_scale * e2.sum((0, 2))))
        return out


def register(*types: type[nn.Module]):
    """Class decorator: file an instance of the decorated :class:`LayerRule` subclass as the rule
    of each of ``types`` (replacing any earlier rule of that type)."""
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"register takes one or more nn.Module subclasses, got {types!r}")

    def decorate(cls: type[LayerRule]) -> type[LayerRule]:
        rule = cls()
        for t in types:
            _RULES[t] = rule
        return cls

    return decorate


def rule_for(m: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(m)`` exactly, or None."""
    return _RULES.get(type(m))


def sq_norm_of_product(e: Tensor, a: Tensor) -> Tensor:
    """||E_i A_i^T||_F^2 per example, for E (n, O, L) and A (n, K, L): from the product, or as
    <A_i^T A_i, E_i^T E_i> when that is cheaper (cost L^2 (K + O) against O K L)."""
    n, o, length = e.shape
    k = a.shape[1]
    if length == 1:
        return e.pow(2).sum((1, 2)) * a.pow(2).sum((1, 2))
    if length * (k + o) < o * k:  # Gram route: <A^T A, E^T E>, cost L^2 (K + O)
        return (torch.bmm(a.transpose(1, 2), a) * torch.bmm(e.transpose(1, 2), e)).sum((1, 2))
    return torch.bmm(e, a.transpose(1, 2)).pow(2).sum((1, 2))


# ----------------------------------------------------------------------------- registered rules


@register(nn.Linear)
class LinearRule(ProductRule):
    """``nn.Linear`` on inputs (n, ..., in): the positions are the middle dimensions."""

    dense = True

    def patches(self, m: nn.Module, a: Tensor) -> Tensor:
        return a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)  # (n, in, L)

    def errors(self, m: nn.Module, e: Tensor) -> Tensor:
        return e.reshape(e.shape[0], -1, e.shape[-1]).transpose(1, 2)  # (n, out, L)

    def weighted_grads(
        self, m: nn.Module, a: Tensor, e: Tensor, w: Tensor
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """One matrix product over all examples and positions (no per-example layout)."""
        if type(self).patches is not LinearRule.patches or type(self).errors is not (
            LinearRule.errors
        ):
            return super().weighted_grads(m, a, e, w)
        w_scale, b_scale = self.scales(m)
        out = []
        if m.weight.requires_grad:
            ew, aw = _weigh_smaller(e, a, w)
            g = ew.reshape(-1, e.shape[-1]).T @ aw.reshape(-1, a.shape[-1])
            out.append((m.weight, w_scale * g))
        if m.bias is not None and m.bias.requires_grad:
            out.append(
                (m.bias, b_scale * (w.to(e.dtype) @ e.reshape(len(e), -1, e.shape[-1]).sum(1)))
            )
        return out


@register(NTKLinear)
class NTKLinearRule(LinearRule):
    """:class:`gradcourse.models.NTKLinear`: w_scale = weight_scale / sqrt(in), b_scale =
    bias_scale."""

    def scales(self, m: nn.Module) -> tuple[float, float]:
        return m.weight_scale / math.sqrt(m.in_features), m.bias_scale


@register(nn.Conv1d, nn.Conv2d)
class ConvRule(ProductRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and zero padding given as ints: A is the
    input unfolded into patches (n, C * prod(kernel), L)."""

    def _own_layout(self) -> bool:
        """Whether A and E are read as this rule reads them: a subclass with its own
        ``patches`` or ``errors`` gets the generic product routes, which use them."""
        return type(self).patches is ConvRule.patches and type(self).errors is ProductRule.errors

    def unsupported(self, name: str, m: nn.Module) -> str | None:
        if m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return None
        return f"conv {name!r}: only groups=1, zero padding given as ints"

    def patches(self, m: nn.Module, a: Tensor) -> Tensor:
        if isinstance(m, nn.Conv1d):
            return F.unfold(
                a.unsqueeze(2),
                (1, m.kernel_size[0]),
                dilation=(1, m.dilation[0]),
                padding=(0, m.padding[0]),
                stride=(1, m.stride[0]),
            )
        return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)

    def sq_norms(self, m: nn.Module, a: Tensor, e: Tensor) -> Tensor:
        """With few output positions L (L (K + O) < O K), the Gram route of
        :func:`sq_norm_of_product` on the unfolded input. Otherwise the weight's per-example
        gradients as one grouped convolution-weight gradient (the n examples as n groups: the
        kernel a convolution's backward pass uses, no ``unfold``), then their squared norms;
        the bias's from E summed over positions."""
        n = a.shape[0]
        k, o, length = m.weight[0].numel(), m.out_channels, e.shape[2:].numel()
        # few positions: the Gram route; a subclass's patches or errors: the generic route
        if length * (k + o) < o * k or not self._own_layout():
            return super().sq_norms(m, a, e)
        w_scale, b_scale = self.scales(m)
        total = torch.zeros(n, dtype=e.dtype, device=e.device)
        if m.weight.requires_grad:
            weight_grad = conv1d_weight if isinstance(m, nn.Conv1d) else conv2d_weight
            shape = (n * m.out_channels, *m.weight.shape[1:])
            g = weight_grad(
                a.reshape(1, n * a.shape[1], *a.shape[2:]),
                shape,
                e.reshape(1, n * e.shape[1], *e.shape[2:]),
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                groups=n,
            )
            total += w_scale**2 * g.reshape(n, -1).pow(2).sum(1)
        if m.bias is not None and m.bias.requires_grad:
            total += b_scale**2 * e.reshape(n, e.shape[1], -1).sum(2).pow(2).sum(1)
        return total

    def weighted_grads(
        self, m: nn.Module, a: Tensor, e: Tensor, w: Tensor
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """The batch convolution-weight gradient of the rescaled errors (the kernel of a
        convolution's backward pass, no ``unfold``)."""
        if not self._own_layout():
            return super().weighted_grads(m, a, e, w)
        w_scale, b_scale = self.scales(m)
        out = []
        if m.weight.requires_grad:
            ew, aw = _weigh_smaller(e, a, w)
            weight_grad = conv1d_weight if isinstance(m, nn.Conv1d) else conv2d_weight
            g = weight_grad(
                aw, m.weight.shape, ew, stride=m.stride, padding=m.padding, dilation=m.dilation
            )
            out.append((m.weight, w_scale * g))
        if m.bias is not None and m.bias.requires_grad:
            per_example = e.reshape(*e.shape[:2], -1).sum(2)  # (n, O)
            out.append((m.bias, b_scale * (w.to(e.dtype) @ per_example)))
        return out


@register(nn.BatchNorm1d, nn.BatchNorm2d)
class BatchNormRule(LayerRule):
    """Affine BatchNorm in eval mode, gamma * xhat + beta per channel with xhat = (a - mean) /
    sqrt(var + eps) from the running statistics: grad_gamma l_i = sum_positions e_i xhat_i and
    grad_beta l_i = sum_positions e_i."""

    @staticmethod
    def _xhat(m: nn.Module, a: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (a.ndim - 2)
        # the forward pass may run on another device with copies of the buffers; the module's
        # own may live elsewhere
        mean, var = (t.to(a.device).view(shape) for t in (m.running_mean, m.running_var))
        return (a - mean) * torch.rsqrt(var + m.eps)

    def sq_norms(self, m: nn.Module, a: Tensor, e: Tensor) -> Tensor:
        n = a.shape[0]
        total = torch.zeros(n, dtype=e.dtype, device=e.device)
        xhat = self._xhat(m, a)
        e2 = e.reshape(n, e.shape[1], -1)
        if m.weight is not None and m.weight.requires_grad:
            total += (e2 * xhat.reshape(n, a.shape[1], -1)).sum(2).pow(2).sum(1)
        if m.bias is not None and m.bias.requires_grad:
            total += e2.sum(2).pow(2).sum(1)
        return total

    def weighted_grads(
        self, m: nn.Module, a: Tensor, e: Tensor, w: Tensor
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """sum_i w_i sum_positions e_i xhat_i and sum_i w_i sum_positions e_i."""
        n = a.shape[0]
        e2 = _rescaled(e, w).reshape(n, e.shape[1], -1)
        out = []
        if m.weight is not None and m.weight.requires_grad:
            xhat = self._xhat(m, a).reshape(n, a.shape[1], -1)
            out.append((m.weight, (e2 * xhat).sum((0, 2))))
        if m.bias is not None and m.bias.requires_grad:
            out.append((m.bias, e2.sum((0, 2))))
        return out


# ----------------------------------------------------------------------------- hook capture


class capture_layers:
    """Context manager recording every forward call of the given layers: ``calls[name]`` is a
    list of (input, output) per call, the input detached and the output the graph node that
    autograd can differentiate against.

        with capture_layers(layers) as cap:
            out = model(x)
        a, z = cap.calls["fc"][0]

    A later in-place op (``ReLU(inplace=True)``, ``z += r``) would overwrite that node, and a
    gradient taken against it would then be the gradient at the overwritten values. With
    ``clone=True`` (the default) the hook hands the rest of the network a clone, so such ops act
    on the clone. With ``clone=False`` it saves that copy and records each output's version
    counter instead: :meth:`overwritten` names the layers whose output an in-place op touched,
    for the caller to run the forward pass again with clones (the rare case)."""

    def __init__(self, layers: Mapping[str, nn.Module], *, clone: bool = True) -> None:
        self.layers = dict(layers)
        self.clone = bool(clone)
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in self.layers}
        self._versions: dict[str, list[int]] = {name: [] for name in self.layers}
        self._handles: list = []

    def _hook(self, name: str):
        def capture(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            self.calls[name].append((inputs[0].detach(), output))
            if self.clone:
                return output.clone()
            self._versions[name].append(output._version)
            return None

        return capture

    def overwritten(self) -> list[str]:
        """The layers (with ``clone=False``) whose recorded output an in-place op has changed
        since it was recorded (its version counter moved): gradients against it would be wrong.
        Always empty with ``clone=True``: the recorded nodes are not handed on."""
        if self.clone:
            return []
        return [
            name
            for name, calls in self.calls.items()
            if any(z._version != v for (_, z), v in zip(calls, self._versions[name], strict=True))
        ]

    def clear(self) -> None:
        """Forget the recorded calls (before the next forward pass)."""
        for found in self.calls.values():
            found.clear()
        for found in self._versions.values():
            found.clear()

    def __enter__(self) -> capture_layers:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
