"""Notebook 02, linear stability of GD and SGD: the experiment functions (config in, results out).

Every function is deterministic given its arguments (seeded data, models and batches) and its
result is cached by :class:`gradcourse.cache.Cache` under a hash of those arguments, so the
notebook's second run and the widget's revisits are instant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import data as gdata
from .. import models, stability, train
from ..cache import Cache
from ..checks import check_positive
from ..curvature import lanczos
from ..functional import FunctionalModel, flatten
from ..models import torch_default_init_  # re-exported (notebook 02 uses sx.torch_default_init_)
from ..scores import spearman  # re-exported for the notebook (ties averaged)

__all__ = [
    "TAIL_START",
    "load_classification",
    "eos_dataset",
    "for_dataset",
    "sharpness_run",
    "converged_sharpness",
    "torch_default_init_",
    "teacher_regression",
    "relu_sweep",
    "linear_stability",
    "sparse_regression",
    "diagonal_sweep",
    "spearman",
    "over_seeds",
    "paired_log_ratios",
    "convergence_prediction",
    "relative_drops",
]


#: Where the "end of training" window starts, as a fraction of the run: the notebook averages the
#: sharpness over the last quarter, and :func:`sharpness_run` tracks that window densely.
TAIL_START = 0.75


def _cache(cache: Cache | None) -> Cache:
    return Cache() if cache is None else cache


def load_classification(
    dataset: str, n: int, device: str = "cpu", *, standardize: str = "feature"
) -> tuple[Any, str]:
    """(x, y) of ``n`` training examples and a note. ``dataset="cifar10"`` is Cohen et al.
    2021's ``cifar10-5k`` set-up: pixels / 255, flattened, each of the 3072 features centred and
    scaled to unit variance (their code standardises per feature; we do it over the subset, a
    class-balanced random one where they take the first 5,000 images). When its files are
    missing (no download here) it falls back to MNIST-1D and says so in the note.
    ``dataset="fashion_mnist"``: a class-balanced subset of Fashion-MNIST's training set,
    flattened, pixels / 255 then ``standardize`` ("feature": each pixel centred and scaled over
    the training set, Cohen et al.'s preprocessing; "none": pixels / 255, Wu, Ma & E's)."""
    if dataset == "fashion_mnist":
        ds = gdata.fashion_mnist(
            n_train=n, n_test=10, standardize=standardize, flatten=True, seed=0
        )
        note = f"Fashion-MNIST, {n} examples, standardize={standardize!r}"
        return (ds.x_train.to(device), ds.y_train.to(device)), note
    if dataset == "cifar10":
        try:
            ds = gdata.cifar10(n_train=n, n_test=100, seed=0)
            x = ds.x_train.flatten(1)
            if n > 1:  # per-feature standardisation (invariant to the per-channel one before)
                x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
            return (x.to(device), ds.y_train.to(device)), f"CIFAR-10, {n} examples"
        except gdata.DatasetUnavailable as err:
            note = f"CIFAR-10 unavailable ({str(err).splitlines()[0]}); using MNIST-1D instead"
            dataset = "mnist1d"
    else:
        note = ""
    if dataset != "mnist1d":
        raise ValueError(
            f"dataset must be 'fashion_mnist', 'mnist1d' or 'cifar10', got {dataset!r}"
        )
    pool = max(4000, 2 * n)  # the generator balances classes over train + test, not train alone
    ds = gdata.mnist1d(n_train=pool, n_test=1000).subset(n, seed=0)
    return (ds.x_train.to(device), ds.y_train.to(device)), note or f"MNIST-1D, {n} examples"


def eos_dataset(dataset: str) -> tuple[str, str]:
    """The dataset the edge-of-stability runs will actually use, and a note saying why:
    ``"cifar10"`` when its files are on disk, else ``"mnist1d"`` (the fallback of
    :func:`load_classification`; nothing is downloaded). Resolve it before choosing learning
    rates (:func:`for_dataset`): a rate sized for one dataset's sharpness can be far from
    another's 2/eta."""
    if dataset == "mnist1d":
        return "mnist1d", "MNIST-1D"
    if dataset == "fashion_mnist":
        return "fashion_mnist", "Fashion-MNIST"
    if dataset != "cifar10":
        raise ValueError(f"dataset must be 'mnist1d' or 'cifar10', got {dataset!r}")
    try:
        gdata.cifar10(n_train=1, n_test=1, seed=0)
    except gdata.DatasetUnavailable as err:
        return "mnist1d", f"CIFAR-10 unavailable ({str(err).splitlines()[0]}); using MNIST-1D"
    return "cifar10", "CIFAR-10"


