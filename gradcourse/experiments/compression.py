"""Notebook 12: sending less than the gradient (Lin et al. 2018, Deep Gradient Compression) on
real ``torch.distributed`` workers.

:func:`train_worker` is what each gloo worker runs (launched by
:func:`gradcourse.distributed.launch`): a small CNN on its shard of Fashion-MNIST, trained by
:class:`gradcourse.distributed.SparseSGD` with the configuration's method; it returns, on
rank 0, the test accuracy, the loss curve, the bytes per step and how stale each parameter's
update is, and on every rank a checksum of its parameters (replicas must agree bitwise).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, models
from ..checks import check_int, check_number, check_positive
from ..distributed import METHODS, ByteCounter, SparseSGD, launch, spsa_round
from . import with_defaults

__all__ = [
    "DEFAULTS",
    "config",
    "train_worker",
    "run",
    "replica_digest",
    "echo_worker",
    "failing_worker",
    "exchange_check_worker",
    "synthetic_grads",
    "check_start",
    "spsa_problem",
    "spsa_check_worker",
]

# ----------------------------------------------------------------------------- checks
# Workers the tests and the notebook's sanity check launch: importable, so spawn can run them.

CHECK_PARAMS = 200
CHECK_LR = 0.05
CHECK_MOMENTUM = 0.9
CHECK_METHODS = {
    "dense": dict(method="dense"),
    "dgc_s0_nomask": dict(method="dgc", sparsity=0.0, masking=False),
    "dgc_s0_mask": dict(method="dgc", sparsity=0.0),
    "dgc_s90": dict(method="dgc", sparsity=0.9),
    "gd_s90": dict(method="gd", sparsity=0.9),
}


def echo_worker(rank: int, world: int, message: Any) -> tuple[int, int, Any]:
    """Returns (rank, world, message): the launcher's round trip."""
    return rank, world, message


def failing_worker(rank: int, world: int, bad_rank: int) -> int:
    """Raises on ``bad_rank`` while the others wait in a collective (which must not hang)."""
    if rank == bad_rank:
        raise RuntimeError(f"boom from rank {rank}")
    import torch.distributed as dist

    dist.barrier()
    return rank


def synthetic_grads(rank: int, steps: int) -> torch.Tensor:
    """Heavy-tailed gradients (steps, CHECK_PARAMS) of one worker, from Generator(rank)."""
    g = torch.Generator().manual_seed(rank)
    scale = torch.exp(1.5 * torch.randn(steps, CHECK_PARAMS, generator=g))
    return torch.randn(steps, CHECK_PARAMS, generator=g) * scale


def check_start() -> torch.Tensor:
    """The parameters every exchange check starts from."""
    return torch.linspace(-1.0, 1.0, CHECK_PARAMS)


def exchange_check_worker(rank: int, world: int, steps: int) -> dict[str, dict[str, Any]]:
    """For each of :data:`CHECK_METHODS`: a flat parameter from :func:`check_start` stepped
    ``steps`` times by :class:`SparseSGD` on this worker's :func:`synthetic_grads`. Returns the
    final parameters and the byte counts per method."""
    grads = synthetic_grads(rank, steps)
    out = {}
    for name, options in CHECK_METHODS.items():
        p = torch.nn.Parameter(check_start())
        opt = SparseSGD([p], lr=CHECK_LR, momentum=CHECK_MOMENTUM, **options)
        for t in range(steps):
            p.grad = grads[t].clone()
            opt.step()
        out[name] = dict(
            params=p.detach().clone(),
            payload=opt.bytes.payload,
            wire=opt.bytes.wire,
            calls=opt.bytes.calls,
        )
    return out


def spsa_problem(rank: int, n: int = 40, d: int = 30):
    """Machine ``rank``'s least-squares loss theta -> mean((X theta - y)^2) on its own data
    (from Generator(100 + rank)), for the SPSA checks."""
    g = torch.Generator().manual_seed(100 + rank)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.linspace(-1.0, 1.0, d) + 0.1 * torch.randn(n, generator=g)

    def loss(theta: torch.Tensor) -> float:
        return float(((X @ theta - y) ** 2).mean())

    return loss


