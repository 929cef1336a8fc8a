"""Curvature of a loss over a dataset: operators, eigenpairs, traces and spectral densities.

Every curvature matrix of the course is a *linear operator* on the flat parameter vector (of
length P), built from ``(model, loss, data)`` and multiplied with vectors without ever being
formed (Pearlmutter 1994); the estimators take any such operator. By topic:

- :mod:`.operators`  :class:`CurvatureOperator` and the Hessian, Gauss-Newton, residual and
  live-Hessian operators; :func:`exact_hessian`, the dense Hessian of a small model, for checks;
- :mod:`.decomposition`  :func:`class_decomposition`, the Gauss-Newton matrix split by class
  (Papyan 2019, 2020);
- :mod:`.krylov`  :func:`lanczos`, top-k / bottom-k eigenpairs by thick-restart Lanczos with
  full reorthogonalisation (Lanczos 1950; Wu & Simon 2000), and the block Lanczos behind SLQ;
- :mod:`.trace`  :func:`hutchinson_trace`, :func:`hutchpp_trace`,
  :func:`hutchinson_squared_frobenius` (Hutchinson 1989; Meyer et al. 2021);
- :mod:`.slq`  :func:`spectral_density`, stochastic Lanczos quadrature (Golub & Meurant 1994;
  Ghorbani, Krishnan & Xiao 2019; Papyan 2020), with Gaussian broadening;
- :mod:`.probes`  the seeded random probes they share.

All random draws come from a seeded ``torch.Generator`` on the CPU (so results do not depend on
the device) and never touch the global RNG. Every name is importable from here, as
``gradcourse.curvature.lanczos`` etc.
"""

from __future__ import annotations

from .decomposition import ClassDecomposition, class_decomposition
from .krylov import (
    EigResult,
    NonFiniteOperatorError,
    Which,  # noqa: F401 (type aliases outside __all__, as the one module had them)
    lanczos,
)
from .operators import (
    Batch,  # noqa: F401
    BatchMap,  # noqa: F401
    CurvatureOperator,
    Data,  # noqa: F401
    GGNOperator,
    HessianOperator,
    LiveHessianOperator,
    ResidualOperator,
    exact_hessian,
)
from .probes import Seed  # noqa: F401
from .slq import SpectralDensity, spectral_density
from .trace import Estimate, hutchinson_squared_frobenius, hutchinson_trace, hutchpp_trace

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
