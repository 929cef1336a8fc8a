"""The Gauss-Newton matrix of a classifier split into its class / cross-class part and the rest
(Papyan 2019, "Measurements of three-level hierarchical structure in the outliers in the spectrum
of deepnet Hessians"; Papyan 2020): dense matrices for small models, from per-example output
Jacobians. See :class:`ClassDecomposition`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..checks import check_int
from ..functional import Params, flatten
from .operators import Batch, GGNOperator, _is_single_batch

__all__ = ["ClassDecomposition", "class_decomposition"]


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
