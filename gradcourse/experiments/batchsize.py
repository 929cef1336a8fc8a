"""Notebook 11, batch size, learning rate and noise: the mini-batch Hessian's spectrum against
the full one and the largest stable learning rate against the batch size (Granziol, Zohren &
Roberts 2022, arXiv 2006.09092), and annealed gradient noise for a very deep network (Neelakantan
et al. 2015, arXiv 1511.06807).

Three experiments, each cached:

- :func:`spectrum_run`: at a checkpoint of a tanh MLP trained briefly on Fashion-MNIST
  (:func:`checkpoint`), :func:`gradcourse.batchsize.minibatch_spectrum` over a grid of batch
  sizes;
- :func:`stable_lr_run`: at the same checkpoint, the largest learning rate at which SGD or Adam
  still lowers the full training loss in a fixed number of steps
  (:func:`gradcourse.batchsize.loss_decreases`), by bisection;
- :func:`one_step_run`: at the same checkpoint, the rate at which one step of SGD or of Adam's
  expected preconditioner leaves the training loss unchanged to second order
  (:func:`gradcourse.batchsize.one_step_rate`), a model of the stable rates' exponents;
- :func:`deep_run`: a 20-layer, width-50 ReLU MLP from a poor or a good initialisation, trained
  by SGD with momentum, with or without annealed gradient noise; its test accuracy.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import batchsize as bsz
from .. import data, models
from ..cache import Cache
from ..checks import check_int, check_number, check_positive
from . import with_defaults

__all__ = [
    "DEFAULTS",
    "cached",
    "stable_lr_table",
    "checkpoint",
    "checkpoint_moments",
    "config",
    "deep_model",
    "deep_run",
    "load",
    "one_step_run",
    "spectrum_run",
    "stable_lr_run",
]

DEFAULTS: dict[str, Any] = dict(
    n_train=2_000,
    n_test=1_000,
    data_seed=0,
    width=100,  # the spectrum / stability MLP: 784 -> width -> width -> 10, tanh
    warmup_epochs=2,  # SGD epochs (rate 0.1, batch 100) to the checkpoint
    spectrum_sizes=(32, 64, 128, 256, 512, 1024),
    draws=8,
    lr_sizes=(16, 32, 64, 128, 256, 512, 1024, 2000),
    lr_steps=50,
    deep_depth=20,
    deep_width=50,
    deep_n_train=5_000,
    deep_steps=1_500,
    deep_lr=0.01,
    deep_batch=100,
    deep_poor_std=0.12,  # ours: the scale where plain SGD fails on some seeds (a probe)
    deep_extra_std=0.0,  # every weight's std enlarged to sqrt(std^2 + this^2): a control
    deep_noise_until=None,  # the noise stops at this step (a control; None: the whole run)
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    check_int("n_train", cfg["n_train"], 20, 60_000)
    check_int("n_test", cfg["n_test"], 10, 10_000)
    check_int("data_seed", cfg["data_seed"], 0)
    check_int("width", cfg["width"], 1)
    check_int("warmup_epochs", cfg["warmup_epochs"], 0)
    for key in ("spectrum_sizes", "lr_sizes"):
        sizes = tuple(int(b) for b in cfg[key])
        if not sizes:
            raise ValueError(f"{key} must hold at least one batch size")
        for b in sizes:
            check_int(f"{key}[i]", b, 1, cfg["n_train"])
        cfg[key] = sizes
    for b in cfg["spectrum_sizes"]:
        check_int("spectrum_sizes[i]", b, 1, cfg["n_train"] - 1)
    check_int("draws", cfg["draws"], 1)
    check_int("lr_steps", cfg["lr_steps"], 1)
    check_int("deep_depth", cfg["deep_depth"], 1)
    check_int("deep_width", cfg["deep_width"], 1)
    check_int("deep_n_train", cfg["deep_n_train"], 10, 60_000)
    check_int("deep_steps", cfg["deep_steps"], 1)
    check_positive("deep_lr", cfg["deep_lr"])
    check_int("deep_batch", cfg["deep_batch"], 1, cfg["deep_n_train"])
    check_positive("deep_poor_std", cfg["deep_poor_std"])
    check_number("deep_extra_std", cfg["deep_extra_std"], low=0)
    if cfg["deep_noise_until"] is not None:
        check_int("deep_noise_until", cfg["deep_noise_until"], 0, cfg["deep_steps"])
    return cfg


_DATA: dict[tuple[Any, ...], data.Dataset] = {}
_MOMENTS: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def load(n_train: int, n_test: int, data_seed: int) -> data.Dataset:
    """Fashion-MNIST, class-balanced subsets, flattened and standardised; kept in memory."""
    key = (n_train, n_test, data_seed)
    if key not in _DATA:
        _DATA[key] = data.fashion_mnist(
            n_train=n_train, n_test=n_test, seed=data_seed, flatten=True
        )
    return _DATA[key]


def checkpoint(cfg: Mapping[str, Any]) -> nn.Module:
    """The tanh MLP 784 -> width -> width -> 10 (PyTorch's default initialisation, seed 0),
    trained by SGD (rate 0.1, batch 100) for ``warmup_epochs`` epochs on the ``n_train`` images:
    the point at which the Hessians and the stable rates are measured. Deterministic."""
    cfg = config(**cfg)
    ds = load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    model = models.MLP(28 * 28, [cfg["width"]] * 2, 10, activation="tanh", seed=0)
    models.torch_default_init_(model, 0)
    if cfg["warmup_epochs"]:
        from ..train import train

        train(
            model,
            ds.x_train,
            ds.y_train,
            loss="ce",
            lr=0.1,
            optimizer="sgd",
            batch_size=100,
            epochs=cfg["warmup_epochs"],
            seed=0,
            progress=False,
        )
    return model


def checkpoint_moments(cfg: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gradcourse.batchsize.gradient_moments` of the ``n_train`` images at
    :func:`checkpoint`: the per-coordinate mean gradient and per-example variance. Kept in
    memory per checkpoint (both are deterministic)."""
    cfg = config(**cfg)
    key = tuple(cfg[k] for k in ("n_train", "n_test", "data_seed", "width", "warmup_epochs"))
    if key not in _MOMENTS:
        ds = load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
        _MOMENTS[key] = bsz.gradient_moments(checkpoint(cfg), "ce", ds.x_train, ds.y_train)
    return _MOMENTS[key]


def spectrum_run(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """:func:`gradcourse.batchsize.minibatch_spectrum` at the checkpoint over
    ``spectrum_sizes``, ``draws`` batches each (drawn from ``seed``)."""
    cfg = config(**cfg)
    ds = load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    model = checkpoint(cfg)
    t0 = time.perf_counter()
    spec = bsz.minibatch_spectrum(
        model, "ce", ds.x_train, ds.y_train, cfg["spectrum_sizes"], draws=cfg["draws"], seed=seed
    )
    return {
        "batch_sizes": np.array(spec.batch_sizes),
        "lambda_full": spec.lambda_full,
        "lambda_batch": spec.lambda_batch,
        "deviation": spec.deviation,
        "noise_scale": spec.noise_scale,
        "seconds": time.perf_counter() - t0,
    }


def stable_lr_run(
    cfg: Mapping[str, Any],
    optimizer: str,
    batch_size: int,
    seed: int,
    scaled_from: int | None = None,
    betas: tuple[float, float] | None = None,
    frozen_adam: bool = False,
) -> dict[str, Any]:
    """The largest rate at which ``lr_steps`` steps of ``optimizer`` on batches of
    ``batch_size`` (drawn from ``seed``) leave the full training loss no higher than at the
    checkpoint: :func:`gradcourse.batchsize.largest_stable_lr` over [1e-3, 1e3] for SGD and
    [1e-6, 10] for Adam, 12 halvings of the log bracket (the result is below the threshold by at
    most a factor (1e6)^(1/4096) for SGD, 0.34%, and (1e7)^(1/4096) for Adam, 0.39%). With
    ``scaled_from`` = B0, Adam's betas and eps are those of the square root scaling rule from
    its defaults at batch size B0 (:func:`gradcourse.batchsize.sqrt_scaled_adam`). With ``betas``
    Adam runs with those betas (eps at its default): ``(0.0, 0.999)`` is Adam without momentum.
    With ``frozen_adam`` (``optimizer="sgd"``), SGD preconditioned by Adam's expected second
    moment at the checkpoint and batch size (:func:`gradcourse.batchsize.adam_preconditioner`),
    frozen: the optimiser of :func:`one_step_run`'s model, bisected over Adam's bracket."""
    cfg = config(**cfg)
    if scaled_from is not None and optimizer != "adam":
        raise ValueError(f"scaled_from is for optimizer 'adam', got {optimizer!r}")
    if betas is not None:
        if optimizer != "adam":
            raise ValueError(f"betas is for optimizer 'adam', got {optimizer!r}")
        if scaled_from is not None:
            raise ValueError("give scaled_from or betas, not both: scaled_from sets the betas")
        if isinstance(betas, (str, bytes)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        betas = (float(betas[0]), float(betas[1]))
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, low=0, high=1, high_open=True)
    kwargs = (
        bsz.sqrt_scaled_adam(batch_size, scaled_from)
        if scaled_from is not None
        else None
        if betas is None
        else {"betas": betas}
    )
    if frozen_adam and optimizer != "sgd":
        raise ValueError(f"frozen_adam preconditions optimizer 'sgd', got {optimizer!r}")
    ds = load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    model = checkpoint(cfg)
    precond = None
    if frozen_adam:
        mean, var = checkpoint_moments(cfg)
        precond = bsz.adam_preconditioner(mean, var, batch_size, cfg["n_train"])
    stable = bsz.loss_decreases(
        model,
        "ce",
        ds.x_train,
        ds.y_train,
        optimizer=optimizer,
        batch_size=batch_size,
        steps=cfg["lr_steps"],
        seed=seed,
        optimizer_kwargs=kwargs,
        preconditioner=precond,
    )
    low, high = (1e-3, 1e3) if optimizer == "sgd" and not frozen_adam else (1e-6, 10.0)
    t0 = time.perf_counter()
    lr = bsz.largest_stable_lr(stable, low, high, iters=12)
    return {"lr": lr, "seconds": time.perf_counter() - t0}


def one_step_run(
    cfg: Mapping[str, Any], preconditioner: str, examples: int, seed: int = 0
) -> dict[str, Any]:
    """:func:`gradcourse.batchsize.one_step_rate` at the checkpoint for the three smallest
    ``lr_sizes`` (those the exponents are fitted over): the rate at which one step of SGD
    (``"sgd"``) or of Adam's expected preconditioner (``"adam"``; ``"adam-noise"``, the
    counterfactual with every coordinate's second moment the batch's noise) leaves the training
    loss unchanged in expectation, to second order; the noise's trace over ``examples`` training
    examples drawn from ``seed``."""
    cfg = config(**cfg)
    ds = load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    model = checkpoint(cfg)
    t0 = time.perf_counter()
    res = bsz.one_step_rate(
        model,
        "ce",
        ds.x_train,
        ds.y_train,
        cfg["lr_sizes"][:3],
        preconditioner=preconditioner,
        examples=min(examples, cfg["n_train"]),
        seed=seed,
    )
    return {
        "batch_sizes": np.array(res.batch_sizes),
        "rate": res.rate,
        "signal": res.signal,
        "mean_curvature": res.mean_curvature,
        "noise_curvature": res.noise_curvature,
        "noise_share": res.noise_share,
        "examples": res.examples,
        "seconds": time.perf_counter() - t0,
    }


def deep_model(cfg: Mapping[str, Any], init: str, seed: int) -> nn.Module:
    """The deep ReLU MLP 784 -> ``deep_width`` x ``deep_depth`` -> 10 with zero biases and
    weights drawn from ``seed``: ``init="poor"``, N(0, ``deep_poor_std``^2) everywhere (below
    He's scale, so each layer shrinks the signal; Neelakantan et al.'s own "poor" initialisation
    could not be read); ``"good"``, He's N(0, 2/fan_in). With ``deep_extra_std`` = s > 0 every
    weight's standard deviation std becomes sqrt(std^2 + s^2), from the same draws: the spread the
    gradient noise's random walk gives each weight over a run
    (:meth:`gradcourse.batchsize.GradientNoise.displacement_std`), applied at the start."""
    cfg = config(**cfg)
    if init not in ("poor", "good"):
        raise ValueError(f"init must be 'poor' or 'good', got {init!r}")
    model = models.MLP(28 * 28, [cfg["deep_width"]] * cfg["deep_depth"], 10, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            std = cfg["deep_poor_std"] if init == "poor" else math.sqrt(2.0 / layer.in_features)
            if cfg["deep_extra_std"] > 0:  # (only then: sqrt(std^2) may be std off by an ulp)
                std = math.sqrt(std**2 + cfg["deep_extra_std"] ** 2)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
            layer.bias.zero_()
    return model


def deep_run(
    cfg: Mapping[str, Any], init: str, eta: float, seed: int, order: int = 0
) -> dict[str, Any]:
    """Train :func:`deep_model` by SGD with momentum 0.9 at ``deep_lr`` for ``deep_steps`` steps
    of ``deep_batch`` examples (drawn with replacement from ``seed``; ``order`` > 0 draws another
    sequence of batches for the same network and noise, a control), cross-entropy, with
    annealed gradient noise of variance ``eta`` / (1 + t)^0.55 added to each gradient
    (:class:`gradcourse.batchsize.GradientNoise`; eta = 0: none; none from step
    ``deep_noise_until`` on when it is set). Returns the test accuracy, the
    training loss every 100 steps, whether the loss became non-finite (``diverged``: the run
    stops there and its accuracy is that of the broken weights, a failure) and the seconds it
    took."""
    cfg = config(**cfg)
    check_number("eta", eta, low=0)
    check_int("order", order, 0)
    ds = load(cfg["deep_n_train"], cfg["n_test"], cfg["data_seed"])
    model = deep_model(cfg, init, seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["deep_lr"], momentum=0.9)
    noise = bsz.GradientNoise(eta, 0.55, seed=seed + 1, until=cfg["deep_noise_until"])
    gen = torch.Generator().manual_seed(seed + 2 + 7919 * order)
    losses = []
    diverged = False
    t0 = time.perf_counter()
    for t in range(cfg["deep_steps"]):
        idx = torch.randint(0, len(ds.x_train), (cfg["deep_batch"],), generator=gen)
        value = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        if not torch.isfinite(value):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        value.backward()
        noise.add_(model.parameters())
        opt.step()
        if t % 100 == 0:
            losses.append(float(value.detach()))
    with torch.no_grad():
        acc = float((model(ds.x_test).argmax(1) == ds.y_test).float().mean())
    return {
        "test_acc": acc,
        "losses": np.array(losses),
        "diverged": diverged,
        "seconds": time.perf_counter() - t0,
    }


def cached(
    cache: Cache | None, name: str, fn, *args: Any, cfg: Mapping[str, Any], **key: Any
) -> dict[str, Any]:
    """``fn(cfg, *args)`` through ``cache`` under ``name``, keyed by the configuration and
    ``key`` (which names ``args``)."""
    cfg = config(**cfg)
    if cache is None:
        return fn(cfg, *args)
    return cache.get_or_compute(name, {**cfg, **key}, lambda: fn(cfg, *args))


def stable_lr_table(
    cache: Cache | None,
    cfg: Mapping[str, Any],
    optimizer: str,
    sizes: Sequence[int],
    seeds: Sequence[int],
    **options: Any,
) -> np.ndarray:
    """:func:`stable_lr_run`'s rate for each batch size (rows) and seed (columns), each
    bisection through ``cache`` under ``"batchsize-lr"``, keyed by the configuration, the
    optimiser, the batch size, the seed and ``options`` (``scaled_from``, ``betas`` or
    ``frozen_adam``, passed on)."""
    fn = functools.partial(stable_lr_run, **options) if options else stable_lr_run
    return np.array(
        [
            [
                cached(
                    cache,
                    "batchsize-lr",
                    fn,
                    optimizer,
                    int(b),
                    int(s),
                    cfg=cfg,
                    optimizer=optimizer,
                    batch_size=int(b),
                    seed=int(s),
                    **options,
                )["lr"]
                for s in seeds
            ]
            for b in sizes
        ]
    )
