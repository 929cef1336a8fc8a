"""Small training loops: full-batch GD and minibatch SGD, with (Nesterov) momentum.

One update is torch.optim.SGD's (dampening 0), with g_t the gradient of the minibatch loss
(the conventions of :mod:`gradcourse.losses`, e.g. C = 1/n sum_i 1/2 ||f(x_i) - y_i||^2):

    v_{t+1} = mu v_t + g_t + lambda w_t,       v_0 = 0   (heavy ball, Polyak 1964)
    w_{t+1} = w_t - lr v_{t+1}                            (nesterov: w_t - lr (g_t + mu v_{t+1}))

With mu = lambda = 0 and the full batch this is plain GD, w_{t+1} = w_t - lr grad C(w_t), the
iteration whose stability Cohen et al. (2021) and Wu et al. (2018) study. Steps count updates:
"step t" means the parameters after t updates, so a run of T steps reports steps 0..T. The loss
is checked for finiteness at every step; a non-finite loss raises :class:`Diverged`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from .checks import check_int, check_nonnegative, check_number, check_positive
from .functional import model_device_dtype, module_mode, place_batch
from .losses import LossFn, get_loss, targets_for

OPTIMIZERS: tuple[str, ...] = ("gd", "sgd")
# lr multipliers over a run of T updates; "step" is Paul et al.'s (2021) CIFAR-10 schedule
# (x 0.2 at epochs 60, 120 and 160 of 200), placed at the same fractions of the run
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")
STEP_MILESTONES: tuple[float, ...] = (0.3, 0.6, 0.8)
STEP_FACTOR = 0.2


def lr_factor(schedule: str, t: int, total: int) -> float:
    """The learning-rate multiplier of update ``t`` (0-based) of ``total`` under ``schedule``:
    ``"constant"`` 1; ``"step"`` 0.2^m, m = the number of :data:`STEP_MILESTONES` fractions of the
    run that t / total has reached; ``"cosine"`` (1 + cos(pi t / total)) / 2."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_int("total", total, 1)
    check_int("t", t, 0, total)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return STEP_FACTOR ** sum(t >= m * total for m in STEP_MILESTONES)
    return 0.5 * (1.0 + math.cos(math.pi * t / total))


class Diverged(RuntimeError):
    """Training produced a non-finite loss (the step size is above the stability threshold)."""

    def __init__(self, step: int, lr: float, loss: float) -> None:
        self.step, self.lr, self.loss = int(step), float(lr), float(loss)
        super().__init__(f"training diverged at step {self.step} (lr={self.lr:g}): loss is {loss}")

    def __reduce__(self):  # keep it picklable (the message is rebuilt from the fields)
        return (type(self), (self.step, self.lr, self.loss))


@dataclass
class History:
    """What a run recorded.

    ``step[i]``, ``loss[i]`` (and ``accuracy[i]`` for integer labels and a multi-output model):
    the loss of the batch used at that step, at the parameters before its update; for GD the
    training loss at w_step. ``records``: the callback's dicts, each with its ``"step"``.
    ``diverged``: the :class:`Diverged` error when ``raise_on_divergence=False`` stopped the run
    (its non-finite loss is not appended to ``loss``). ``wall_time``: seconds.
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    diverged: Diverged | None = None
    wall_time: float = 0.0

    def __len__(self) -> int:
        return len(self.step)

    @property
    def final_loss(self) -> float:
        """The last logged loss (nan before anything was logged)."""
        return self.loss[-1] if self.loss else math.nan

    def as_arrays(self) -> dict[str, np.ndarray]:
        """``step``, ``loss`` (and ``accuracy`` when recorded) as NumPy arrays."""
        out = {"step": np.asarray(self.step, dtype=np.int64), "loss": np.asarray(self.loss)}
        if self.accuracy:
            out["accuracy"] = np.asarray(self.accuracy)
        return out

    def record_arrays(self) -> dict[str, np.ndarray]:
        """The callback records as one array per key (nan where a record lacks the key)."""
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        return {k: np.asarray([r.get(k, math.nan) for r in self.records]) for k in keys}


# ----------------------------------------------------------------------------- helpers


def _prepare(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """x, y on the model's device; floating tensors in the model's dtype."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of examples, got {len(x)}, {len(y)}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one example")
    return place_batch(x, y, *model_device_dtype(model))


