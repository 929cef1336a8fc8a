"""The neural tangent kernel (moved from ``gradcourse/ntk.py``; see
:mod:`gradcourse.ntk.empirical`)."""

from . import empirical as _empirical
from .empirical import *  # noqa: F403
from .empirical import __all__ as __all__

globals().update({k: v for k, v in vars(_empirical).items() if not k.startswith("__")})
