"""Notebook 08, scale-invariant weights: how each optimiser moves their norm and
effective step (Heo et al. 2021, AdamP, arXiv 2006.08217), and diffGrad's friction on network
gradients (Dubey et al. 2019, arXiv 1909.11015).

One run (:func:`train_run`, cached by :func:`cached_run`) trains :func:`make_model`, an MLP whose
hidden weights are scale-invariant (bias-free linear layers, each followed by BatchNorm), on
Fashion-MNIST with one optimiser of :data:`OPTIMIZERS`, and records along training each hidden
weight's norm, its effective step lr / ||w||^2 and the angle of its updates, and (diffGrad) the
friction xi's distribution; at the end, the test accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data
from .. import optim as go
from ..cache import Cache
from ..checks import check_int, check_number, check_positive
from . import seeded_run, with_defaults

__all__ = [
    "DEFAULTS",
    "OPTIMIZERS",
    "cached_run",
    "config",
    "hidden_weights",
    "load",
    "make_model",
    "make_optimizer",
    "norm_identity_run",
    "train_run",
]

OPTIMIZERS: tuple[str, ...] = (
    "sgd",  # SGD with momentum
    "sgdp",
    "adam",
    "adamw",  # Adam with decoupled weight decay
    "adamp",
    "adam_half",  # Adam at lr / 2
    "diffgrad",  # the authors' fixed formula
    "diffgrad_aliased",  # the published code: xi = 1/2
)

DEFAULTS: dict[str, Any] = dict(
    n_train=10_000,
    n_test=2_000,
    data_seed=0,
    width=256,
    depth=2,  # hidden layers, each bias-free linear -> BatchNorm -> ReLU
    bn_eps=1e-5,  # BatchNorm's eps (PyTorch's default); a tiny one makes the invariance exact
    optimizer="sgd",
    lr=None,  # None: 0.1 for the SGD family, 1e-3 for the Adam family
    momentum=0.9,  # SGD's, and Adam's beta1
    weight_decay=0.0,
    loss_scale=1.0,  # the loss multiplied by this (Adam is invariant to it; diffGrad is not)
    epochs=10,
    schedule="cosine",  # the rate decays to 0 over training ("constant": it does not)
    batch_size=128,
    record_every=10,  # steps between two records of the norms
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked; ``lr``
    filled in from the optimiser's family when None."""
    cfg = with_defaults(DEFAULTS, overrides)
    check_int("n_train", cfg["n_train"], 10, 60_000)
    check_int("n_test", cfg["n_test"], 10, 10_000)
    check_int("data_seed", cfg["data_seed"], 0)
    check_int("width", cfg["width"], 1)
    check_int("depth", cfg["depth"], 1)
    check_number("bn_eps", cfg["bn_eps"], low=0, low_open=True)
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg['optimizer']!r}")
    if cfg["lr"] is None:
        cfg["lr"] = 0.1 if cfg["optimizer"] in ("sgd", "sgdp") else 1e-3
    check_positive("lr", cfg["lr"])
    check_number("momentum", cfg["momentum"], low=0, high=1, high_open=True)
    check_number("weight_decay", cfg["weight_decay"], low=0)
    check_number("loss_scale", cfg["loss_scale"], low=0, low_open=True)
    check_int("epochs", cfg["epochs"], 1)
    if cfg["schedule"] not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg['schedule']!r}")
    check_int("batch_size", cfg["batch_size"], 1, cfg["n_train"])
    check_int("record_every", cfg["record_every"], 1)
    return cfg


_DATA: dict[tuple[Any, ...], data.Dataset] = {}


def load(cfg: Mapping[str, Any], device: str | torch.device | None = None) -> data.Dataset:
    """Fashion-MNIST, class-balanced subsets under ``data_seed``, flattened and standardised;
    kept in memory per setting."""
    cfg = config(**cfg)
    key = (cfg["n_train"], cfg["n_test"], cfg["data_seed"], str(device))
    if key not in _DATA:
        _DATA[key] = data.fashion_mnist(
            n_train=cfg["n_train"], n_test=cfg["n_test"], seed=cfg["data_seed"], flatten=True
        ).to(device)
    return _DATA[key]


