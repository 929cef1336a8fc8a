"""Training in a random subspace of the parameters (Li, Farkhoor, Liu & Yosinski 2018, "Measuring
the Intrinsic Dimension of Objective Landscapes", ICLR, arXiv 1804.08838).

The D parameters of a network are tied to d trainable ones: theta = theta0 + P theta_d, with
theta0 the network's initialisation (frozen), P a fixed random D x d matrix and theta_d starting
at 0. The smallest d at which training reaches 90% of the full network's accuracy is the
intrinsic dimension d_int90 of the objective.

Three projections, as in the paper (their properties as the authors' code builds them):

- :class:`DenseProjection`: P_ij ~ N(0, 1), each column scaled to unit norm. Memory D d.
- :class:`SparseProjection`: scikit-learn's sparse random projection, entries +-sqrt(s) with
  probability 1 / (2 s) each and 0 otherwise, density 1 / s = 1 / sqrt(D); columns scaled to
  unit norm. Memory about d sqrt(D).
- :class:`FastfoodProjection`: blocks V = H G Pi H B (Le, Sarlos & Smola 2013) applied to
  theta_d padded to L = 2^ceil(log2 D), sliced to the first D coordinates: H the unnormalised
  Walsh-Hadamard matrix (:func:`fwht`, O(L log L), never formed), B a random +-1 diagonal, Pi
  a permutation, G a Gaussian diagonal; divided by ||G|| sqrt(D). A column of H G Pi H B has
  norm ||G|| sqrt(L) over all L coordinates, so each column's squared norm over the D kept
  ones is one in expectation (not exactly, as for the other two). d > L takes ceil(d / L)
  independent blocks, summed. Memory O(L) per block, whatever d.

:class:`CoordinateProjection` (not the paper's) trains d randomly chosen parameters, the
axis-aligned subspace to compare random directions with.

Every column is normalised over the whole network (one norm over all D coordinates, not per
layer), as the authors do. :class:`SubspaceModel` wraps a model: its only parameter is
theta_d, and its forward pass is the model's with theta0 + P theta_d.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .checks import check_int, check_number
from .functional import FunctionalModel

__all__ = [
    "CoordinateProjection",
    "DenseProjection",
    "FastfoodProjection",
    "PROJECTIONS",
    "Projection",
    "SparseProjection",
    "SubspaceModel",
    "fwht",
    "make_projection",
]


def fwht(x: Tensor) -> Tensor:
    """The unnormalised Walsh-Hadamard transform H x along the last dimension, whose length must
    be a power of two (H the Sylvester-ordered Hadamard matrix, ``scipy.linalg.hadamard``'s
    order): log2(L) butterfly stages of additions, O(L log L), no matrix formed."""
    length = x.shape[-1]
    if length < 1 or length & (length - 1):
        raise ValueError(f"the last dimension must be a power of two, got {length}")
    batch = x.shape[:-1]
    y = x.reshape(-1, length)
    h = 1
    while h < length:
        y = y.reshape(-1, length // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*batch, length)


class Projection(nn.Module):
    """A fixed random D x d matrix P, applied as ``P @ theta_d`` (``forward``) without (for the
    sparse and Fastfood kinds) forming it. Its random state lives in buffers, so it moves with
    ``.to()`` and is saved with ``state_dict``."""

    def __init__(self, D: int, d: int) -> None:  # noqa: N803 (the paper's names)
        super().__init__()
        self.D = check_int("D", D, 1)
        self.d = check_int("d", d, 1)

    def forward(self, theta_d: Tensor) -> Tensor:
        raise NotImplementedError

    def _check(self, theta_d: Tensor) -> None:
        if theta_d.shape != (self.d,):
            raise ValueError(f"theta_d must have shape ({self.d},), got {tuple(theta_d.shape)}")

    def matrix(self) -> Tensor:
        """P as a dense (D, d) tensor, column by column through :meth:`forward` (for tests and
        small D; memory D d)."""
        eye = torch.eye(self.d, dtype=self.dtype, device=self.device)
        return torch.stack([self(eye[j]) for j in range(self.d)], dim=1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.buffers()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def stored_numbers(self) -> int:
        """How many numbers the projection keeps (its buffers' elements)."""
        return sum(b.numel() for b in self.buffers())


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(check_int("seed", seed, 0))


class DenseProjection(Projection):
    """P_ij ~ N(0, 1), each column scaled to unit norm over all D coordinates."""

    def __init__(
        self, D: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:  # noqa: N803
        super().__init__(D, d)
        p = torch.randn(D, d, generator=_generator(seed), dtype=torch.float64)
        self.register_buffer("weight", (p / p.norm(dim=0, keepdim=True)).to(dtype))

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check(theta_d)
        return self.weight @ theta_d


def _distinct(n: int, k: int, gen: torch.Generator) -> Tensor:
    """k distinct integers of [0, n), uniformly: rejection of repeats when k is small against
    n (O(k), not the O(n) of a permutation), a permutation otherwise."""
    if 4 * k > n:
        return torch.randperm(n, generator=gen)[:k]
    while True:
        r = torch.randint(n, (k + k // 8 + 8,), generator=gen).unique()
        if len(r) >= k:
            return r[torch.randperm(len(r), generator=gen)[:k]]


class _SparseMatVec(torch.autograd.Function):
    """P theta for a sparse CSR P, with P^T (also CSR, kept beside it) in the backward pass."""

    @staticmethod
    def forward(ctx, theta: Tensor, p: Tensor, p_t: Tensor) -> Tensor:  # noqa: ANN001
        ctx.p_t = p_t
        return p @ theta

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        return ctx.p_t @ grad, None, None


class SparseProjection(Projection):
    """scikit-learn's sparse random projection (Li, Hastie & Church 2006): each entry +-sqrt(s)
    with probability 1 / (2 s), else 0, density 1 / s (default 1 / sqrt(D)); each column then
    scaled to unit norm. Stored twice, as P and as P^T in sparse CSR form: about 4 d D / s
    numbers."""

    def __init__(
        self,
        D: int,  # noqa: N803
        d: int,
        *,
        density: float | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(D, d)
        density = 1 / math.sqrt(D) if density is None else density
        density = check_number("density", density, low=0, high=1, low_open=True)
        gen = _generator(seed)
        rows, cols, vals = [], [], []
        counts = torch.binomial(
            torch.full((d,), float(D), dtype=torch.float64),
            torch.full((d,), density, dtype=torch.float64),
            generator=gen,
        ).long()
        counts = counts.clamp_min(1)  # an all-zero column would have no direction to normalise
        for j, k in enumerate(counts.tolist()):
            rows.append(_distinct(D, k, gen))
            cols.append(torch.full((k,), j, dtype=torch.long))
            signs = torch.randint(0, 2, (k,), generator=gen, dtype=torch.float64) * 2 - 1
            vals.append(signs / math.sqrt(k))  # +-sqrt(s) entries, then the column's unit norm
        index = torch.stack((torch.cat(rows), torch.cat(cols)))
        values = torch.cat(vals).to(dtype)
        p = torch.sparse_coo_tensor(index, values, (D, d), check_invariants=True).coalesce()
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            # CSR for P and for P^T: the products of a training step (P theta_d forward, P^T g
            # backward) run about 10x faster than with COO's sparse.mm (benchmarks/subspace.py)
            self.register_buffer("weight", p.to_sparse_csr())
            self.register_buffer("weight_t", p.t().coalesce().to_sparse_csr())

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check(theta_d)
        return _SparseMatVec.apply(theta_d, self.weight, self.weight_t)

    def stored_numbers(self) -> int:
        return sum(
            m.crow_indices().numel() + m.col_indices().numel() + m.values().numel()
            for m in (self.weight, self.weight_t)
        )


class FastfoodProjection(Projection):
    """Fastfood blocks V = H G Pi H B on theta_d padded to L = 2^ceil(log2 D), sliced to the
    first D coordinates and divided by ||G|| sqrt(D) (the authors' normalisation: unit column
    norms in expectation); ceil(d / L) independent blocks for d > L, their outputs summed.
    Stores 3 L numbers per block."""

    def __init__(
        self, D: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:  # noqa: N803
        super().__init__(D, d)
        self.L = 1 << max(0, math.ceil(math.log2(D)))
        blocks = math.ceil(d / self.L)
        gen = _generator(seed)
        b = torch.randint(0, 2, (blocks, self.L), generator=gen, dtype=torch.float64) * 2 - 1
        perm = torch.stack([torch.randperm(self.L, generator=gen) for _ in range(blocks)])
        g = torch.randn(blocks, self.L, generator=gen, dtype=torch.float64)
        scale = g.norm(dim=1, keepdim=True) * math.sqrt(D)
        self.register_buffer("signs", b.to(dtype))
        self.register_buffer("perm", perm)
        self.register_buffer("gauss", (g / scale).to(dtype))

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check(theta_d)
        blocks = self.signs.shape[0]
        padded = theta_d.new_zeros(blocks * self.L)
        padded[: self.d] = theta_d
        v = fwht(padded.view(blocks, self.L) * self.signs)  # H B
        v = torch.gather(v, 1, self.perm)  # Pi
        v = fwht(v * self.gauss)  # H G, with the 1 / (||G|| sqrt(D)) folded into G
        return v.sum(0)[: self.D]


class CoordinateProjection(Projection):
    """d distinct coordinates of theta, chosen uniformly at random: P's columns are standard
    basis vectors, so theta_d trains those d parameters of the network and the others stay at
    theta0. Not one of the paper's projections: the axis-aligned subspace to compare random
    directions with (the same d, the same network). Stores d indices."""

    def __init__(
        self, D: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:  # noqa: N803
        super().__init__(D, d)
        if d > D:
            raise ValueError(f"d={d} coordinates cannot be chosen among D={D}")
        self.register_buffer("index", _distinct(D, d, _generator(seed)))
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check(theta_d)
        return theta_d.new_zeros(self.D).index_put((self.index,), theta_d)


PROJECTIONS = {
    "dense": DenseProjection,
    "sparse": SparseProjection,
    "fastfood": FastfoodProjection,
    "coordinates": CoordinateProjection,
}


def make_projection(
    kind: str, D: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Projection:  # noqa: N803
    """One of :data:`PROJECTIONS` by name ("dense", "sparse" or "fastfood")."""
    if kind not in PROJECTIONS:
        raise ValueError(f"kind must be one of {sorted(PROJECTIONS)}, got {kind!r}")
    return PROJECTIONS[kind](D, d, seed=seed, dtype=dtype)


class SubspaceModel(nn.Module):
    """``model`` restricted to the subspace theta0 + P theta_d: ``theta_d`` (d,) is the only
    parameter (zeros at the start, so the network starts at its own initialisation theta0), and
    ``forward(x)`` runs the model with theta0 + P theta_d by ``functional_call``. The model's
    trainable parameters at construction are theta0 (copied, frozen); its buffers are used as
    they are. ``projection``: a :class:`Projection` with D = the model's number of trainable
    parameters, or a name of :data:`PROJECTIONS` (then ``d`` and ``seed`` make it). The model's
    own parameters are frozen (``requires_grad`` set to False: only theta_d trains, and
    ``parameters()`` yields it alone among trainable tensors). Train it like any module, e.g.
    with ``gc.train.train``."""

    def __init__(
        self,
        model: nn.Module,
        projection: Projection | str,
        d: int | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        fm = FunctionalModel(model)  # detached copies of the trainable parameters
        self.D = fm.size
        if isinstance(projection, str):
            if d is None:
                raise ValueError("d is required when projection is a name")
            projection = make_projection(projection, self.D, d, seed=seed, dtype=fm.dtype)
        if not isinstance(projection, Projection):
            raise ValueError(f"projection must be a Projection or a name, got {projection!r}")
        if projection.D != self.D:
            raise ValueError(
                f"the projection maps to D={projection.D} parameters; the model has {self.D}"
            )
        self.model = model
        self._names = list(fm.params)
        self._shapes = [p.shape for p in fm.params.values()]
        self.register_buffer("theta0", fm.flatten(fm.params).to(fm.device))
        self.projection = projection.to(fm.device)
        self.theta_d = nn.Parameter(torch.zeros(projection.d, dtype=fm.dtype, device=fm.device))
        for p in model.parameters():  # theta_d is all that trains
            p.requires_grad_(False)

    @property
    def d(self) -> int:
        return self.projection.d

    def flat_params(self) -> Tensor:
        """theta0 + P theta_d, the network's D parameters, flat."""
        return self.theta0 + self.projection(self.theta_d)

    def params(self) -> dict[str, Tensor]:
        """theta0 + P theta_d as the model's parameter dict (names -> tensors)."""
        chunks = torch.split(self.flat_params(), [math.prod(s) for s in self._shapes])
        return {n: c.view(s) for n, c, s in zip(self._names, chunks, self._shapes, strict=True)}

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.params(), (x,))
