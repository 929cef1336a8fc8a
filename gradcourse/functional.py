"""A model as a function of a dict of parameters: the one functional core that curvature, NTK,
per-example and stability code share when they call ``torch.func.functional_call``.

- :class:`FunctionalModel`  the chosen parameters and the frozen tensors (the other parameters
  and the buffers), the flat layout, ``outputs(params, x)`` and ``loss(params, x, y)``;
- :func:`select_params`, :func:`frozen_tensors`  the two halves of that split;
- :func:`flatten`, :func:`unflatten`  a dict of tensors to and from one vector (or one row per
  example of a Jacobian or of per-example gradients);
- :func:`place`, :func:`place_batch`  a batch on the model's device, floats in its dtype;
- :func:`shared_parameters`, :func:`layers_used_elsewhere`  tied weights, for per-layer rules;
- :func:`refuse_random_train_mode`, :class:`module_mode`, :func:`model_device_dtype`;
- :func:`math_attention`  attention by its math kernel, which every route here differentiates
  twice or forward-mode (PyTorch's fused CPU kernel supports neither).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

from .checks import check_finite, check_labels
from .losses import LossFn, get_loss, targets_for

Params = dict[str, Tensor]


def math_attention():
    """A context in which ``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention``
    and ``nn.TransformerEncoderLayer``) uses its math kernel: plain differentiable operations.
    PyTorch's fused kernels on the CPU have no double backward and no forward-mode AD
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), which Hessian-vector products need; the math kernel gives the same values
    to rounding. :meth:`FunctionalModel.outputs` and the live Hessian operator run under it."""
    return sdpa_kernel(SDPBackend.MATH)


def refuse_batch_statistics(model: nn.Module, consequence: str) -> None:
    """Raise ValueError if ``model`` has a BatchNorm without running statistics
    (``track_running_stats=False``): it normalises with the batch's own statistics in eval mode
    too, so an example's output depends on the rest of its batch. ``consequence`` says what
    breaks. The one check every route shares (per-example gradients, clipped sums, curvature,
    the NTK)."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not module.track_running_stats:
            raise ValueError(
                f"model has BatchNorm {name or type(module).__name__!r} with "
                "track_running_stats=False: it normalises with batch statistics even in eval "
                f"mode, so an example's output depends on the rest of the batch and {consequence}"
            )


def refuse_random_train_mode(model: nn.Module, consequence: str) -> None:
    """Raise ValueError if ``model`` has BatchNorm or dropout in train mode (its output then
    depends on the rest of the batch or on random masks), or a BatchNorm without running
    statistics in any mode (:func:`refuse_batch_statistics`). ``consequence`` says what
    breaks."""
    refuse_batch_statistics(model, consequence)
    for name, module in model.named_modules():
        if module.training and isinstance(module, _BatchNorm | _DropoutNd):
            kind = "BatchNorm" if isinstance(module, _BatchNorm) else "dropout"
            raise ValueError(
                f"model has {kind} module {name or type(module).__name__!r} in train mode: "
                f"its output depends on the batch (BatchNorm statistics) or on random masks "
                f"(dropout), so {consequence}. Call model.eval() first."
            )


def select_params(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    device: str | torch.device | None,
    *,
    copy: bool = True,
    name: str = "params",
) -> Params:
    """The chosen parameters (default: all that require grad), detached, on ``device`` (default:
    where they are); cloned when ``copy``. Checks the names and that they share one float dtype;
    ``name`` is the argument the error messages name."""
    named = dict(model.named_parameters())
    if params is None:
        params = {n: p for n, p in named.items() if p.requires_grad}
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise ValueError(f"{name} has names that are not parameters of the model: {unknown}")
    if not params:
        raise ValueError(f"{name} is empty: the model has no parameters that require grad")
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"{name} must share one floating dtype, got {sorted(map(str, dtypes))}")
    if device is None:
        device = next(iter(params.values())).device
    chosen = {n: p.detach().to(device) for n, p in params.items()}
    return {n: p.clone() for n, p in chosen.items()} if copy else chosen


def frozen_tensors(
    model: nn.Module, params: Mapping[str, Tensor], device: str | torch.device | None
) -> Params:
    """What ``functional_call`` needs besides ``params``: the model's other parameters, then its
    buffers (BatchNorm's running statistics), detached, on ``device`` (default: where they
    are). Not copied: they are the model's own storage."""
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    frozen.update(dict(model.named_buffers()))
    return {n: t.detach().to(device) for n, t in frozen.items()}


