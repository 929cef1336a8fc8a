"""The neural tangent kernel: empirical, infinite-width, and the dynamics it predicts.

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

Infinite-width kernels of a fully connected ReLU net in the NTK parameterisation
(:class:`gradcourse.models.MLP` with ``parameterization="ntk"``), built layer by layer from small
pure functions of a :class:`Kernel` (Jacot et al. 2018, Proposition 1 and Theorem 1):

    Sigma^(1)(x, x') = sigma_w^2 x.x'/n0 + beta^2,                  Theta^(1) = Sigma^(1)
    Sigma^(l+1)      = sigma_w^2 E[relu(u) relu(v)] + beta^2,         (u, v) ~ N(0, Sigma^(l))
    Theta^(l+1)      = Theta^(l) dotSigma^(l+1) + Sigma^(l+1),  dotSigma^(l+1) = sigma_w^2 E[relu'(u) relu'(v)]

with the arc-cosine expectations of Cho & Saul (2009). See :func:`analytic_ntk`.

Dynamics of least squares, C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2 (:func:`gradcourse.losses.mse`),
for a fixed kernel, i.e. for the linearised network (:func:`linearize`; Jacot et al. 2018,
section 5; Lee et al. 2019, "Wide neural networks of any depth evolve as linear models", eq. 9):
:func:`kernel_gradient_flow` (time t), :func:`kernel_gradient_descent` (k steps of rate lr),
:func:`kernel_regression` (t -> infinity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap
from torch.utils.flop_counter import FlopCounterMode

from ..checks import check_int, check_nonnegative, check_positive
from ..functional import (
    FunctionalModel,
    Params,
    flatten,
    layers_used_elsewhere,
    place,
    refuse_random_train_mode,
    shared_parameters,
)
from ..models import NTKLinear

__all__ = [
    "METHODS",
    "auto_method",
    "empirical_ntk",
    "empirical_ntk_fn",
    "EmpiricalNTK",
    "Kernel",
    "input_kernel",
    "dense_kernel",
    "relu_kernel",
    "analytic_ntk",
    "KernelPrediction",
    "kernel_gradient_flow",
    "kernel_gradient_descent",
    "kernel_regression",
    "LinearizedModel",
    "linearize",
]

METHODS: tuple[str, ...] = ("auto", "jacobian", "ntk_vp", "layerwise")
#: How much slower one NTK-vector-product flop runs than one flop of the Jacobian route (the
#: jvp's batched tangents are memory-bound; the contraction is one large matrix product).
#: benchmarks/ntk.py, MLP 40-64-64-10, N = 256, 1 CPU thread: the cost model gives ntk_vp 5x
#: fewer flops, yet it ran 1.7x slower, so one of its flops costs ~8.5; rounded up to 10.
NTK_VP_OVERHEAD = 10.0
#: Memory budget (bytes) of the Jacobian / tangent blocks when ``chunk_size`` is not given.
DEFAULT_CHUNK_BYTES = 2**28


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_deterministic(model: nn.Module) -> None:
    """Refuse BatchNorm / dropout in train mode: the NTK would not be a function of (x, x')."""
    refuse_random_train_mode(model, "the NTK would not be a function of one pair of examples")


def _check_inputs(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of shape (n, ...), got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one example (shape (n, ...), n >= 1)")
    return x


# --------------------------------------------------------------------------------------------
# empirical NTK
# --------------------------------------------------------------------------------------------


def _single(fm: FunctionalModel, fixed: Params) -> Callable[[Params, Tensor], Tensor]:
    """f(params, x) -> (O,) for one example x (no batch dimension), ``fixed`` (chosen
    parameters left out of this route) held fixed with the frozen tensors."""

    def f(params: Params, x: Tensor) -> Tensor:
        return fm.outputs({**fixed, **params}, x.unsqueeze(0)).reshape(-1)

    return f


def _batched(fm: FunctionalModel, fixed: Params) -> Callable[[Params, Tensor], Tensor]:
    """f(params, xs) -> (n, O) for a batch xs, ``fixed`` held fixed as in :func:`_single`."""

    def f(params: Params, xs: Tensor) -> Tensor:
        return fm.outputs({**fixed, **params}, xs).reshape(xs.shape[0], -1)

    return f


def _flat_jacobian(f_single: Callable, params: Params, xs: Tensor) -> Tensor:
    """The Jacobians of the examples xs as one (n, O, P) tensor, by vmap(jacrev)."""
    return flatten(vmap(jacrev(f_single), in_dims=(None, 0))(params, xs), batch_dims=2)


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
    tangents = vmap(jacrev(f_single), in_dims=(None, 0))(params, xb)  # name -> (nb, O, *shape)
    nb, o = next(iter(tangents.values())).shape[:2]
    tangents = {n: t.reshape(nb * o, *t.shape[2:]) for n, t in tangents.items()}

    def column(tangent: Params) -> Tensor:
        return jvp(lambda p: f_batch(p, xa), (params,), (tangent,))[1]  # (na, O)

    cols = vmap(column)(tangents)  # (nb * O, na, O): cols[j O + b, i, a] = Theta(xa_i, xb_j)_ab
    theta = cols.reshape(nb, o, xa.shape[0], o).permute(2, 0, 3, 1)
    return theta.diagonal(dim1=2, dim2=3).mean(-1) if trace else theta


# -------------------------------------------------------------- layerwise (per-layer Gram) route


@dataclass(frozen=True)
class _Dense:
    """A dense layer z = w_scale * W a + b_scale * b that runs once per forward pass on inputs of
    shape (n, in): its parameters' Jacobian rows are outer products g ⊗ a (see _block_layerwise)."""

    module: nn.Module
    weight: str | None  # the weight's name if it is among the chosen parameters
    bias: str | None
    w_scale: float
    b_scale: float


def _dense_scales(m: nn.Module) -> tuple[float, float]:
    if isinstance(m, NTKLinear):
        return m.weight_scale / math.sqrt(m.in_features), m.bias_scale
    return 1.0, 1.0


def _find_dense(fm: FunctionalModel, x_one: Tensor) -> tuple[dict[str, _Dense], int]:
    """The dense layers (``nn.Linear``, :class:`~gradcourse.models.NTKLinear`) owning chosen
    parameters that the layerwise route can take: called once per forward pass, on (n, in)
    inputs (a Linear applied twice, or along a sequence, shares weights across positions and
    is left to Jacobian contraction, as is a layer whose parameters are tied to another's).
    Also returns O, the number of outputs, from the same
    forward pass of ``x_one``."""
    model, params = fm.model, fm.params
    candidates: dict[str, tuple[nn.Module, str | None, str | None]] = {}
    shared = shared_parameters(model)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear | NTKLinear):
            continue
        if any(id(p) in shared for p in m.parameters(recurse=False)):
            continue  # tied weights: the layer sees one use only; Jacobian contraction sees all
        w = f"{name}.weight" if name else "weight"
        b = f"{name}.bias" if name else "bias"
        w, b = (w if w in params else None), (b if m.bias is not None and b in params else None)
        if w or b:
            candidates[name] = (m, w, b)
    calls: dict[str, list[int]] = {name: [] for name in candidates}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            calls[name].append(inputs[0].ndim)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, (m, _, _) in candidates.items()]
    tensors, result = {**fm.frozen, **params}, {}

    def forward() -> None:
        with torch.no_grad():
            result["out"] = fm.outputs(params, x_one)  # the same tensor objects as ``tensors``

    try:  # a weight also used outside its layer (tied by a function call) is left out too
        foreign = layers_used_elsewhere({n: c[0] for n, c in candidates.items()}, tensors, forward)
    finally:
        for h in handles:
            h.remove()
    out = result["out"]
    dense = {
        name: _Dense(m, w, b, *_dense_scales(m))
        for name, (m, w, b) in candidates.items()
        if calls[name] == [2] and name not in foreign
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
    records: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str):
        def capture(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            records[name] = (inputs[0].detach(), output)
            return output.clone()  # later in-place ops act on the clone, not on the node we use

        return capture

    handles = [d.module.register_forward_hook(hook(n)) for n, d in dense.items()]
    try:
        with torch.enable_grad():
            live = {n: p.detach().requires_grad_(True) for n, p in fm.params.items()}
            out = fm.outputs(live, xs).reshape(len(xs), -1)
    finally:
        for h in handles:
            h.remove()
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
        """
        _check_deterministic(self.model)  # again: the model may have been put in train mode
        fm = self._functional(params)
        params_ = fm.params
        # inputs, never labels: always cast to the parameters' dtype
        x1 = _check_inputs("x1", x1).to(fm.device, fm.dtype)
        symmetric = x2 is None
        x2 = x1 if symmetric else _check_inputs("x2", x2).to(fm.device, fm.dtype)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(
                f"x2 must have the example shape of x1, {tuple(x1.shape[1:])}, "
                f"got {tuple(x2.shape[1:])}"
            )
        with FlopCounterMode(display=False) as counter:
            dense, o = _find_dense(fm, x1[:1])
        trace = self.trace_outputs or o == 1
        method = self.method
        n_params = fm.size
        if method == "auto":
            flops = counter.get_total_flops() or 2 * n_params
            sizes = [(d.module.in_features, d.module.out_features) for d in dense.values()]
            method = auto_method(len(x1), len(x2), o, n_params, flops, trace=trace, dense=sizes)
        self.last_method = method
        if method != "layerwise":
            dense = {}
        owned = {n for d in dense.values() for n in (d.weight, d.bias) if n is not None}
        rest = {n: p for n, p in params_.items() if n not in owned}
        fixed = {n: p for n, p in params_.items() if n in owned}
        f_single, f_batch = _single(fm, fixed), _batched(fm, fixed)

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


# --------------------------------------------------------------------------------------------
# analytic infinite-width kernels
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# least-squares dynamics under a fixed kernel
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPrediction:
    """Predicted outputs on the training inputs and (when a test kernel was given) the test
    inputs; with a 1-D tensor of times / steps, a leading dimension indexes them."""

    train: Tensor
    test: Tensor | None


def _as_outputs(name: str, f: Tensor, n: int) -> tuple[Tensor, tuple[int, ...]]:
    """(n,) or (n, ...) -> (n, O) plus the original shape."""
    if not isinstance(f, Tensor) or f.ndim < 1 or f.shape[0] != n:
        got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"{name} must be a tensor of shape ({n}, ...) , got {got}")
    return f.reshape(n, -1), tuple(f.shape)


class _Spectral:
    """Eigendecomposition of the training kernel, flattened to (n O, n O) when given as blocks;
    a kernel (n, n) acts on every output alike (Theta (x) I_O)."""

    def __init__(self, ntk_train_train: Tensor, y_train: Tensor) -> None:
        if not isinstance(ntk_train_train, Tensor) or ntk_train_train.ndim not in (2, 4):
            raise ValueError(
                "ntk_train_train must be a tensor of shape (n, n) or (n, n, O, O), got "
                f"{getattr(ntk_train_train, 'shape', type(ntk_train_train).__name__)}"
            )
        k = ntk_train_train
        n = k.shape[0]
        if k.shape[1] != n or (k.ndim == 4 and k.shape[2] != k.shape[3]):
            raise ValueError(f"ntk_train_train must be square, got shape {tuple(k.shape)}")
        self.n, self.blocks = n, k.ndim == 4
        self.dtype, self.device = k.dtype, k.device
        y, self.out_shape = _as_outputs("y_train", y_train, n)
        y = y.to(self.device, self.dtype)  # like f0_* and the test kernel
        self.o = y.shape[1]
        if self.blocks and k.shape[2] != self.o:
            raise ValueError(
                f"y_train must have O = {k.shape[2]} outputs per example to match ntk_train_train "
                f"{tuple(k.shape)}, got shape {tuple(y_train.shape)}"
            )
        flat = k.permute(0, 2, 1, 3).reshape(n * self.o, n * self.o) if self.blocks else k
        self.eigvals, self.eigvecs = torch.linalg.eigh((flat + flat.T) / 2)
        self.y = y

    def vec(self, f: Tensor) -> Tensor:
        """(n, O) -> the layout the eigenvectors act on: (n O, 1) for blocks, (n, O) otherwise."""
        return f.reshape(-1, 1) if self.blocks else f

    def apply(self, g: Tensor, r: Tensor) -> Tensor:
        """V diag(g) V^T r for g (k, m) (k functions of the eigenvalues) -> (k, n, O)."""
        coeffs = self.eigvecs.T @ self.vec(r)  # (m, c)
        out = torch.einsum("im,km,mc->kic", self.eigvecs, g, coeffs)
        return out.reshape(g.shape[0], self.n, self.o)

    def test_kernel(self, ntk_test_train: Tensor) -> Tensor:
        """Theta(test, train) flattened like the training kernel: (m O, n O) or (m, n)."""
        k = ntk_test_train
        ok = isinstance(k, Tensor) and k.ndim == (4 if self.blocks else 2) and k.shape[1] == self.n
        if ok and self.blocks:
            ok = k.shape[2:] == (self.o, self.o)
        if not ok:
            want = f"(m, {self.n}, {self.o}, {self.o})" if self.blocks else f"(m, {self.n})"
            got = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(f"ntk_test_train must have shape {want}, got {got}")
        k = k.to(self.device, self.dtype)
        m = k.shape[0]
        return k.permute(0, 2, 1, 3).reshape(m * self.o, self.n * self.o) if self.blocks else k

    def predict(
        self,
        decay: Tensor,
        integral: Tensor,
        f0_train: Tensor | None,
        ntk_test_train: Tensor | None,
        f0_test: Tensor | None,
        scalar: bool,
    ) -> KernelPrediction:
        """f_train = y + V decay V^T (f0 - y); f_test = f0_test - K_test V integral V^T (f0 - y)."""
        f0 = torch.zeros_like(self.y) if f0_train is None else f0_train
        f0, _ = _as_outputs("f0_train", f0.to(self.device, self.dtype), self.n)
        if f0.shape[1] != self.o:
            raise ValueError(f"f0_train must have the shape of y_train, {self.out_shape}")
        r = f0 - self.y
        train = self.y + self.apply(decay, r)
        train = train.reshape(-1, *self.out_shape)
        test = None
        if ntk_test_train is not None:
            kt = self.test_kernel(ntk_test_train)
            m = ntk_test_train.shape[0]
            if f0_test is None:
                f0t = torch.zeros(m, self.o, dtype=self.dtype, device=self.device)
            else:
                f0t, _ = _as_outputs("f0_test", f0_test.to(self.device, self.dtype), m)
                if f0t.shape[1] != self.o:
                    raise ValueError(f"f0_test must have {self.o} outputs per example")
            moved = self.apply(integral, r).reshape(
                integral.shape[0], -1, 1 if self.blocks else self.o
            )
            step = (kt @ moved).reshape(-1, m, self.o)
            test = (f0t - step).reshape(-1, m, *self.out_shape[1:])
        elif f0_test is not None:
            raise ValueError("f0_test needs ntk_test_train")
        if scalar:
            train = train[0]
            test = None if test is None else test[0]
        return KernelPrediction(train, test)


def _times(name: str, t: float | Tensor, *, integer: bool) -> tuple[Tensor, bool]:
    """A scalar or 1-D sequence of non-negative times (or step counts) -> (k,) float64."""
    values = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    if values.ndim > 1 or values.numel() == 0:
        raise ValueError(
            f"{name} must be a number or a 1-D sequence of numbers, got shape {tuple(values.shape)}"
        )
    bad = torch.isnan(values) | (values < 0)
    if integer:
        bad = bad | torch.isinf(values) | (values != values.round())
    if bool(bad.any()):
        kind = "ints >= 0" if integer else "numbers >= 0 (inf allowed)"
        raise ValueError(f"{name} must be {kind}, got {t!r}")
    return values.reshape(-1), values.ndim == 0


def _null_threshold(eigvals: Tensor) -> float:
    return float(eigvals.abs().max()) * eigvals.shape[0] * torch.finfo(eigvals.dtype).eps


def kernel_gradient_flow(
    ntk_train_train: Tensor,
    ntk_test_train: Tensor | None,
    f0_train: Tensor | None,
    f0_test: Tensor | None,
    y_train: Tensor,
    t: float | Tensor,
) -> KernelPrediction:
    """Gradient flow of C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2 in function space under a fixed NTK
    (Jacot et al. 2018, section 5; Lee et al. 2019, eq. 9): df/dt = -(1/n) Theta (f - y), so

        f_t(train) = y + exp(-t Theta/n) (f0 - y)
        f_t(test)  = f0(test) - Theta(test, train) Theta^{-1} (I - exp(-t Theta/n)) (f0 - y)

    by the eigendecomposition of Theta (Theta^{-1}(I - e^{-t Theta/n}) -> t/n on its null space;
    at t = inf the null space is dropped, the pseudo-inverse of :func:`kernel_regression`).
    Gradient descent with learning rate lr for k steps is this flow at t = lr k for small lr
    (exactly: :func:`kernel_gradient_descent`). n is the number of training examples.

    Kernels: (n, n) / (m, n) (the same kernel on every output), or blocks (n, n, O, O) /
    (m, n, O, O) from :func:`empirical_ntk`. Outputs: (n,) or (n, O); ``f0_*=None`` means 0.
    The targets, the f0_* and the test kernel are moved to the training kernel's device and
    dtype, where the results are.
    ``t``: a number, or a 1-D sequence (then the results get a leading time dimension).
    """
    times, scalar = _times("t", t, integer=False)
    spec = _Spectral(ntk_train_train, y_train)
    lam = spec.eigvals
    tt = times.to(lam.device, lam.dtype)[:, None]
    n = spec.n
    finite = torch.isfinite(tt)
    tt_f = torch.where(finite, tt, torch.zeros_like(tt))
    decay = torch.where(
        finite, torch.exp(-tt_f * lam / n), (lam <= _null_threshold(lam)).to(lam.dtype)
    )
    safe = torch.where(lam == 0, torch.ones_like(lam), lam)
    integral = torch.where(lam == 0, tt_f / n, -torch.expm1(-tt_f * lam / n) / safe)
    inv = torch.where(lam > _null_threshold(lam), 1 / safe, torch.zeros_like(lam))
    integral = torch.where(finite, integral, inv.expand_as(integral))
    return spec.predict(decay, integral, f0_train, ntk_test_train, f0_test, scalar)


def kernel_gradient_descent(
    ntk_train_train: Tensor,
    ntk_test_train: Tensor | None,
    f0_train: Tensor | None,
    f0_test: Tensor | None,
    y_train: Tensor,
    lr: float,
    steps: int | Tensor,
) -> KernelPrediction:
    """k steps of gradient descent with learning rate lr on C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2
    for the linearised network (fixed NTK): f_{k+1} = f_k - (lr/n) Theta (f_k - y), so

        f_k(train) = y + (I - lr Theta/n)^k (f0 - y)
        f_k(test)  = f0(test) - Theta(test, train) Theta^{-1} (I - (I - lr Theta/n)^k) (f0 - y)

    the discrete-time version of :func:`kernel_gradient_flow` (which it approaches at t = lr k
    when lr lambda_max / n << 1; it diverges when lr lambda_max / n > 2). This is exactly what
    GD on :func:`linearize`'s model produces. Arguments as in :func:`kernel_gradient_flow`;
    ``steps`` an int >= 0 or a 1-D sequence of them.
    """
    lr = check_positive("lr", lr)
    counts, scalar = _times("steps", steps, integer=True)
    spec = _Spectral(ntk_train_train, y_train)
    lam = spec.eigvals
    k = counts.to(lam.device, lam.dtype)[:, None]
    a = lr * lam / spec.n
    stable = a < 1
    log_base = torch.log1p(-torch.where(stable, a, torch.zeros_like(a)))
    decay = torch.where(stable, torch.exp(k * log_base), (1 - a) ** k)
    safe = torch.where(lam == 0, torch.ones_like(lam), lam)
    integral = torch.where(stable, -torch.expm1(k * log_base), 1 - decay) / safe
    integral = torch.where(lam == 0, k * lr / spec.n, integral)
    return spec.predict(decay, integral, f0_train, ntk_test_train, f0_test, scalar)


def kernel_regression(
    ntk_train_train: Tensor,
    ntk_test_train: Tensor,
    y_train: Tensor,
    *,
    ridge: float = 0.0,
    f0_train: Tensor | None = None,
    f0_test: Tensor | None = None,
) -> Tensor:
    """The t -> infinity limit of :func:`kernel_gradient_flow` on the test inputs:

        f_inf(test) = f0(test) + Theta(test, train) (Theta + ridge I)^{-1} (y - f0(train))

    (Jacot et al. 2018, section 5: the limit of least-squares training is kernel regression
    with the NTK). With ridge = 0 the inverse is the pseudo-inverse (eigenvalues below
    n·eps·lambda_max count as 0). ``f0_*=None`` means 0. Returns (m, ...) like y_train per example.
    """
    ridge = check_nonnegative("ridge", ridge)
    if ntk_test_train is None:
        raise ValueError("ntk_test_train must be a tensor of shape (m, n) or (m, n, O, O)")
    spec = _Spectral(ntk_train_train, y_train)
    lam = spec.eigvals + ridge
    keep = lam > (_null_threshold(spec.eigvals) if ridge == 0 else 0.0)
    inv = torch.where(keep, 1 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    decay = torch.zeros_like(lam)[None, :]
    return spec.predict(decay, inv[None, :], f0_train, ntk_test_train, f0_test, True).test


# --------------------------------------------------------------------------------------------
# the linearised network
# --------------------------------------------------------------------------------------------


class LinearizedModel:
    """f_lin(params, x) = f(params0, x) + J(params0, x) (params - params0), the first-order
    Taylor expansion of the network in its parameters (Lee et al. 2019, eq. 5), one ``jvp``.

    Call as ``f_lin(params, x)`` with ``params`` a dict like ``f_lin.params0``; differentiable
    in ``params`` (``torch.func.grad`` or autograd), so it trains like a model.
    """

    def __init__(self, model: nn.Module, params0: Params, frozen: Params) -> None:
        self.model, self.params0 = model, params0
        self._functional = FunctionalModel.from_split(model, params0, frozen)

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        _check_deterministic(self.model)  # the mode it had at linearize() may have changed
        missing = sorted(set(self.params0) - set(params))
        if missing:
            raise ValueError(f"params is missing entries of params0: {missing}")
        fm = self._functional
        x = place(x, fm.device, fm.dtype)
        delta = {n: params[n] - p0 for n, p0 in self.params0.items()}
        out0, dout = jvp(lambda p: fm.outputs(p, x), (self.params0,), (delta,))
        return out0 + dout


def linearize(model: nn.Module, params0: Mapping[str, Tensor] | None = None) -> LinearizedModel:
    """The network linearised in its parameters around ``params0`` (default: the model's current
    parameters that require grad, copied): gradient descent on it is exactly kernel gradient
    descent with the NTK at params0 (:func:`kernel_gradient_descent`), the "lazy" limit that wide
    networks approach (Jacot et al. 2018, Theorem 2; Lee et al. 2019)."""
    _check_deterministic(model)
    fm = FunctionalModel(model, params=params0, copy=True, name="params0")
    return LinearizedModel(model, fm.params, fm.frozen)