def for_dataset(setting: Any, dataset: str) -> Any:
    """``setting[dataset]`` when ``setting`` is a dict keyed by dataset name (a profile whose
    learning rates depend on the data actually loaded, see :func:`eos_dataset`), else
    ``setting`` unchanged."""
    if not isinstance(setting, dict):
        return setting
    if dataset not in setting:
        raise ValueError(f"no setting for dataset {dataset!r}; have {sorted(setting)}")
    return setting[dataset]


def _mlp(in_dim: int, widths, activation: str, init: str, seed: int, device, dtype=None):
    if init not in ("lecun", "torch"):
        raise ValueError(f"init must be 'lecun' or 'torch', got {init!r}")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = models.MLP(in_dim, list(widths), 10, activation=activation, seed=seed, **kwargs)
    if init == "torch":
        torch_default_init_(model, seed)
    return model.to(device)


def sharpness_run(
    *,
    lr: float,
    optimizer: str = "gd",
    batch_size: int | None = None,
    n: int = 256,
    widths: tuple[int, ...] = (64, 64),
    steps: int = 1000,
    every: int = 25,
    every_early: int | None = None,
    dataset: str = "mnist1d",
    activation: str = "tanh",
    init: str = "lecun",
    standardize: str = "feature",
    seed: int = 0,
    device: str = "cpu",
    cache: Cache | None = None,
) -> dict[str, Any]:
    """Train an MLP (default: tanh, Cohen et al. 2021's ``fc-tanh``; ``init="torch"`` for
    PyTorch's default initialisation, :func:`torch_default_init_`) with MSE by GD or SGD, tracking
    lambda_max(H) of the full-batch loss every ``every`` steps (warm-started Lanczos,
    :class:`gradcourse.stability.SharpnessTracker`). With ``every_early`` (a multiple of
    ``every``), the first three quarters of the run are tracked only every ``every_early``
    steps and the last quarter, the window the notebook averages, every ``every`` steps: near
    the edge the warm start saves little (the top eigenvalues cluster and swap), so the cost of
    tracking is set by the number of measurements. A diverging run is kept, with
    ``diverged_at`` >= 0 (else -1). ``track_time`` is the tracker's share of ``wall_time``."""
    if every_early is not None and (
        isinstance(every_early, bool)
        or not isinstance(every_early, int)
        or every_early < every
        or every_early % every
    ):
        raise ValueError(f"every_early must be a multiple of every={every}, got {every_early!r}")
    config = dict(
        lr=float(lr),
        optimizer=optimizer,
        batch_size=batch_size,
        n=n,
        widths=list(widths),
        steps=steps,
        every=every,
        every_early=every_early,
        dataset=dataset,
        seed=seed,
    )
    if (activation, init) != ("tanh", "lecun"):  # keeps the cache keys of earlier runs
        config.update(activation=activation, init=init)
    if dataset == "fashion_mnist":
        config.update(standardize=standardize)

    def measure_at(step: int) -> bool:
        return every_early is None or step >= TAIL_START * steps or step % every_early == 0

    def compute() -> dict[str, Any]:
        (x, y), note = load_classification(dataset, n, device, standardize=standardize)
        model = _mlp(x.shape[1], widths, activation, init, seed, device)
        tracker = stability.SharpnessTracker(x, y, seed=seed, measure_at=measure_at)
        hist = train.train(
            model,
            x,
            y,
            lr=lr,
            optimizer=optimizer,
            batch_size=batch_size,
            steps=steps,
            callback=tracker,
            every=every,
            seed=seed,
            progress=False,
            raise_on_divergence=False,
        )
        rec = hist.record_arrays()
        return {
            "step": np.asarray(hist.step),
            "loss": np.asarray(hist.loss),
            "sharp_step": rec.get("step", np.zeros(0)),
            "sharpness": rec.get("sharpness", np.zeros(0)),
            "matvecs": rec.get("sharpness_matvecs", np.zeros(0)),
            "wall_time": hist.wall_time,
            "track_time": tracker.total_time,
            "diverged_at": hist.diverged.step if hist.diverged is not None else -1,
            "note": note,
        }

    return _cache(cache).get_or_compute("stability-sharpness", config, compute)