def _loss_and_accuracy(
    model: nn.Module, loss: str | LossFn, xb: Tensor, yb: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Mean loss of the batch and, for integer labels and several outputs, its accuracy."""
    out = model(xb)
    num_outputs = out.shape[1] if out.dim() > 1 else 1
    value = get_loss(loss)(out, targets_for(loss, yb, num_outputs, out.dtype))
    acc = None
    if not yb.dtype.is_floating_point and num_outputs > 1 and yb.dim() == 1:
        acc = (out.argmax(dim=1) == yb).to(out.dtype).mean()
    return value, acc


SAMPLINGS: tuple[str, ...] = ("epoch", "fresh")


def minibatches(
    n: int, batch_size: int, *, seed: int = 0, sampling: str = "epoch"
) -> Iterator[Tensor]:
    """Endless minibatch indices from ``torch.Generator().manual_seed(seed)``.

    ``sampling="epoch"``: each epoch a fresh permutation of range(n) cut into batches of
    ``batch_size`` (the last one smaller when batch_size does not divide n), the usual
    reshuffling loader. ``sampling="fresh"``: every batch drawn anew, ``batch_size`` distinct
    examples uniformly at random, independently of the previous batches: the sampling that
    Wu, Ma & E's (2018) stability analysis assumes."""
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1, n)
    check_int("seed", seed, 0)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    g = torch.Generator().manual_seed(seed)
    if sampling == "fresh":
        while True:
            yield torch.randperm(n, generator=g)[:batch_size]
    while True:
        yield from torch.randperm(n, generator=g).split(batch_size)


