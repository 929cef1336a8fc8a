"""The empirical neural tangent kernel of a network, by three exact methods.

Jacot, Gabriel & Hongler (2018), "Neural Tangent Kernel: Convergence and Generalization in Neural
Networks", NeurIPS, arXiv:1806.07572. For a network f(x; theta) with outputs in R^O the NTK is

    Theta(x, x')_{ab} = sum_p  d f_a(x) / d theta_p  *  d f_b(x') / d theta_p        (eq. 2 / 3)

i.e. J(x) J(x')^T for the Jacobian J of the outputs w.r.t. the parameters. Gradient flow on a
cost C moves the function along it (section 3, eq. 3): df_t/dt = -Theta grad_f C.

Empirical kernels (any ``torch.func``-friendly model, parameters as a dict):

- :func:`empirical_ntk`, :func:`empirical_ntk_fn`: the (n1, n2, O, O) blocks, or their mean
  diagonal (``trace_outputs=True``, shape (n1, n2)), by three exact methods:

  * ``"jacobian"``: Jacobian contraction, per-example Jacobians by ``vmap(jacrev)`` then one
    matrix product. Cost ~ N·O·[FP] + N²·O²·P (N inputs, O outputs, P parameters, [FP] the
    cost of one forward pass of one example);
  * ``"ntk_vp"``: NTK-vector products, Theta e = J(x) (J(x')^T e): a vjp (``jacrev`` of the
    single example x'_j: J(x')^T e_{jb} only involves example j) then a ``jvp`` through the
    batch x. Cost ~ N²·O·[FP]. (These two are the methods of PyTorch's ``torch.func`` NTK
    tutorial, in our own code.)
  * ``"layerwise"``: for a dense layer z = W a + b run once per example, d f_o / d W = g_o a^T
    with g_o = d f_o / d z, so the layer's part of the kernel factorises into two small Grams,
    (a(x).a(x') + 1) · g_o(x).g_p(x'), cost N²·(in + O²·out) instead of N²·O²·in·out. The
    inputs a are captured by forward hooks and the g_o come from O backward passes of the batch;
    parameters outside such layers (convolutions, a layer applied twice, a Linear on sequences)
    go through Jacobian contraction. The same outer-product structure is what the per-example
    gradient norms of :mod:`gradcourse.pergrad` use (Goodfellow 2015), and what
    neural-tangents' "structured derivatives" exploit in general.

  All work on blocks of ``chunk_size`` examples, so memory stays bounded for thousands of
  inputs; ``"auto"`` (the default) picks by a flop count (:func:`auto_method`), with the
  NTK-vector products' lower flop efficiency measured by ``benchmarks/ntk.py``
  (:data:`NTK_VP_OVERHEAD`). In that benchmark (MLP 40-64-64-10 and 40-64-64-1, 1-D SmallCNN,
  N = 32, 128 and 256, one CPU thread) the layerwise route won every case: 5-40x faster than a
  per-example loop of autograd Jacobians (12-39x for the MLP at N = 256 over three runs),
  against 1.3-7.4x for Jacobian contraction.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..checks import check_int
from ..functional import (
    FunctionalModel,
    Params,
    flatten,
    layers_used_elsewhere,
    place,
    shared_parameters,
)
from ..layers import capture_layers, rule_for
from ._checks import _check_deterministic, _check_inputs

__all__ = ["METHODS", "auto_method", "empirical_ntk", "empirical_ntk_fn", "EmpiricalNTK"]


METHODS: tuple[str, ...] = ("auto", "jacobian", "ntk_vp", "layerwise")
#: How much slower one NTK-vector-product flop runs than one flop of the Jacobian route (the
#: jvp's batched tangents are memory-bound; the contraction is one large matrix product).
#: benchmarks/ntk.py, MLP 40-64-64-10, N = 256, 1 CPU thread: the cost model gives ntk_vp 5x
#: fewer flops, yet it ran 1.7x slower, so one of its flops costs ~8.5; rounded up to 10.
NTK_VP_OVERHEAD = 10.0
#: Memory budget (bytes) of the Jacobian / tangent blocks when ``chunk_size`` is not given.
DEFAULT_CHUNK_BYTES = 2**28


def _batched(fm: FunctionalModel, fixed: Params) -> Callable[[Params, Tensor], Tensor]:
    """f(params, xs) -> (n, O) for a batch xs, ``fixed`` (chosen parameters left out of this
    route) held fixed with the frozen tensors."""

    def f(params: Params, xs: Tensor) -> Tensor:
        return fm.outputs({**fixed, **params}, xs).reshape(xs.shape[0], -1)

    return f


def _single(f_batch: Callable[[Params, Tensor], Tensor]) -> Callable[[Params, Tensor], Tensor]:
    """f(params, x) -> (O,) for one example x (no batch dimension): ``f_batch`` of the batch of
    x alone."""
    return lambda params, x: f_batch(params, x.unsqueeze(0)).reshape(-1)


def _placed(fm: FunctionalModel, name: str, x: object) -> Tensor:
    """The inputs ``x``, checked, on the parameters' device: floating inputs in their dtype,
    integer inputs (token ids, indices) only moved (:func:`gradcourse.functional.place`)."""
    return place(_check_inputs(name, x), fm.device, fm.dtype)


def _jacobians(f_single: Callable, params: Params, xs: Tensor) -> Params:
    """The Jacobians of the examples xs, name -> (n, O, *shape), by vmap(jacrev)."""
    return vmap(jacrev(f_single), in_dims=(None, 0))(params, xs)


def _flat_jacobian(f_single: Callable, params: Params, xs: Tensor) -> Tensor:
    """The Jacobians of the examples xs as one (n, O, P) tensor."""
    return flatten(_jacobians(f_single, params, xs), batch_dims=2)


def _block_jacobian(
    f_single: Callable, params: Params, xa: Tensor, xb: Tensor, trace: bool, ja: Tensor | None
) -> Tensor:
    """Jacobian contraction of one block: J_a J_b^T, (na, nb, O, O) or its mean diagonal."""
    ja = _flat_jacobian(f_single, params, xa) if ja is None else ja
    jb = ja if xb is xa else _flat_jacobian(f_single, params, xb)
    if trace:
        return torch.einsum("iop,jop->ij", ja, jb) / ja.shape[1]
    (na, o, p), nb = ja.shape, jb.shape[0]
    theta = ja.reshape(na * o, p) @ jb.reshape(nb * o, p).T
    return theta.reshape(na, o, nb, o).permute(0, 2, 1, 3)


def _block_ntk_vp(
    f_single: Callable, f_batch: Callable, params: Params, xa: Tensor, xb: Tensor, trace: bool
) -> Tensor:
    """NTK-vector products of one block: Theta(xa, xb) e_{jb} = J_a (J_b^T e_{jb}) for every
    output (j, b) of xb; J_b^T e_{jb} is a vjp of the single example xb_j (jacrev), J_a t a jvp."""
    tangents = _jacobians(f_single, params, xb)  # name -> (nb, O, *shape)
    nb, o = next(iter(tangents.values())).shape[:2]
    tangents = {n: t.reshape(nb * o, *t.shape[2:]) for n, t in tangents.items()}

    def column(tangent: Params) -> Tensor:
        return jvp(lambda p: f_batch(p, xa), (params,), (tangent,))[1]  # (na, O)

    cols = vmap(column)(tangents)  # (nb * O, na, O): cols[j O + b, i, a] = Theta(xa_i, xb_j)_ab
    theta = cols.reshape(nb, o, xa.shape[0], o).permute(2, 0, 3, 1)
    return theta.diagonal(dim1=2, dim2=3).mean(-1) if trace else theta


# -------------------------------------------------------------- layerwise (per-layer Gram) route


class _LayoutChanged(RuntimeError):
    """A kept dense-layer analysis no longer matches the model's forward pass."""


