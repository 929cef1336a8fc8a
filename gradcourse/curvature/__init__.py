"""Curvature of a loss over a dataset (moved from ``gradcourse/curvature.py``; see
:mod:`gradcourse.curvature.operators`)."""

from . import operators as _operators
from .operators import *  # noqa: F403
from .operators import __all__ as __all__

globals().update({k: v for k, v in vars(_operators).items() if not k.startswith("__")})
