"""The neural tangent kernel: empirical, infinite-width, and the dynamics it predicts.

Jacot, Gabriel & Hongler (2018), "Neural Tangent Kernel: Convergence and Generalization in Neural
Networks", NeurIPS, arXiv:1806.07572. For a network f(x; theta) the NTK is J(x) J(x')^T, J the
Jacobian of the outputs w.r.t. the parameters; gradient flow on a cost C moves the function
along it, df_t/dt = -Theta grad_f C. By topic:

- :mod:`.empirical`  :func:`empirical_ntk`, :func:`empirical_ntk_fn` / :class:`EmpiricalNTK`
  of any ``torch.func``-friendly model, by Jacobian contraction, NTK-vector products or
  per-layer Grams of dense layers, chosen by a flop count (:func:`auto_method`);
- :mod:`.analytic`  the infinite-width NNGP and NTK of a fully connected ReLU net in the NTK
  parameterisation (:func:`analytic_ntk`, from the layer functions :func:`input_kernel`,
  :func:`dense_kernel`, :func:`relu_kernel` on a :class:`Kernel`);
- :mod:`.dynamics`  least squares under a fixed kernel in closed form:
  :func:`kernel_gradient_flow`, :func:`kernel_gradient_descent`, :func:`kernel_regression`,
  and :func:`gradient_descent_mse`, the same as a predictor function (neural-tangents' shape);
- :mod:`.linearized`  :func:`linearize`, the network linearised in its parameters, which
  gradient descent trains exactly as kernel gradient descent predicts.

Every name is importable from here, as ``gradcourse.ntk.empirical_ntk`` etc.
"""

from __future__ import annotations

from .analytic import (
    ANALYTIC_ACTIVATIONS,  # noqa: F401 (names outside __all__, as the one module had them)
    Kernel,
    analytic_ntk,
    dense_kernel,
    input_kernel,
    relu_kernel,
)
from .dynamics import (
    KernelPrediction,
    _Spectral,  # noqa: F401 (its tests use it)
    gradient_descent_mse,
    kernel_gradient_descent,
    kernel_gradient_flow,
    kernel_regression,
)
from .empirical import (
    DEFAULT_CHUNK_BYTES,  # noqa: F401
    METHODS,
    NTK_VP_OVERHEAD,  # noqa: F401
    EmpiricalNTK,
    auto_method,
    empirical_ntk,
    empirical_ntk_fn,
)
from .linearized import LinearizedModel, linearize

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
    "gradient_descent_mse",
    "LinearizedModel",
    "linearize",
]
