"""The network linearised in its parameters around a point (Lee et al. 2019, "Wide neural
networks of any depth evolve as linear models under gradient descent", eq. 5): what kernel
gradient descent with the NTK at that point trains exactly (:mod:`.dynamics`).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import jvp

from ..functional import FunctionalModel, Params, place
from ._checks import _check_deterministic

__all__ = ["LinearizedModel", "linearize"]


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
