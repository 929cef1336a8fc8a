"""The two losses of the course, with one convention each, used by training and curvature alike.

- ``mse``: C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2, the cost of Jacot et al. (2018) and Cohen et al.
  (2021). Its Hessian w.r.t. the outputs is the identity / n. (PyTorch's ``MSELoss`` also divides
  by the number of outputs and drops the 1/2; its gradient is 2/O times this one.)
- ``ce``: mean softmax cross-entropy over examples, integer class labels as targets.

Classification labels are turned into one-hot float targets for ``mse`` by :func:`targets_for`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES: tuple[str, ...] = ("mse", "ce")


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """1/n sum_i 1/2 ||outputs_i - targets_i||^2 (a scalar output may be shape (n,) or (n, 1))."""
    if outputs.shape != targets.shape:
        targets = targets.reshape(outputs.shape)
    diff = (outputs - targets).reshape(outputs.shape[0], -1)
    return 0.5 * diff.pow(2).sum(dim=1).mean()


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean softmax cross-entropy; ``targets`` are integer labels (or class probabilities)."""
    return F.cross_entropy(outputs, targets)


def token_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats per token) of (n, T, vocab) logits against (n, T)
    integer targets: every position of every sequence weighs the same."""
    if outputs.ndim != 3 or targets.shape != outputs.shape[:2]:
        raise ValueError(
            f"outputs must be (n, T, vocab) and targets (n, T), got {tuple(outputs.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())


def get_loss(loss: str | LossFn) -> LossFn:
    """Return the loss function for ``"mse"`` or ``"ce"``; a callable is passed through."""
    if callable(loss):
        return loss
    if loss == "mse":
        return mse
    if loss == "ce":
        return cross_entropy
    raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot float targets of shape (n, num_classes) from integer labels."""
    if labels.dtype.is_floating_point:
        raise ValueError("one_hot expects integer labels, got a floating-point tensor")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return F.one_hot(labels.long(), num_classes).to(dtype)


def targets_for(loss: str | LossFn, y: Tensor, num_outputs: int, dtype: torch.dtype) -> Tensor:
    """Targets in the form ``loss`` expects: one-hot floats for ``mse`` on integer labels
    (when the model has more than one output), labels unchanged for ``ce``."""
    if loss == "mse" and not y.dtype.is_floating_point and num_outputs > 1:
        return one_hot(y, num_outputs, dtype=dtype)
    if loss == "mse":
        return y.to(dtype)
    return y
