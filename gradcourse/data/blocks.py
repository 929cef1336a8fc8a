"""Block images after Shah, Jain & Netrapalli 2021's BlockMNIST: a Fashion-MNIST image in one
block, a null patch in the other (notebook 06).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_int as _check_int

# ----------------------------------------------------------------------------------------------
# Block images (after Shah, Jain & Netrapalli 2021's BlockMNIST)


def null_patch(size: int = 28, side: int = 12, width: int = 2) -> Tensor:
    """The "null" block: a (size, size) image holding the outline of a centred square of
    ``side`` pixels, ``width`` pixels thick, at intensity 1 on 0. The same in every image of
    both classes, so it carries no information about the label."""
    _check_int("size", size, 4)
    _check_int("side", side, 2, size)
    _check_int("width", width, 1, side // 2)
    img = torch.zeros(size, size)
    lo = (size - side) // 2
    hi = lo + side
    img[lo:hi, lo:hi] = 1.0
    img[lo + width : hi - width, lo + width : hi - width] = 0.0
    return img


def block_images(
    images: Tensor, labels: Tensor, *, seed: int = 0, patch: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Stack each (1, H, W) image with a null block (:func:`null_patch`, or ``patch``) into a
    (1, 2H, W) image, the image on top for exactly half of the examples of every class (at
    random, from ``seed``) and below for the rest: BlockMNIST's design (Shah, Jain & Netrapalli
    2021, arXiv 2102.12781, section 4), where only the image's block can tell the classes apart
    and its position cannot. Returns the stacked images and ``top`` (bool, (n,)): whether the
    image is the upper block. Pixels as given (use unstandardised [0, 1] images, so that the
    patch's 1 is the images' white)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (n, 1, H, W), got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    _check_int("seed", seed, 0)
    h, w = images.shape[-2:]
    patch = null_patch(h) if patch is None else torch.as_tensor(patch)
    if patch.shape != (h, w):
        raise ValueError(f"patch must have shape ({h}, {w}), got {tuple(patch.shape)}")
    gen = torch.Generator().manual_seed(seed)
    top = torch.zeros(len(images), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        top[idx[: (len(idx) + 1) // 2]] = True
    null = patch.to(images).expand(len(images), 1, h, w)
    upper = torch.where(top.view(-1, 1, 1, 1).to(images.device), images, null)
    lower = torch.where(top.view(-1, 1, 1, 1).to(images.device), null, images)
    return torch.cat([upper, lower], dim=2), top


def block_mask(top: Tensor, height: int = 28, width: int = 28) -> Tensor:
    """(n, 1, 2 height, width) bool: True on the block that holds the image (the signal)."""
    _check_int("height", height, 1)
    _check_int("width", width, 1)
    top = torch.as_tensor(top, dtype=torch.bool).flatten()
    upper = top.view(-1, 1, 1, 1).expand(len(top), 1, height, width)
    return torch.cat([upper, ~upper], dim=2)