def make_model(
    cfg: Mapping[str, Any], *, seed: int, device: str | torch.device | None = None
) -> nn.Sequential:
    """784 -> [bias-free linear -> BatchNorm1d -> ReLU] x ``depth`` -> linear -> 10, PyTorch's
    default initialisation from ``seed``. In training mode each hidden weight is
    scale-invariant up to BatchNorm's ``bn_eps`` (exactly, to rounding, with a tiny one): rescaling a row rescales that unit's
    pre-activations, which the batch normalisation undoes. The last layer is not."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        n_in = 28 * 28
        for _ in range(cfg["depth"]):
            layers += [
                nn.Linear(n_in, cfg["width"], bias=False),
                nn.BatchNorm1d(cfg["width"], eps=cfg["bn_eps"]),
                nn.ReLU(),
            ]
            n_in = cfg["width"]
        layers.append(nn.Linear(n_in, 10))
        return nn.Sequential(*layers).to(device)


def hidden_weights(model: nn.Module) -> list[str]:
    """The names of the scale-invariant weights: every linear weight followed by a BatchNorm."""
    names, previous = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and previous is not None:
            names.append(f"{previous}.weight")
        previous = name if isinstance(module, nn.Linear | nn.Conv2d) else None
    return names


def make_optimizer(cfg: Mapping[str, Any], params: Any) -> torch.optim.Optimizer:
    """The optimiser ``cfg["optimizer"]`` names, at ``lr``, ``momentum`` (Adam's beta1) and
    ``weight_decay`` (L2 for SGD and Adam, decoupled for AdamW, AdamP and SGDP as their papers
    define it)."""
    cfg = config(**cfg)
    name, lr, m, wd = cfg["optimizer"], cfg["lr"], cfg["momentum"], cfg["weight_decay"]
    betas = (m, 0.999)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=wd)
    if name == "sgdp":
        return go.SGDP(params, lr=lr, momentum=m, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adam_half":
        return torch.optim.Adam(params, lr=lr / 2, betas=betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adamp":
        return go.AdamP(params, lr=lr, betas=betas, weight_decay=wd)
    return go.DiffGrad(
        params, lr=lr, betas=betas, weight_decay=wd, aliased=name == "diffgrad_aliased"
    )


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    model.train()
    return acc


def train_run(
    cfg: Mapping[str, Any], seed: int, *, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Train :func:`make_model` from ``seed`` with :func:`make_optimizer` for ``epochs`` of
    batches reshuffled each epoch (from ``seed``), cross-entropy, the rate decayed by
    ``schedule``. Every
    ``record_every`` steps (and at the start): the step, each scale-invariant weight's norm and
    effective step lr_t / ||w||^2 (lr_t the scheduled rate), and the angle (radians) its last update turned it. Returns those
    as arrays (records x weights), the names, the norms of the other weights of two or more
    dimensions (``other_names``, ``other_norms``: the last layer, not scale-invariant), the test
    accuracy, the last epoch's mean training
    loss, for diffGrad the quantiles (5, 25, 50, 75, 95%) of xi - 1/2 over all coordinates at
    each record, and the seconds it took."""
    cfg = config(**cfg)
    ds = load(cfg, device)
    model = make_model(cfg, seed=seed, device=device)
    names = hidden_weights(model)
    params = dict(model.named_parameters())
    others = [n for n, p in params.items() if p.dim() >= 2 and n not in names]
    opt = make_optimizer(cfg, model.parameters())
    total = cfg["epochs"] * math.ceil(ds.n_train / cfg["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: (
            1.0
            if cfg["schedule"] == "constant"
            else 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    steps, norms, effective, angles, xi_q, other_norms = [], [], [], [], [], []
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)

    def record(step: int, before: dict[str, Tensor] | None) -> None:
        steps.append(step)
        other_norms.append(list(go.weight_norms(model, others).values()))
        w = go.weight_norms(model, names)
        norms.append([w[n] for n in names])
        lr = opt.param_groups[0]["lr"]  # the scheduled rate of the step just taken
        effective.append([lr / w[n] ** 2 for n in names])
        angles.append(
            [0.0 if before is None else go.angular_update(before[n], params[n]) for n in names]
        )
        if cfg["optimizer"].startswith("diffgrad") and step > 0:
            xi = torch.cat([opt.state[p]["xi"].reshape(-1) for p in model.parameters()])
            xi_q.append(torch.quantile(xi.double().cpu()[:1_000_000] - 0.5, quantiles).tolist())

    record(0, None)
    t0, step, losses = time.perf_counter(), 0, []
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(ds.n_train, generator=gen).to(ds.x_train.device)
        losses = []
        for i in range(0, ds.n_train, cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            loss = cfg["loss_scale"] * F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            step += 1
            before = (
                {n: params[n].detach().clone() for n in names}
                if step % cfg["record_every"] == 0
                else None
            )
            opt.step()
            losses.append(float(loss.detach()) / cfg["loss_scale"])
            if before is not None:
                record(step, before)
            sched.step()
        if not math.isfinite(losses[-1]):
            break
    return {
        "names": names,
        "steps": np.array(steps),
        "norms": np.array(norms),
        "effective_steps": np.array(effective),
        "angles": np.array(angles),
        "xi_quantiles": np.array(xi_q) if xi_q else np.zeros((0, 5)),
        "other_names": others,
        "other_norms": np.array(other_norms),
        "accuracy": _accuracy(model, ds.x_test, ds.y_test),
        "train_loss": float(np.mean(losses)),
        "seconds": time.perf_counter() - t0,
    }


def cached_run(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """:func:`train_run` through ``cache`` (keyed by the full configuration and the seed)."""
    return seeded_run("scale-run", train_run, config(**cfg), seed, cache=cache, device=device)


def norm_identity_run(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    steps: int = 50,
    beta: float = 0.9,
    lr: float = 0.1,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """``steps`` of heavy-ball SGD (``torch.optim.SGD``, momentum ``beta``, no weight decay) on
    :func:`make_model` in float64 with BatchNorm's eps at 1e-12, so that the hidden weights are
    scale-invariant to rounding, on Fashion-MNIST batches (from ``seed``). Records, per hidden
    weight, ||w_t||^2 for t = 0..steps and the momentum buffer's ||p_t||^2 for t = 0..steps-1:
    the two sides of :func:`gradcourse.optim.momentum_norm_prediction`'s identity."""
    cfg = config(**{**cfg, "bn_eps": 1e-12})
    check_int("steps", steps, 1)
    check_number("beta", beta, low=0, high=1, high_open=True)
    check_positive("lr", lr)
    ds = load(cfg, device)
    model = make_model(cfg, seed=seed, device=device).double()
    names = hidden_weights(model)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    gen = torch.Generator().manual_seed(seed)
    norms_sq = [[float(params[n].detach().double().pow(2).sum()) for n in names]]
    buffers_sq = []
    for _ in range(steps):
        idx = torch.randint(0, ds.n_train, (cfg["batch_size"],), generator=gen).to(
            ds.x_train.device
        )
        loss = F.cross_entropy(model(ds.x_train[idx].double()), ds.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bufs = [opt.state[params[n]].get("momentum_buffer") for n in names]
        buffers_sq.append(
            [
                float((params[n].grad if b is None else b).pow(2).sum())
                for n, b in zip(names, bufs, strict=True)
            ]
        )
        norms_sq.append([float(params[n].detach().pow(2).sum()) for n in names])
    return {
        "names": names,
        "norms_sq": np.array(norms_sq),
        "buffers_sq": np.array(buffers_sq),
        "lr": lr,
        "beta": beta,
    }