def converged_sharpness(
    *,
    lr: float,
    n: int = 1_000,
    widths: tuple[int, ...] = (500, 500, 500),
    activation: str = "relu",
    init: str = "torch",
    dataset: str = "fashion_mnist",
    standardize: str = "none",
    loss_tol: float = 1e-4,
    max_steps: int = 20_000,
    check_every: int = 50,
    seed: int = 0,
    device: str = "cpu",
    cache: Cache | None = None,
) -> dict[str, Any]:
    """Wu, Ma & E 2018's GD table: full-batch GD with MSE (0.5 ||f - onehot(y)||^2, averaged)
    from PyTorch's default initialisation until the training loss is <= ``loss_tol`` (checked
    every ``check_every`` steps) or ``max_steps``; then lambda_max(H) of the full-batch loss by
    Lanczos (relative residual 1e-6). Also the sharpness at initialisation, to show the run
    started below 2/eta. ``converged`` says whether the loss tolerance was reached."""
    config = dict(lr=float(lr), n=n, widths=list(widths), activation=activation, init=init,
                  dataset=dataset, standardize=standardize, loss_tol=float(loss_tol),
                  max_steps=max_steps, check_every=check_every, seed=seed)  # fmt: skip
    check_positive("loss_tol", loss_tol)

    def top(model, x, y) -> float:
        from ..curvature import HessianOperator

        op = HessianOperator(model, "mse", (x, y))
        return float(lanczos(op, k=1, tol=1e-6, seed=seed).eigenvalues[0])

    def compute() -> dict[str, Any]:
        (x, y), note = load_classification(dataset, n, device, standardize=standardize)
        model = _mlp(x.shape[1], widths, activation, init, seed, device)
        start = top(model, x, y)
        hist = train.train(
            model, x, y, loss="mse", lr=lr, steps=max_steps, log_every=check_every, seed=seed,
            progress=False, raise_on_divergence=False,
            stop_when=lambda h: h.loss[-1] <= loss_tol,
        )  # fmt: skip
        final_loss = float(hist.loss[-1])
        diverged = hist.diverged is not None
        return {
            "step": np.asarray(hist.step),
            "loss": np.asarray(hist.loss),
            "steps": int(hist.step[-1]),
            "final_loss": final_loss,
            "converged": bool(not diverged and final_loss <= loss_tol),
            "diverged": diverged,
            "sharpness_init": start,
            "sharpness": math.nan if diverged else top(model, x, y),
            "wall_time": hist.wall_time,
            "note": note,
        }

    return _cache(cache).get_or_compute("stability-converged", config, compute)


# ----------------------------------------------------------------------------- scalar regression


def teacher_regression(n: int, n_test: int, dim: int, *, seed: int = 0, dtype=torch.float64):
    """x ~ N(0, I_dim), y = a teacher two-layer ReLU net of width 4 (scalar output)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, dim, generator=g, dtype=dtype)
    w = torch.randn(4, dim, generator=g, dtype=dtype) / math.sqrt(dim)
    a = torch.randn(4, generator=g, dtype=dtype)
    y = (torch.relu(x @ w.T) @ a).unsqueeze(1)
    return x[:n], y[:n], x[n:], y[n:]


def _path_norm(model: torch.nn.Module) -> float:
    """sum_k |a_k| ||(w_k, b_k)|| of a two-layer ReLU net (the norm Wu & Su 2023 relate to the
    sharpness of two-layer ReLU nets)."""
    first, second = model.layers
    with torch.no_grad():
        w = torch.cat([first.weight, first.bias.unsqueeze(1)], dim=1)
        return float((second.weight.abs().squeeze(0) * w.norm(dim=1)).sum())


def _measures(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    eig = stability.gauss_newton_spectrum(model, x)
    return {
        "lambda_max": float(eig[0]),
        "trace": float(eig.sum()),
        "frobenius": float(eig.norm()),
    }


def _train_once(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    batch_size: int,
    steps: int,
    loss_tol: float,
    seed: int,
) -> tuple[float, bool, int]:
    """Train by GD (batch_size = n) or SGD until the full training loss (checked every 10
    steps) is below ``loss_tol`` / 10 or ``steps``; return (full training loss, diverged, steps
    taken). A run counts as diverged when the loss went non-finite or ended above 1000x the
    targets' mean square."""
    n = len(x)

    def full_loss() -> float:
        # the whole training set's loss: with SGD, one minibatch's loss can be tiny by chance
        return train.evaluate(model, x, y)["loss"]

    hist = train.train(
        model, x, y, lr=lr, optimizer="gd" if batch_size == n else "sgd",
        batch_size=None if batch_size == n else batch_size, steps=steps, seed=seed,
        progress=False, raise_on_divergence=False, log_every=10, sampling="fresh",
        stop_when=lambda h: full_loss() < loss_tol * 0.1,
    )  # fmt: skip
    full = train.evaluate(model, x, y)["loss"]
    diverged = hist.diverged is not None or not full < 1e3 * float(y.pow(2).mean())
    return full, diverged, hist.step[-1] if hist.step else 0


