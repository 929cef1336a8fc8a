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

from . import decomposition, krylov, operators, slq, trace
from .decomposition import *  # noqa: F403 (each submodule's __all__, gathered below)
from .krylov import *  # noqa: F403
from .krylov import Which  # noqa: F401 (type aliases outside __all__, as the one module had them)
from .operators import *  # noqa: F403
from .operators import Batch, BatchMap, Data  # noqa: F401
from .probes import Seed  # noqa: F401
from .slq import *  # noqa: F403
from .trace import *  # noqa: F403

# every submodule's public names, in this order: operators, decomposition, krylov, trace, slq
__all__ = [
    *operators.__all__,
    *decomposition.__all__,
    *krylov.__all__,
    *trace.__all__,
    *slq.__all__,
]