def spsa_check_worker(
    rank: int, world: int, rounds: int, samples: int, one_byte: bool
) -> dict[str, Any]:
    """``rounds`` rounds of one-byte (or float) SPSA on :func:`spsa_problem` from theta = 0,
    rate 0.01, eps 1e-3. Returns the final theta and the bytes."""
    loss = spsa_problem(rank)
    theta = torch.zeros(30)
    counter = ByteCounter()
    for r in range(rounds):
        theta = spsa_round(
            loss, theta, r, samples=samples, eps=1e-3, lr=0.01, one_byte=one_byte, counter=counter
        )
    return dict(theta=theta, payload=counter.payload, wire=counter.wire, calls=counter.calls)


# ----------------------------------------------------------------------------- training

DEFAULTS: dict[str, Any] = dict(
    n_train=10_000,
    n_test=2_000,
    workers=2,
    method="dgc",
    sparsity=0.999,
    warmup_steps=0,
    correction=True,
    masking=True,
    clip=None,
    lr=0.05,
    momentum=0.9,
    batch_size=64,  # per worker
    steps=300,
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    check_int("n_train", cfg["n_train"], 10, 60_000)
    check_int("n_test", cfg["n_test"], 10, 10_000)
    check_int("workers", cfg["workers"], 1, 16)
    if cfg["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg['method']!r}")
    check_number("sparsity", cfg["sparsity"], low=0, high=1, high_open=True)
    check_int("warmup_steps", cfg["warmup_steps"], 0)
    if cfg["clip"] is not None:
        check_positive("clip", cfg["clip"])
    check_positive("lr", cfg["lr"])
    check_number("momentum", cfg["momentum"], low=0, high=1, high_open=True)
    check_int("batch_size", cfg["batch_size"], 1)
    check_int("steps", cfg["steps"], 1)
    return cfg


def replica_digest(model: torch.nn.Module) -> str:
    """A hash of the parameters' exact bytes: equal on two replicas only if bitwise equal."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_worker(rank: int, world: int, cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """One worker's run (see the module docstring). Every worker builds the same network from
    ``seed`` and draws its batches from its own shard (every ``world``-th training image)."""
    cfg = config(**cfg)
    t0 = time.perf_counter()
    ds = data.fashion_mnist(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=0)
    x, y = ds.x_train[rank::world], ds.y_train[rank::world]
    model = models.SmallCNN(in_channels=1, num_classes=10, seed=seed)
    opt = SparseSGD(
        model.parameters(),
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        method=cfg["method"],
        sparsity=cfg["sparsity"],
        warmup_steps=cfg["warmup_steps"],
        clip=cfg["clip"],
        correction=cfg["correction"],
        masking=cfg["masking"],
    )
    gen = torch.Generator().manual_seed(10_000 * seed + rank)
    losses = []
    for _ in range(cfg["steps"]):
        i = torch.randint(0, len(y), (cfg["batch_size"],), generator=gen)
        model.zero_grad()
        loss = F.cross_entropy(model(x[i]), y[i])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        acc = float((model(ds.x_test).argmax(1) == ds.y_test).float().mean())
    return dict(
        accuracy=acc,
        losses=np.array(losses),
        payload=opt.bytes.payload,
        wire=opt.bytes.wire,
        calls=opt.bytes.calls,
        history=np.array([(p, -1 if w is None else w) for p, w in opt.bytes.history]),
        digest=replica_digest(model),
        params=sum(p.numel() for p in opt.params),
        seconds=time.perf_counter() - t0,
        gap_counts=opt.gap_counts.numpy(),
    )


def run(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """:func:`train_worker` on ``workers`` gloo workers; rank 0's record, with every rank's
    digest under ``digests``."""
    cfg = config(**cfg)
    out = launch(train_worker, cfg["workers"], dict(cfg), seed)
    rec = dict(out[0])
    rec["digests"] = [o["digest"] for o in out]
    return rec