# ----------------------------------------------------------------------------- train


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | LossFn = "mse",
    lr: float,
    optimizer: str = "gd",
    batch_size: int | None = None,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    steps: int | None = None,
    epochs: int | None = None,
    callback: Callable[[int, nn.Module], dict[str, Any] | None] | None = None,
    every: int = 1,
    log_every: int = 1,
    seed: int = 0,
    progress: bool = True,
    stop_when: Callable[[History], bool] | None = None,
    raise_on_divergence: bool = True,
    sampling: str = "epoch",
    schedule: str = "constant",
    grad_noise: float = 0.0,
    grad_noise_gamma: float = 0.55,
    device: str | torch.device | None = None,
) -> History:
    """Train ``model`` in place on (x, y) with GD or SGD (see the module docstring for the update).

    - ``optimizer="gd"`` is full batch; ``"sgd"`` samples batches of ``batch_size`` without
      replacement, reshuffling every epoch, or with ``sampling="fresh"`` drawing every batch
      anew (:func:`minibatches` with ``seed``).
    - Exactly one of ``steps`` (updates) and ``epochs`` (passes over the data) is given.
    - ``callback(step, model)`` runs at steps 0, every, 2*every, ... and at the last step, before
      that step's forward pass and update (so it sees the model, BatchNorm statistics included,
      as of that step; on an overflowing model it must cope with inf/NaN, as
      :class:`gradcourse.stability.SharpnessTracker` does); a returned dict is stored in
      ``history.records`` with its step.
    - ``stop_when(history)`` is asked after each logged step; True ends the run there.
    - ``schedule``: update t uses ``lr * lr_factor(schedule, t, T)`` over the run's T updates
      (:func:`lr_factor`; ``"step"`` is Paul et al.'s step decay, ``"cosine"`` a cosine decay).
    - ``grad_noise`` = eta > 0 adds annealed Gaussian noise to every gradient before the step,
      of variance eta / (1 + t)^``grad_noise_gamma`` at update t (Neelakantan et al. 2015;
      :class:`gradcourse.batchsize.GradientNoise`, seeded from ``seed``); 0 (the default) adds
      none.
    - ``loss="mse"`` on integer labels trains on one-hot targets (:func:`losses.targets_for`).
    - ``device``: move the model there first (default: where the model is); x and y follow the
      model. The model is in train mode during the run, then its previous modes are restored.
    """
    lr = check_positive("lr", lr)
    momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    n = len(x)
    if n < 1:
        raise ValueError("x must hold at least one example, got 0")
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, n)
        if optimizer == "gd" and batch_size != n:
            raise ValueError(
                f"optimizer='gd' is full batch: batch_size must be None or n={n}, "
                f"got {batch_size} (use optimizer='sgd' for minibatches)"
            )
    batch_size = n if batch_size is None else batch_size
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs (a positive int)")
    steps_per_epoch = math.ceil(n / batch_size)
    if steps is None:
        total = check_int("epochs", epochs, 1) * steps_per_epoch
    else:
        total = check_int("steps", steps, 1)
    check_int("every", every, 1)
    check_int("log_every", log_every, 1)
    check_int("seed", seed, 0)
    get_loss(loss)  # validates the name
    lr_factor(schedule, 0, total)  # validates the name
    check_nonnegative("grad_noise", grad_noise)
    check_nonnegative("grad_noise_gamma", grad_noise_gamma)
    noise = None
    if grad_noise > 0:
        from .batchsize import GradientNoise

        noise = GradientNoise(grad_noise, grad_noise_gamma, seed=seed)

    if device is not None:
        model.to(device)
    x, y = _prepare(model, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    batches = minibatches(n, batch_size, seed=seed, sampling=sampling) if batch_size < n else None

    history = History()
    start = time.perf_counter()
    bar = tqdm(total=total, desc="train", disable=not progress, leave=False)
    try:
        with module_mode(model, True):
            for t in range(total + 1):
                last = t == total
                # before the step's forward pass, which moves BatchNorm's running statistics
                if callback is not None and (t % every == 0 or last):
                    _store(history, t, callback(t, model))
                if batches is None:
                    xb, yb = x, y
                else:
                    idx = next(batches).to(x.device)
                    xb, yb = x[idx], y[idx]
                with torch.set_grad_enabled(not last):
                    value, acc = _loss_and_accuracy(model, loss, xb, yb)
                loss_t = float(value.detach())
                if not math.isfinite(loss_t):
                    error = Diverged(t, lr, loss_t)
                    if raise_on_divergence:
                        raise error
                    history.diverged = error
                    break
                stop = False
                if t % log_every == 0 or last:
                    history.step.append(t)
                    history.loss.append(loss_t)
                    if acc is not None:
                        history.accuracy.append(float(acc))
                    bar.set_postfix(loss=f"{loss_t:.4g}", refresh=False)
                    stop = stop_when is not None and bool(stop_when(history))
                if last:
                    break
                if stop:
                    if callback is not None and t % every != 0:
                        _store(history, t, callback(t, model))
                    break
                opt.zero_grad(set_to_none=True)
                value.backward()
                if noise is not None:
                    noise.add_(params)
                if schedule != "constant":
                    for group in opt.param_groups:
                        group["lr"] = lr * lr_factor(schedule, t, total)
                opt.step()
                bar.update(1)
    finally:
        bar.close()
        history.wall_time = time.perf_counter() - start
    return history


def _store(history: History, step: int, result: object) -> None:
    if result is None:
        return
    if not isinstance(result, dict):
        raise TypeError(f"callback must return a dict or None, got {type(result).__name__}")
    history.records.append({"step": step, **result})


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | LossFn = "mse",
    batch_size: int | None = None,
) -> dict[str, float | None]:
    """Loss and accuracy on (x, y) in eval mode under no_grad (the model's modes are restored).

    Batch losses are averaged weighted by batch size, which is exact for losses that are means
    over examples (both of :mod:`gradcourse.losses`). ``accuracy`` is None unless the labels are
    integers and the model has several outputs.
    """
    x, y = _prepare(model, x, y)
    n = len(x)
    batch_size = n if batch_size is None else check_int("batch_size", batch_size, 1, n)
    total_loss, total_correct, has_acc = 0.0, 0.0, False
    with module_mode(model, False), torch.no_grad():
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            value, acc = _loss_and_accuracy(model, loss, xb, yb)
            total_loss += float(value) * len(xb)
            if acc is not None:
                has_acc = True
                total_correct += float(acc) * len(xb)
    return {"loss": total_loss / n, "accuracy": total_correct / n if has_acc else None}


def grad_norm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | LossFn = "mse",
    batch_size: int | None = None,
) -> float:
    """||grad C(w)||_2 of the full-batch loss (e.g. Sagun et al. 2017 stop at <= 1e-4).

    Uses the model's current mode and leaves ``.grad`` untouched; with ``batch_size`` the
    gradient is accumulated over chunks, weighted by chunk size (exact for mean losses).
    """
    x, y = _prepare(model, x, y)
    n = len(x)
    batch_size = n if batch_size is None else check_int("batch_size", batch_size, 1, n)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        value, _ = _loss_and_accuracy(model, loss, xb, yb)
        grads = torch.autograd.grad(value, params, allow_unused=True)
        for acc, g in zip(total, grads, strict=True):
            if g is not None:
                acc.add_(g, alpha=len(xb) / n)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in total)))