@dataclass(frozen=True)
class _Dense:
    """A dense layer z = w_scale * W a + b_scale * b (a rule of :mod:`gradcourse.layers` with
    ``dense`` set) that runs once per forward pass on inputs of shape (n, in): its parameters'
    Jacobian rows are outer products g ⊗ a (see _block_layerwise)."""

    module: nn.Module
    weight: str | None  # the weight's name if it is among the chosen parameters
    bias: str | None
    w_scale: float
    b_scale: float


def _scales(m: nn.Module) -> dict[str, float]:
    """The layer's current w_scale and b_scale, from its rule."""
    w_scale, b_scale = rule_for(m).scales(m)
    return {"w_scale": w_scale, "b_scale": b_scale}


class _ForwardFlops(TorchDispatchMode):
    """The flops of the operators run inside it, by torch's own formulas
    (``torch.utils.flop_counter.flop_registry``, the ones ``FlopCounterMode`` applies), without
    ``FlopCounterMode``'s per-module bookkeeping, which cost more than the count on a small
    model (a one-call ``empirical_ntk`` on an MLP spent a third of its time there). ``total``
    equals ``FlopCounterMode().get_total_flops()`` (tested)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def _find_dense(fm: FunctionalModel, x_one: Tensor) -> tuple[dict[str, _Dense], int]:
    """The dense layers (those whose rule in :mod:`gradcourse.layers` is ``dense``:
    ``nn.Linear``, :class:`~gradcourse.models.NTKLinear`) owning chosen parameters that the
    layerwise route can take: called once per forward pass, on (n, in) inputs (a Linear applied
    twice, or along a sequence, shares weights across positions and is left to Jacobian
    contraction, as is a layer whose parameters are tied to another's). Also returns O, the
    number of outputs, from the same forward pass of ``x_one``."""
    model, params = fm.model, fm.params
    candidates: dict[str, tuple[nn.Module, str | None, str | None]] = {}
    shared = shared_parameters(model)
    for name, m in model.named_modules():
        rule = rule_for(m)
        if rule is None or not rule.dense or rule.unsupported(name, m) is not None:
            continue
        if any(id(p) in shared for p in m.parameters(recurse=False)):
            continue  # tied weights: the layer sees one use only; Jacobian contraction sees all
        w = f"{name}.weight" if name else "weight"
        b = f"{name}.bias" if name else "bias"
        w, b = (w if w in params else None), (b if m.bias is not None and b in params else None)
        if w or b:
            candidates[name] = (m, w, b)
    tensors, result = {**fm.frozen, **params}, {}
    layers = {n: c[0] for n, c in candidates.items()}

    def forward() -> None:
        with torch.no_grad():
            result["out"] = fm.outputs(params, x_one)  # the same tensor objects as ``tensors``

    with capture_layers(layers) as cap:  # a weight also used outside its layer is left out too
        foreign = layers_used_elsewhere(layers, tensors, forward)
    out = result["out"]
    dense = {
        name: _Dense(m, w, b, **_scales(m))
        for name, (m, w, b) in candidates.items()
        if [a.ndim for a, _ in cap.calls[name]] == [2] and name not in foreign
    }
    return dense, out.reshape(len(x_one), -1).shape[1]


def _dense_factors(
    fm: FunctionalModel, dense: dict[str, _Dense], xs: Tensor
) -> list[tuple[Tensor | None, Tensor]]:
    """Per dense layer: its input a (n, in), already multiplied by w_scale (None when the weight
    is not chosen), and g (n, O, out) = d f_o(x_i) / d z_i, the gradient of each output w.r.t.
    the layer's output z for each example. One forward pass of the batch and one backward pass
    per output o: example i's outputs depend on z_i alone, so the gradient of sum_i f_o(x_i)
    w.r.t. z is exactly (d f_o(x_i) / d z_i)_i."""
    with capture_layers({n: d.module for n, d in dense.items()}) as cap, torch.enable_grad():
        live = {n: p.detach().requires_grad_(True) for n, p in fm.params.items()}
        out = fm.outputs(live, xs).reshape(len(xs), -1)
    for name, calls in cap.calls.items():
        if [a.ndim for a, _ in calls] != [
            2
        ]:  # the forward pass changed since the layers were found
            raise _LayoutChanged(f"dense layer {name!r} no longer runs once on (n, in) inputs")
    records = {name: calls[-1] for name, calls in cap.calls.items()}
    outputs = [records[name][1] for name in dense]
    o = out.shape[1]
    grads: list[list[Tensor | None]] = []
    for k in range(o):
        grads.append(
            list(
                torch.autograd.grad(
                    out[:, k].sum(), outputs, retain_graph=k < o - 1, allow_unused=True
                )
            )
        )
    factors = []
    for j, (name, d) in enumerate(dense.items()):
        a, z = records[name]
        per_output = [g[j] if g[j] is not None else torch.zeros_like(z) for g in grads]
        g = torch.stack(per_output, dim=1).detach()  # (n, O, out)
        factors.append((None if d.weight is None else a * d.w_scale, g))
    return factors


def _block_layerwise(
    fa: list[tuple[Tensor | None, Tensor]],
    fb: list[tuple[Tensor | None, Tensor]],
    dense: dict[str, _Dense],
    trace: bool,
) -> Tensor:
    """sum over dense layers of their part of Theta(xa, xb). A dense layer's Jacobian rows are
    d f_o(x) / d W = g_o(x) ⊗ w_scale a(x) and d f_o(x) / d b = b_scale g_o(x), so its part is

        Theta_l(x, x')_{op} = (w_scale² a(x).a(x') + b_scale²) · g_o(x).g_p(x')

    an (n1 x n2) Gram of inputs times an (n1 O x n2 O) Gram of output gradients: cost
    n1·n2·(in + O²·out) per layer instead of n1·n2·O²·in·out for the contraction of J."""
    na, o = fa[0][1].shape[:2]
    nb = fb[0][1].shape[0]
    # accumulate in the (na, O, nb, O) layout of the Gram products; permute once at the end
    total = fa[0][1].new_zeros((na, nb) if trace else (na, o, nb, o))
    for (aa, ga), (ab, gb), d in zip(fa, fb, dense.values(), strict=True):
        coef = aa @ ab.T if aa is not None else ga.new_zeros(na, nb)
        if d.bias is not None:
            coef += d.b_scale**2
        m = ga.shape[2]
        if trace:
            total.addcmul_(coef, ga.reshape(na, o * m) @ gb.reshape(nb, o * m).T, value=1 / o)
        else:
            gram = (ga.reshape(na * o, m) @ gb.reshape(nb * o, m).T).view(na, o, nb, o)
            total.addcmul_(coef[:, None, :, None], gram)
    return total if trace else total.permute(0, 2, 1, 3)


def auto_method(
    n1: int,
    n2: int,
    outputs: int,
    n_params: int,
    flops: float,
    *,
    trace: bool = False,
    dense: Sequence[tuple[int, int]] = (),
) -> str:
    """The cheapest method by a flop count, for n1 x n2 inputs, O = ``outputs``,
    P = ``n_params``, [FP] = ``flops`` of one example's forward pass, and ``dense`` the
    (in, out) sizes of the dense layers the layerwise route can take (O² becomes O when traced):

        jacobian:   (n1 + n2)·O·[FP] + n1·n2·O²·P
        ntk_vp:     NTK_VP_OVERHEAD · n1·n2·O·[FP] + n2·O·[FP]
        layerwise:  (n1 + n2)·O·[FP] + n1·n2·sum_l (in_l + O²·out_l)
                    + Jacobian contraction of the P_rest other parameters, if any

    The first two are the cost model of the ``torch.func`` NTK tutorial: for many inputs
    Jacobian contraction wins when O·P < [FP] (O = 1, or weight sharing: convolutions) and
    NTK-vector products when O·P > [FP]. The layerwise route replaces a dense layer's in·out
    parameters by in + O·out numbers per example, so it wins whenever dense layers hold most of
    the parameters (an MLP; the head of a CNN).
    """
    o, pairs = outputs, n1 * n2
    o2 = o if trace else o * o
    jacobian = (n1 + n2) * o * flops + pairs * o2 * n_params
    ntk_vp = NTK_VP_OVERHEAD * pairs * o * flops + n2 * o * flops
    costs = {"jacobian": jacobian, "ntk_vp": ntk_vp}
    if dense:
        rest = max(0, n_params - sum(i * m + m for i, m in dense))
        layerwise = (n1 + n2) * o * flops + pairs * sum(i + o2 * m for i, m in dense)
        if rest:
            layerwise += (n1 + n2) * o * flops + pairs * o2 * rest
        costs["layerwise"] = layerwise
    return min(costs, key=costs.__getitem__)


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[dict[str, _Dense], int, int]]] = (
    weakref.WeakKeyDictionary()
)


class EmpiricalNTK:
    """The empirical NTK of ``model``, configured once and called many times (see
    :func:`empirical_ntk_fn`). ``ntk(x1, x2=None, params=None)`` -> Tensor."""

    def __init__(
        self,
        model: nn.Module,
        *,
        params: Mapping[str, Tensor] | None = None,
        trace_outputs: bool = False,
        method: str = "auto",
        chunk_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
        _check_deterministic(model)
        self.model = model
        self.params = None if params is None else dict(params)
        self.trace_outputs = bool(trace_outputs)
        self.method = method
        self.chunk_size = chunk_size
        self.device = None if device is None else torch.device(device)
        # the layouts found for this model, shared by every kernel function of it (so that one
        # call of empirical_ntk after another on the same model does not search again); keyed
        # by the model's structure, so a replaced layer or parameter is a new entry
        self._layouts = _LAYOUTS.setdefault(model, {})

    def _layout(
        self, fm: FunctionalModel, x: Tensor, *, fresh: bool = False
    ) -> tuple[dict[str, _Dense], int, int]:
        """The dense layers the layerwise route takes, O and one example's forward flops
        (:func:`_find_dense`, a forward pass under a flop counter): found once per model
        structure (its modules, their types and its parameter objects), chosen parameters and
        example shape, then reused (``fresh``: found again), since on small batches this pass
        costs as much as the kernel. The layers' scales are read anew on every call, and
        :func:`_dense_factors` checks on each batch that every kept layer still runs once on
        (n, in) inputs (else the layers are found again). Not seen: a forward pass that starts
        using a kept layer's weight outside that layer while modules and parameters stay the
        same; call :meth:`forget` after such a change. The analyses are shared by every
        kernel function of one model, so one :func:`empirical_ntk` call after another on the
        same model finds the layers once."""
        key = (
            tuple((n, id(m), type(m)) for n, m in self.model.named_modules()),
            tuple((n, id(p)) for n, p in self.model.named_parameters()),
            tuple(fm.params),
            tuple(x.shape[1:]),
            x.dtype,
            fm.device,
        )
        if fresh or key not in self._layouts:
            with _ForwardFlops() as counter:
                dense, o = _find_dense(fm, x[:1])
            self._layouts[key] = (dense, o, counter.total)
        dense, o, flops = self._layouts[key]
        rescaled = {n: replace(d, **_scales(d.module)) for n, d in dense.items()}
        return rescaled, o, flops

    def forget(self) -> None:
        """Drop the layer analyses kept for this model (by every kernel function of it), so the
        next call finds its dense layers again: needed only after a change the checks cannot
        see (see :meth:`_layout`)."""
        self._layouts.clear()

    def _functional(self, params: Mapping[str, Tensor] | None) -> FunctionalModel:
        """The model as a function of the chosen parameters (those of this call, else those
        given when configuring, else all that require grad), not copied."""
        chosen = self.params if params is None else params
        return FunctionalModel(self.model, params=chosen, device=self.device, copy=False)

    def __call__(
        self, x1: Tensor, x2: Tensor | None = None, params: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Theta(x1, x2): (n1, n2, O, O), or (n1, n2) when ``trace_outputs`` or O == 1.

        ``x2=None`` means x2 = x1 (only the blocks on and above the diagonal are computed).
        ``params`` (names -> tensors) overrides the parameters; the rest stay at the model's.
        Floating inputs are cast to the parameters' dtype; integer inputs (token ids for an
        embedding) are only moved to their device.
        """
        _check_deterministic(self.model)  # again: the model may have been put in train mode
        fm = self._functional(params)
        x1 = _placed(fm, "x1", x1)
        symmetric = x2 is None
        x2 = x1 if symmetric else _placed(fm, "x2", x2)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(
                f"x2 must have the example shape of x1, {tuple(x1.shape[1:])}, "
                f"got {tuple(x2.shape[1:])}"
            )
        try:
            return self._kernel(fm, x1, x2, symmetric, *self._layout(fm, x1))
        except _LayoutChanged:  # the forward pass changed under the kept analysis: redo it
            return self._kernel(fm, x1, x2, symmetric, *self._layout(fm, x1, fresh=True))

    def _kernel(
        self,
        fm: FunctionalModel,
        x1: Tensor,
        x2: Tensor,
        symmetric: bool,
        dense: dict[str, _Dense],
        o: int,
        flops: int,
    ) -> Tensor:
        """Theta(x1, x2) for the dense layers, O and flops of :meth:`_layout`."""
        params_ = fm.params
        trace = self.trace_outputs or o == 1
        method = self.method
        n_params = fm.size
        if method == "auto":
            flops = flops or 2 * n_params
            sizes = [(d.module.in_features, d.module.out_features) for d in dense.values()]
            method = auto_method(len(x1), len(x2), o, n_params, flops, trace=trace, dense=sizes)
        self.last_method = method
        if method != "layerwise":
            dense = {}
        owned = {n for d in dense.values() for n in (d.weight, d.bias) if n is not None}
        rest = {n: p for n, p in params_.items() if n not in owned}
        fixed = {n: p for n, p in params_.items() if n in owned}
        f_batch = _batched(fm, fixed)
        f_single = _single(f_batch)

        chunk = self.chunk_size
        if chunk is None:
            per_example = sum(p.numel() for p in rest.values()) * o
            per_example += sum(
                d.module.in_features + o * d.module.out_features for d in dense.values()
            )
            chunk = max(1, DEFAULT_CHUNK_BYTES // (max(per_example, 1) * fm.dtype.itemsize))
        n1, n2 = x1.shape[0], x2.shape[0]
        shape = (n1, n2) if trace else (n1, n2, o, o)
        out = torch.empty(shape, dtype=fm.dtype, device=fm.device)
        for i in range(0, n1, chunk):
            xa = x1[i : i + chunk]
            ja = fa = None
            if method in ("jacobian", "layerwise") and rest:
                ja = _flat_jacobian(f_single, rest, xa)
            if dense:
                fa = _dense_factors(fm, dense, xa)
            for j in range(i if symmetric else 0, n2, chunk):
                same = symmetric and j == i
                xb = xa if same else x2[j : j + chunk]
                if method == "ntk_vp":
                    block = _block_ntk_vp(f_single, f_batch, rest, xa, xb, trace)
                else:
                    block = 0.0
                    if rest:
                        block = _block_jacobian(f_single, rest, xa, xb, trace, ja)
                    if dense:
                        fb = fa if same else _dense_factors(fm, dense, xb)
                        block = block + _block_layerwise(fa, fb, dense, trace)
                out[i : i + len(xa), j : j + len(xb)] = block
                if symmetric and j != i:
                    mirrored = block.transpose(0, 1)
                    if not trace:
                        mirrored = mirrored.transpose(2, 3)
                    out[j : j + len(xb), i : i + len(xa)] = mirrored
        return out

    def __repr__(self) -> str:
        return (
            f"EmpiricalNTK({type(self.model).__name__}, method={self.method!r}, "
            f"trace_outputs={self.trace_outputs}, chunk_size={self.chunk_size})"
        )


def empirical_ntk_fn(
    model: nn.Module,
    *,
    params: Mapping[str, Tensor] | None = None,
    trace_outputs: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> EmpiricalNTK:
    """The empirical NTK of ``model`` as a function ``ntk(x1, x2=None, params=None)``.

    Theta(x, x')_{ab} = sum_p df_a(x)/dtheta_p df_b(x')/dtheta_p (Jacot et al. 2018, eq. 2 / 3),
    over the parameters in ``params`` (default: the model's parameters that require grad, read
    at each call, so the function follows a model that trains). Returns (n1, n2, O, O), or
    (n1, n2) when ``trace_outputs`` (the mean of the diagonal of each O x O block, i.e. trace/O,
    which is the scalar kernel Theta in Theta (x) I_O at infinite width) or when O == 1.

    ``method``: ``"jacobian"`` (Jacobian contraction, N·O·[FP] + N²·O²·P), ``"ntk_vp"``
    (NTK-vector products, N²·O·[FP]), ``"layerwise"`` (per-layer Grams of dense layers,
    N·O·[FP] + N²·sum_l (in_l + O²·out_l), the rest by Jacobian contraction) or ``"auto"``
    (the cheapest by :func:`auto_method`; the choice of the last call is in ``last_method``).
    ``chunk_size``: examples per block (default: as many as keep one block's Jacobians or
    layer factors under :data:`DEFAULT_CHUNK_BYTES`). ``device``: where to compute (default: the parameters').
    A model with BatchNorm or dropout in train mode is refused.
    """
    return EmpiricalNTK(
        model,
        params=params,
        trace_outputs=trace_outputs,
        method=method,
        chunk_size=chunk_size,
        device=device,
    )


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    params: Mapping[str, Tensor] | None = None,
    trace_outputs: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """The empirical NTK Theta(x1, x2) of ``model`` (Jacot et al. 2018, eq. 2 / 3).

    Shape (n1, n2, O, O), or (n1, n2) when ``trace_outputs`` (trace/O of each block) or O == 1;
    ``x2=None`` means x2 = x1. Arguments as in :func:`empirical_ntk_fn`.
    """
    fn = empirical_ntk_fn(
        model,
        params=params,
        trace_outputs=trace_outputs,
        method=method,
        chunk_size=chunk_size,
        device=device,
    )
    return fn(x1, x2)
