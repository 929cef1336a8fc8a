"""Notebook 09: why Adam trains transformers faster than SGD (Pan & Li 2023, arXiv 2306.00204).

Two tasks, one protocol:

- ``task="transformer"``: a small causal transformer (:class:`gradcourse.models.CausalTransformer`)
  learning the next byte of real Python source (the standard library,
  :func:`gradcourse.data.python_source`), windows of ``context`` bytes;
- ``task="mlp"``, the non-transformer control: a ReLU MLP 784 -> ``mlp_width`` x 2 -> 10 on
  ``n_train`` Fashion-MNIST images, cross-entropy.

:func:`trajectory_run` follows one trajectory (moved by Adam, or by SGD with momentum, at
``driver_lr``) and, every ``every`` steps, measures on the step's own mini-batch (as the authors'
code does) the directional sharpness and the line-search decrease of the direction each
optimiser of :class:`gradcourse.directional.PseudoUpdates` would take from the same gradients,
plus how heavy-tailed the gradient's coordinates are. :func:`train_run` trains with one of
:data:`OPTIMISERS` at one learning rate; :func:`tuned_lr` picks the rate from a grid on a seed
kept out of the comparisons. Batches and initialisation come from the seed, so runs of
different optimisers with the same seed see the same data in the same order (paired).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import data, losses, models
from ..cache import Cache
from ..checks import check_int, check_number, check_positive
from ..directional import (
    DIRECTIONS,
    PseudoUpdates,
    clip_coordinates_,
    directional_sharpnesses,
    line_search,
)
from . import seeded_run, seeded_runs, with_defaults

__all__ = [
    "DEFAULTS",
    "OPTIMISERS",
    "TASKS",
    "config",
    "load",
    "make_model",
    "batches",
    "trajectory_run",
    "train_run",
    "cached_trajectories",
    "cached_trainings",
    "tuned_lr",
    "model_at",
    "HIST_EDGES",
    "STATE_KEYS",
]

TASKS = ("transformer", "mlp")
OPTIMISERS = ("sgd", "sgd_clip", "adam", "adam_clip")
DRIVERS = ("adam", "sgd")
#: what a trajectory keeps per checkpoint with ``keep_states``: flat parameters, three
#: directions (the gradient, SGD's momentum and Adam's), and the batch (x, y)
STATE_KEYS = ("params", "sgd", "momentum", "adam", "x", "y")
#: log10 |g_i| bin edges of the gradient-coordinate histogram
HIST_EDGES = np.linspace(-12.0, 1.0, 53)

DEFAULTS: dict[str, Any] = dict(
    task="transformer",
    corpus_bytes=4_000_000,  # bytes of training source read (files in sorted order)
    context=64,
    width=64,
    depth=2,
    heads=4,
    n_train=10_000,  # mlp: Fashion-MNIST training images
    mlp_width=100,
    batch_size=32,
    steps=300,
    every=30,  # steps between two measurements along the trajectory
    driver="adam",
    driver_lr=1e-3,
    momentum=0.9,  # of the pseudo-updates' momentum direction
    train_momentum=0.0,  # of the trained SGD (Pan & Li's runs: torch's SGD, no momentum)
    sgd_fraction=0.1,  # Pan & Li's rho for SGD
    adam_fraction=0.5,  # and for Adam
    optimizer="sgd",
    lr=0.1,
    val_batches=8,  # validation batches of 64 sequences (or images) for the final loss
    keep_states=False,  # trajectory: keep parameters, directions and batch at each checkpoint
    pretrain_steps=0,  # Adam steps before everything else: the runs then fine-tune, as Pan & Li
    pretrain_lr=3e-3,
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    if cfg["task"] not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {cfg['task']!r}")
    check_int("corpus_bytes", cfg["corpus_bytes"], 10_000)
    check_int("context", cfg["context"], 2, 1024)
    check_int("heads", cfg["heads"], 1)
    check_int("width", cfg["width"], cfg["heads"])
    if cfg["width"] % cfg["heads"]:
        raise ValueError(f"width must be a multiple of heads ({cfg['heads']}), got {cfg['width']}")
    check_int("depth", cfg["depth"], 1)
    check_int("n_train", cfg["n_train"], 100, 60_000)
    check_int("mlp_width", cfg["mlp_width"], 1)
    check_int("batch_size", cfg["batch_size"], 2, 4096)
    check_int("steps", cfg["steps"], 1)
    check_int("every", cfg["every"], 1, cfg["steps"])
    if cfg["driver"] not in DRIVERS:
        raise ValueError(f"driver must be one of {DRIVERS}, got {cfg['driver']!r}")
    check_positive("driver_lr", cfg["driver_lr"])
    check_number("momentum", cfg["momentum"], low=0, high=1, high_open=True)
    check_number("train_momentum", cfg["train_momentum"], low=0, high=1, high_open=True)
    check_number("sgd_fraction", cfg["sgd_fraction"], low=0, high=1, high_open=True)
    check_number("adam_fraction", cfg["adam_fraction"], low=0, high=1, high_open=True)
    if cfg["optimizer"] not in OPTIMISERS:
        raise ValueError(f"optimizer must be one of {OPTIMISERS}, got {cfg['optimizer']!r}")
    check_positive("lr", cfg["lr"])
    check_int("val_batches", cfg["val_batches"], 1)
    if not isinstance(cfg["keep_states"], bool):
        raise ValueError(f"keep_states must be True or False, got {cfg['keep_states']!r}")
    check_int("pretrain_steps", cfg["pretrain_steps"], 0)
    check_positive("pretrain_lr", cfg["pretrain_lr"])
    return cfg


_DATA: dict[tuple[Any, ...], dict[str, Any]] = {}


def load(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The task's data (on the CPU): byte tokens of the training and validation source files,
    or Fashion-MNIST training and test images (flattened, standardised)."""
    cfg = config(**cfg)
    if cfg["task"] == "transformer":
        key: tuple[Any, ...] = ("transformer", cfg["corpus_bytes"])
        if key not in _DATA:
            train = data.python_source("train", max_bytes=cfg["corpus_bytes"])
            val = data.python_source("validation", max_bytes=max(cfg["corpus_bytes"] // 4, 10_000))
            _DATA[key] = dict(train=train, validation=val)
    else:
        key = ("mlp", cfg["n_train"])
        if key not in _DATA:
            ds = data.fashion_mnist(n_train=cfg["n_train"], n_test=2_000, seed=0, flatten=True)
            _DATA[key] = dict(x=ds.x_train, y=ds.y_train, x_val=ds.x_test, y_val=ds.y_test)
    return _DATA[key]


def loss_of(cfg: Mapping[str, Any]):
    """The task's loss: next-byte cross-entropy, or cross-entropy on labels."""
    return losses.token_cross_entropy if cfg["task"] == "transformer" else "ce"


def make_model(cfg: Mapping[str, Any], *, seed: int, device: Any = None) -> nn.Module:
    """The task's network, initialised from ``seed`` (GPT-2's initialisation for the
    transformer, PyTorch's default for the MLP)."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    if cfg["task"] == "transformer":
        net: nn.Module = models.CausalTransformer(
            256, cfg["context"], cfg["width"], cfg["depth"], cfg["heads"], seed=seed
        )
    else:
        net = models.MLP(28 * 28, [cfg["mlp_width"]] * 2, 10, seed=seed)
        models.torch_default_init_(net, seed)
    return net.to(device)


_PRETRAINED: dict[tuple[Any, ...], dict[str, Tensor]] = {}
_ARCH_KEYS = (
    "task",
    "corpus_bytes",
    "context",
    "width",
    "depth",
    "heads",
    "n_train",
    "mlp_width",
    "batch_size",
    "pretrain_steps",
    "pretrain_lr",
)


def start_model(cfg: Mapping[str, Any], *, seed: int, device: Any = None) -> nn.Module:
    """Where every run of the seed starts: :func:`make_model`, then ``pretrain_steps`` steps of
    Adam at ``pretrain_lr`` on the seed's pre-training batches (a stream of its own), so that
    the runs compared fine-tune a trained network, as Pan & Li's do. Kept in memory per
    (architecture, data, seed)."""
    cfg = config(**cfg)
    model = make_model(cfg, seed=seed, device=device)
    if cfg["pretrain_steps"] == 0:
        return model
    key = (*(cfg[k] for k in _ARCH_KEYS), seed, str(device))
    if key not in _PRETRAINED:
        loss_fn = losses.get_loss(loss_of(cfg))
        opt = torch.optim.Adam(model.parameters(), lr=cfg["pretrain_lr"])
        stream = batches(cfg, seed + 5000, device)
        for _ in range(cfg["pretrain_steps"]):
            x, y = next(stream)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        _PRETRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_PRETRAINED[key])
    return model


def batches(cfg: Mapping[str, Any], seed: int, device: Any = None):
    """The seed's endless stream of training batches (x, y), from ``Generator(seed + 1000)``."""
    cfg = config(**cfg)
    d = load(cfg)
    gen = torch.Generator().manual_seed(1000 + seed)
    while True:
        if cfg["task"] == "transformer":
            x, y = data.token_windows(d["train"], cfg["batch_size"], cfg["context"], generator=gen)
        else:
            i = torch.randint(0, len(d["y"]), (cfg["batch_size"],), generator=gen)
            x, y = d["x"][i], d["y"][i]
        yield x.to(device), y.to(device)


def _validation(cfg: Mapping[str, Any], seed: int, device: Any) -> list[tuple[Tensor, Tensor]]:
    """The seed's validation batches: the same for every optimiser of a seed (paired), other
    windows for other seeds (the tuning seed's are not the comparison seeds')."""
    d = load(cfg)
    gen = torch.Generator().manual_seed(12_345 + seed)
    out = []
    for _ in range(cfg["val_batches"]):
        if cfg["task"] == "transformer":
            x, y = data.token_windows(d["validation"], 64, cfg["context"], generator=gen)
        else:
            i = torch.randint(0, len(d["y_val"]), (64,), generator=gen)
            x, y = d["x_val"][i], d["y_val"][i]
        out.append((x.to(device), y.to(device)))
    return out


def _mean_loss(model: nn.Module, loss_fn, pairs: Sequence[tuple[Tensor, Tensor]]) -> float:
    with torch.no_grad():
        value = float(np.mean([float(loss_fn(model(x), y)) for x, y in pairs]))
    return value if math.isfinite(value) else math.inf


def _flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _tails(g: Tensor) -> tuple[float, float]:
    """Over g's nonzero coordinates (a byte absent from the batch leaves its embedding's
    gradient exactly 0): the share of ||g||^2 in the top 1% by |g_i|, and the kurtosis (3 for
    Gaussian coordinates)."""
    g = g[g != 0].double()
    if g.numel() < 2:
        return math.nan, math.nan
    sq = g.square()
    k = max(1, g.numel() // 100)
    top = float(sq.topk(k).values.sum() / sq.sum())
    c = g - g.mean()
    kurt = float(c.pow(4).mean() / c.pow(2).mean().square())
    return top, kurt


def _top_by_tensor(g: Tensor, sizes: Sequence[int]) -> np.ndarray:
    """How many of g's top 1% coordinates (by |g_i|) fall in each parameter tensor."""
    k = max(1, g.numel() // 100)
    index = g.abs().topk(k).indices
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return np.bincount(owner[index.cpu()].numpy(), minlength=len(sizes))


def trajectory_run(cfg: Mapping[str, Any], seed: int, *, device: Any = None) -> dict[str, Any]:
    """One trajectory of ``steps`` updates by the driver (Adam, or SGD with ``momentum``, at
    ``driver_lr``), the pseudo-updates of every direction in
    :data:`gradcourse.directional.DIRECTIONS` fed the same gradients, and at steps ``every``,
    ``2 every``, ..., ``steps`` on that step's batch: each direction's sharpness ``S`` and
    line-search ``decrease`` (rows: checkpoints; columns: directions), the gradient's tails
    (``top1_share``, ``kurtosis``, over its nonzero coordinates) and, at the last checkpoint,
    the histogram ``hist`` of log10 |g_i| of the nonzero coordinates over :data:`HIST_EDGES`
    (values beyond the edges in the end bins), the count of exact zeros (``zeros``), and how
    many of the top 1% coordinates each parameter tensor holds (``top1_counts``, in the order
    of ``tensor_names``). Also the training loss of every step and the final validation
    loss."""
    cfg = config(**cfg)
    t0 = time.perf_counter()
    model = start_model(cfg, seed=seed, device=device)
    loss = loss_of(cfg)
    loss_fn = losses.get_loss(loss)
    params = list(model.parameters())
    if cfg["driver"] == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg["driver_lr"])
    else:
        opt = torch.optim.SGD(params, lr=cfg["driver_lr"], momentum=cfg["momentum"])
    pseudo = PseudoUpdates(
        momentum=cfg["momentum"],
        sgd_fraction=cfg["sgd_fraction"],
        adam_fraction=cfg["adam_fraction"],
        seed=seed,
    )
    stream = batches(cfg, seed, device)
    train_loss, checkpoints, sharp, decrease, top1, kurt = [], [], [], [], [], []
    hist = np.zeros(len(HIST_EDGES) - 1)
    top_counts = np.zeros(len(params), dtype=np.int64)
    zeros = 0
    states: dict[str, list[np.ndarray]] = {k: [] for k in STATE_KEYS}
    for step in range(1, cfg["steps"] + 1):
        x, y = next(stream)
        opt.zero_grad(set_to_none=False)
        value = loss_fn(model(x), y)
        value.backward()
        train_loss.append(float(value.detach()))
        g = _flat_grad(model).detach()
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"the driver diverged at step {step} (lower driver_lr)")
        pseudo.update(g)
        if step % cfg["every"] == 0:
            dirs = pseudo.directions()
            s = directional_sharpnesses(model, loss, x, y, dirs)
            sharp.append([s[n] for n in DIRECTIONS])
            decrease.append([line_search(model, loss, x, y, dirs[n]).decrease for n in DIRECTIONS])
            a, b = _tails(g)
            top1.append(a)
            kurt.append(b)
            checkpoints.append(step)
            if cfg["keep_states"]:
                theta = torch.cat([p.detach().reshape(-1) for p in params])
                for k, v in (
                    ("params", theta),
                    ("sgd", g),
                    ("momentum", dirs["momentum"]),
                    ("adam", dirs["adam"]),
                    ("x", x),
                    ("y", y),
                ):
                    states[k].append(v.detach().cpu().numpy())
            if step + cfg["every"] > cfg["steps"]:
                nonzero = g[g != 0]
                zeros = g.numel() - nonzero.numel()
                logs = torch.log10(nonzero.abs().double()).cpu().numpy()
                hist = np.histogram(np.clip(logs, HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0]
                top_counts = _top_by_tensor(g, [p.numel() for p in params])
        opt.step()
    out_states = {k: np.stack(v) for k, v in states.items()} if cfg["keep_states"] else {}
    return dict(
        states=out_states,
        step=np.array(checkpoints),
        S=np.array(sharp),
        decrease=np.array(decrease),
        directions=list(DIRECTIONS),
        top1_share=np.array(top1),
        kurtosis=np.array(kurt),
        hist=np.asarray(hist, dtype=float),
        zeros=int(zeros),
        tensor_names=[n for n, _ in model.named_parameters()],
        top1_counts=top_counts,
        train_loss=np.array(train_loss),
        val_loss=_mean_loss(model, loss_fn, _validation(cfg, seed, device)),
        params=sum(p.numel() for p in params),
        seconds=time.perf_counter() - t0,
    )


def train_run(cfg: Mapping[str, Any], seed: int, *, device: Any = None) -> dict[str, Any]:
    """``steps`` updates of ``optimizer`` at ``lr`` from the seed's initialisation and batches:
    ``sgd`` is SGD with ``momentum``, ``adam`` torch's Adam (default betas, eps), and the
    ``_clip`` variants clip the gradient coordinate-wise first
    (:func:`gradcourse.directional.clip_coordinates_`, fraction ``sgd_fraction`` or
    ``adam_fraction``). Records every step's training loss and the validation loss at the end
    (inf, and ``diverged``, if the loss stopped being finite)."""
    cfg = config(**cfg)
    t0 = time.perf_counter()
    model = start_model(cfg, seed=seed, device=device)
    loss_fn = losses.get_loss(loss_of(cfg))
    name = cfg["optimizer"]
    params = list(model.parameters())
    if name.startswith("adam"):
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg["lr"])
        fraction = cfg["adam_fraction"]
    else:
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["train_momentum"])
        fraction = cfg["sgd_fraction"]
    stream = batches(cfg, seed, device)
    train_loss, diverged = [], False
    for _ in range(cfg["steps"]):
        x, y = next(stream)
        opt.zero_grad(set_to_none=False)
        value = loss_fn(model(x), y)
        if not math.isfinite(float(value.detach())):
            diverged = True
            break
        value.backward()
        train_loss.append(float(value.detach()))
        if name.endswith("_clip"):
            if not all(bool(torch.isfinite(p.grad).all()) for p in params):
                diverged = True
                break
            clip_coordinates_(params, fraction)
        opt.step()
    val = math.inf if diverged else _mean_loss(model, loss_fn, _validation(cfg, seed, device))
    return dict(
        train_loss=np.array(train_loss),
        val_loss=val,
        diverged=diverged or not math.isfinite(val),
        seconds=time.perf_counter() - t0,
    )


def _runner(name: str, run, desc: str, what: str):
    """A function running ``run(cfg, seed)`` for every job ``{key: (cfg, seed)}``, each cached
    under ``name`` and its configuration and seed, under one progress bar."""

    def one(cfg, seed, *, cache=None, device=None):
        return seeded_run(name, run, config(**cfg), seed, cache=cache, device=device)

    def many(
        jobs: Mapping[Any, tuple[Mapping[str, Any], int]],
        *,
        cache: Cache | None = None,
        device: Any = None,
        progress: bool = True,
    ) -> dict[Any, dict[str, Any]]:
        return seeded_runs(one, jobs, cache=cache, device=device, progress=progress, desc=desc)

    many.__doc__ = (
        f":func:`{what}` for every job ``{{key: (cfg, seed)}}``, cached, one progress bar."
    )
    return many


cached_trajectories = _runner(
    "adam-sgd-trajectory", trajectory_run, "trajectories", "trajectory_run"
)
cached_trainings = _runner("adam-sgd-train", train_run, "training runs", "train_run")


def tuned_lr(runs: Mapping[float, Mapping[str, Any]]) -> float:
    """The learning rate whose run (``{lr: train_run record}``, all on the tuning seed) ends at
    the lowest validation loss; diverged runs count as inf. Raises if every run diverged."""
    if not runs:
        raise ValueError("runs must hold at least one {lr: record}")
    best = min(runs, key=lambda lr: runs[lr]["val_loss"])
    if not math.isfinite(runs[best]["val_loss"]):
        raise ValueError(f"every learning rate diverged: {sorted(runs)}; try smaller ones")
    return best


def model_at(cfg: Mapping[str, Any], record: Mapping[str, Any], index: int, device: Any = None):
    """The network of a trajectory kept with ``keep_states`` at its checkpoint ``index``, with
    that checkpoint's batch and directions: (model, x, y, {"sgd", "momentum", "adam"})."""
    cfg = config(**cfg)
    states = record.get("states") or {}
    if not states:
        raise ValueError("this trajectory kept no states: run it with keep_states=True")
    count = len(states["params"])
    check_int("index", index, 0, count - 1)
    model = make_model(cfg, seed=0, device=device)
    theta = torch.as_tensor(states["params"][index])
    torch.nn.utils.vector_to_parameters(theta.to(device), model.parameters())
    x = torch.as_tensor(states["x"][index]).to(device)
    y = torch.as_tensor(states["y"][index]).to(device)
    dirs = {k: torch.as_tensor(states[k][index]).to(device) for k in ("sgd", "momentum", "adam")}
    return model, x, y, dirs
