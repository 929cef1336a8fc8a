"""Traces and norms of a curvature operator by random probes: Hutchinson and Hutch++.

- :func:`hutchinson_trace`  tr(A) (Hutchinson 1989; Avron & Toledo 2011);
- :func:`hutchpp_trace`  tr(A) with a sketched top range (Meyer, Musco, Musco & Woodruff 2021);
- :func:`hutchinson_squared_frobenius`  ||A||_F^2 = tr(A^2) for a symmetric A.

Each returns an :class:`Estimate` (value, standard error, the per-probe samples). Products are
taken a block of probes at a time (:meth:`CurvatureOperator.matmat`), or one at a time on the
CPU for a model with large activations; see ``block_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checks import check_int
from .operators import CurvatureOperator
from .probes import Seed, _generator, _probes, _progress

__all__ = ["Estimate", "hutchinson_trace", "hutchpp_trace", "hutchinson_squared_frobenius"]


@dataclass
class Estimate:
    """A Monte-Carlo estimate: its value, standard error and the per-sample values (float64)."""

    value: float
    stderr: float
    samples: Tensor = field(repr=False)
    num_matvecs: int = 0

    def __str__(self) -> str:
        return f"{self.value:.6g} ± {self.stderr:.2g}"


def _estimate(samples: Tensor, offset: float, num_matvecs: int) -> Estimate:
    n = len(samples)
    stderr = float(samples.std() / math.sqrt(n)) if n > 1 else math.inf
    return Estimate(offset + float(samples.mean()), stderr, samples, num_matvecs)


# block_size=None: probes per product off the CPU
DEVICE_BLOCK_SIZE = 8
# on the CPU: blocks only when the largest activation of one product is at most
# CPU_BLOCK_MAX_BYTES, of as many probes as keep the block's largest activation (k times that)
# within CPU_BLOCK_BUDGET_BYTES, at most CPU_MAX_BLOCK_SIZE
CPU_BLOCK_MAX_BYTES = 128 * 1024
CPU_BLOCK_BUDGET_BYTES = 2 * 1024 * 1024
CPU_MAX_BLOCK_SIZE = 32


def _check_estimator_args(
    op: CurvatureOperator, num_samples: int, dist: str, block_size: int | None
) -> int:
    """Check the arguments; return the block size to use (``None``: :func:`_auto_block_size`)."""
    check_int("num_samples", num_samples, 1)
    if block_size is not None:
        check_int("block_size", block_size, 1)
    if dist not in ("rademacher", "gaussian"):
        raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return _auto_block_size(op) if block_size is None else block_size


def _auto_block_size(op: CurvatureOperator) -> int:
    """:data:`DEVICE_BLOCK_SIZE` off the CPU. On the CPU, from the operator's largest activation
    a (:meth:`CurvatureOperator.activation_bytes`): 1 (one product at a time) when a is unknown
    or over :data:`CPU_BLOCK_MAX_BYTES`, else :data:`CPU_BLOCK_BUDGET_BYTES` // a, at most
    :data:`CPU_MAX_BLOCK_SIZE` (32 for a <= 64 KiB, 16 at 128 KiB).

    On the CPU (1 thread, tanh MLPs; 2-core VM, 1 MiB L2 a core) each ``vmap``-ed block costs
    a fixed ~0.6 ms besides its products, so blocks pay while a product's activations are small:
    per product, blocks of 16-32 are 1.1-1.8x faster than blocks of 8 up to 128 KiB of
    activations (the block's within 2-3 MiB), 1.5-3x faster than single products; blocks of
    50-64 gain nothing more, and lose from 64 KiB (out of cache). From ~250 KiB a single product
    is as fast as any block, and from ~300 KiB 1.1-1.5x faster.
    """
    if op.device.type != "cpu":
        return DEVICE_BLOCK_SIZE
    size = op.activation_bytes()
    if size is None or size > CPU_BLOCK_MAX_BYTES:
        return 1
    return min(CPU_MAX_BLOCK_SIZE, CPU_BLOCK_BUDGET_BYTES // max(size, 1))


def _products(op: CurvatureOperator, vs: Tensor) -> Tensor:
    """A V for a block V (P, k): one ``matvec`` for a single column, else ``matmat``."""
    if vs.shape[1] == 1:
        return op.matvec(vs[:, 0]).unsqueeze(1)
    return op.matmat(vs)


def _even_blocks(num: int, block_size: int) -> list[int]:
    """Sizes of as few blocks of at most ``block_size`` as hold ``num``, as even as can be
    (100 at 32: four blocks of 25, not three of 32 and one of 4)."""
    count = -(-num // block_size)
    return [num * (i + 1) // count - num * i // count for i in range(count)]


def _probe_blocks(
    op: CurvatureOperator,
    num: int,
    gen: torch.Generator,
    dist: str,
    block_size: int,
    deflate: Tensor | None = None,
    progress: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield blocks (V, A V) of ``num`` random probes, at most ``block_size`` columns each
    (:func:`_even_blocks`).

    The probes are those drawn one by one (:func:`_probes`), so the samples do not depend on
    ``block_size``. With ``deflate`` (orthonormal columns Q) each probe is projected to
    (I - Q Q^T) v first.
    """
    bar = _progress(num, "probes", progress)
    for size in _even_blocks(num, block_size):
        vs = _probes(op, gen, dist, size)
        if deflate is not None:
            vs = vs - deflate @ (deflate.T @ vs)
        yield vs, _products(op, vs)
        bar.update(vs.shape[1])
    bar.close()


def _quadratic_forms(vs: Tensor, avs: Tensor) -> Tensor:
    """v_i^T A v_i for each column: Hutchinson's samples of tr(A)."""
    return (vs * avs).sum(dim=0)


def _squared_norms(vs: Tensor, avs: Tensor) -> Tensor:
    """||A v_i||^2 for each column (in float64): samples of ||A||_F^2."""
    return avs.double().pow(2).sum(dim=0)


def _probe_samples(
    op: CurvatureOperator,
    num: int,
    gen: torch.Generator,
    dist: str,
    block_size: int,
    sample: Callable[[Tensor, Tensor], Tensor],
    *,
    deflate: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """``sample(V, A V)`` over :func:`_probe_blocks`, one float64 value per probe, on the CPU."""
    blocks = _probe_blocks(op, num, gen, dist, block_size, deflate, progress)
    return torch.cat([sample(vs, avs).double().cpu() for vs, avs in blocks])


def _hutchinson(
    op: CurvatureOperator,
    num_samples: int,
    seed: Seed,
    dist: str,
    block_size: int | None,
    progress: bool,
    sample: Callable[[Tensor, Tensor], Tensor],
) -> Estimate:
    """The mean of ``sample(V, A V)`` over ``num_samples`` seeded probes, as an Estimate."""
    block_size = _check_estimator_args(op, num_samples, dist, block_size)
    gen = _generator(seed)
    samples = _probe_samples(op, num_samples, gen, dist, block_size, sample, progress=progress)
    return _estimate(samples, 0.0, num_samples)


def hutchinson_trace(
    op: CurvatureOperator,
    num_samples: int = 100,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int | None = None,
    progress: bool = False,
) -> Estimate:
    """tr(A) ~ mean_i v_i^T A v_i with E[v v^T] = I (Hutchinson 1989; Avron & Toledo 2011).

    Rademacher probes have the smallest variance, 2 (||A||_F^2 - sum_i A_ii^2) per sample;
    ``stderr`` is the sample standard deviation / sqrt(num_samples). Products are taken
    at most ``block_size`` probes at a time, in blocks of even sizes (see
    :meth:`CurvatureOperator.matmat`); the default ``None`` takes 8 at a time on other devices
    than the CPU, and on the CPU up to 32 for a model with small activations, else one by one
    (see :func:`_auto_block_size`). The probes are those drawn one by one, so the samples do not
    depend on ``block_size`` (up to rounding).
    """
    return _hutchinson(op, num_samples, seed, dist, block_size, progress, _quadratic_forms)


def hutchinson_squared_frobenius(
    op: CurvatureOperator,
    num_samples: int = 100,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int | None = None,
    progress: bool = False,
) -> Estimate:
    """||A||_F^2 = tr(A^T A) ~ mean_i ||A v_i||^2 with E[v v^T] = I (Hutchinson 1989).

    For a Hessian this is tr(H^2) = sum_i lambda_i^2, the quantity in Wu & Su (2023).
    ``block_size`` as in :func:`hutchinson_trace`.
    """
    return _hutchinson(op, num_samples, seed, dist, block_size, progress, _squared_norms)


def hutchpp_trace(
    op: CurvatureOperator,
    num_matvecs: int = 99,
    *,
    seed: Seed = 0,
    dist: str = "rademacher",
    block_size: int | None = None,
) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1) with ``num_matvecs`` products.

    A third of the budget sketches the top range Q of A (its trace tr(Q^T A Q) is exact), the
    rest runs Hutchinson on the deflated (I - QQ^T) A (I - QQ^T). Much lower variance than plain
    Hutchinson when a few outlier eigenvalues dominate, as in neural-network Hessians.
    ``stderr`` is that of the Hutchinson part, given Q. ``block_size`` as in
    :func:`hutchinson_trace`.
    """
    check_int("num_matvecs", num_matvecs, 3)
    block_size = _check_estimator_args(op, 1, dist, block_size)
    gen = _generator(seed)
    sketch_size = min(num_matvecs // 3, op.shape[0])
    num_samples = num_matvecs - 2 * sketch_size
    sketch = torch.cat([avs for _, avs in _probe_blocks(op, sketch_size, gen, dist, block_size)], 1)
    q = torch.linalg.qr(sketch)[0]
    exact_part = sum(
        float((cols * _products(op, cols)).sum())
        for cols in q.split(_even_blocks(q.shape[1], block_size), 1)
    )
    samples = _probe_samples(op, num_samples, gen, dist, block_size, _quadratic_forms, deflate=q)
    return _estimate(samples, exact_part, num_matvecs)
