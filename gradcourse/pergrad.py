"""Per-example gradients and their norms, over all parameters of a model.

For a loss that is a mean over examples, L(w) = 1/n sum_i l_i(w) with l_i(w) = l(f(x_i; w), y_i),
this module computes the per-example gradients g_i = grad_w l_i(w) (not divided by n) and their
norms ||g_i||_2, the GraNd score of Paul et al. 2021 ("Deep Learning on a Data Diet", arXiv
2107.07075, Definition 2.1, before the average over initialisations).

Two exact routes:

- ``"vmap"``: ``torch.func.vmap(torch.func.grad(l_i))`` over the examples of a chunk, on the
  functional model (``functional_call``). Works for any model whose examples are independent.
- ``"linear_trick"``: one batched backward pass of sum_i l_i. For a linear layer z = W a + b the
  gradient of the sum w.r.t. z_i is exactly dl_i/dz_i =: e_i (example i only touches its own
  output), and the per-example weight gradient is the outer product e_i a_i^T, so

      ||grad_W l_i||^2 = ||e_i||^2 ||a_i||^2,      ||grad_b l_i||^2 = ||e_i||^2

  (Goodfellow 2015, "Efficient per-example gradient computations", arXiv 1510.01799). A layer
  applied at L positions (a convolution, or a Linear on sequences) has
  grad_W l_i = E_i A_i^T with E_i (out, L) and A_i (in, L); its squared norm is computed either
  from that product or as <A_i^T A_i, E_i^T E_i>, whichever is cheaper. BatchNorm in eval mode
  is the per-channel affine map gamma * xhat + beta, so grad_gamma l_i = sum_positions e_i xhat_i.
  Layer inputs are captured by forward hooks and only the gradients w.r.t. layer outputs are
  backpropagated (no weight gradient of the batch is formed).

``method="auto"`` takes the linear trick when every parameter belongs to a layer it supports
(``nn.Linear``, :class:`gradcourse.models.NTKLinear`, ``nn.Conv1d`` / ``nn.Conv2d`` with
``groups=1`` and zero padding, affine ``BatchNorm1d`` / ``BatchNorm2d``: the rules of
:mod:`gradcourse.layers`, where a new layer type can be registered), each called once per
forward pass, and no parameter is shared between modules (tied weights); otherwise vmap. A
convolution's weight gradients are formed per example by one grouped convolution-weight
gradient (the examples as groups, the kernel of a convolution's backward pass; no ``unfold``),
or, when its output positions are few (L (K + O) < O K), by the Gram route on unfolded patches.
With these the trick was faster than vmap on every model measured, from 1.1x (CIFAR-sized
SmallCNN, a VGG-like block) to 90x (an MLP) at batch 128-256 (benchmarks/pergrad.py; see benchmarks/README.md), so
``auto`` has no other cost rule.

**Eval mode.** Both routes run the model in eval mode (every submodule's own mode is restored
afterwards): BatchNorm then normalises with its running statistics and dropout is off, so l_i
depends on example i alone and the per-example gradient is well defined. The gradient is taken
w.r.t. every parameter that requires grad (BatchNorm scale and shift included); buffers such as
running statistics are not parameters. A BatchNorm without running statistics
(``track_running_stats=False``) normalises with batch statistics even in eval mode and is
refused.

**Precision.** Both routes are exact up to rounding: in float64 they agree with a per-sample loop
to ~1e-15 relative, in float32 to ~1e-7 on the CPU. On CUDA, cuDNN may run float32 convolutions
in TF32 (``torch.backends.cudnn.allow_tf32``, on by default), which can limit the agreement of
the vmap route to ~1e-5 (seen on an H100 for SmallCNN; the linear trick stayed at ~1e-7).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from .functional import (
    FunctionalModel,
    layers_used_elsewhere,
    module_mode,
    refuse_batch_statistics,
    shared_parameters,
)
from .layers import capture_layers, rule_for
from .losses import LossFn

__all__ = [
    "METHODS",
    "eval_mode",
    "per_example_grad_norms",
    "per_example_grads",
    "per_example_losses",
    "supports_linear_trick",
]

METHODS: tuple[str, ...] = ("auto", "vmap", "linear_trick")

# Parameter elements held by one vmap chunk's gradients (chunk_size * P); 2^26 floats = 256 MiB.
_VMAP_BUDGET = 2**26
_TRICK_CHUNK = 1024


# ----------------------------------------------------------------------------- checks and set-up


def _check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return chunk_size


def _check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def eval_mode(model: nn.Module) -> module_mode:
    """Put every submodule in eval mode; afterwards restore each one's own ``training`` flag: an
    alias of :class:`gradcourse.functional.module_mode` with ``training=False``."""
    return module_mode(model, False)


def _check_batchnorm(model: nn.Module) -> None:
    refuse_batch_statistics(
        model,
        "per-example gradients, losses and scores are not defined (the route runs in eval mode)",
    )


def _prepare(
    model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor, device: str | torch.device | None
) -> tuple[FunctionalModel, Tensor, Tensor]:
    """The model as a function of its parameters that require grad (detached, not copied; the
    other parameters and the buffers frozen), and x and y, all on ``device`` (default: the
    parameters' device), floating x and y in their dtype; y in the form the loss takes (one-hot
    floats for ``"mse"`` on integer labels when the model has several outputs), made once, in
    eval mode, outside vmap."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("x and y must be tensors")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(
            f"x and y must hold the same number of examples (dim 0), got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise ValueError("x must hold at least one example, got 0")
    fm = FunctionalModel(model, loss, device=device, copy=False)
    x, y = fm.place_batch(x, y)
    with eval_mode(model):
        y = fm.targets(x, y)
    return fm, x, y


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# ----------------------------------------------------------------------------- vmap route