def _sweep(
    name: str,
    settings: dict[str, Any],
    data: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    make_model: Callable[[], torch.nn.Module],
    measure: Callable[..., dict[str, float]],
    columns: tuple[str, ...],
    *,
    lrs: list[float],
    batch_sizes: list[int],
    steps: int,
    loss_tol: float,
    seed: int,
    cache: Cache | None,
    progress: bool = True,
) -> dict[str, Any]:
    """The sweep that :func:`relu_sweep` and :func:`diagonal_sweep` share: on
    ``data() = (x, y, x_test, y_test)``, a fresh ``make_model()`` per run, trained by GD
    (B = n = len(x)) and then SGD at each B in ``batch_sizes``, each at every lr in ``lrs``, by
    :func:`_train_once`. A run's row has lr, batch_size, train_loss, test_loss, steps, diverged,
    converged (the training loss ended at or below ``loss_tol``, not diverged) and what
    ``measure(model, x, y, lr, batch_size, diverged)`` returns (other names); the result keeps
    ``columns`` of them, in that order, one array each. Cached under ``name`` and a config of
    the sweep's arguments and the experiment's ``settings``."""
    # version: bumped when the runs or either sweep's returned fields change (3: fresh batches;
    # 4: the exact mean-square rates; 5: the diagonal nets' exact thresholds)
    config = dict(version=5, lrs=[float(v) for v in lrs], batch_sizes=list(batch_sizes),
                  **settings, steps=steps, loss_tol=loss_tol, seed=seed)  # fmt: skip

    def compute() -> dict[str, Any]:
        from tqdm.auto import tqdm

        x, y, xt, yt = data()
        rows: dict[str, list] = {k: [] for k in columns}
        total = (1 + len(batch_sizes)) * len(lrs)
        bar = tqdm(total=total, desc=f"{name} seed {seed}", disable=not progress, leave=False)
        for b in [len(x), *batch_sizes]:
            for lr in lrs:
                bar.update()
                model = make_model()
                full, diverged, taken = _train_once(
                    model, x, y, lr=lr, batch_size=b, steps=steps, loss_tol=loss_tol, seed=seed
                )
                row = dict(
                    lr=lr,
                    batch_size=b,
                    **measure(model, x, y, lr, b, diverged),
                    train_loss=full,
                    test_loss=train.evaluate(model, xt, yt)["loss"],
                    steps=taken,
                    diverged=diverged,
                    converged=bool(not diverged and full <= loss_tol),
                )
                for k in columns:
                    rows[k].append(row[k])
        bar.close()
        return {k: np.asarray(v) for k, v in rows.items()}

    return _cache(cache).get_or_compute(name, config, compute)


