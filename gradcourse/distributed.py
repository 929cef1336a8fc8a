"""Training on real ``torch.distributed`` workers: a launcher, gradient compression (Deep Gradient
Compression and Gradient Dropping) and the bytes each collective moves.

**Launcher.** :func:`launch` starts ``workers`` processes (``spawn``), each with one CPU thread,
joined into one gloo process group over TCP on this machine (``torchrun`` runs the same worker
functions across machines: :func:`init_from_env`). A worker function must live in an importable
module (``spawn`` pickles it by name, so a function defined in a notebook cell cannot be used).
Each worker's return value comes back to the caller, in rank order. A worker that raises makes
:func:`launch` raise :class:`WorkerError` with that worker's rank and traceback; its peers are
stopped (never a hang: collectives time out after ``timeout`` seconds).

**Compression** (Lin, Han, Mao, Wang & Dally, "Deep Gradient Compression", ICLR 2018,
arXiv 1712.01887). :class:`SparseSGD` is one worker's optimiser. Per parameter tensor and step,
with g the worker's gradient and m the momentum:

- ``method="dense"``: all-reduce the mean gradient, then SGD with momentum (torch's rule:
  b <- m b + G, theta <- theta - lr b);
- ``method="dgc"``: momentum correction u <- m u + g and local accumulation v <- v + u; send the
  top-k entries of |v| (k = ceil((1 - s) d) for sparsity s), all-gathered as (values, indices)
  and summed; momentum-factor masking zeroes u and v where sent; theta <- theta - lr G / N;
  optional local gradient clipping (norm threshold ``clip`` / sqrt(N)) and a sparsity warm-up;
- ``method="gd"`` (Gradient Dropping, Aji & Heafield 2017): accumulate v <- v + g, send its
  top-k, zero v where sent, then SGD with momentum on the summed sparse gradient.

Every method can also warm up the learning rate (``lr_warmup_steps``, Goyal et al. 2017: from
lr / N to lr over those steps, :func:`warmup_lr`), as Lin et al.'s "warm-up training" does
together with the sparsity warm-up.

``correction`` and ``masking`` switch DGC's two corrections off, for ablations: without
masking at sparsity 0, DGC is dense SGD with momentum; with it, momentum is erased every step.

**Bytes.** Every collective is counted twice: ``payload``, the bytes of the tensors handed to
it (numel x element size), and ``wire``, the bytes this process wrote while it ran
(``wchar`` of ``/proc/self/io``, which counts socket writes; absent off Linux), so protocol
framing shows (gloo adds a few hundred bytes a message).

**One-byte SPSA** (Zelikman et al. 2023, after MeZO, Malladi et al. 2023): per round, each
machine m estimates S directional derivatives along z_{m,s} ~ N(0, I) regenerated from a seed
every machine can compute (:func:`spsa_seed`), sends those S numbers (one byte each with
:func:`quantise_byte`), and every machine replays the update
theta <- theta - lr / (M S) sum_{m,s} g_{m,s} z_{m,s} in the same order (:func:`spsa_apply`),
so the replicas stay equal without ever sending a vector.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import pickle
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import check_int, check_number, check_positive

__all__ = [
    "WorkerError",
    "launch",
    "init_from_env",
    "ByteCounter",
    "SparseSGD",
    "METHODS",
    "warmup_sparsity",
    "warmup_lr",
    "dgc_compress",
    "spsa_seed",
    "perturbation",
    "quantise_byte",
    "dequantise_byte",
    "spsa_estimates",
    "spsa_apply",
    "spsa_round",
]

METHODS = ("dense", "dgc", "gd")
GAP_BINS = 24


class WorkerError(RuntimeError):
    """A worker raised: the message holds its rank and traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, fn: Callable, args: tuple, world: int, port: int, timeout: float, out: str
) -> None:
    torch.set_num_threads(1)
    path = Path(out) / f"rank{rank}.pkl"

    def report(*record: Any) -> None:
        path.write_bytes(pickle.dumps(record))

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
    except BaseException:  # the group was not formed: nothing of fn's has run
        report("init-error", traceback.format_exc(), time.time())
        raise
    try:
        result = fn(rank, world, *args)
    except BaseException:  # reported, with when, before the group closes and its peers fail
        report("error", traceback.format_exc(), time.time())
        dist.destroy_process_group()
        raise
    # reported before the group closes: gloo's shutdown can abort the process (a native
    # "terminate called without an active exception"), after which nothing more is written
    report("ok", result, time.time())
    dist.destroy_process_group()


