"""Curvature of a loss over a dataset: operators, eigenpairs, traces and spectral densities.

Every curvature matrix of the course is a *linear operator* on the flat parameter vector (of
length P), built from ``(model, loss, data)`` and multiplied with vectors without ever being
formed (Pearlmutter 1994, "Fast exact multiplication by the Hessian"):

- :class:`HessianOperator`   H v, forward-over-reverse (``jvp`` of ``grad``) with ``torch.func``,
  or, with a batch's graph cached, one more backward pass through its gradient;
- :class:`GGNOperator`       G v = J^T H_out J v, the generalised Gauss-Newton (Schraudolph 2002);
- :class:`ResidualOperator`  R v = sum_k (dL/df_k) Hess(f_k) v, so that H = G + R
  (Papyan 2020, "Traces of class/cross-class structure pervade deep learning spectra", eq. 3).
- :class:`LiveHessianOperator`  H v by double backward through the module itself, at its
  current parameters, for one batch: cheaper to build, for a sharpness measured during training.

Operators average over the whole dataset (one ``(x, y)`` batch, or a list / DataLoader of
batches, weighted by batch size), so they are the curvature of the *mean* loss whatever the
batching. ``op @ V`` on a block of vectors (P, k) vectorises the k products with ``vmap``.
Estimators take any :class:`CurvatureOperator`:

- :func:`lanczos`        top-k / bottom-k eigenpairs, thick-restart Lanczos with full
  reorthogonalisation (Lanczos 1950; Wu & Simon 2000);
- :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`hutchinson_squared_frobenius`
  (Hutchinson 1989; Meyer et al. 2021);
- :func:`spectral_density`  stochastic Lanczos quadrature (Golub & Meurant 1994; Ghorbani,
  Krishnan & Xiao 2019; Papyan 2020), with Gaussian broadening;
- :func:`exact_hessian`     the dense Hessian of a small model, for checks.

All random draws come from a seeded ``torch.Generator`` on the CPU (so results do not depend on
the device) and never touch the global RNG.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from ..checks import check_int, check_number, check_positive
from ..functional import FunctionalModel, Params, flatten, place_batch, refuse_random_train_mode
from ..losses import LossFn, get_loss, targets_for

Batch = tuple[Tensor, Tensor]
Data = Batch | Iterable[Batch]
Seed = int | torch.Generator
Which = Literal["largest", "smallest", "both"]
BatchMap = Callable[[Params], Params]

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "LiveHessianOperator",
    "GGNOperator",
    "ResidualOperator",
    "exact_hessian",
    "ClassDecomposition",
    "class_decomposition",
    "EigResult",
    "lanczos",
    "NonFiniteOperatorError",
    "Estimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_squared_frobenius",
    "SpectralDensity",
    "spectral_density",
]


# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------


class CurvatureOperator:
    """A symmetric linear map on flat parameter vectors of length P.

    Subclasses implement ``_matvec``; :meth:`matvec` checks the input and counts the calls in
    ``num_matvecs``. ``op @ v`` works for a vector (P,) or a matrix (P, k), and operators combine
    linearly (``H - G``, ``2.0 * H``).
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (size, size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for a flat vector ``v`` of shape (P,) (moved to this dtype/device)."""
        if v.shape != (self.shape[0],):
            raise ValueError(f"v must have shape ({self.shape[0]},), got {tuple(v.shape)}")
        self.num_matvecs += 1
        return self._matvec(v.to(device=self.device, dtype=self.dtype))

    def _matmat(self, vs: Tensor) -> Tensor:
        return torch.stack([self._matvec(col) for col in vs.T], dim=1)

    def matmat(self, vs: Tensor) -> Tensor:
        """Return ``A @ vs`` for a block of vectors ``vs`` of shape (P, k) (counted as k matvecs).

        Model operators vectorise the k products with ``torch.func.vmap``: faster for small
        models, k times the activation memory.
        """
        if vs.ndim != 2 or vs.shape[0] != self.shape[0]:
            raise ValueError(f"vs must have shape ({self.shape[0]}, k), got {tuple(vs.shape)}")
        self.num_matvecs += vs.shape[1]
        return self._matmat(vs.to(device=self.device, dtype=self.dtype))

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matmat(other) if other.ndim == 2 else self.matvec(other)

    def dense(self, max_size: int = 10_000, block_size: int = 32) -> Tensor:
        """Materialise the (P, P) matrix by P matvecs against the identity (small P only)."""
        size = self.shape[0]
        if size > max_size:
            raise ValueError(f"dense() needs P <= max_size={max_size}, got P={size}")
        check_int("block_size", block_size, 1)
        eye = torch.eye(size, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(cols) for cols in eye.split(block_size, dim=1)], dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (numpy in, numpy out) for cross-checks."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def mv(x):
            v = torch.as_tensor(x.reshape(-1))
            return self.matvec(v).cpu().numpy().astype(np_dtype, copy=False)

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np_dtype)

    def __add__(self, other: CurvatureOperator) -> CurvatureOperator:
        return _LinearCombination([(1.0, self), (1.0, other)])

    def __sub__(self, other: CurvatureOperator) -> CurvatureOperator:
        return _LinearCombination([(1.0, self), (-1.0, other)])

    def __mul__(self, scale: float) -> CurvatureOperator:
        return _LinearCombination([(float(scale), self)])

    __rmul__ = __mul__

    def __neg__(self) -> CurvatureOperator:
        return _LinearCombination([(-1.0, self)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.shape[0]}, dtype={self.dtype}, device={self.device})"


class _LinearCombination(CurvatureOperator):
    """sum_i c_i A_i of operators with the same shape, dtype and device."""

    def __init__(self, terms: list[tuple[float, CurvatureOperator]]) -> None:
        first = terms[0][1]
        for _, op in terms:
            if not isinstance(op, CurvatureOperator):
                raise ValueError(f"can only combine CurvatureOperators, got {type(op).__name__}")
            if (op.shape, op.dtype, op.device) != (first.shape, first.dtype, first.device):
                raise ValueError(
                    f"operators must share shape, dtype and device; got {first!r} and {op!r}"
                )
        super().__init__(first.shape[0], first.dtype, first.device)
        self.terms = terms

    def _matvec(self, v: Tensor) -> Tensor:
        return sum(c * op.matvec(v) for c, op in self.terms)

    def _matmat(self, vs: Tensor) -> Tensor:
        return sum(c * op.matmat(vs) for c, op in self.terms)


def _check_deterministic(model: nn.Module) -> None:
    """Refuse BatchNorm / dropout in train mode: the map v -> H v would change between calls."""
    refuse_random_train_mode(model, "the curvature would not be a fixed linear map")


def _is_single_batch(data: object) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    )


class _ModelOperator(CurvatureOperator):
    """Shared plumbing: the functional model (:class:`gradcourse.functional.FunctionalModel`:
    the loss, the parameters, the frozen tensors and the flat layout) and the data.

    Subclasses implement ``_batch_map(x, y)``: a function v -> (curvature of the mean loss over
    that batch) v, for v a dict shaped like the parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn,
        data: Data,
        *,
        params: dict[str, Tensor] | None = None,
        device: str | torch.device | None = None,
        cache: bool | None = None,
    ) -> None:
        _check_deterministic(model)
        self._model = model
        self._data = _check_data(data)
        self.cache = _is_single_batch(data) if cache is None else bool(cache)
        self._cached_maps: list[tuple[int, BatchMap]] | None = None
        self.functional = FunctionalModel(model, loss, params=params, device=device, copy=True)
        self.params = self.functional.params
        super().__init__(self.functional.size, self.functional.dtype, self.functional.device)

    def batches(self) -> Iterator[Batch]:
        """The (x, y) batches on this operator's device, floating inputs in its dtype."""
        if _is_single_batch(self._data):
            yield self._on_device(self._data)
            return
        count = 0
        with torch.random.fork_rng(devices=[]):  # a DataLoader seeds itself from the global RNG
            for batch in self._data:
                count += 1
                yield self._on_device(batch)
        if count == 0:
            raise ValueError("data has no batches")

    def _on_device(self, batch: Batch) -> Batch:
        if not _is_single_batch(batch):
            raise ValueError("each batch in data must be an (x, y) pair of tensors")
        return self.functional.place_batch(*batch)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (P,) into a dict shaped like the parameters (views of ``v``)."""
        return self.functional.unflatten(v)

    def outputs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model's outputs f(x; params), the other parameters and buffers held fixed.

        The model's mode is checked here, at product time, and not only when the operator is
        built: switched to train mode since, its dropout or BatchNorm would change the map."""
        _check_deterministic(self._model)
        return self.functional.outputs(params, x)

    def loss_of_outputs(self, outputs: Tensor, y: Tensor) -> Tensor:
        """The mean loss of one batch, from the model's outputs."""
        return self.functional.loss_of_outputs(outputs, y)

    def batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The mean loss of one batch as a function of the parameters."""
        return self.loss_of_outputs(self.outputs(params, x), y)

    def _batch_map(self, x: Tensor, y: Tensor) -> BatchMap:
        raise NotImplementedError

    def _derivative_map(self, gradient: Callable[[Params], Params]) -> BatchMap:
        """v -> (d gradient / d params) v, for a ``gradient`` whose Jacobian is symmetric.

        Uncached: forward-over-reverse, ``jvp`` of the gradient (Pearlmutter 1994). Cached: the
        gradient's graph is built once and each product is one more backward pass through it
        (``vjp`` of the gradient, equal to the ``jvp`` because the Jacobian is symmetric).
        """
        if self.cache:
            _, vjp_fn = vjp(gradient, self.params)
            return lambda v: vjp_fn(v)[0]
        return lambda v: jvp(gradient, (self.params,), (v,))[1]

    def _batch_maps(self) -> Iterable[tuple[int, BatchMap]]:
        if not self.cache:
            return ((len(x), self._batch_map(x, y)) for x, y in self.batches())
        if self._cached_maps is None:
            self._cached_maps = [(len(x), self._batch_map(x, y)) for x, y in self.batches()]
        return self._cached_maps

    def _average(self, per_batch: Callable[[BatchMap], Tensor], like: Tensor) -> Tensor:
        """sum_b n_b per_batch(map_b) / sum_b n_b: the mean-loss curvature applied to a vector."""
        total, count = torch.zeros_like(like), 0
        for batch_size, apply in self._batch_maps():
            total += batch_size * per_batch(apply)
            count += batch_size
        return total / count

    def _matvec(self, v: Tensor) -> Tensor:
        return self._average(lambda apply: flatten(apply(self.unflatten(v))), v)

    def _matmat(self, vs: Tensor) -> Tensor:
        def per_batch(apply: BatchMap) -> Tensor:
            def column(v: Tensor) -> Tensor:
                return flatten(apply(self.unflatten(v)))

            return vmap(column, in_dims=1, out_dims=1)(vs)

        return self._average(per_batch, vs)


class HessianOperator(_ModelOperator):
    """The Hessian H of the mean loss w.r.t. the parameters, as a linear operator.

    H v = d/dt grad L(theta + t v) at t = 0 (Pearlmutter 1994, "Fast exact multiplication by
    the Hessian"), computed with ``torch.func`` on the functional model.

    ``data`` is an (x, y) batch or a list / DataLoader of batches, weighted by batch size so the
    operator is the curvature of the mean loss over all examples. ``params`` (names -> tensors)
    selects and sets the parameters; by default all that require grad, at their current values
    (copied when the operator is built). ``device`` defaults to the parameters' device.
    ``cache`` (default: True for a single batch) keeps each batch's graph in memory after the
    first product, so later products skip the forward pass. A model in train mode with
    BatchNorm or dropout is refused (call ``model.eval()``).
    """

    def _batch_map(self, x: Tensor, y: Tensor) -> BatchMap:
        def gradient(p: Params) -> Params:
            return grad(self.batch_loss)(p, x, y)

        return self._derivative_map(gradient)


class LiveHessianOperator(CurvatureOperator):
    """H of the mean loss over (x, y) at ``model``'s current parameters, by double backward
    (Pearlmutter 1994) through one autograd graph of the module itself: one forward and one
    ``create_graph`` backward to build it, then one backward per product.

    The same products as :class:`HessianOperator` (the tests hold it to that), for a single
    (x, y) batch, built for the case where an operator lives for one Lanczos run at a point that
    changes between runs (:class:`gradcourse.stability.SharpnessTracker` during training): it
    neither copies the parameters nor goes through ``torch.func``, and on the small nets of
    notebook 02 its set-up plus first product costs about 1.6 training steps instead of 3
    (``benchmarks/stability_tracking.py``). It reads the module's parameters as they are: valid
    until they change (an optimizer step invalidates the graph); use :class:`HessianOperator`
    for a fixed point, chosen parameters, or data in several batches.
    """

    def __init__(self, model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor) -> None:
        refuse_random_train_mode(model, "the curvature would not be a fixed linear map")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameters that require grad")
        first = params[0]
        x, y = place_batch(x, y, first.device, first.dtype)
        with torch.enable_grad():
            out = model(x)
            if isinstance(loss, str):
                y = targets_for(loss, y, out.shape[1] if out.ndim > 1 else 1, out.dtype)
            grads = torch.autograd.grad(get_loss(loss)(out, y), params, create_graph=True)
        # a gradient that does not depend on the parameters has a zero row block in H
        self._live = [i for i, g in enumerate(grads) if g.requires_grad]
        self._grads = [grads[i] for i in self._live]
        self._params, self._sizes = params, [p.numel() for p in params]
        super().__init__(sum(self._sizes), first.dtype, first.device)

    def _matvec(self, v: Tensor) -> Tensor:
        chunks = torch.split(v, self._sizes)
        directions = [chunks[i].view_as(self._params[i]) for i in self._live]
        hv = torch.autograd.grad(
            self._grads,
            self._params,
            directions,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return flatten(hv)


class ResidualOperator(_ModelOperator):
    """The residual R = H - G = sum_k (dL/df_k) Hess(f_k) (Papyan 2020, eq. 3, second term).

    Computed directly, not as H - G: the Hessian of theta -> <g, f(x; theta)> with the output
    gradient g = dL/df held fixed at the current parameters. R vanishes when the model is
    linear in its parameters or the residuals dL/df are zero. Arguments as for
    :class:`HessianOperator`.
    """

    def _batch_map(self, x: Tensor, y: Tensor) -> BatchMap:
        with torch.no_grad():
            outputs = self.outputs(self.params, x)
        out_grad = grad(self.loss_of_outputs)(outputs, y)

        def gradient(p: Params) -> Params:
            return grad(lambda q: (out_grad * self.outputs(q, x)).sum())(p)

        return self._derivative_map(gradient)


class GGNOperator(_ModelOperator):
    """The generalised Gauss-Newton G = J^T H_out J of the mean loss (Schraudolph 2002).

    J is the Jacobian of the model's outputs w.r.t. the parameters and H_out the Hessian of the
    loss w.r.t. the outputs (Papyan 2020, eq. 3, first term). G v: ``jvp`` of the model (J v),
    the output Hessian (``jvp`` of the loss's output gradient), then ``vjp`` of the model
    (cached per batch when ``cache``). Arguments as for :class:`HessianOperator`.
    """

    def _batch_map(self, x: Tensor, y: Tensor) -> BatchMap:
        def model_out(p: Params) -> Tensor:
            return self.outputs(p, x)

        def loss_grad(out: Tensor) -> Tensor:
            return grad(self.loss_of_outputs)(out, y)

        cached_transpose = vjp(model_out, self.params)[1] if self.cache else None

        def apply(v: Params) -> Params:
            outputs, jac_v = jvp(model_out, (self.params,), (v,))
            out_hess_jac_v = jvp(loss_grad, (outputs,), (jac_v,))[1]
            transpose = cached_transpose
            if transpose is None:
                transpose = vjp(model_out, self.params)[1]
            return transpose(out_hess_jac_v)[0]

        return apply


def _check_data(data: Data) -> Data:
    if _is_single_batch(data):
        return tuple(data)
    if not isinstance(data, Iterable):
        raise ValueError("data must be an (x, y) tuple or an iterable of (x, y) batches")
    if isinstance(data, Iterator):  # (calling iter() on a DataLoader would draw a seed)
        raise ValueError(
            "data must be re-iterable (an (x, y) tuple, a list of batches or a DataLoader); "
            "a generator or iterator would be exhausted after the first matvec"
        )
    return data


def exact_hessian(
    model: nn.Module,
    loss: str | LossFn,
    data: Data,
    *,
    params: dict[str, Tensor] | None = None,
    device: str | torch.device | None = None,
    max_params: int = 5_000,
) -> Tensor:
    """The dense (P, P) Hessian of the mean loss over ``data``, for models with P <= max_params.

    ``torch.func.hessian`` of the loss as a function of the flat parameter vector, per batch,
    weighted by batch size. Parameter order is that of :class:`HessianOperator` (the model's
    ``named_parameters``), so ``exact_hessian(...) @ v == HessianOperator(...) @ v``.
    """
    op = HessianOperator(model, loss, data, params=params, device=device)
    size = op.shape[0]
    if size > max_params:
        raise ValueError(
            f"exact_hessian needs P <= max_params={max_params} (a P x P matrix), got P={size}; "
            "use HessianOperator with lanczos / spectral_density instead"
        )
    flat = flatten(op.params)
    total, count = torch.zeros(size, size, dtype=op.dtype, device=op.device), 0
    for x, y in op.batches():

        def flat_loss(w: Tensor, x: Tensor = x, y: Tensor = y) -> Tensor:
            return op.batch_loss(op.unflatten(w), x, y)

        total += len(x) * torch.func.hessian(flat_loss)(flat)
        count += len(x)
    return total / count


@dataclass
class ClassDecomposition:
    """The Gauss-Newton matrix of a classifier split by class (Papyan 2019, 2020).

    G = sum over examples i and logit directions c' of w_ic' g_ic' g_ic'^T / n, with
    g_ic' = J_i^T (e_c' - p_i) and w_ic' = p_ic' for softmax cross-entropy (its output Hessian
    is diag(p) - p p^T = sum_c' p_c' (e_c' - p)(e_c' - p)^T), and g_ic' = J_i^T e_c', w = 1 for
    the squared loss. Grouping the pairs (i, c') by (true class c, direction c'):

    - ``means[c, c']`` the weighted mean of g_ic' over the examples of class c, ``weights[c, c']``
      the share of the total weight it carries (sum_{i in c} w_ic' / n);
    - ``between = sum_{c, c'} weights[c, c'] means[c, c'] means[c, c']^T``: the class /
      cross-class part, rank <= K (K - 1) for cross-entropy (for each c the weighted means sum to
      zero, since sum_c' p_c' (e_c' - p) = 0) and <= K^2 for the squared loss;
    - ``within = ggn - between``: the weighted within-group second moment about those means,
      positive semi-definite.
    """

    ggn: Tensor
    between: Tensor
    within: Tensor
    means: Tensor
    weights: Tensor


def class_decomposition(
    model: nn.Module,
    loss: str,
    data: Batch,
    *,
    num_classes: int | None = None,
    chunk_size: int = 256,
    max_params: int = 5_000,
) -> ClassDecomposition:
    """Dense G = between + within for a classifier with P <= ``max_params`` (see
    :class:`ClassDecomposition`), from per-example output Jacobians (``vmap`` of ``jacrev``)
    over ``data = (x, y)`` with integer labels, ``chunk_size`` examples at a time.

    ``loss`` is ``"ce"`` (softmax cross-entropy) or ``"mse"`` (1/2 ||f - onehot(y)||^2, whose
    Gauss-Newton matrix does not depend on the targets). The classes are 0 .. K - 1, K the
    number of model outputs unless ``num_classes`` is given.
    """
    if loss not in ("ce", "mse"):
        raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}")
    if not _is_single_batch(data):
        raise ValueError("data must be one (x, y) pair of tensors")
    check_int("chunk_size", chunk_size, 1)
    op = GGNOperator(model, loss, data)
    size = op.shape[0]
    if size > max_params:
        raise ValueError(
            f"class_decomposition needs P <= max_params={max_params} (P x P matrices), got P={size}"
        )
    x, y = next(op.batches())
    if y.is_floating_point() or y.ndim != 1:
        raise ValueError("y must hold integer class labels, shape (n,)")

    def example_outputs(params: Params, xi: Tensor) -> Tensor:
        return op.outputs(params, xi[None])[0]

    jacobian = vmap(torch.func.jacrev(example_outputs), in_dims=(None, 0))
    n = len(x)
    with torch.no_grad():
        num_outputs = op.outputs(op.params, x[:1]).shape[1]
    k = num_outputs if num_classes is None else check_int("num_classes", num_classes, 1)
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k - 1}], got [{int(y.min())}, {int(y.max())}]")
    ggn = torch.zeros(size, size, dtype=op.dtype, device=op.device)
    sums = torch.zeros(k, num_outputs, size, dtype=op.dtype, device=op.device)
    mass = torch.zeros(k, num_outputs, dtype=op.dtype, device=op.device)
    eye = torch.eye(num_outputs, dtype=op.dtype, device=op.device)
    for start in range(0, n, chunk_size):
        xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]
        jac = jacobian(op.params, xb)
        jac = flatten(jac, batch_dims=2)
        if loss == "ce":
            with torch.no_grad():
                p = op.outputs(op.params, xb).softmax(dim=1)
            # g[i, c'] = J_i^T (e_c' - p_i), weight p_ic'
            g = jac.unsqueeze(1).mul((eye[None] - p[:, None, :]).unsqueeze(-1)).sum(2)
            w = p
        else:
            g, w = jac, torch.ones(len(xb), num_outputs, dtype=op.dtype, device=op.device)
        flat = (g * w.sqrt().unsqueeze(-1)).reshape(-1, size)
        ggn += flat.T @ flat
        sums.index_add_(0, yb, g * w.unsqueeze(-1))
        mass.index_add_(0, yb, w)
    ggn /= n
    safe = torch.where(mass > 0, mass, torch.ones_like(mass))
    means = sums / safe.unsqueeze(-1)
    weights = mass / n
    scaled = (means * weights.sqrt().unsqueeze(-1)).reshape(-1, size)
    between = scaled.T @ scaled
    return ClassDecomposition(ggn, between, ggn - between, means, weights)


# --------------------------------------------------------------------------------------------
# Random probes and Krylov helpers
# --------------------------------------------------------------------------------------------


def _generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or a torch.Generator, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _probe(op: CurvatureOperator, gen: torch.Generator, dist: str) -> Tensor:
    """A random vector with E[v v^T] = I: Rademacher (+-1) or standard Gaussian entries."""
    size = op.shape[0]
    if dist == "rademacher":
        v = torch.randint(0, 2, (size,), generator=gen, device=gen.device).mul_(2).sub_(1)
    elif dist == "gaussian":
        v = torch.randn(size, generator=gen, device=gen.device, dtype=torch.float64)
    else:
        raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return v.to(device=op.device, dtype=op.dtype)


def _orthogonalize_(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``w`` (in place) its components along the orthonormal rows of ``basis``.

    Classical Gram-Schmidt applied twice ("twice is enough", Giraud et al. 2005); returns the
    coefficients basis @ w_original in float64.
    """
    coeffs = basis @ w
    w -= basis.T @ coeffs
    correction = basis @ w
    w -= basis.T @ correction
    return (coeffs + correction).double().cpu()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------------
# Eigenpairs: thick-restart Lanczos
# --------------------------------------------------------------------------------------------


@dataclass
class EigResult:
    """Eigenpairs from :func:`lanczos`.

    ``eigenvalues`` (float64, CPU): descending for ``which="largest"`` and ``"both"`` (top k
    first, bottom k last), ascending for ``"smallest"``. ``eigenvectors``: (P, k) columns in the
    operator's dtype and device. ``residual_norms``: ||A x - theta x|| of each pair; a pair has
    ``converged`` when that is <= tol * (largest |Ritz value|).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual_norms: Tensor
    converged: Tensor
    num_matvecs: int
    num_restarts: int


def _wanted_indices(theta: Tensor, count: int, which: Which) -> Tensor:
    """Indices (into ascending ``theta``) of the ``count`` Ritz values to keep or report."""
    n = len(theta)
    count = min(count, n)
    if which == "largest":
        return torch.arange(n - count, n).flip(0)
    if which == "smallest":
        return torch.arange(count)
    top = count - count // 2
    return torch.cat([torch.arange(n - top, n).flip(0), torch.arange(count - top).flip(0)])


def _default_tol(dtype: torch.dtype) -> float:
    """eps^(2/3): 2.4e-5 in float32, 3.7e-11 in float64; the eigenvalue error is then about
    eps^(4/3) ||A||^2 / gap, and the residual stays well above the rounding floor of a matvec."""
    return torch.finfo(dtype).eps ** (2 / 3)


def _start_vector(op: CurvatureOperator, v0: Tensor | None, gen: torch.Generator) -> Tensor:
    if v0 is None:
        v = _probe(op, gen, "gaussian")
    else:
        if v0.ndim == 2:  # several previous eigenvectors: start from their sum
            v0 = v0.sum(dim=1)
        if v0.shape != (op.shape[0],):
            raise ValueError(f"v0 must have shape (P,) or (P, j) with P={op.shape[0]}")
        v = v0.detach().to(device=op.device, dtype=op.dtype).clone()
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("v0 must be a finite, non-zero vector")
    return v / norm


def lanczos(
    op: CurvatureOperator,
    k: int = 10,
    *,
    which: Which = "largest",
    tol: float | None = None,
    basis_size: int | None = None,
    max_matvecs: int | None = None,
    seed: Seed = 0,
    v0: Tensor | None = None,
    progress: bool = False,
) -> EigResult:
    """The k largest (or smallest, or both) eigenpairs of a symmetric operator.

    Lanczos (1950) with full reorthogonalisation, thick-restarted (Wu & Simon 2000, SIAM J.
    Matrix Anal. Appl. 22(2)): the Krylov basis grows to ``basis_size`` vectors; the projected
    matrix T = V^T A V (float64) gives Ritz pairs (theta_i, V s_i) with residual norm
    |beta_m s_{m,i}|; on restart the best Ritz vectors are kept and the iteration continues.
    Stops when every wanted pair has residual <= ``tol`` * max|theta| (default eps^(2/3) of the
    operator's dtype: 2.4e-5 in float32, 3.7e-11 in float64; the eigenvalue error is then about
    residual^2 / gap) or after ``max_matvecs``, with a warning. With TF32 convolutions or
    matmuls (a GPU default for convolutions) a matvec is only accurate to ~1e-3: pass
    ``tol=1e-3``.

    ``v0`` warm-starts the iteration from a previous estimate (a vector, or eigenvectors (P, j)
    whose sum is used), e.g. to track the sharpness along training. Raises
    :class:`NonFiniteOperatorError` when a product comes back inf/NaN. Memory: basis_size + 1
    vectors of length P (default basis_size = max(2 k' + 20, 40) capped at P, k' = k or 2k).
    """
    size = op.shape[0]
    check_int("k", k, 1)
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    num_wanted = 2 * k if which == "both" else k
    if num_wanted > size:
        raise ValueError(f"k must be <= P={size} (<= P/2 for which='both'), got k={k}")
    tol = _default_tol(op.dtype) if tol is None else tol
    # a relative residual: tol >= 1 (or inf, or NaN) would accept any vector as converged
    check_number("tol", tol, low=0, high=1, low_open=True, high_open=True)
    m = min(size, max(2 * num_wanted + 20, 40)) if basis_size is None else basis_size
    check_int("basis_size", m, num_wanted + 1 if size > num_wanted else size)
    if m > size:
        raise ValueError(f"basis_size must be <= P={size}, got {m}")
    max_matvecs = max(20 * m, 1_000) if max_matvecs is None else max_matvecs
    check_int("max_matvecs", max_matvecs, 1)
    gen = _generator(seed)
    krylov = _ThickRestartBasis(op, m, _start_vector(op, v0, gen), gen)
    num_keep = min(num_wanted + (m - num_wanted) // 2, m - 1)
    bar = _progress(max_matvecs, "lanczos", progress)
    while True:
        krylov.expand()
        bar.update()
        too_few = krylov.size < min(num_wanted, m) and krylov.beta > 0
        if too_few and krylov.num_matvecs < max_matvecs:
            continue  # fewer Ritz values than wanted: nothing to check yet
        theta, vecs, residuals = krylov.ritz()
        wanted = _wanted_indices(theta, num_wanted, which)
        converged = residuals[wanted] <= tol * float(theta.abs().max())
        if (len(wanted) == num_wanted and bool(converged.all())) or krylov.size == size:
            break
        if krylov.num_matvecs >= max_matvecs:
            warnings.warn(
                f"lanczos: {int((~converged).sum())} of {len(wanted)} eigenpairs did not reach "
                f"tol={tol:g} within max_matvecs={max_matvecs}",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        if krylov.size == m:
            krylov.restart(_wanted_indices(theta, num_keep, which), theta, vecs)
    bar.close()
    eigvecs = krylov.ritz_vectors(vecs[:, wanted])
    return EigResult(
        theta[wanted], eigvecs, residuals[wanted], converged, krylov.num_matvecs, krylov.restarts
    )


class NonFiniteOperatorError(FloatingPointError):
    """A curvature operator returned inf or NaN: the parameters or the loss have overflowed
    (typically a training run about to diverge), so no eigenvalue can be computed."""


class _ThickRestartBasis:
    """The Krylov basis V (rows) and projected matrix T = V^T A V of thick-restart Lanczos.

    Invariant: A V_j = V_j T_j + beta v_{j+1} e_j^T, so a Ritz pair (theta, V s) has residual
    norm |beta s_j| (Wu & Simon 2000, eq. 2.4). T is filled from the Gram-Schmidt coefficients,
    so after a restart (T = diag(theta_kept) plus the coupling row) nothing changes.
    """

    def __init__(self, op: CurvatureOperator, m: int, start: Tensor, gen: torch.Generator):
        self.op, self.gen = op, gen
        self.basis = torch.empty(m + 1, op.shape[0], dtype=op.dtype, device=op.device)
        self.basis[0] = start
        self.proj = torch.zeros(m, m, dtype=torch.float64)
        self.size, self.beta, self.num_matvecs, self.restarts = 0, 0.0, 0, 0

    def expand(self) -> None:
        """One matvec: column ``size`` of T, then the next basis vector and its coupling beta."""
        j, dim = self.size, self.op.shape[0]
        w = self.op.matvec(self.basis[j])
        self.num_matvecs += 1
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteOperatorError(
                f"lanczos: the operator returned inf/NaN at product {self.num_matvecs} "
                "(overflowing parameters or loss: a diverging run?)"
            )
        av_norm = w.norm()
        coeffs = _orthogonalize_(w, self.basis[: j + 1])
        self.proj[: j + 1, j] = coeffs
        self.proj[j, : j + 1] = coeffs
        self.size = j = j + 1
        beta = w.norm()
        invariant = beta <= max(dim**0.5, 10) * torch.finfo(self.op.dtype).eps * av_norm
        self.beta = 0.0 if (invariant or j == dim) else float(beta)
        if j == dim:
            return
        if invariant:  # the Krylov space is invariant: go on from a fresh direction, coupling 0
            w = _probe(self.op, self.gen, "gaussian")
            _orthogonalize_(w, self.basis[:j])
        self.basis[j] = w / w.norm()

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), their vectors in basis coordinates, and residual norms."""
        theta, vecs = torch.linalg.eigh(self.proj[: self.size, : self.size])
        return theta, vecs, self.beta * vecs[-1].abs()

    def ritz_vectors(self, coords: Tensor) -> Tensor:
        """Ritz vectors V^T s, as columns (P, k), for basis coordinates ``coords`` (size, k)."""
        return self.basis[: self.size].T @ coords.to(device=self.op.device, dtype=self.op.dtype)

    def restart(self, keep: Tensor, theta: Tensor, vecs: Tensor) -> None:
        """Keep the Ritz vectors ``keep`` and the residual direction; T becomes diag(theta)."""
        num_keep = len(keep)
        kept = self.ritz_vectors(vecs[:, keep]).T
        self.basis[num_keep] = self.basis[self.size]
        self.basis[:num_keep] = kept
        self.proj.zero_()
        self.proj[:num_keep, :num_keep] = torch.diag(theta[keep])
        self.size, self.restarts = num_keep, self.restarts + 1


# --------------------------------------------------------------------------------------------
# Traces and norms: Hutchinson, Hutch++
# --------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """A Monte-Carlo estimate: its value, standard error and the per-sample values (float64)."""

    value: float
    stderr: float
    samples: Tensor = field(repr=False)
    num_matvecs: int = 0

    def __str__(self) -> str:
        return f"{self.value:.6g} ± {self.stderr:.2g}"


def _estimate(samples: Tensor, offset: float, num_matvecs: int) -> Estimate:
    n = len(samples)
    stderr = float(samples.std() / math.sqrt(n)) if n > 1 else math.inf
    return Estimate(offset + float(samples.mean()), stderr, samples, num_matvecs)


def _check_estimator_args(num_samples: int, dist: str, block_size: int) -> None:
    check_int("num_samples", num_samples, 1)
    check_int("block_size", block_size, 1)
    if dist not in ("rademacher", "gaussian"):
        raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {dist!r}")


def _probe_blocks(
    op: CurvatureOperator,
    num: int,
    gen: torch.Generator,
    dist: str,
    block_size: int,
    deflate: Tensor | None = None,
    progress: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield blocks (V, A V) of ``num`` random probes, ``block_size`` columns at a time.

    Probes are drawn one by one, so the samples do not depend on ``block_size``. With
    ``deflate`` (orthonormal columns Q) each probe is projected to (I - Q Q^T) v first.
    """
    bar = _progress(num, "probes", progress)
    for start in range(0, num, block_size):
        probes = [_probe(op, gen, dist) for _ in range(min(block_size, num - start))]
        vs = torch.stack(probes, dim=1)
        if deflate is not None:
            vs = vs - deflate @ (deflate.T @ vs)
        yield vs, op.matmat(vs)
        bar.update(vs.shape[1])
    bar.close()


def hutchinson_trace(
    op: CurvatureOperator,
    num_samples: int = 100,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int = 8,
    progress: bool = False,
) -> Estimate:
    """tr(A) ~ mean_i v_i^T A v_i with E[v v^T] = I (Hutchinson 1989; Avron & Toledo 2011).

    Rademacher probes have the smallest variance, 2 (||A||_F^2 - sum_i A_ii^2) per sample;
    ``stderr`` is the sample standard deviation / sqrt(num_samples). Products are taken
    ``block_size`` probes at a time (see :meth:`CurvatureOperator.matmat`).
    """
    _check_estimator_args(num_samples, dist, block_size)
    blocks = _probe_blocks(op, num_samples, _generator(seed), dist, block_size, progress=progress)
    samples = torch.cat([(vs * avs).sum(dim=0).double().cpu() for vs, avs in blocks])
    return _estimate(samples, 0.0, num_samples)


def hutchinson_squared_frobenius(
    op: CurvatureOperator,
    num_samples: int = 100,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int = 8,
    progress: bool = False,
) -> Estimate:
    """||A||_F^2 = tr(A^T A) ~ mean_i ||A v_i||^2 with E[v v^T] = I (Hutchinson 1989).

    For a Hessian this is tr(H^2) = sum_i lambda_i^2, the quantity in Wu & Su (2023).
    """
    _check_estimator_args(num_samples, dist, block_size)
    blocks = _probe_blocks(op, num_samples, _generator(seed), dist, block_size, progress=progress)
    samples = torch.cat([avs.double().pow(2).sum(dim=0).cpu() for _, avs in blocks])
    return _estimate(samples, 0.0, num_samples)


def hutchpp_trace(
    op: CurvatureOperator,
    num_matvecs: int = 99,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int = 8,
) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1) with ``num_matvecs`` products.

    A third of the budget sketches the top range Q of A (its trace tr(Q^T A Q) is exact), the
    rest runs Hutchinson on the deflated (I - QQ^T) A (I - QQ^T). Much lower variance than plain
    Hutchinson when a few outlier eigenvalues dominate, as in neural-network Hessians.
    ``stderr`` is that of the Hutchinson part, given Q.
    """
    check_int("num_matvecs", num_matvecs, 3)
    _check_estimator_args(1, dist, block_size)
    gen = _generator(seed)
    sketch_size = min(num_matvecs // 3, op.shape[0])
    num_samples = num_matvecs - 2 * sketch_size
    sketch = torch.cat([avs for _, avs in _probe_blocks(op, sketch_size, gen, dist, block_size)], 1)
    q = torch.linalg.qr(sketch)[0]
    exact_part = sum(float((cols * op.matmat(cols)).sum()) for cols in q.split(block_size, dim=1))
    blocks = _probe_blocks(op, num_samples, gen, dist, block_size, deflate=q)
    samples = torch.cat([(vs * avs).sum(dim=0).double().cpu() for vs, avs in blocks])
    return _estimate(samples, exact_part, num_matvecs)


# --------------------------------------------------------------------------------------------
# Spectral density: stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------


@dataclass
class SpectralDensity:
    """Gauss quadrature nodes and weights of the spectral density, one row per probe.

    For a unit probe u, sum_j weights[l, j] f(nodes[l, j]) = u^T f(A) u exactly for polynomials f
    of degree < 2 num_iters (Golub & Meurant 1994); averaged over probes it estimates
    tr(f(A)) / P (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019, eq. 3; Papyan 2020). Rows that
    stopped early (an invariant subspace) are padded with zero weights.
    """

    nodes: Tensor
    weights: Tensor
    dimension: int
    num_matvecs: int

    def moment(self, order: int) -> Estimate:
        """tr(A^order) / P, estimated as the mean over probes of sum_j w_j theta_j^order."""
        check_int("order", order, 0)
        samples = (self.weights * self.nodes.pow(order)).sum(dim=1)
        return _estimate(samples, 0.0, self.num_matvecs)

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """The density on ``grid``, each node broadened to a Gaussian of std ``sigma``.

        phi(t) = mean_l sum_j w_lj N(t; theta_lj, sigma^2) (Ghorbani et al. 2019, eq. 5);
        it integrates to 1 over the real line.
        """
        check_positive("sigma", sigma)
        grid = torch.as_tensor(grid, dtype=torch.float64)
        z = (grid.reshape(-1, 1, 1) - self.nodes) / sigma
        kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return (self.weights * kernel).sum(dim=2).mean(dim=1).reshape(grid.shape)

    def grid(self, num_points: int = 1_000, margin: float = 0.05) -> Tensor:
        """An evenly spaced grid over [min node, max node], widened by ``margin`` of the range."""
        check_int("num_points", num_points, 2)
        used = self.nodes[self.weights > 0]
        low, high = float(used.min()), float(used.max())
        pad = margin * max(high - low, 1e-12)
        return torch.linspace(low - pad, high + pad, num_points, dtype=torch.float64)


def _block_lanczos_tridiagonals(
    op: CurvatureOperator, starts: Tensor, num_iters: int
) -> list[Tensor]:
    """Run Lanczos with full reorthogonalisation from each column of ``starts`` (P, b) in
    lockstep, one block product per step; return each column's tridiagonal T = V^T A V
    (float64), cut short where that column's Krylov space became invariant."""
    size, width = starts.shape
    basis = torch.zeros(num_iters, size, width, dtype=op.dtype, device=op.device)
    basis[0] = starts / starts.norm(dim=0)
    alphas = torch.zeros(num_iters, width, dtype=torch.float64)
    betas = torch.zeros(num_iters, width, dtype=torch.float64)
    lengths = torch.full((width,), num_iters)
    threshold = max(size**0.5, 10) * torch.finfo(op.dtype).eps
    for j in range(num_iters):
        w = op.matmat(basis[j])
        av_norm = w.norm(dim=0)
        for _ in range(2):  # classical Gram-Schmidt, twice, per column
            coeffs = torch.einsum("jpb,pb->jb", basis[: j + 1], w)
            w -= torch.einsum("jpb,jb->pb", basis[: j + 1], coeffs)
            alphas[j] += coeffs[j].double().cpu()
        beta = w.norm(dim=0)
        lengths[(beta <= threshold * av_norm).cpu() & (lengths > j)] = j + 1  # invariant
        if j + 1 == num_iters or bool((lengths <= j + 1).all()):
            break
        active = (lengths > j + 1).to(op.device)
        betas[j] = torch.where(active, beta, 0).double().cpu()
        basis[j + 1] = torch.where(active, w / beta.clamp_min(torch.finfo(op.dtype).tiny), 0)
    return [
        torch.diag(alphas[:n, c])
        + torch.diag(betas[: n - 1, c], 1)
        + torch.diag(betas[: n - 1, c], -1)
        for c, n in enumerate(lengths.tolist())
    ]


def spectral_density(
    op: CurvatureOperator,
    num_probes: int = 10,
    num_iters: int = 80,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int = 8,
    progress: bool = False,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019, Sec. 2; Papyan 2020).

    For each of ``num_probes`` unit probes u, ``num_iters`` Lanczos steps (full
    reorthogonalisation) give T = S diag(theta) S^T; the nodes are theta and the weights
    S[0, :]^2, a Gauss quadrature rule for the spectral measure of u. Costs
    num_probes x num_iters matvecs, ``block_size`` probes advancing together; memory
    num_iters x block_size vectors of length P.
    """
    check_int("num_probes", num_probes, 1)
    check_int("num_iters", num_iters, 1)
    _check_estimator_args(1, dist, block_size)
    gen = _generator(seed)
    num_iters = min(num_iters, op.shape[0])
    nodes = torch.zeros(num_probes, num_iters, dtype=torch.float64)
    weights = torch.zeros(num_probes, num_iters, dtype=torch.float64)
    start_count = op.num_matvecs
    bar = _progress(num_probes, "SLQ probes", progress)
    for first in range(0, num_probes, block_size):
        width = min(block_size, num_probes - first)
        starts = torch.stack([_probe(op, gen, dist) for _ in range(width)], dim=1)
        for row, tri in enumerate(_block_lanczos_tridiagonals(op, starts, num_iters), first):
            theta, vecs = torch.linalg.eigh(tri)
            nodes[row, : len(theta)] = theta
            weights[row, : len(theta)] = vecs[0] ** 2
        bar.update(width)
    bar.close()
    return SpectralDensity(nodes, weights, op.shape[0], op.num_matvecs - start_count)