def relu_sweep(
    *,
    lrs: list[float],
    batch_sizes: list[int],
    n: int = 64,
    n_test: int = 500,
    dim: int = 10,
    width: int = 32,
    steps: int = 3000,
    loss_tol: float = 1e-5,
    seed: int = 0,
    cache: Cache | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Two-layer ReLU nets (Wu & Su 2023, Section 4) on teacher regression, trained by GD
    (B = n) and SGD (each B in ``batch_sizes``) at each lr, float64, until the training loss is
    below ``loss_tol`` or ``steps``. At the end: lambda_max, trace and Frobenius norm of the
    Gauss-Newton matrix (= the Hessian at zero loss), the path norm, train and test loss, and
    ``wme_lambda``, lambda_max of the Wu-Ma-E matrix for that run's (lr, B) with Gauss-Newton
    curvature (a sufficient condition: <= 1, the endpoint is mean-square stable for it; it is
    never below 1, since H's null space gives (I - lr H)^2 an eigenvalue 1).
    ``ms_rate``: the exact mean-square rate of SGD(lr, B) at the endpoint, restricted to the span
    of the per-example gradients (:func:`gradcourse.stability.mean_square_rate`, batches drawn
    without replacement as in the runs; <= 1: stable in mean square; GD's rows: B = n).
    ``ms_rate_sgd`` (GD's rows only, NaN elsewhere): the same rate of SGD(lr, B) at GD's endpoint
    for each B in ``batch_sizes``: whether SGD could stay in GD's minimum.
    ``converged``: the training loss ended at or below ``loss_tol``."""
    columns = ("lr", "batch_size", "lambda_max", "trace", "frobenius", "path_norm", "train_loss",
               "test_loss", "steps", "diverged", "converged", "wme_lambda", "ms_rate",
               "ms_rate_sgd")  # fmt: skip
    sgd_sizes = [int(b) for b in batch_sizes]

    def measure(model, x, y, lr, batch_size, diverged) -> dict[str, Any]:
        if diverged:  # (a run that did not diverge ended at a finite loss, see _train_once)
            names = ("lambda_max", "trace", "frobenius", "path_norm", "wme_lambda", "ms_rate")
            return dict.fromkeys(names, math.nan) | {"ms_rate_sgd": [math.nan] * len(sgd_sizes)}
        wme = _wme_lambda(model, x, y, lr=lr, batch_size=batch_size)
        rate = _rates(model, x, y, lr, [batch_size, *(sgd_sizes if batch_size == n else [])])
        at_gd = rate[1:] if batch_size == n else [math.nan] * len(sgd_sizes)
        return {**_measures(model, x), "path_norm": _path_norm(model), "wme_lambda": wme,
                "ms_rate": rate[0], "ms_rate_sgd": at_gd}  # fmt: skip

    return _sweep(
        "stability-relu",
        dict(n=n, n_test=n_test, dim=dim, width=width),
        lambda: teacher_regression(n, n_test, dim, seed=seed),
        lambda: models.two_layer_relu(dim, width, seed=seed, dtype=torch.float64),
        measure,
        columns,
        lrs=lrs, batch_sizes=batch_sizes, steps=steps, loss_tol=loss_tol, seed=seed, cache=cache,
        progress=progress,
    )  # fmt: skip


def _rates(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, batch_sizes):
    """The exact mean-square rate of SGD(lr, B) at the model's parameters, for each B, with the
    Gauss-Newton per-example curvatures restricted to the span of the per-example gradients."""
    sigma = stability.SigmaOperator(model, "mse", (x, y), curvature="ggn")
    hs = stability.per_example_matrices(sigma.per_example, _gradient_basis(model, x))
    return [stability.mean_square_rate(hs, lr, int(b)) for b in batch_sizes]


def _ms_threshold(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> float:
    """The exact mean-square threshold lr of SGD(B) at the model's parameters (Gauss-Newton
    per-example curvatures in the span of the per-example gradients); nan where the curvature
    vanishes on that span (a dead or zero net)."""
    sigma = stability.SigmaOperator(model, "mse", (x, y), curvature="ggn")
    hs = stability.per_example_matrices(sigma.per_example, _gradient_basis(model, x))
    try:
        return stability.mean_square_threshold(hs, int(batch_size))
    except ValueError:
        return math.nan


def _wme_lambda(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, batch_size: int
) -> float:
    """lambda_max of the Wu-Ma-E matrix (I - lr G)^2 + lr^2 c_B Sigma at the model's parameters,
    with the Gauss-Newton per-example curvatures (PSD, as the analysis assumes)."""
    n = len(x)
    sigma = stability.SigmaOperator(model, "mse", (x, y), curvature="ggn")
    check = stability.wu_ma_e_stable(
        sigma.mean, sigma if batch_size < n else None, lr, batch_size, n, lanczos_tol=1e-8
    )
    return check.lambda_max


def _gradient_basis(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (P, r) of the span of the per-example gradients of a scalar-output
    model: where every Gauss-Newton H_i = g_i g_i^T acts (QR of the Jacobian's transpose; columns
    whose R diagonal falls below 1e-10 of the largest are dropped)."""
    from torch.func import jacrev

    fm = FunctionalModel(model, copy=False)
    jac = jacrev(lambda p: fm.outputs(p, x).reshape(len(x)))(fm.params)
    rows = flatten(jac, batch_dims=1).double()
    q, r = torch.linalg.qr(rows.T)
    diag = r.diagonal().abs()
    return q[:, diag > 1e-10 * diag.max()]


def linear_stability(
    *,
    batch_size: int,
    factors: list[float],
    n: int = 32,
    dim: int = 5,
    width: int = 16,
    train_lr: float = 0.05,
    train_steps: int = 4000,
    sim_steps: int = 60,
    num_runs: int = 64,
    seed: int = 0,
    cache: Cache | None = None,
) -> dict[str, Any]:
    """At a minimum found by GD (a float64 two-layer ReLU net interpolating teacher data), with
    Gauss-Newton per-example curvatures H_i = g_i g_i^T restricted to the span of the g_i
    (:func:`gradcourse.stability.per_example_matrices`):

    - three learning rates: Wu-Ma-E's lr* (lambda_max(A) = 1, :func:`critical_learning_rate`),
      the exact mean-square threshold (:func:`mean_square_threshold`) and GD's 2 / lambda_max;
    - at lr = factor * lr*, for each factor: lambda_max(A), the exact mean-square rate
      (:func:`mean_square_rate`), E||x_t||^2 / ||x_0||^2 from the top eigenvector of H by the
      exact recursion (:func:`sgd_second_moment`), and ``num_runs`` sampled runs
      (:func:`sgd_run_norms`): their mean and their median (the typical run);
    - the per-example matrices ``hessians`` (n, r, r) in that span and the ``start`` (r,) of the
      recursion (the top eigenvector of H), for the notebook's exercises."""
    config = dict(
        version=3,
        batch_size=batch_size,
        factors=[float(f) for f in factors],
        n=n,
        dim=dim,
        width=width,
        train_lr=train_lr,
        train_steps=train_steps,
        sim_steps=sim_steps,
        num_runs=num_runs,
        seed=seed,
    )

    def compute() -> dict[str, Any]:
        x, y, _, _ = teacher_regression(n, 1, dim, seed=seed)
        model = models.two_layer_relu(dim, width, seed=seed, dtype=torch.float64)
        train.train(model, x, y, lr=train_lr, steps=train_steps, progress=False, log_every=50)
        final_loss = train.evaluate(model, x, y)["loss"]
        sigma = stability.SigmaOperator(model, "mse", (x, y), curvature="ggn")
        h = sigma.mean
        top = lanczos(h, k=1, seed=seed)
        lam_h = float(top.eigenvalues[0])
        lr_star = stability.critical_learning_rate(h, sigma, batch_size, n, seed=seed)
        basis = _gradient_basis(model, x)
        hs = stability.per_example_matrices(sigma.per_example, basis)
        lr_ms = stability.mean_square_threshold(hs, batch_size)
        start = basis.T @ top.eigenvectors[:, 0].double().cpu()
        lams, rates, exact, mean, median = [], [], [], [], []
        for f in factors:
            lr = f * lr_star
            lams.append(stability.wu_ma_e_stable(h, sigma, lr, batch_size, n, seed=seed).lambda_max)
            rates.append(stability.mean_square_rate(hs, lr, batch_size))
            exact.append(
                stability.sgd_second_moment(
                    hs, lr, batch_size, sim_steps, s0=torch.outer(start, start)
                ).numpy()
            )
            runs = stability.sgd_run_norms(
                hs, lr, batch_size, sim_steps, x0=start, num_runs=num_runs, seed=seed
            )
            mean.append(runs.mean(0).numpy())
            median.append(runs.median(0).values.numpy())
        return {
            "final_loss": final_loss,
            "lambda_max_h": lam_h,
            "rank": int(basis.shape[1]),
            "lr_star": lr_star,
            "lr_ms": lr_ms,
            "lr_gd": 2.0 / lam_h,
            "factors": np.asarray(factors),
            "lambda_max_a": np.asarray(lams),
            "rate": np.asarray(rates),
            "exact": np.stack(exact),
            "mc_mean": np.stack(mean),
            "mc_median": np.stack(median),
            "hessians": hs.numpy(),
            "start": start.numpy(),
        }

    return _cache(cache).get_or_compute("stability-linear", config, compute)


# ----------------------------------------------------------------------------- diagonal linear


def sparse_regression(
    n: int, n_test: int, dim: int, sparsity: int, *, seed: int = 0, signed: bool = False
):
    """x ~ N(0, I_dim), y = <beta*, x>, noiseless, with beta* = 1 on ``sparsity`` coordinates,
    or, with ``signed``, +1 or -1 (a fair coin each) there: a teacher that a model with
    u * v >= 0 (u = v) could not represent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, dim, generator=g, dtype=torch.float64)
    beta = torch.zeros(dim, dtype=torch.float64)
    support = torch.randperm(dim, generator=g)[:sparsity]
    beta[support] = 1.0
    if signed:
        beta[support] = torch.where(torch.rand(sparsity, generator=g) < 0.5, -1.0, 1.0).double()
    y = (x @ beta).unsqueeze(1)
    return x[:n], y[:n], x[n:], y[n:]


def diagonal_sweep(
    *,
    lrs: list[float],
    batch_sizes: list[int],
    n: int = 20,
    n_test: int = 500,
    dim: int = 40,
    sparsity: int = 3,
    init_scale: float = 1.0,
    init: str = "constant",
    signed: bool = False,
    steps: int = 5000,
    loss_tol: float = 1e-6,
    seed: int = 0,
    cache: Cache | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Diagonal linear nets f(x) = <u * v, x> (Wu & Su 2023, Section 5) on sparse regression
    (n < dim), trained by GD and SGD at each lr; at the end: the trace of the Gauss-Newton matrix,
    tr(G) = 1/n sum_i sum_j (u_j^2 + v_j^2) x_ij^2, the weighted l1 norm
    2 sum_j m_j |u_j v_j| (m_j = 1/n sum_i x_ij^2) that it bounds (AM-GM, equality when |u| = |v|),
    ||beta||_1 and the test error. ``converged``: the training loss ended at or below
    ``loss_tol``. ``ms_threshold``: the exact mean-square threshold lr of SGD at the run's batch
    size at its endpoint (:func:`gradcourse.stability.mean_square_threshold`, Gauss-Newton
    curvatures in the span of the gradients); over the run's lr it says how far the run sits from
    the edge of mean-square stability (1: at the edge). ``init="random"`` draws u and v independently (u != v, so beta = u * v has
    both signs and the trace only bounds the weighted l1 norm); ``signed`` gives the teacher
    both signs (:func:`sparse_regression`)."""
    columns = ("lr", "batch_size", "trace", "weighted_l1", "l1", "train_loss", "test_loss",
               "diverged", "converged", "ms_threshold")  # fmt: skip

    def measure(model, x, y, lr, batch_size, diverged) -> dict[str, float]:
        out = _diagonal_measures(model, x)
        out["ms_threshold"] = math.nan if diverged else _ms_threshold(model, x, y, batch_size)
        return out

    return _sweep(
        "stability-diagonal",
        dict(n=n, n_test=n_test, dim=dim, sparsity=sparsity, init_scale=init_scale, init=init,
             signed=signed),
        lambda: sparse_regression(n, n_test, dim, sparsity, seed=seed, signed=signed),
        lambda: models.DiagonalLinear(
            dim, init_scale=init_scale, init=init, seed=seed, dtype=torch.float64
        ),
        measure,
        columns,
        lrs=lrs, batch_sizes=batch_sizes, steps=steps, loss_tol=loss_tol, seed=seed, cache=cache,
        progress=progress,
    )  # fmt: skip


def _diagonal_measures(model: models.DiagonalLinear, x: torch.Tensor) -> dict[str, float]:
    """tr(G) = 1/n sum_i sum_j (u_j^2 + v_j^2) x_ij^2, the weighted l1 norm
    2 sum_j m_j |u_j v_j| (m_j = 1/n sum_i x_ij^2) and ||u * v||_1 of a diagonal linear net."""
    u, v = model.u.detach(), model.v.detach()
    m = x.pow(2).mean(0)
    return {
        "trace": float((m * (u**2 + v**2)).sum()),
        "weighted_l1": float(2 * (m * (u * v).abs()).sum()),
        "l1": float((u * v).abs().sum()),
    }


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------ over seeds


def over_seeds(sweep: Callable[..., dict[str, Any]], seeds, **kwargs) -> dict[str, np.ndarray]:
    """``sweep(seed=s, **kwargs)`` (:func:`relu_sweep` or :func:`diagonal_sweep`) for each seed,
    the rows of all of them in one table with a ``seed`` column (each seed draws its own data and
    initialisation; every run of one seed shares them, so GD and SGD are paired within a seed)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    parts = [sweep(seed=s, **kwargs) for s in seeds]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["seed"] = np.concatenate(
        [np.full(len(p["lr"]), s) for s, p in zip(seeds, parts, strict=True)]
    )
    return out


def _gd_rows(table: dict[str, np.ndarray], n: int) -> dict[tuple[int, float], int]:
    """(seed, lr) -> the row of GD's run (B = n) in ``table``."""
    return {
        (int(table["seed"][i]), float(table["lr"][i])): i
        for i in range(len(table["lr"]))
        if table["batch_size"][i] == n
    }


def paired_log_ratios(
    table: dict[str, np.ndarray], key: str, batch_sizes, n: int
) -> dict[str, np.ndarray]:
    """log(SGD's ``key`` / GD's ``key``) at the same seed and lr, for the SGD runs with B in
    ``batch_sizes`` that converged where GD converged too (the pairs Wu, Ma & E's comparison is
    about: both ended at a minimum). Returns ``log_ratio`` and the pair's ``lr``, ``batch_size``
    and ``seed``."""
    gd = _gd_rows(table, n)
    keep = {int(b) for b in batch_sizes}
    rows = {"log_ratio": [], "lr": [], "batch_size": [], "seed": []}
    for i in range(len(table["lr"])):
        b, s, lr = int(table["batch_size"][i]), int(table["seed"][i]), float(table["lr"][i])
        j = gd.get((s, lr))
        if b not in keep or j is None or not (table["converged"][i] and table["converged"][j]):
            continue
        rows["log_ratio"].append(math.log(table[key][i] / table[key][j]))
        rows["lr"].append(lr)
        rows["batch_size"].append(b)
        rows["seed"].append(s)
    return {k: np.asarray(v) for k, v in rows.items()}


def convergence_prediction(table: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Which (seed, lr, B < n) SGD can converge at, predicted from GD's minimum at the same seed
    and lr, against what SGD did.

    ``predicted``: GD's endpoint meets SGD's trace bound, tr H <= 2 / (lr c_B)
    (:func:`gradcourse.stability.trace_bound`): a minimum SGD could stay in; ``slack`` is that
    bound over GD's trace. ``observed``: SGD's run converged. Settings where GD itself did not
    converge are left out (no minimum to judge)."""
    gd = _gd_rows(table, n)
    rows = {k: [] for k in ("lr", "batch_size", "seed", "predicted", "observed", "slack")}
    for i in range(len(table["lr"])):
        b, s, lr = int(table["batch_size"][i]), int(table["seed"][i]), float(table["lr"][i])
        j = gd.get((s, lr))
        if b == n or j is None or not table["converged"][j]:
            continue
        bound = stability.trace_bound(lr, b, n)
        rows["lr"].append(lr)
        rows["batch_size"].append(b)
        rows["seed"].append(s)
        rows["predicted"].append(bool(table["trace"][j] <= bound))
        rows["observed"].append(bool(table["converged"][i]))
        rows["slack"].append(float(bound / table["trace"][j]))
    return {k: np.asarray(v) for k, v in rows.items()}


def relative_drops(
    table: dict[str, np.ndarray], key: str, batch_size: int
) -> dict[str, np.ndarray]:
    """Per seed, for the converged runs at ``batch_size``: 1 - key(largest lr) / key(smallest
    lr), the relative fall of ``key`` across the learning rates (positive: a larger lr ends
    lower), and Spearman's correlation of lr with ``key`` (``nan`` with fewer than 3 runs)."""
    seeds = sorted({int(s) for s in table["seed"]})
    drop, rho, runs = [], [], []
    for s in seeds:
        sel = (table["seed"] == s) & (table["batch_size"] == batch_size) & table["converged"]
        lrs, vals = table["lr"][sel], table[key][sel]
        runs.append(int(sel.sum()))
        if sel.sum() < 2:
            drop.append(math.nan)
            rho.append(math.nan)
            continue
        order = np.argsort(lrs)
        drop.append(float(1 - vals[order[-1]] / vals[order[0]]))
        rho.append(spearman(lrs, vals) if sel.sum() >= 3 else math.nan)
    return {"seed": np.asarray(seeds), "drop": np.asarray(drop), "spearman": np.asarray(rho),
            "runs": np.asarray(runs)}  # fmt: skip
