"""Argument checks shared by the modules of :mod:`gradcourse.ntk`."""

from __future__ import annotations

from torch import Tensor, nn

from ..functional import refuse_random_train_mode


def _check_deterministic(model: nn.Module) -> None:
    """Refuse BatchNorm / dropout in train mode: the NTK would not be a function of (x, x')."""
    refuse_random_train_mode(model, "the NTK would not be a function of one pair of examples")


def _check_inputs(name: str, x: object) -> Tensor:
    """``x`` itself, once it is a tensor of n >= 1 examples along its first dimension."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of shape (n, ...), got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one example (shape (n, ...), n >= 1)")
    return x
