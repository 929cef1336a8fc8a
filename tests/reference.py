"""Independent references shared by the tests: networks written out by hand on a flat
parameter vector, for autograd Hessians and Jacobians to compare the library with."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters, detached, in ``named_parameters`` order, as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, P): each example's cross-entropy gradient, flattened, by a loop of backward passes."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
    return torch.stack(rows)


def mlp_by_hand(
    w: torch.Tensor,
    x: torch.Tensor,
    sizes: tuple[int, ...],
    act: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
) -> torch.Tensor:
    """A fully connected net (weight then bias per layer, PyTorch's W: out x in, ``act``
    between layers) evaluated on the flat vector ``w``, the layout of :func:`flat_params`."""
    offset, h = 0, x
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        weight = w[offset : offset + fan_in * fan_out].reshape(fan_out, fan_in)
        offset += fan_in * fan_out
        bias = w[offset : offset + fan_out]
        offset += fan_out
        h = h @ weight.T + bias
        if i < len(sizes) - 2:
            h = act(h)
    return h
