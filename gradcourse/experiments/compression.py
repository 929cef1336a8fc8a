"""Notebook 12: sending less than the gradient (Lin et al. 2018, Deep Gradient Compression;
Zelikman et al. 2023, one-byte SPSA) on real ``torch.distributed`` workers.

:func:`train_worker` is what each gloo worker runs (launched by
:func:`gradcourse.distributed.launch`): a small CNN on its shard of Fashion-MNIST, trained by
:class:`gradcourse.distributed.SparseSGD` (dense, DGC or Gradient Dropping) or by DDP with torch's
PowerSGD hook, optionally with the learning rate warmed up (``lr_warmup_steps``); it returns the
test accuracy (at the end and every ``eval_every`` steps), the loss curve, the bytes per step, how
stale each parameter's update is (over the run and after the warm-up), the step at which the loss
or a gradient stopped being finite on some worker (all workers stop there), and a checksum of its
parameters (replicas must agree bitwise). :func:`finetune_worker` fine-tunes a pre-trained copy by
one-byte or float SPSA, a control, or backpropagation. :func:`run_many` and :func:`finetune_many`
run many configurations on one launch of workers, each stored in the cache as soon as it ends.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, models
from ..cache import Cache
from ..checks import check_int, check_number, check_positive
from ..distributed import (
    GAP_BINS,
    METHODS,
    ByteCounter,
    SparseSGD,
    launch,
    spsa_round,
    warmup_lr,
)
from ..functional import flatten, unflatten
from . import with_defaults

__all__ = [
    "DEFAULTS",
    "config",
    "train_worker",
    "run",
    "run_many",
    "sweep_worker",
    "replica_digest",
    "echo_worker",
    "failing_worker",
    "aborting_worker",
    "exchange_check_worker",
    "synthetic_grads",
    "intercept_check_worker",
    "FT_DEFAULTS",
    "FT_METHODS",
    "TRAIN_METHODS",
    "ft_config",
    "pretrained",
    "finetune_worker",
    "finetune_many",
    "check_start",
    "spsa_problem",
    "spsa_check_worker",
]

# ----------------------------------------------------------------------------- checks
# Workers the tests and the notebook's sanity check launch: importable, so spawn can run them.

CHECK_PARAMS = 200
CHECK_LR = 0.05
CHECK_MOMENTUM = 0.9
CHECK_LR_WARMUP = 8  # steps of the learning-rate warm-up in the "_lrw" checks
CHECK_METHODS = {
    "dense": dict(method="dense"),
    "dgc_s0_nomask": dict(method="dgc", sparsity=0.0, masking=False),
    "dgc_s0_mask": dict(method="dgc", sparsity=0.0),
    "dgc_s90": dict(method="dgc", sparsity=0.9),
    "gd_s90": dict(method="gd", sparsity=0.9),
    "dense_lrw": dict(method="dense", lr_warmup_steps=CHECK_LR_WARMUP),
    "dgc_s90_lrw": dict(method="dgc", sparsity=0.9, lr_warmup_steps=CHECK_LR_WARMUP),
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


def aborting_worker(rank: int, world: int, when: str) -> int:
    """Returns its rank after arranging a native abort: ``when="shutdown"`` in the group's
    shutdown after it returns (gloo's teardown race, simulated), ``"now"`` on rank 1 before it
    returns (a crash with no Python exception)."""
    import os

    import torch.distributed as dist

    if when == "shutdown":
        dist.destroy_process_group = os.abort  # this worker process only
    elif rank == 1:
        os.abort()
    return rank


def intercept_check_worker(rank: int, world: int) -> dict[str, Any]:
    """Inside :meth:`ByteCounter.intercept`, one all-reduce of 5 float32 and one all-gather of
    3 int64 through ``torch.distributed``; returns the counts, the sum and whether the module's
    functions were put back."""
    import torch.distributed as dist

    real = dist.all_reduce, dist.all_gather
    counter = ByteCounter()
    t = torch.ones(5)
    with counter.intercept():
        dist.all_reduce(t)
        dist.all_gather([torch.empty(3, dtype=torch.int64) for _ in range(world)], torch.arange(3))
    restored = (dist.all_reduce, dist.all_gather) == real
    return dict(payload=counter.payload, calls=counter.calls, restored=restored, sum=t.tolist())


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


def ddp_lr_check_worker(rank: int, world: int, steps: int, lr_warmup_steps: int) -> torch.Tensor:
    """``steps`` steps of :func:`_powersgd`'s DDP optimiser (PowerSGD starting after them, so
    every step is a plain all-reduce) with the learning rate warmed up, on a linear model from
    :func:`check_start` and this worker's :func:`synthetic_grads` as the gradient of a linear
    loss. Returns the final parameters."""
    grads = synthetic_grads(rank, steps)
    model = torch.nn.Linear(CHECK_PARAMS, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(check_start().view(1, -1))
    cfg = config(
        method="powersgd",
        lr=CHECK_LR,
        momentum=CHECK_MOMENTUM,
        warmup_steps=steps + 1,
        lr_warmup_steps=lr_warmup_steps,
    )
    net, step = _powersgd(model, cfg)
    for t in range(steps):
        model.zero_grad()
        # d/dw of w . g_t is g_t: the worker's synthetic gradient, averaged by DDP's all-reduce
        (net(grads[t].view(1, -1)).sum()).backward()
        step()
    return model.weight.detach().view(-1).clone()


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

# notebook 12's `cpu` setting
DEFAULTS: dict[str, Any] = dict(
    n_train=10_000,
    n_test=2_000,
    workers=2,
    method="dgc",
    sparsity=0.999,
    warmup_steps=200,  # DGC's sparsity warm-up; PowerSGD's dense start
    lr_warmup_steps=0,  # the learning rate's warm-up (Goyal et al.: lr / workers to lr); 0: off
    correction=True,
    masking=True,
    clip=3.0,  # DGC's local clipping (norm clip / sqrt(workers) on each worker); None: off
    lr=0.05,
    momentum=0.9,
    batch_size=32,  # per worker
    steps=1000,
    eval_every=100,  # test accuracy every this many steps (and at the end)
    powersgd_rank=1,  # method "powersgd": torch's DDP hook, the peer
)

TRAIN_METHODS = (*METHODS, "powersgd")


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    check_int("n_train", cfg["n_train"], 10, 60_000)
    check_int("n_test", cfg["n_test"], 10, 10_000)
    check_int("workers", cfg["workers"], 1, 16)
    if cfg["method"] not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {TRAIN_METHODS}, got {cfg['method']!r}")
    check_int("powersgd_rank", cfg["powersgd_rank"], 1, 64)
    check_number("sparsity", cfg["sparsity"], low=0, high=1, high_open=True)
    check_int("warmup_steps", cfg["warmup_steps"], 0)
    check_int("lr_warmup_steps", cfg["lr_warmup_steps"], 0)
    if cfg["clip"] is not None:
        check_positive("clip", cfg["clip"])
    check_positive("lr", cfg["lr"])
    check_number("momentum", cfg["momentum"], low=0, high=1, high_open=True)
    check_int("batch_size", cfg["batch_size"], 1)
    check_int("steps", cfg["steps"], 1)
    check_int("eval_every", cfg["eval_every"], 1)
    return cfg


def replica_digest(model: torch.nn.Module) -> str:
    """A hash of the parameters' exact bytes: equal on two replicas only if bitwise equal."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _staleness(opt, steps: int, warmup_steps: int) -> dict[str, Any]:
    """At the end of a run: ``age_survival[j]``, the share of coordinates that have not changed
    for 2^j steps or more, and ``updated_after_warmup``, the share that changed at least once
    after the warm-up (nan when the run ended inside it). None for DDP runs."""
    if opt.gap_counts is None:
        return dict(age_survival=None, updated_after_warmup=None)
    age = torch.cat(opt.age).double()
    survival = np.array([float((age >= 2**j).double().mean()) for j in range(GAP_BINS)])
    after = steps - warmup_steps
    fresh = float((age < after).double().mean()) if after > 0 else float("nan")
    return dict(age_survival=survival, updated_after_warmup=fresh)


