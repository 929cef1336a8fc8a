"""Notebook 01, the Hessian's bulk and outliers (Sagun et al. 2017, arXiv 1706.04454).

The experiment functions of the notebook: configuration in, a dict of tensors and numbers out
(so :class:`gradcourse.cache.Cache` can store them). The algorithms they call live in
:mod:`gradcourse.curvature` (exact Hessian, GGN / residual operators, Lanczos, stochastic
Lanczos quadrature) and :mod:`gradcourse.train`; this module adds what is specific to the paper:

- :func:`count_outliers`  the outlier-counting rule (largest multiplicative gap at the top);
- :func:`near_zero_fraction`  the size of the bulk (eigenvalues small relative to the top one);
- :func:`blob_spectrum`  train a small ReLU net on K Gaussian blobs and take its full spectrum;
- :func:`interpolate`, :func:`barrier`, :func:`batch_size_experiment`  small- vs large-batch
  solutions on one straight line (Sagun et al. 2017, section 4);
- :func:`slq_experiment`  the spectral density of a larger net, checked against exact moments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import curvature, data, models, train
from ..cache import Cache
from ..checks import check_int, check_positive

DTYPE = torch.float64


# ----------------------------------------------------------------------------- checks


# ----------------------------------------------------------------------------- spectrum statistics


def count_outliers(eigenvalues: Tensor | Sequence[float], max_outliers: int = 20) -> int:
    """The number of outliers: the position of the largest multiplicative gap at the top.

    Sort the positive eigenvalues in decreasing order, lambda_1 >= lambda_2 >= ...; among the
    ratios lambda_i / lambda_{i+1} for i = 1 .. ``max_outliers`` return the i of the largest
    one (ties: the smallest i). The rule is scale-free (it does not change when the loss is
    rescaled) and needs no bulk model; it is the rule used for claim 2 of notebook 01, fixed
    before the measurements. Eigenvalues below 1e-12 lambda_1 are treated as zero and end
    the search (a ratio to zero is not a gap between outliers and a bulk).
    """
    check_int("max_outliers", max_outliers, 1)
    eig = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    if eig.numel() < 2:
        raise ValueError(f"eigenvalues must hold at least 2 values, got {eig.numel()}")
    if not bool(torch.isfinite(eig).all()):
        raise ValueError("eigenvalues must be finite")
    top = eig.sort(descending=True).values
    if top[0] <= 0:
        raise ValueError(f"eigenvalues must include a positive one, largest is {float(top[0]):g}")
    top = top[top > 1e-12 * top[0]]
    if top.numel() < 2:
        return 1
    window = min(max_outliers, top.numel() - 1)
    ratios = top[:window] / top[1 : window + 1]
    return int(torch.argmax(ratios)) + 1


def near_zero_fraction(eigenvalues: Tensor | Sequence[float], rel: float = 0.01) -> float:
    """Fraction of eigenvalues with |lambda| <= ``rel`` * max |lambda| (the size of the bulk)."""
    rel = check_positive("rel", rel)
    eig = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    if eig.numel() == 0:
        raise ValueError("eigenvalues must not be empty")
    scale = float(eig.abs().max())
    return float((eig.abs() <= rel * scale).double().mean())


# ----------------------------------------------------------------------------- blobs + MLP


def blobs(
    num_classes: int,
    *,
    n_train: int = 100,
    dim: int = 2,
    spread: float = 1.0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """K standardised Gaussian blobs in float64 (gc.data.gaussian_mixture): (x, y)."""
    check_int("num_classes", num_classes, 2)
    check_positive("spread", spread)
    ds = data.gaussian_mixture(
        n_train, 0, num_classes=num_classes, dim=dim, spread=spread, seed=seed, dtype=DTYPE
    )
    return ds.x_train.to(device), ds.y_train.to(device)


def train_to_flat(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    max_steps: int,
    grad_tol: float = 1e-4,
    check_every: int = 50,
    optimizer: str = "gd",
    batch_size: int | None = None,
    seed: int = 0,
) -> train.History:
    """Train with cross-entropy until ||grad L|| <= ``grad_tol`` (Sagun et al.'s rule, checked
    every ``check_every`` steps on the full batch) or ``max_steps`` updates."""
    check_positive("grad_tol", grad_tol)

    def flat_enough(history: train.History) -> bool:
        return train.grad_norm(model, x, y, loss="ce") <= grad_tol

    return train.train(
        model,
        x,
        y,
        loss="ce",
        lr=lr,
        steps=max_steps,
        optimizer=optimizer,
        batch_size=batch_size,
        seed=seed,
        log_every=check_every,
        stop_when=flat_enough,
        progress=False,
    )


def blob_spectrum(
    num_classes: int = 2,
    *,
    widths: Sequence[int] = (10, 5),
    spread: float = 1.0,
    n_train: int = 100,
    dim: int = 2,
    lr: float = 0.1,
    max_steps: int = 2_000,
    grad_tol: float = 1e-4,
    decompose: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The full Hessian spectrum of a ReLU MLP on K blobs, at initialisation and after GD.

    Sagun et al. 2017, section 3: softmax cross-entropy, full-batch GD (lr 0.1) until the
    gradient norm is <= 1e-4 or ``max_steps``; the exact Hessian (float64,
    :func:`gradcourse.curvature.exact_hessian`) and ``torch.linalg.eigvalsh``. With
    ``decompose`` also the spectra of the Gauss-Newton part G and the residual R = H - G at
    the end (Papyan 2020, eq. 3). Eigenvalues are ascending, on the CPU.
    """
    check_int("num_classes", num_classes, 2)
    widths = tuple(widths)
    for i, w in enumerate(widths):
        check_int(f"widths[{i}]", w, 1)
    check_int("max_steps", max_steps, 1)
    x, y = blobs(num_classes, n_train=n_train, dim=dim, spread=spread, seed=seed, device=device)
    model = models.MLP(dim, widths, num_classes, seed=seed, dtype=DTYPE, device=x.device)

    def eigvals(matrix: Tensor) -> Tensor:
        return torch.linalg.eigvalsh(matrix).cpu()

    batch = (x, y)
    init = eigvals(curvature.exact_hessian(model, "ce", batch))
    history = train_to_flat(model, x, y, lr=lr, max_steps=max_steps, grad_tol=grad_tol)
    final = eigvals(curvature.exact_hessian(model, "ce", batch))
    out: dict[str, Any] = {
        "eig_init": init,
        "eig_final": final,
        "num_params": int(final.numel()),
        "steps": int(history.step[-1]),
        "loss_steps": torch.tensor(history.step),
        "loss": torch.tensor(history.loss, dtype=DTYPE),
        "final_loss": float(history.loss[-1]),
        "accuracy": float(history.accuracy[-1]),
        "grad_norm": train.grad_norm(model, x, y, loss="ce"),
    }
    if decompose:
        out["eig_ggn"] = eigvals(curvature.GGNOperator(model, "ce", batch).dense())
        out["eig_residual"] = eigvals(curvature.ResidualOperator(model, "ce", batch).dense())
    return out


