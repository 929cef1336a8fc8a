"""Curvature matrices as linear operators on the flat parameter vector.

Every curvature matrix of the course is a *linear operator* on the flat parameter vector (of
length P), built from ``(model, loss, data)`` and multiplied with vectors without ever being
formed (Pearlmutter 1994, "Fast exact multiplication by the Hessian"):

- :class:`HessianOperator`   H v, forward-over-reverse (``jvp`` of ``grad``) with ``torch.func``,
  or, with a batch's graph cached, one more backward pass through its gradient;
- :class:`GGNOperator`       G v = J^T H_out J v, the generalised Gauss-Newton (Schraudolph 2002);
- :class:`ResidualOperator`  R v = sum_k (dL/df_k) Hess(f_k) v, so that H = G + R
  (Papyan 2020, "Traces of class/cross-class structure pervade deep learning spectra", eq. 3).
- :class:`LiveHessianOperator`  H v by double backward through the module itself, at its
  current parameters, for one batch: cheaper to build, for a sharpness measured during training;
- :func:`exact_hessian`     the dense Hessian of a small model, for checks.

Operators average over the whole dataset (one ``(x, y)`` batch, or a list / DataLoader of
batches, weighted by batch size), so they are the curvature of the *mean* loss whatever the
batching. ``op @ V`` on a block of vectors (P, k) vectorises the k products with ``vmap``.
The estimators that take any :class:`CurvatureOperator` are in :mod:`.krylov` (eigenpairs),
:mod:`.trace` (traces and norms) and :mod:`.slq` (spectral densities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from ..checks import check_int
from ..functional import (
    FunctionalModel,
    Params,
    flatten,
    math_attention,
    place_batch,
    refuse_random_train_mode,
)
from ..losses import LossFn, get_loss, targets_for

Batch = tuple[Tensor, Tensor]
Data = Batch | Iterable[Batch]
BatchMap = Callable[[Params], Params]

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "LiveHessianOperator",
    "GGNOperator",
    "ResidualOperator",
    "exact_hessian",
]


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

    def activation_bytes(self) -> int | None:
        """The largest tensor one product runs through, in bytes, or None when unknown: a
        hint for how many products to vectorise together (:func:`.trace.hutchinson_trace`)."""
        return None

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

    def activation_bytes(self) -> int | None:
        sizes = [op.activation_bytes() for _, op in self.terms]
        return None if None in sizes else max(sizes)

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

    def activation_bytes(self) -> int | None:
        """The largest output of any submodule on the first batch, in bytes: one forward pass
        under ``no_grad`` with forward hooks, measured once."""
        if not hasattr(self, "_activation_bytes"):
            x, _ = next(iter(self.batches()))
            largest = [0]

            def record(module: nn.Module, inputs: object, output: object) -> None:
                if isinstance(output, Tensor):
                    largest.append(output.numel() * output.element_size())

            hooks = [m.register_forward_hook(record) for m in self.functional.model.modules()]
            try:
                with torch.no_grad():
                    self.outputs(self.params, x)
            finally:
                for hook in hooks:
                    hook.remove()
            self._activation_bytes = max(largest)
        return self._activation_bytes

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
        (the vector-Jacobian product, equal to the ``jvp`` because the Jacobian is symmetric),
        see :class:`_CachedDerivative`.
        """
        if self.cache:
            return _CachedDerivative(gradient, self.params)
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
        maps = self._batch_maps()
        if isinstance(maps, list) and len(maps) == 1 and isinstance(maps[0][1], _CachedDerivative):
            return maps[0][1].flat(v)  # one cached batch: no dicts, no averaging
        return self._average(lambda apply: flatten(apply(self.unflatten(v))), v)

    def _matmat(self, vs: Tensor) -> Tensor:
        def per_batch(apply: BatchMap) -> Tensor:
            if isinstance(apply, _CachedDerivative):
                apply = apply.for_vmap()

            def column(v: Tensor) -> Tensor:
                return flatten(apply(self.unflatten(v)))

            return vmap(column, in_dims=1, out_dims=1)(vs)

        return self._average(per_batch, vs)


class _CachedDerivative:
    """v -> (d gradient / d params) v by one more backward pass through the graph of
    ``gradient`` (a ``torch.func`` function) at the parameters, recorded on first use.

    A single product (:meth:`flat`, :meth:`__call__`) is one ``torch.autograd.grad`` backward
    through a graph recorded by plain autograd around ``gradient`` at leaf copies of the
    parameters: the same numbers as ``torch.func.vjp`` of ``gradient`` (bit-equal on the
    benchmark's MLPs), on one CPU thread about 10% cheaper per product with :meth:`flat` (no
    dicts around it): PyHessian's double backward, at its cost (``benchmarks/curvature.py``).
    Under ``vmap`` (``matmat``) the functorch ``vjp`` is 10-17% cheaper instead (and 20-25%
    cheaper than ``autograd.grad(..., is_grads_batched=True)`` through the plain graph):
    :meth:`for_vmap` records that one. Each graph is recorded when first needed, so an
    estimator that takes only blocks (or only single products) pays for one; with both kinds
    of products the cached memory is twice that of one graph.
    """

    def __init__(self, gradient: Callable[[Params], Params], params: Params) -> None:
        self.gradient, self.params = gradient, params
        self.names = list(params)
        self._sizes = [p.numel() for p in params.values()]
        self._graph: tuple[list[Tensor], list[int], list[Tensor]] | None = None
        self._vjp_fn: Callable | None = None

    def _plain_graph(self) -> tuple[list[Tensor], list[int], list[Tensor]]:
        """(leaf inputs, indices of the live gradient entries, those entries), recorded once."""
        if self._graph is None:
            inputs = [p.detach().requires_grad_() for p in self.params.values()]
            with torch.enable_grad():
                grads = self.gradient(dict(zip(self.names, inputs, strict=True)))
            # an entry that does not depend on the parameters has a zero row block
            live = [i for i, n in enumerate(self.names) if grads[n].requires_grad]
            self._graph = inputs, live, [grads[self.names[i]] for i in live]
        return self._graph

    def _backward(self, directions: Callable[[int], Tensor]) -> tuple[Tensor, ...] | None:
        """The backward pass with ``directions(i)`` for live entry i; None if none is live."""
        inputs, live, outputs = self._plain_graph()
        if not live:
            return None
        return torch.autograd.grad(
            outputs,
            inputs,
            [directions(i) for i in live],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )

    def flat(self, v: Tensor) -> Tensor:
        """The product for a flat vector (P,), without building dicts: one matvec's path."""
        chunks = torch.split(v, self._sizes)
        products = self._backward(lambda i: chunks[i].view_as(self.params[self.names[i]]))
        if products is None:
            return torch.zeros_like(v)
        return torch.cat([t.reshape(-1) for t in products])

    def for_vmap(self) -> BatchMap:
        """The same map through the functorch ``vjp`` of the gradient, for ``vmap``."""
        if self._vjp_fn is None:
            self._vjp_fn = vjp(self.gradient, self.params)[1]
        vjp_fn = self._vjp_fn
        return lambda v: vjp_fn(v)[0]

    def __call__(self, v: Params) -> Params:
        products = self._backward(lambda i: v[self.names[i]])
        if products is None:
            return {n: torch.zeros_like(v[n]) for n in self.names}
        return dict(zip(self.names, products, strict=True))


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
        with torch.enable_grad(), math_attention():  # the fused CPU attention has no 2nd derivative
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