def _per_example_grad_fn(fm: FunctionalModel):
    """vmap(grad(l_i)): (params, x chunk, y chunk) -> dict name -> (chunk, *shape)."""

    def example_loss(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return fm.loss(params, xi.unsqueeze(0), yi.unsqueeze(0))  # a batch of one: l_i

    return vmap(grad(example_loss), in_dims=(None, 0, 0))


def per_example_grads(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    *,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The per-example gradients g_i = grad_w l(f(x_i; w), y_i), as ``{name: (n, *shape)}``.

    Computed with ``vmap(grad)`` over chunks of ``chunk_size`` examples (default: as many as keep
    a chunk's gradients under 2^26 numbers), in eval mode (see the module docstring), for every
    parameter that requires grad. ``loss`` is ``"mse"``, ``"ce"`` or a callable mean loss
    ``loss(outputs, targets)`` (conventions of :mod:`gradcourse.losses`); g_i is the gradient of
    example i's own loss, not divided by n. Results are on ``device`` (default: the model's).
    Memory is n * P numbers: for norms alone use :func:`per_example_grad_norms`.
    """
    chunk_size = _check_chunk_size(chunk_size)
    _check_batchnorm(model)
    fm, x, y = _prepare(model, loss, x, y, device)
    n = len(x)
    chunk_size = chunk_size or max(1, min(n, _VMAP_BUDGET // fm.size))
    grads_fn = _per_example_grad_fn(fm)
    parts: dict[str, list[Tensor]] = {name: [] for name in fm.params}
    with eval_mode(model), torch.no_grad():
        for start, stop in tqdm(
            _chunks(n, chunk_size), desc="per-example grads", disable=not progress, leave=False
        ):
            for name, g in grads_fn(fm.params, x[start:stop], y[start:stop]).items():
                parts[name].append(g)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _vmap_sq_norms(
    fm: FunctionalModel, x: Tensor, y: Tensor, chunk_size: int, progress: bool
) -> Tensor:
    grads_fn = _per_example_grad_fn(fm)
    out = []
    with torch.no_grad():
        for start, stop in tqdm(
            _chunks(len(x), chunk_size),
            desc="per-example grad norms",
            disable=not progress,
            leave=False,
        ):
            grads = grads_fn(fm.params, x[start:stop], y[start:stop])
            out.append(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in grads.values()))
    return torch.cat(out)


# ----------------------------------------------------------------------------- linear trick


class _Unsupported(Exception):
    """The linear trick cannot handle this model (the message says why)."""


def _trick_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules owning trainable parameters, if the linear trick supports all of them (each
    has a rule in :mod:`gradcourse.layers` that accepts it)."""
    layers = {}
    shared = shared_parameters(model)
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        tied = [shared[id(p)] for p in own if id(p) in shared]
        if tied:
            raise _Unsupported(
                f"parameter {' = '.join(tied[0])} is shared: its gradient sums over its uses, "
                "which a per-layer rule cannot see"
            )
        rule = rule_for(m)
        if rule is None:
            raise _Unsupported(f"module {name!r} ({type(m).__name__}) is not supported")
        why = rule.unsupported(name, m)
        if why is not None:
            raise _Unsupported(why)
        layers[name] = m
    if not layers:
        raise _Unsupported("no supported layer owns a parameter")
    return layers


def supports_linear_trick(model: nn.Module) -> bool:
    """Whether ``method="auto"`` can take the linear trick for ``model`` (every trainable
    parameter in a supported layer; whether each layer runs once per forward pass is only
    known when the model runs)."""
    try:
        _trick_layers(model)
    except _Unsupported:
        return False
    return True


def _trick_chunk(model: nn.Module, n: int) -> int:
    """The default chunk of the linear trick: up to 1024 examples, fewer when a convolution's
    per-example weight gradients (formed on its grouped route) would pass 2^26 numbers."""
    convs = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    return max(1, min(n, _TRICK_CHUNK, _VMAP_BUDGET // max(convs, default=1)))


def _trick_setup(fm: FunctionalModel, x_one: Tensor) -> dict[str, nn.Module]:
    """The layers the linear trick takes for ``fm``'s model (:func:`_trick_layers`), after
    checking on one example's forward pass that no layer's parameters are also used outside
    it; raises :class:`_Unsupported` otherwise."""
    layers = _trick_layers(fm.model)
    tensors = {**fm.frozen, **fm.params}  # the tensor objects fm.outputs(fm.params, .) uses
    with torch.no_grad():
        foreign = layers_used_elsewhere(layers, tensors, lambda: fm.outputs(fm.params, x_one))
    if foreign:
        raise _Unsupported(
            f"the parameters of {sorted(foreign)} are also used outside their layer (a tied "
            "weight reused by a function call): a per-layer rule would miss those uses"
        )
    return layers


def _trick_errors(
    layers: dict[str, nn.Module], cap: capture_layers, total: Tensor, *, retain_graph: bool
) -> dict[str, Tensor | None]:
    """The gradient of ``total`` = sum_i l_i w.r.t. each layer's output in the forward pass that
    ``cap`` recorded (d total / d z_i = d l_i / d z_i; None for a layer the loss does not
    use). ``retain_graph`` keeps the graph for another backward."""
    for name, calls in cap.calls.items():
        if len(calls) != 1:
            raise _Unsupported(f"layer {name!r} ran {len(calls)} times in one forward pass")
    layer_outputs = [cap.calls[name][0][1] for name in layers]
    errors = torch.autograd.grad(total, layer_outputs, allow_unused=True, retain_graph=retain_graph)
    return dict(zip(layers, errors, strict=True))


def _trick_norms(
    layers: dict[str, nn.Module], cap: capture_layers, errors: dict[str, Tensor | None]
) -> Tensor:
    """Squared per-example gradient norms (n,) from each layer's rule, its captured input and
    the errors of :func:`_trick_errors`."""
    with torch.no_grad():
        a0 = cap.calls[next(iter(layers))][0][0]
        dtype = next((e.dtype for e in errors.values() if e is not None), a0.dtype)
        sq = torch.zeros(len(a0), dtype=dtype, device=a0.device)
        for name, m in layers.items():
            if errors[name] is not None:
                sq += rule_for(m).sq_norms(m, cap.calls[name][0][0], errors[name])
    return sq


def _trick_pass(
    layers: dict[str, nn.Module], cap: capture_layers, total: Tensor, *, retain_graph: bool
) -> Tensor:
    """Squared per-example gradient norms (n,) from one forward pass that ``cap`` recorded and
    ``total`` = sum_i l_i of its examples: d total / d z_i = d l_i / d z_i for every layer
    output z, then each layer's rule. ``retain_graph`` keeps the graph for another backward."""
    return _trick_norms(layers, cap, _trick_errors(layers, cap, total, retain_graph=retain_graph))


def _trick_sq_norms(
    fm: FunctionalModel, x: Tensor, y: Tensor, chunk_size: int, progress: bool
) -> Tensor:
    layers = _trick_setup(fm, x[:1])
    live = {n: p.detach().requires_grad_(True) for n, p in fm.params.items()}  # graph: outputs
    out = []
    clone = False  # differentiate against the layers' own outputs unless an in-place op
    for start, stop in tqdm(
        _chunks(len(x), chunk_size),
        desc="per-example grad norms",
        disable=not progress,
        leave=False,
    ):
        xb, yb = x[start:stop], y[start:stop]
        while True:  # overwrites one (then with copies, for this chunk and the next)
            with capture_layers(layers, clone=clone) as cap, torch.enable_grad():
                total = fm.loss(live, xb, yb) * len(xb)  # sum_i l_i
            if clone or not cap.overwritten():
                break
            clone = True
        with torch.enable_grad():
            out.append(_trick_pass(layers, cap, total, retain_graph=False))
    return torch.cat(out)


# ----------------------------------------------------------------------------- public API


def per_example_grad_norms(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
    squared: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Tensor:
    """||g_i||_2 for every example, g_i = grad_w l(f(x_i; w), y_i) over all trainable parameters.

    This is the GraNd score of Paul et al. 2021 (Definition 2.1) for one network; average it
    over initialisations with :func:`gradcourse.scores.grand_scores`. The model runs in eval mode
    (BatchNorm uses its running statistics; modes restored afterwards).

    Args:
        loss: ``"mse"``, ``"ce"`` or a callable mean loss ``loss(outputs, targets)``.
        chunk_size: examples per vmap call or per batched backward pass (default: a chunk's
            gradients stay under 2^26 numbers for vmap; 1024 examples for the linear trick, fewer
            when a convolution's per-example weight gradients would pass 2^26 numbers).
        method: ``"vmap"``, ``"linear_trick"`` (raises ValueError when a layer is not
            supported) or ``"auto"`` (the linear trick when supported, else vmap). See the
            module docstring.
        squared: return ||g_i||^2 instead.
        device: where to compute (default: the model's device); the model itself is not moved.
        progress: show a progress bar over chunks.

    Returns a tensor (n,) in the parameters' dtype, on ``device``.
    """
    chunk_size = _check_chunk_size(chunk_size)
    method = _check_method(method)
    _check_batchnorm(model)
    fm, x, y = _prepare(model, loss, x, y, device)
    n = len(x)
    sq = None
    with eval_mode(model):
        if method in ("auto", "linear_trick"):
            try:
                sq = _trick_sq_norms(fm, x, y, chunk_size or _trick_chunk(fm.model, n), progress)
            except _Unsupported as why:
                if method == "linear_trick":
                    raise ValueError(
                        f"method='linear_trick' does not support this model: {why}"
                    ) from None
        if sq is None:
            chunk = chunk_size or max(1, min(n, _VMAP_BUDGET // fm.size))
            sq = _vmap_sq_norms(fm, x, y, chunk, progress)
    sq = sq.detach()
    return sq if squared else sq.sqrt()


def per_example_losses(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> Tensor:
    """l(f(x_i), y_i) for every example, in eval mode under no_grad (vmap of the mean loss over
    a batch of one, so a callable loss needs no per-example variant). A BatchNorm without
    running statistics is refused, as in :func:`per_example_grad_norms`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check_batchnorm(model)
    fm, x, y = _prepare(model, loss, x, y, device)
    one = vmap(lambda o, t: fm.loss_of_outputs(o.unsqueeze(0), t.unsqueeze(0)))
    out = []
    with eval_mode(model), torch.no_grad():
        for start, stop in _chunks(len(x), batch_size):
            out.append(one(fm.outputs(fm.params, x[start:stop]), y[start:stop]))
    return torch.cat(out)