def _accuracy(model: torch.nn.Module, ds) -> float:
    with torch.no_grad():
        return float((model(ds.x_test).argmax(1) == ds.y_test).float().mean())


def _all_finite(loss: torch.Tensor, model: torch.nn.Module) -> bool:
    """Whether the loss and gradients are finite on every worker: a one-number all-reduce
    (a control message, not counted in the bytes), so that all workers stop together."""
    import torch.distributed as dist

    ok = bool(torch.isfinite(loss)) and all(
        bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
    )
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


class _DDPStep:
    """The optimiser side of a DDP run: torch's SGD with momentum after DDP's (hooked)
    all-reduce, with a :class:`ByteCounter` like :class:`SparseSGD`'s."""

    def __init__(
        self, model: torch.nn.Module, lr: float, momentum: float, lr_warmup_steps: int = 0
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.lr_warmup_steps, self.steps = lr, lr_warmup_steps, 0
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        self.bytes = ByteCounter()
        self.gap_counts = None  # every coordinate changes every step

    def __call__(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        rate = warmup_lr(self.steps, self.lr, world, self.lr_warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = rate
        self.opt.step()
        self.bytes.mark()
        self.steps += 1


def _powersgd(model: torch.nn.Module, cfg: Mapping[str, Any]):
    """DDP with torch's PowerSGD communication hook (Vogels et al. 2019; error feedback and warm
    start on, rank ``powersgd_rank``; plain all-reduce for the first ``warmup_steps`` steps)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model)
    state = psgd.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=cfg["powersgd_rank"],
        start_powerSGD_iter=max(2, cfg["warmup_steps"]),
        min_compression_rate=1,
        random_seed=0,
    )
    net.register_comm_hook(state, psgd.powerSGD_hook)
    step = _DDPStep(model, cfg["lr"], cfg["momentum"], cfg["lr_warmup_steps"])
    return net, step


def train_worker(rank: int, world: int, cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """One worker's run (see the module docstring). Every worker builds the same network from
    ``seed`` and draws its batches from its own shard (every ``world``-th training image)."""
    cfg = config(**cfg)
    t0 = time.perf_counter()
    ds = data.fashion_mnist(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=0)
    x, y = ds.x_train[rank::world], ds.y_train[rank::world]
    model = models.SmallCNN(in_channels=1, num_classes=10, seed=seed)
    if cfg["method"] == "powersgd":
        net, opt = _powersgd(model, cfg)
        step = opt
    else:
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
            lr_warmup_steps=cfg["lr_warmup_steps"],
        )
        net, step = model, opt.step
    gen = torch.Generator().manual_seed(10_000 * seed + rank)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    diverged = None
    at_warmup = None if opt.gap_counts is None else opt.gap_counts.clone()
    for t in range(cfg["steps"]):
        i = torch.randint(0, len(y), (cfg["batch_size"],), generator=gen)
        model.zero_grad()
        loss = F.cross_entropy(net(x[i]), y[i])
        if cfg["method"] == "powersgd":
            with opt.bytes.intercept():  # DDP all-reduces inside backward
                loss.backward()
        else:
            loss.backward()
        if not _all_finite(loss, model):  # every worker stops at the same step
            diverged = t
            break
        if t == cfg["warmup_steps"] and opt.gap_counts is not None:
            at_warmup = opt.gap_counts.clone()
        step()
        losses.append(float(loss.detach()))
        if (t + 1) % cfg["eval_every"] == 0 and t + 1 < cfg["steps"]:
            curve.append((t + 1, _accuracy(model, ds)))
    acc = _accuracy(model, ds)
    curve.append((len(losses), acc))
    return dict(
        accuracy=acc,
        test_curve=np.array(curve, dtype=np.float64),
        diverged=diverged,
        losses=np.array(losses),
        payload=opt.bytes.payload,
        wire=opt.bytes.wire,
        calls=opt.bytes.calls,
        history=np.array([(p, -1 if w is None else w) for p, w in opt.bytes.history]),
        digest=replica_digest(model),
        params=sum(p.numel() for p in opt.params),
        seconds=time.perf_counter() - t0,
        gap_counts=None if opt.gap_counts is None else opt.gap_counts.numpy(),
        gap_counts_after_warmup=None
        if opt.gap_counts is None
        else (opt.gap_counts - at_warmup).numpy(),
        **_staleness(opt, len(losses), cfg["warmup_steps"]),
    )


def sweep_worker(
    rank: int,
    world: int,
    kind: str,
    jobs: list[tuple[dict[str, Any], int]],
    cache: Cache | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Each (configuration, seed) of ``jobs`` in turn, in one process group (spawning costs
    seconds; a sweep pays it once): :func:`train_worker` (``kind="train"``) or
    :func:`finetune_worker` (``"finetune"``, each pre-trained start computed once). Rank 0
    returns the records, each with every rank's digest, and stores each in ``cache`` under
    ``name`` as soon as it is done (nothing computed is lost to a later failure); the other
    ranks return []."""
    import torch.distributed as dist

    starts: dict[tuple, dict] = {}
    out = []
    for cfg, seed in jobs:
        if kind == "train":
            rec = train_worker(rank, world, cfg, seed)
        else:
            cfg = ft_config(**cfg)
            key = (seed, *(cfg[k] for k in PRETRAIN_KEYS))
            if key not in starts:
                starts[key] = pretrained(cfg, seed).state_dict()
            rec = finetune_worker(rank, world, cfg, seed, start=starts[key])
        digests: list[Any] = [None] * world
        dist.all_gather_object(digests, rec["digest"])
        if rank == 0:
            rec = {**rec, "digests": digests}
            if cache is not None and name is not None:
                _store(cache, name, cfg, seed, rec)
            out.append(rec)
    return out


PRETRAIN_KEYS = ("n_train", "n_test", "pretrain_steps", "pretrain_lr", "pretrain_batch")


def _store(cache: Cache, name: str, cfg: Mapping[str, Any], seed: int, rec: Mapping) -> None:
    try:
        cache.save(name, {**cfg, "seed": seed}, dict(rec))
    except OSError as exc:
        warnings.warn(
            f"could not store a run in the cache {cache.root}: {exc}", RuntimeWarning, stacklevel=2
        )


def _launch_jobs(kind, make_config, jobs, cache=None, name=None) -> list[dict[str, Any]]:
    cfgs = [(make_config(**cfg), check_int("seed", seed, 0)) for cfg, seed in jobs]
    if not cfgs:
        raise ValueError("jobs is empty: give at least one (configuration, seed)")
    found: dict[int, dict[str, Any]] = {}
    if cache is not None:
        for j, (c, seed) in enumerate(cfgs):
            rec = cache.load(name, {**c, "seed": seed})
            if rec is not None:
                found[j] = rec
    todo = [j for j in range(len(cfgs)) if j not in found]
    if todo:
        workers = {cfgs[j][0]["workers"] for j in todo}
        if len(workers) != 1:
            raise ValueError(
                f"every job must use the same number of workers, got {sorted(workers)}"
            )
        jobs_todo = [(dict(cfgs[j][0]), cfgs[j][1]) for j in todo]
        out = launch(sweep_worker, workers.pop(), kind, jobs_todo, cache, name)[0]
        found.update(zip(todo, out, strict=True))
    return [found[j] for j in range(len(cfgs))]


def run_many(
    jobs: list[tuple[Mapping[str, Any], int]], cache: Cache | None = None
) -> list[dict[str, Any]]:
    """:func:`run` for each (configuration, seed) of ``jobs``: those not in ``cache`` on one
    launch of workers (they must all name the same number of workers), each stored in the
    cache as soon as it ends."""
    return _launch_jobs("train", config, jobs, cache, "compression-train")


def finetune_many(
    jobs: list[tuple[Mapping[str, Any], int]], cache: Cache | None = None
) -> list[dict[str, Any]]:
    """:func:`finetune_worker` records (rank 0's, with every rank's digest) for ``jobs``, as
    :func:`run_many` does."""
    return _launch_jobs("finetune", ft_config, jobs, cache, "compression-finetune")


def run(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """:func:`train_worker` on ``workers`` gloo workers; rank 0's record, with every rank's
    digest under ``digests``."""
    return run_many([(cfg, seed)])[0]


# ----------------------------------------------------------------------------- fine-tuning

FT_METHODS = ("backprop", "spsa", "spsa_byte", "spsa_shuffled")

# notebook 12's `cpu` setting
FT_DEFAULTS: dict[str, Any] = dict(
    n_train=10_000,
    n_test=2_000,
    workers=2,
    pretrain_steps=300,  # backpropagation, SGD with momentum, before fine-tuning
    pretrain_lr=0.05,
    pretrain_batch=64,
    method="spsa_byte",
    rounds=300,
    samples=4,  # two-point estimates per machine and round
    eps=1e-3,
    lr=2e-3,  # SPSA's rate; backprop uses bp_lr
    bp_lr=0.05,
    batch_size=32,  # per machine and round
)


def ft_config(**overrides: Any) -> dict[str, Any]:
    """:data:`FT_DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(FT_DEFAULTS, overrides)
    check_int("n_train", cfg["n_train"], 10, 60_000)
    check_int("n_test", cfg["n_test"], 10, 10_000)
    check_int("workers", cfg["workers"], 1, 16)
    check_int("pretrain_steps", cfg["pretrain_steps"], 0)
    check_positive("pretrain_lr", cfg["pretrain_lr"])
    check_int("pretrain_batch", cfg["pretrain_batch"], 1)
    if cfg["method"] not in FT_METHODS:
        raise ValueError(f"method must be one of {FT_METHODS}, got {cfg['method']!r}")
    check_int("rounds", cfg["rounds"], 1)
    check_int("samples", cfg["samples"], 1, 4096)
    check_positive("eps", cfg["eps"])
    check_positive("lr", cfg["lr"])
    check_positive("bp_lr", cfg["bp_lr"])
    check_int("batch_size", cfg["batch_size"], 1)
    return cfg


def pretrained(cfg: Mapping[str, Any], seed: int, ds=None) -> torch.nn.Module:
    """The network fine-tuning starts from: SmallCNN(seed) after ``pretrain_steps`` steps of
    SGD with momentum 0.9 on the whole training set (one process, one thread: the same bits on
    every worker)."""
    cfg = ft_config(**cfg)
    if ds is None:
        ds = data.fashion_mnist(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=0)
    model = models.SmallCNN(in_channels=1, num_classes=10, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["pretrain_lr"], momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg["pretrain_steps"]):
        i = torch.randint(0, len(ds.y_train), (cfg["pretrain_batch"],), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(ds.x_train[i]), ds.y_train[i]).backward()
        opt.step()
    return model


def _test(model, theta, ds) -> tuple[float, float]:
    with torch.no_grad():
        out = torch.func.functional_call(
            model, unflatten(theta, dict(model.named_parameters())), (ds.x_test,)
        )
        return float(F.cross_entropy(out, ds.y_test)), float(
            (out.argmax(1) == ds.y_test).float().mean()
        )


def finetune_worker(
    rank: int, world: int, cfg: Mapping[str, Any], seed: int, start: dict | None = None
) -> dict[str, Any]:
    """One machine's fine-tuning from :func:`pretrained` (``seed``): ``rounds`` rounds of
    one-byte or float SPSA (:func:`gradcourse.distributed.spsa_round`, perturbation seeds based
    on ``seed``), of its control ``spsa_shuffled`` (each round's gathered estimates rolled by one
    position, so each multiplies another sample's direction: the same numbers, no information),
    or of backpropagation (SGD on the all-reduced mean gradient, no momentum), each machine on
    its own batch of its own shard. ``start``: the pre-trained state, if already computed.
    Returns the test loss and accuracy before and after, the
    bytes, and a digest of the final parameters."""
    cfg = ft_config(**cfg)
    t0 = time.perf_counter()
    ds = data.fashion_mnist(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=0)
    if start is None:
        model = pretrained(cfg, seed, ds)
    else:  # the state :func:`pretrained` gave for this configuration and seed
        model = models.SmallCNN(in_channels=1, num_classes=10, seed=seed)
        model.load_state_dict(start)
    x, y = ds.x_train[rank::world], ds.y_train[rank::world]
    like = dict(model.named_parameters())
    theta = flatten([p.detach() for p in like.values()])
    before = _test(model, theta, ds)
    gen = torch.Generator().manual_seed(10_000 * seed + rank + 1)
    counter = ByteCounter()
    method = cfg["method"]
    for r in range(cfg["rounds"]):
        i = torch.randint(0, len(y), (cfg["batch_size"],), generator=gen)
        xb, yb = x[i], y[i]
        if method == "backprop":
            t = theta.clone().requires_grad_(True)
            loss = F.cross_entropy(torch.func.functional_call(model, unflatten(t, like), (xb,)), yb)
            (g,) = torch.autograd.grad(loss, t)
            counter.all_reduce(g)
            theta = theta - cfg["bp_lr"] * g / world
            counter.mark()
            continue

        def loss(t: torch.Tensor, xb=xb, yb=yb) -> float:
            with torch.no_grad():
                out = torch.func.functional_call(model, unflatten(t, like), (xb,))
                return float(F.cross_entropy(out, yb))

        theta = spsa_round(
            loss,
            theta,
            r,
            samples=cfg["samples"],
            eps=cfg["eps"],
            lr=cfg["lr"],
            one_byte=method == "spsa_byte",
            counter=counter,
            base=seed,
            shuffle=method == "spsa_shuffled",
        )
    after = _test(model, theta, ds)
    return dict(
        loss_before=before[0],
        acc_before=before[1],
        loss_after=after[0],
        acc_after=after[1],
        payload=counter.payload,
        wire=counter.wire,
        calls=counter.calls,
        params=theta.numel(),
        digest=hashlib.sha256(theta.contiguous().numpy().tobytes()).hexdigest(),
        seconds=time.perf_counter() - t0,
    )