def cached(cache: Cache | None, name: str, fn: Any, **config: Any) -> dict[str, Any]:
    """``fn(**config)`` through ``cache`` (None: no cache); the device is not part of the key."""
    if cache is None:
        return fn(**config)
    key = {k: v for k, v in config.items() if k != "device"}
    return cache.get_or_compute(name, key, lambda: fn(**config))


def explore_spectrum(
    num_classes: int,
    width: int,
    spread: float,
    steps: int,
    *,
    dim: int = 10,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The spectrum for the notebook's sliders: K blobs in ``dim`` dimensions (200 points),
    two hidden layers of ``width``, GD with lr 0.1 for at most ``steps``; validated with
    messages a reader can act on, and cached per slider setting."""
    check_int("num_classes (K)", num_classes, 2, 20)
    check_int("width", width, 1, 32)
    check_positive("spread", spread)
    check_int("steps", steps, 1, 5_000)
    check_int("dim", dim, 1, 64)
    config = dict(
        num_classes=num_classes,
        widths=(width, width),
        spread=spread,
        max_steps=steps,
        dim=dim,
        n_train=200,
    )
    return cached(cache, "hessian-explore", blob_spectrum, device=device, **config)


# ----------------------------------------------------------------------------- small vs large batch


def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _as_dict(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def interpolate(
    model: nn.Module,
    theta_a: Tensor,
    theta_b: Tensor,
    x: Tensor,
    y: Tensor,
    alphas: Tensor | Sequence[float],
) -> Tensor:
    """Training loss (cross-entropy) at theta(alpha) = (1 - alpha) theta_a + alpha theta_b
    for each alpha (Sagun et al. 2017, fig. 6; Goodfellow et al. 2015); flat parameter
    vectors in ``model.named_parameters()`` order. Returns float64 on the CPU."""
    if theta_a.shape != theta_b.shape:
        raise ValueError(f"theta_a and theta_b differ in shape: {theta_a.shape}, {theta_b.shape}")
    size = sum(p.numel() for p in model.parameters())
    if theta_a.numel() != size:
        raise ValueError(f"theta_a must have {size} entries (the model's), got {theta_a.numel()}")
    losses = []
    with torch.no_grad():
        for alpha in torch.as_tensor(alphas, dtype=torch.float64).tolist():
            theta = (1 - alpha) * theta_a + alpha * theta_b
            out = functional_call(model, _as_dict(model, theta), (x,))
            losses.append(float(nn.functional.cross_entropy(out, y)))
    return torch.tensor(losses, dtype=torch.float64)


def barrier(alphas: Tensor | Sequence[float], losses: Tensor | Sequence[float]) -> float:
    """max over alpha in [0, 1] of L(alpha) - ((1 - alpha) L(0) + alpha L(1)).

    Zero or below: no bump above the chord between the two solutions. Needs alpha = 0 and
    alpha = 1 among ``alphas``.
    """
    a = torch.as_tensor(alphas, dtype=torch.float64)
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if a.shape != losses.shape or a.ndim != 1:
        raise ValueError(
            f"alphas and losses must be 1-D of equal length, got {a.shape}, {losses.shape}"
        )
    at0, at1 = torch.isclose(a, a.new_zeros(())), torch.isclose(a, a.new_ones(()))
    if not (at0.any() and at1.any()):
        raise ValueError("alphas must include 0 and 1 (the two solutions)")
    l0, l1 = losses[at0][0], losses[at1][0]
    inside = (a >= 0) & (a <= 1)
    chord = (1 - a[inside]) * l0 + a[inside] * l1
    return float((losses[inside] - chord).max())


def batch_size_experiment(
    *,
    num_classes: int = 4,
    widths: Sequence[int] = (20, 20),
    spread: float = 1.0,
    n_train: int = 200,
    dim: int = 2,
    lr: float = 0.1,
    small_batch: int = 10,
    epochs: int = 200,
    num_alphas: int = 41,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train one initialisation twice, SGD with ``small_batch`` for ``epochs`` and full-batch
    GD for the same number of updates, with the same lr; the loss on the line between the two solutions,
    alpha in [-0.5, 1.5], and the top Hessian eigenvalue (Lanczos) at each end."""
    check_int("small_batch", small_batch, 1, n_train)
    check_int("epochs", epochs, 1)
    check_int("num_alphas", num_alphas, 5)
    x, y = blobs(num_classes, n_train=n_train, dim=dim, spread=spread, seed=seed, device=device)
    solutions, top, losses = [], [], []
    steps = epochs * math.ceil(n_train / small_batch)  # the same number of updates for both
    for optimizer, batch in (("sgd", small_batch), ("gd", None)):
        model = models.MLP(dim, tuple(widths), num_classes, seed=seed, dtype=DTYPE, device=x.device)
        hist = train.train(
            model, x, y, loss="ce", lr=lr, optimizer=optimizer, batch_size=batch,
            steps=steps, seed=seed, log_every=10**9, progress=False,
        )  # fmt: skip
        solutions.append(_flat_params(model))
        op = curvature.HessianOperator(model, "ce", (x, y))
        top.append(float(curvature.lanczos(op, k=1, seed=seed).eigenvalues[0]))
        losses.append(train.evaluate(model, x, y, loss="ce")["loss"])
        del hist
    # a 1/8 grid, so alpha = 0 and 1 are exact grid points whatever num_alphas
    alphas = torch.linspace(-0.5, 1.5, num_alphas, dtype=torch.float64)
    alphas = torch.unique(torch.cat([alphas, torch.tensor([0.0, 1.0], dtype=torch.float64)]))
    line = interpolate(model, solutions[0], solutions[1], x, y, alphas)
    return {
        "alphas": alphas,
        "loss": line,
        "barrier": barrier(alphas, line),
        "loss_small": losses[0],
        "loss_large": losses[1],
        "top_small": top[0],
        "top_large": top[1],
        "distance": float((solutions[0] - solutions[1]).norm()),
    }


# ----------------------------------------------------------------------------- SLQ at scale


def slq_experiment(
    *,
    dataset: str = "mnist1d",
    model: str = "mlp",
    n_train: int = 200,
    hidden: int = 16,
    channels: Sequence[int] = (16, 32),
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 50,
    num_probes: int = 4,
    num_iters: int = 30,
    exact: bool = True,
    eval_batch: int = 1_000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Spectral density of a trained net by stochastic Lanczos quadrature (Ghorbani et al.
    2019), with the exact moments tr(H)/P and tr(H^2)/P when ``exact`` (then in float64).

    ``dataset``: "mnist1d" (offline) or "cifar10" (needs the files on disk);
    ``model``: "mlp" (one hidden layer of ``hidden``) or "cnn" (gc.models.SmallCNN).
    Trained with SGD (``batch_size``, ``lr``) for ``epochs``; the Hessian operator averages over
    the training set in chunks of ``eval_batch``. Returns the quadrature nodes and weights.
    """
    if dataset not in ("mnist1d", "cifar10"):
        raise ValueError(f"dataset must be 'mnist1d' or 'cifar10', got {dataset!r}")
    if model not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    dtype = DTYPE if exact else torch.float32
    if dataset == "mnist1d":
        ds = data.mnist1d(seed=42)
        ds = ds.subset(n_train, seed=seed) if n_train < ds.n_train else ds
    else:
        ds = data.cifar10(n_train=n_train, n_test=100, seed=seed)
    ds = ds.to(device, dtype)
    x, y = ds.x_train, ds.y_train
    in_channels = 1 if dataset == "mnist1d" else 3
    if model == "mlp":
        net: nn.Module = models.MLP(
            math.prod(ds.input_shape), (hidden,), 10, seed=seed, dtype=dtype, device=x.device
        )
    else:
        net = models.SmallCNN(
            in_channels, 10, conv_dim=1 if dataset == "mnist1d" else 2, channels=tuple(channels),
            hidden=hidden, seed=seed, dtype=dtype, device=x.device,
        )  # fmt: skip
    hist = train.train(
        net, x, y, loss="ce", lr=lr, optimizer="sgd", batch_size=batch_size, epochs=epochs,
        seed=seed, log_every=10**9, progress=False,
    )  # fmt: skip
    chunks = [(x[i : i + eval_batch], y[i : i + eval_batch]) for i in range(0, len(x), eval_batch)]
    op = curvature.HessianOperator(net, "ce", chunks, cache=len(chunks) == 1)
    sd = curvature.spectral_density(op, num_probes=num_probes, num_iters=num_iters, seed=seed)
    m1, m2 = sd.moment(1), sd.moment(2)
    out: dict[str, Any] = {
        "nodes": sd.nodes,
        "weights": sd.weights,
        "num_params": op.shape[0],
        "final_loss": float(hist.final_loss),
        "slq_m1": m1.value,
        "slq_m1_stderr": m1.stderr,
        "slq_m2": m2.value,
        "slq_m2_stderr": m2.stderr,
        "top": float(sd.nodes.max()),
    }
    if exact:
        hess = curvature.exact_hessian(net, "ce", chunks, max_params=op.shape[0])
        eig = torch.linalg.eigvalsh(hess).cpu()
        out.update(eig=eig, exact_m1=float(eig.mean()), exact_m2=float((eig**2).mean()))
    return out


def density_from(result: Mapping[str, Any], sigma_rel: float = 0.01, num_points: int = 800):
    """(grid, density) of an :func:`slq_experiment` result, broadened by a Gaussian of std
    ``sigma_rel`` times the node range (Ghorbani et al. 2019, eq. 5)."""
    sd = curvature.SpectralDensity(result["nodes"], result["weights"], result["num_params"], 0)
    grid = sd.grid(num_points)
    sigma = sigma_rel * float(grid[-1] - grid[0])
    return grid, sd.density(grid, sigma)