def launch(
    fn: Callable, workers: int, *args: Any, timeout: float = 60.0, retries: int = 1
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``workers`` gloo workers and return their results
    in rank order (each must be picklable). ``fn`` must be importable by name (defined at the
    top level of a module). ``timeout``: seconds a collective may wait for its peers.
    ``retries``: how many times a run is started again, on a new port, when a worker died without
    a report and without an exception of its own (a native abort) or when the group could not
    be formed before ``fn`` ran (the port chosen taken by another process before rank 0 bound
    it, ``EADDRINUSE``; or gloo's connection between two workers closed while they set it up,
    seen once in 2 notebooks run at a time); an exception raised by ``fn`` is never retried,
    and an abort while the group shuts down after every worker has reported its result (gloo's
    rare teardown race) changes none of the results, which are returned."""
    workers = check_int("workers", workers, 1, 64)
    timeout = check_positive("timeout", timeout)
    retries = check_int("retries", retries, 0, 5)
    if getattr(fn, "__module__", "__main__") in ("__main__", "builtins") or "<locals>" in getattr(
        fn, "__qualname__", ""
    ):
        raise ValueError(
            f"fn must be a function defined at the top level of an importable module, got "
            f"{getattr(fn, '__qualname__', fn)!r} from {getattr(fn, '__module__', None)!r}: "
            "spawn re-imports it by name in each worker (a notebook cell's function cannot be)"
        )
    for attempt in range(retries + 1):
        with tempfile.TemporaryDirectory(prefix="gc-dist-") as out:
            port = _free_port()
            failure = None
            try:
                torch.multiprocessing.start_processes(
                    _worker,
                    args=(fn, args, workers, port, timeout, out),
                    nprocs=workers,
                    join=True,
                    start_method="spawn",
                )
            except Exception as err:  # noqa: BLE001 (read the workers' own reports below)
                failure = err
            reports = {}
            for rank in range(workers):
                p = Path(out) / f"rank{rank}.pkl"
                if p.exists():
                    reports[rank] = pickle.loads(p.read_bytes())
            errors = {r: rep for r, rep in reports.items() if rep[0] in ("error", "init-error")}
            if attempt < retries and errors and all(e[0] == "init-error" for e in errors.values()):
                # the group did not form (a port taken meanwhile, a peer lost): again, and say so
                cause = errors[min(errors)][1].strip().splitlines()[-1]
                warnings.warn(
                    f"the gloo group of {workers} workers did not form ({cause}); "
                    "starting it again on a new port",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            if errors:  # the first to fail is the cause; its peers fail in their collectives
                rank = min(errors, key=lambda r: errors[r][2])
                others = sorted(set(errors) - {rank})
                also = f" (then worker(s) {others} failed waiting for it)" if others else ""
                raise WorkerError(f"worker {rank} of {workers} raised{also}:\n{errors[rank][1]}")
            if len(reports) == workers:  # any abort came after every result was written
                return [reports[r][1] for r in range(workers)]
            if attempt < retries:  # a worker died without a report or an exception: again
                warnings.warn(
                    f"{workers - len(reports)} of {workers} workers ended without a result "
                    f"({failure}); starting the run again",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            raise WorkerError(
                f"{workers - len(reports)} of {workers} workers ended without a result ({failure})"
            )
    raise AssertionError("unreachable")


def init_from_env(timeout: float = 60.0) -> tuple[int, int]:
    """Join the gloo group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and return (rank, world_size)."""
    dist.init_process_group(
        "gloo", timeout=datetime.timedelta(seconds=check_positive("timeout", timeout))
    )
    return dist.get_rank(), dist.get_world_size()


def _written() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class ByteCounter:
    """Bytes a worker handed to collectives (``payload``) and wrote while they ran (``wire``;
    None where ``/proc/self/io`` is absent), and how many collectives ran."""

    payload: int = 0
    wire: int | None = 0
    calls: int = 0
    history: list[tuple[int, int | None]] = field(default_factory=list)

    def _run(self, tensors: Sequence[Tensor], collective: Callable[[], Any]) -> Any:
        before = _written()
        out = collective()
        after = _written()
        self.payload += sum(t.numel() * t.element_size() for t in tensors)
        if before is None or after is None or self.wire is None:
            self.wire = None
        else:
            self.wire += after - before
        self.calls += 1
        return out

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the workers in place."""
        self._run([tensor], lambda: dist.all_reduce(tensor))
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every worker's ``tensor`` (same shape and dtype everywhere), in rank order."""
        world = dist.get_world_size()
        out = [torch.empty_like(tensor) for _ in range(world)]
        self._run([tensor], lambda: dist.all_gather(out, tensor))
        return out

    @contextlib.contextmanager
    def intercept(self):
        """Count the payload of every ``dist.all_reduce`` / ``dist.all_gather`` that code inside
        the block calls through the ``torch.distributed`` module (as DDP's communication hooks,
        PowerSGD's among them, do), and the bytes written meanwhile as ``wire``. For code this
        counter does not run itself; the patch is undone on exit."""
        real_reduce, real_gather = dist.all_reduce, dist.all_gather

        def all_reduce(tensor, *args, **kwargs):
            self.payload += tensor.numel() * tensor.element_size()
            self.calls += 1
            return real_reduce(tensor, *args, **kwargs)

        def all_gather(out, tensor, *args, **kwargs):
            self.payload += tensor.numel() * tensor.element_size()
            self.calls += 1
            return real_gather(out, tensor, *args, **kwargs)

        before = _written()
        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        try:
            yield self
        finally:
            dist.all_reduce, dist.all_gather = real_reduce, real_gather
            after = _written()
            if before is None or after is None or self.wire is None:
                self.wire = None
            else:
                self.wire += after - before

    def mark(self) -> None:
        """Close a step: append (payload, wire) so far to ``history``."""
        self.history.append((self.payload, self.wire))


def warmup_sparsity(step: int, final: float, warmup_steps: int, stages: int = 4) -> float:
    """DGC's sparsity warm-up: over the first ``warmup_steps`` steps, ``stages`` equal stages
    whose density falls geometrically from 25% towards ``1 - final`` (the paper's 75%, 93.75%,
    98.4375%, 99.6%, then 99.9%); ``final`` after."""
    final = check_number("final", final, low=0, high=1, high_open=True)
    check_int("warmup_steps", warmup_steps, 0)
    check_int("stages", stages, 1)
    if warmup_steps == 0 or step >= warmup_steps:
        return final
    stage = min(stages - 1, step * stages // warmup_steps)
    return min(final, 1 - 0.25 ** (stage + 1))


def warmup_lr(step: int, lr: float, workers: int, warmup_steps: int) -> float:
    """The gradual learning-rate warm-up of Goyal et al. 2017 ("Accurate, Large Minibatch SGD",
    arXiv 1706.02677), per step: at step t < ``warmup_steps`` the rate is
    lr (1 + (N - 1) t / W) / N, rising linearly from lr / N (one worker's rate) to ``lr``, the
    rate of N workers' global batch; ``lr`` after. With one worker or ``warmup_steps`` = 0 it is
    ``lr`` throughout."""
    check_int("step", step, 0)
    lr = check_positive("lr", lr)
    workers = check_int("workers", workers, 1)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    if step >= warmup_steps:
        return lr
    return lr * (1 + (workers - 1) * step / warmup_steps) / workers


def _topk(v: Tensor, k: int) -> Tensor:
    return v.abs().flatten().topk(k, sorted=False).indices


def dgc_compress(
    g: Tensor, u: Tensor, v: Tensor, momentum: float, k: int, masking: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """One worker's DGC selection for one tensor, without communication (new tensors; the
    inputs are not changed): momentum correction u' = m u + g, local accumulation v' = v + u',
    then ``sent`` = v' at its ``k`` largest |entries| and zero elsewhere; v' (and with
    ``masking``, u') zeroed where sent. Returns (sent, u', v'). :class:`SparseSGD` does the same
    in place, then sums every worker's ``sent``."""
    momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
    if g.shape != u.shape or g.shape != v.shape:
        raise ValueError(
            f"g, u and v must have one shape, got {tuple(g.shape)}, {tuple(u.shape)}, {tuple(v.shape)}"
        )
    k = check_int("k", k, 1, g.numel())
    u = u.clone()
    v = v.clone()
    sent = torch.zeros_like(v)
    idx = _accumulate_and_pick(g, u, v, momentum, k, correction=True)
    sent.view(-1)[idx] = v.view(-1)[idx]
    _clear_sent(u, v, idx, masking)
    return sent, u, v


def _accumulate_and_pick(
    g: Tensor, u: Tensor, v: Tensor, momentum: float, k: int, correction: bool
) -> Tensor:
    """In place: u <- m u + g and v <- v + u (``correction``) or v <- v + g; the top-k of |v|."""
    if correction:
        u.mul_(momentum).add_(g)
        v.add_(u)
    else:
        v.add_(g)
    return _topk(v, k)


def _clear_sent(u: Tensor, v: Tensor, idx: Tensor, masking: bool) -> None:
    v.view(-1)[idx] = 0
    if masking:  # momentum-factor masking
        u.view(-1)[idx] = 0


class SparseSGD:
    """One worker's SGD whose gradient exchange is dense, DGC or Gradient Dropping (see the
    module docstring). Call :meth:`step` after ``backward()`` on the worker's own batch; every
    worker must call it with the same settings, in the same order. Returns nothing; bytes go to
    :attr:`bytes` (a :class:`ByteCounter`)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float,
        momentum: float = 0.9,
        method: str = "dgc",
        sparsity: float = 0.999,
        warmup_steps: int = 0,
        clip: float | None = None,
        correction: bool = True,
        masking: bool = True,
        lr_warmup_steps: int = 0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params holds no parameter that requires grad")
        self.lr = check_positive("lr", lr)
        self.momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        self.method = method
        self.sparsity = check_number("sparsity", sparsity, low=0, high=1, high_open=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.lr_warmup_steps = check_int("lr_warmup_steps", lr_warmup_steps, 0)
        self.clip = None if clip is None else check_positive("clip", clip)
        self.correction, self.masking = bool(correction), bool(masking)
        self.u = [torch.zeros_like(p) for p in self.params]  # momentum (DGC) / buffer (dense, gd)
        self.v = [torch.zeros_like(p) for p in self.params]  # accumulated (DGC, gd)
        self.steps = 0
        self.bytes = ByteCounter()
        self.last_sent: list[Tensor] = []  # per tensor, the flat indices this worker sent
        # staleness: steps since each coordinate last changed, and a histogram of the gaps
        # between updates (bin j: gaps in [2^j, 2^(j+1)))
        self.age = [torch.zeros(p.numel(), dtype=torch.int64) for p in self.params]
        self.gap_counts = torch.zeros(GAP_BINS, dtype=torch.int64)

    def current_sparsity(self) -> float:
        return warmup_sparsity(self.steps, self.sparsity, self.warmup_steps)

    def current_lr(self) -> float:
        """This step's rate: ``lr``, or during ``lr_warmup_steps`` :func:`warmup_lr`'s ramp."""
        return warmup_lr(self.steps, self.lr, dist.get_world_size(), self.lr_warmup_steps)

    @torch.no_grad()
    def step(self) -> None:
        world = dist.get_world_size()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for g in grads:
            if not bool(torch.isfinite(g).all()):
                raise FloatingPointError(f"a gradient holds nan or inf at step {self.steps}")
        if self.clip is not None and self.method != "dense":  # DGC's local clipping
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            scale = min(1.0, self.clip / math.sqrt(world) / (float(norm) + 1e-12))
            grads = [g * scale for g in grads]
        if self.method == "dense":
            self._dense(grads, world)
        else:
            self._sparse(grads, world)
        self.bytes.mark()
        self.steps += 1

    def _record_updates(self, i: int, changed: Tensor) -> None:
        age = self.age[i]
        gaps = age[changed.cpu()] + 1
        bins = torch.log2(gaps.double()).floor().long().clamp_(max=GAP_BINS - 1)
        self.gap_counts += torch.bincount(bins, minlength=GAP_BINS)
        age += 1
        age[changed.cpu()] = 0

    def _sgd_momentum(self, i: int, p: Tensor, G: Tensor) -> None:
        b = self.u[i]
        if self.steps == 0:
            b.copy_(G)
        else:
            b.mul_(self.momentum).add_(G)
        p.sub_(self.current_lr() * b)

    def _dense(self, grads: list[Tensor], world: int) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.bytes.all_reduce(flat)
        flat /= world
        sizes = [p.numel() for p in self.params]
        for i, (p, G) in enumerate(zip(self.params, flat.split(sizes), strict=True)):
            self._sgd_momentum(i, p, G.view_as(p))
            self._record_updates(i, torch.ones(p.numel(), dtype=torch.bool))

    def _sparse(self, grads: list[Tensor], world: int) -> None:
        # per tensor: accumulate, pick its own top-k; then one all-gather of every tensor's
        # values and one of their indices (a bucket, as real implementations send them)
        s = self.current_sparsity()
        picked = []
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            k = max(1, math.ceil((1 - s) * p.numel()))
            dgc = self.method == "dgc" and self.correction
            picked.append(_accumulate_and_pick(g, self.u[i], self.v[i], self.momentum, k, dgc))
        ks = [len(idx) for idx in picked]
        vals = torch.cat([v.flatten()[idx] for v, idx in zip(self.v, picked, strict=True)])
        # indices travel as int32 (4 bytes, as the values): every tensor here has < 2^31
        idxs = torch.cat(picked).to(torch.int32)
        all_vals = [t.split(ks) for t in self.bytes.all_gather(vals)]
        all_idx = [t.split(ks) for t in self.bytes.all_gather(idxs)]
        self.last_sent = picked
        for i, (p, idx) in enumerate(zip(self.params, picked, strict=True)):
            u, v = self.u[i], self.v[i]
            total = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            for r in range(world):  # rank order: the same sum on every worker
                total.index_add_(0, all_idx[r][i].long(), all_vals[r][i])
            G = (total / world).view_as(p)
            self._record_updates(i, total != 0)
            _clear_sent(u, v, idx, self.method == "dgc" and self.correction and self.masking)
            if self.method == "dgc" and self.correction:
                p.sub_(self.current_lr() * G)
            else:
                self._sgd_momentum(i, p, G)


# ----------------------------------------------------------------------------- one-byte SPSA
# Zelikman, Huang, Liang, Haber & Goodman, "Just One Byte (per gradient)", arXiv 2306.10015,
# after MeZO (Malladi et al. 2023, arXiv 2305.17333): each machine perturbs the weights along
# directions regenerated from shared seeds, measures a two-point directional derivative per
# direction and sends that number alone; every machine replays everyone's update.

BYTE_SCALE = 16.0  # codes per unit of ln|x|
BYTE_OFFSET = 64  # code c holds |x| = exp((c - 64) / 16), c in 0..127


def spsa_seed(round_: int, machine: int, sample: int, base: int = 0) -> int:
    """The seed of one perturbation, the same on every machine: a hash of (base, round,
    machine, sample)."""
    import hashlib

    key = f"{base}:{round_}:{machine}:{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def perturbation(seed: int, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """z ~ N(0, I) of ``size`` entries from ``torch.Generator().manual_seed(seed)`` (CPU)."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def quantise_byte(x: Tensor) -> Tensor:
    """Each value as one byte (uint8): the sign in the top bit, and in the low 7 bits the code
    c = clamp(round(16 ln|x|) + 64, 0, 127), a logarithmic grid of ratio e^(1/16) from e^-4 to
    e^(63/16). Within that range the round trip :func:`dequantise_byte` errs by at most a factor
    e^(1/32) (about 3.2%); smaller magnitudes (0 included) come back as e^-4, larger as e^3.94.
    (Zelikman et al.'s code uses 16 ln|x| clamped to +-127 and a separate sign: 9 bits.)"""
    if not x.is_floating_point():
        raise ValueError(f"x must be floating, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must hold finite numbers")
    mag = x.abs().double().clamp_min(1e-300)
    code = (torch.round(BYTE_SCALE * torch.log(mag)) + BYTE_OFFSET).clamp(0, 127).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 7)


def dequantise_byte(b: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values :func:`quantise_byte` encoded."""
    if b.dtype != torch.uint8:
        raise ValueError(f"b must be uint8, got {b.dtype}")
    code = (b & 0x7F).to(torch.float64)
    sign = 1.0 - 2.0 * ((b >> 7) & 1).to(torch.float64)
    return (sign * torch.exp((code - BYTE_OFFSET) / BYTE_SCALE)).to(dtype)


def spsa_estimates(
    loss: Callable[[Tensor], float],
    theta: Tensor,
    round_: int,
    machine: int,
    samples: int,
    eps: float,
    base: int = 0,
) -> Tensor:
    """This machine's ``samples`` two-point estimates (L(theta + eps z) - L(theta - eps z)) /
    (2 eps) of round ``round_``, z from :func:`spsa_seed` (round, machine, sample)."""
    out = torch.empty(samples, dtype=torch.float64)
    for s in range(samples):
        z = perturbation(spsa_seed(round_, machine, s, base), theta.numel(), theta.dtype)
        out[s] = (float(loss(theta + eps * z)) - float(loss(theta - eps * z))) / (2 * eps)
    return out


def spsa_apply(theta: Tensor, estimates: Tensor, round_: int, lr: float, base: int = 0) -> Tensor:
    """theta - lr / (M S) sum_{m, s} estimates[m, s] z_{m, s}, the M machines' S estimates
    each, replayed in order (machine, then sample): the same on every machine."""
    machines, samples = estimates.shape
    step = lr / (machines * samples)
    for m in range(machines):
        for s in range(samples):
            z = perturbation(spsa_seed(round_, m, s, base), theta.numel(), theta.dtype)
            theta = theta - (step * float(estimates[m, s])) * z
    return theta


def spsa_round(
    loss: Callable[[Tensor], float],
    theta: Tensor,
    round_: int,
    *,
    samples: int,
    eps: float,
    lr: float,
    one_byte: bool,
    counter: ByteCounter,
    base: int = 0,
    shuffle: bool = False,
) -> Tensor:
    """One round on this worker: its estimates on its own ``loss``, all-gathered (as one byte
    each with ``one_byte``, else float32), dequantised, and the update replayed. ``shuffle``
    (a control): the gathered estimates are rolled by one position before the update, so each
    multiplies another sample's direction (the same numbers, carrying no information)."""
    rank = dist.get_rank()
    local = spsa_estimates(loss, theta, round_, rank, samples, eps, base)
    if one_byte:
        sent = counter.all_gather(quantise_byte(local))
        values = torch.stack([dequantise_byte(b, torch.float64) for b in sent])
    else:
        sent = counter.all_gather(local.to(torch.float32))
        values = torch.stack(sent).to(torch.float64)
    counter.mark()
    if shuffle:
        values = values.flatten().roll(1).view_as(values)
    return spsa_apply(theta, values, round_, lr, base)