def flatten(tensors: Mapping[str, Tensor] | Iterable[Tensor], batch_dims: int = 0) -> Tensor:
    """The tensors (a dict's values in its order, or a sequence) as one vector (P,), each
    reshaped to (-1,) and concatenated. With ``batch_dims = k`` the first k dimensions are kept
    and the rest flattened: per-example gradients ``{name: (n, *shape)}`` give (n, P), a
    Jacobian ``{name: (n, O, *shape)}`` gives (n, O, P)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in values], dim=-1)


def unflatten(v: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a vector (P,) into a dict shaped like ``like`` (names, order and shapes), the
    inverse of :func:`flatten`; the entries are views of ``v``."""
    chunks = torch.split(v, [t.numel() for t in like.values()])
    return {n: c.view_as(t) for (n, t), c in zip(like.items(), chunks, strict=True)}


def place(tensor: Tensor, device: str | torch.device, dtype: torch.dtype) -> Tensor:
    """``tensor`` on ``device``; a floating tensor also cast to ``dtype`` (integer labels and
    indices only move)."""
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)


def place_batch(
    x: Tensor, y: Tensor, device: str | torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """A batch (x, y) on ``device``, floating tensors in ``dtype`` (see :func:`place`)."""
    return place(x, device, dtype), place(y, device, dtype)


class FunctionalModel:
    """``model`` as a function of a dict of its parameters, for ``torch.func``.

    ``params`` (names -> tensors) chooses the parameters and their values (default: all that
    require grad, at their current values); they are detached, moved to ``device`` (default:
    where they are) and cloned when ``copy`` (:func:`select_params`, whose messages name the
    argument ``name``). :attr:`frozen` holds the rest, the other parameters and the buffers,
    detached on the same device (:func:`frozen_tensors`). Tied parameters are registered once,
    under their first name, and ``functional_call`` keeps the tie (see
    :func:`shared_parameters`).

    ``loss`` (``"mse"``, ``"ce"`` or a callable mean loss, :mod:`gradcourse.losses`) is resolved
    once, here; a named loss turns integer labels into the targets it takes
    (:func:`~gradcourse.losses.targets_for`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn | None = None,
        *,
        params: Mapping[str, Tensor] | None = None,
        device: str | torch.device | None = None,
        copy: bool = True,
        name: str = "params",
    ) -> None:
        loss_fn = None if loss is None else get_loss(loss)
        chosen = select_params(model, params, device, copy=copy, name=name)
        first = next(iter(chosen.values()))
        self._set(model, loss, loss_fn, chosen, frozen_tensors(model, chosen, first.device))

    @classmethod
    def from_split(
        cls, model: nn.Module, params: Params, frozen: Params, loss: str | LossFn | None = None
    ) -> FunctionalModel:
        """A functional model from parameters and frozen tensors already chosen (as by
        :func:`select_params` and :func:`frozen_tensors`): taken as they are, unchecked."""
        self = cls.__new__(cls)
        self._set(model, loss, None if loss is None else get_loss(loss), params, frozen)
        return self

    def _set(
        self,
        model: nn.Module,
        loss: str | LossFn | None,
        loss_fn: LossFn | None,
        params: Params,
        frozen: Params,
    ) -> None:
        self.model, self.params, self.frozen = model, params, frozen
        self.loss_name = loss if isinstance(loss, str) else None
        self.loss_fn = loss_fn
        first = next(iter(params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.size = sum(p.numel() for p in params.values())

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """A dict shaped like :attr:`params` as one vector (P,), in :attr:`params`' order."""
        return flatten({n: params[n] for n in self.params})

    def unflatten(self, v: Tensor) -> Params:
        """Split a flat vector (P,) into a dict shaped like the parameters (views of ``v``)."""
        return unflatten(v, self.params)

    def place_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x, y) on this model's device, floating tensors in its dtype."""
        return place_batch(x, y, self.device, self.dtype)

    def outputs(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The model's outputs f(x; params), the frozen tensors held fixed (attention by its
        math kernel, :func:`math_attention`, so that every derivative of it exists)."""
        with math_attention():
            return functional_call(self.model, {**self.frozen, **params}, (x,))

    def targets(self, x: Tensor, y: Tensor) -> Tensor:
        """y as the loss takes it, made once outside ``vmap`` (where ``one_hot`` cannot read
        the labels): one-hot floats for ``"mse"`` on integer labels when the model has several
        outputs (one forward pass of ``x[:1]``, under no_grad), else y unchanged.

        Checked here, once for every route that builds on it (per-example gradients, clipped
        sums, scores): x and a floating y hold finite numbers, and for ``"ce"`` the labels are
        integers in range of the model's outputs (or class probabilities of their shape)."""
        check_finite("x", x)
        check_finite("y", y)
        if self.loss_name == "ce":
            with torch.no_grad():
                out = self.outputs(self.params, x[:1])
            classes = out.shape[1] if out.ndim > 1 else 1
            if y.is_floating_point() and y.shape[1:] == out.shape[1:]:
                return y  # class probabilities, as F.cross_entropy takes them
            check_labels("y", y, classes)
            return y
        if self.loss_name != "mse" or y.is_floating_point():
            return y
        with torch.no_grad():
            out = self.outputs(self.params, x[:1])
        return targets_for(self.loss_name, y, out.shape[1] if out.ndim > 1 else 1, out.dtype)

    def loss_of_outputs(self, outputs: Tensor, y: Tensor) -> Tensor:
        """The mean loss of one batch, from the model's outputs."""
        if self.loss_fn is None:
            raise ValueError("this FunctionalModel was built without a loss")
        if self.loss_name is not None:
            num_outputs = outputs.shape[1] if outputs.ndim > 1 else 1
            y = targets_for(self.loss_name, y, num_outputs, outputs.dtype)
        return self.loss_fn(outputs, y)

    def loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The mean loss of the batch (x, y) as a function of the parameters."""
        return self.loss_of_outputs(self.outputs(params, x), y)

    def __repr__(self) -> str:
        return (
            f"FunctionalModel({type(self.model).__name__}, P={self.size}, loss="
            f"{self.loss_name or getattr(self.loss_fn, '__name__', None)!r}, "
            f"device={self.device}, dtype={self.dtype})"
        )


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Parameters reachable under more than one name (tied weights, e.g. ``b.weight =
    a.weight``, or one module used in two places), as ``id(tensor) -> names``.

    ``named_parameters()`` lists such a tensor once, under its first name, and
    ``functional_call`` keeps the tie, so whole-model routes (vmap, Jacobians) are exact. A rule
    that works layer by layer sees each use separately and would miss the cross terms of the
    summed gradient: it must leave these parameters to a whole-model route."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {key: found for key, found in names.items() if len(found) > 1}


class _UseTracker(TorchFunctionMode):
    """Records the layers whose watched tensors enter an operation outside that layer's own
    forward call (see :func:`layers_used_elsewhere`)."""

    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched, self.stack, self.foreign = watched, [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            owner = self.watched.get(id(leaf)) if isinstance(leaf, Tensor) else None
            if owner is not None and (not self.stack or self.stack[-1] != owner):
                self.foreign.add(owner)
        return func(*args, **kwargs)


def layers_used_elsewhere(
    layers: Mapping[str, nn.Module], tensors: Mapping[str, Tensor], forward: Callable[[], Any]
) -> set[str]:
    """The names of ``layers`` whose parameters are used by an operation outside the layer's
    own forward call while ``forward()`` runs: a tied weight reused by a function call
    (``F.linear(h, self.enc.weight.t())``), which :func:`shared_parameters` cannot see since the
    weight is registered once. ``tensors`` maps parameter names (``"enc.weight"``) to the tensor
    objects the forward pass uses (those given to ``functional_call``). A per-layer rule sees
    only the uses inside the layer's call, so these layers must go to a whole-model route."""
    watched = {}
    for name in layers:
        prefix = f"{name}." if name else ""
        for pname, tensor in tensors.items():
            local = pname[len(prefix) :] if pname.startswith(prefix) else None
            if local is not None and "." not in local:
                watched[id(tensor)] = name
    tracker = _UseTracker(watched)

    def enter(name: str):
        return lambda module, args: tracker.stack.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        tracker.stack.pop()

    handles = []
    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with tracker:
            forward()
    finally:
        for h in handles:
            h.remove()
    return tracker.foreign


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``model``'s first parameter (CPU and the default dtype for a
    model without parameters)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


class module_mode:  # noqa: N801 (used as a context manager, like torch.no_grad)
    """Put every submodule in train (``training=True``) or eval mode, and restore each one's
    own ``training`` flag afterwards."""

    def __init__(self, model: nn.Module, training: bool) -> None:
        self.model, self.training = model, training

    def __enter__(self) -> nn.Module:
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, training in self.saved:
            m.training = training
