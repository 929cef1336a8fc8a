"""A model as a function of a dict of parameters: the helpers that curvature, NTK and
per-example code share when they call ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

Params = dict[str, Tensor]


def refuse_random_train_mode(model: nn.Module, consequence: str) -> None:
    """Raise ValueError if ``model`` has BatchNorm or dropout in train mode: its output then
    depends on the rest of the batch or on random masks. ``consequence`` says what breaks."""
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
) -> Params:
    """The chosen parameters (default: all that require grad), detached, on ``device`` (default:
    where they are); cloned when ``copy``. Checks the names and that they share one float dtype."""
    named = dict(model.named_parameters())
    if params is None:
        params = {n: p for n, p in named.items() if p.requires_grad}
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise ValueError(f"params has names that are not parameters of the model: {unknown}")
    if not params:
        raise ValueError("params is empty: the model has no parameters that require grad")
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"params must share one floating dtype, got {sorted(map(str, dtypes))}")
    if device is None:
        device = next(iter(params.values())).device
    chosen = {n: p.detach().to(device) for n, p in params.items()}
    return {n: p.clone() for n, p in chosen.items()} if copy else chosen


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
