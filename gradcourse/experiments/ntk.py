"""Notebook 03, the neural tangent kernel (Jacot, Gabriel & Hongler 2018, arXiv 1806.07572).

The experiment functions of the notebook: configuration in, a dict of tensors and numbers out
(so :class:`gradcourse.cache.Cache` can store them). The kernels themselves come from
:mod:`gradcourse.ntk` (empirical NTK, analytic infinite-width NNGP / NTK, kernel gradient
descent); this module adds what is specific to the paper's section 6:

- :func:`make_net`, :func:`gradient_descent`  the networks of the paper (NTK parameterisation,
  ReLU, beta = 0.1, scalar output) and full-batch GD on C = 1/n sum 1/2 (f - y)^2;
- :func:`kernel_run`, :func:`kernel_runs`, :func:`kernel_statistics`  Fig. 1 and the scaling
  laws: Theta(x0, x) on the unit circle and the Gram matrix of the training inputs, at
  initialisation and after training, against the analytic limit;
- :func:`gaussian_limit`, :func:`circle_fit_run`  Fig. 2: the t -> infinity (or step-k)
  Gaussian distribution of the trained infinite-width network, against trained finite nets;
- :func:`kernel_pcs`, :func:`pc_run`  Fig. 3: training towards targets along the kernel's
  principal components;
- :func:`explore_kernel`  the notebook's sliders.

Depth: Jacot's "depth L = 4" counts the linear layers (the network has layers 0..L), so it is
three hidden layers, ``depth=3`` in :func:`gradcourse.ntk.analytic_ntk` and here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import data, losses, models, ntk
from ..cache import Cache, cached  # cached: re-exported for the notebooks
from ..checks import check_int, check_nonnegative, check_number, check_positive
from ..train import Diverged

DTYPE = torch.float64
#: Jacot et al.'s L = 4 linear layers = 3 hidden layers (our ``depth``).
PAPER_DEPTH = 3
PAPER_BETA = 0.1


# ----------------------------------------------------------------------------- checks


# ----------------------------------------------------------------------------- nets and data


def make_net(
    in_dim: int,
    width: int,
    depth: int = PAPER_DEPTH,
    *,
    beta: float = PAPER_BETA,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = DTYPE,
) -> nn.Module:
    """The paper's network: ``depth`` hidden ReLU layers of ``width`` in the NTK
    parameterisation, a~ = W a / sqrt(n_in) + beta b with W, b ~ N(0, 1), one output."""
    check_int("width", width, 1)
    check_int("depth", depth, 1)
    check_nonnegative("beta", beta)
    return models.MLP(
        in_dim,
        [width] * depth,
        1,
        parameterization="ntk",
        bias_scale=beta,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def _net_with(
    in_dim: int,
    width: int,
    depth: int,
    beta: float,
    seed: int,
    device: str | torch.device | None,
    *tensors: Tensor,
) -> tuple[Any, ...]:
    """(model, *tensors): :func:`make_net`'s network and ``tensors`` moved to its device."""
    model = make_net(in_dim, width, depth, beta=beta, seed=seed, device=device)
    dev = model.layers[0].weight.device
    return model, *(t.to(dev) for t in tensors)


def _function(model: nn.Module, x: Tensor) -> Tensor:
    """The scalar-output network's function on x, (m,), on the CPU (no autograd graph)."""
    with torch.no_grad():
        return model(x)[:, 0].cpu()


def circle(angles: Tensor | Sequence[float]) -> Tensor:
    """Points x = (cos g, sin g) of the unit circle for the angles g: (m, 2), float64."""
    g = torch.as_tensor(angles, dtype=DTYPE).reshape(-1)
    return torch.stack([torch.cos(g), torch.sin(g)], dim=1)


def angle_grid(n_angles: int) -> Tensor:
    """``n_angles`` angles evenly spaced in [-pi, pi]."""
    check_int("n_angles", n_angles, 2)
    return torch.linspace(-math.pi, math.pi, n_angles, dtype=DTYPE)


def gaussian_task(n_train: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fig. 1's least-squares task: x ~ N(0, I_2), target f*(x) = x1 x2; (x (n, 2), y (n, 1))."""
    check_int("n_train", n_train, 1)
    x = torch.randn(n_train, 2, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return x, (x[:, 0] * x[:, 1])[:, None]


def gradient_descent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    record: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """``steps`` steps of full-batch GD with rate ``lr`` on C = 1/n sum_i 1/2 (f(x_i) - y_i)^2
    (:func:`gradcourse.losses.mse`, Jacot's cost), updating ``model`` in place. ``record(k, f)``
    is called with the outputs f (n, 1) at the parameters before step k (and k = steps at the
    end). Returns the loss before each step and at the end, (steps + 1,). Raises
    :class:`gradcourse.train.Diverged` on a non-finite loss.

    The same updates as ``gradcourse.train.train(model, x, y, loss="mse", lr=lr, steps=steps)``
    (to the bit at lr = 1, to rounding otherwise: its optimizer forms p - lr g in one operation;
    a test holds them together), kept as its own loop because here ``steps = 0`` is a run (the
    notebook's slider starts there; ``train`` trains at least one step) and ``record`` sees
    each step's outputs from its own forward pass (``train``'s callback gets the model: a second
    forward pass per step), and so that cached runs keep their numbers."""
    lr = check_positive("lr", lr)
    check_int("steps", steps, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    history = torch.empty(steps + 1, dtype=torch.float64)
    for k in range(steps + 1):
        out = model(x)
        loss = losses.mse(out, y)
        value = float(loss.detach())
        history[k] = value
        if not math.isfinite(value):
            raise Diverged(k, lr, value)
        if record is not None:
            record(k, out.detach())
        if k == steps:
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
    return history


def analytic(
    x1: Tensor, x2: Tensor | None = None, *, depth: int, beta: float
) -> tuple[Tensor, Tensor]:
    """(NNGP, NTK) of the paper's net at infinite width on x1 x x2
    (:func:`gradcourse.ntk.analytic_ntk` with beta as its bias scale)."""
    return ntk.analytic_ntk(x1, x2, depth=depth, bias_scale=beta)


def _probe_circle(n_angles: int) -> tuple[Tensor, Tensor]:
    """Fig. 1's probes: x = (cos g, sin g) on ``n_angles`` angles in [-pi, pi], and x0 = (1, 0)."""
    xs = circle(angle_grid(n_angles))
    return xs, xs.new_tensor([[1.0, 0.0]])


def _fig1_kernels(model: nn.Module, x0: Tensor, xs: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Theta(x0, x) for every x in xs, (m,), and the Gram matrix Theta(X, X) of the training
    inputs, on the CPU (the library's layerwise route: one forward and one backward pass of each
    set, then per-layer Gram products)."""
    return ntk.empirical_ntk(model, xs, x0)[:, 0].cpu(), ntk.empirical_ntk(model, x).cpu()


def _relative_change(before: Tensor, after: Tensor) -> Tensor:
    """||after - before|| / ||before|| per seed (leading dimension), over all other entries."""
    return (after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)


# ----------------------------------------------------------------------------- Fig. 1 / scaling


def kernel_run(
    width: int,
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1.0,
    n_train: int = 16,
    n_angles: int = 61,
    data_seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """One network of Fig. 1: the NTK Theta(x0, x) for x0 = (1, 0) and x = (cos g, sin g) on
    ``n_angles`` angles in [-pi, pi], and the Gram matrix Theta(X, X) of the training inputs,
    at initialisation and after ``steps`` GD steps of rate ``lr`` on the least-squares task of
    :func:`gaussian_task`. Float64."""
    check_int("n_angles", n_angles, 2)
    x, y = gaussian_task(n_train, seed=data_seed)
    model, x, y, xs, x0 = _net_with(
        2, width, depth, beta, seed, device, x, y, *_probe_circle(n_angles)
    )
    curve0, gram0 = _fig1_kernels(model, x0, xs, x)
    loss = gradient_descent(model, x, y, lr=lr, steps=steps)
    curve_t, gram_t = _fig1_kernels(model, x0, xs, x)
    return {"curve0": curve0, "curveT": curve_t, "gram0": gram0, "gramT": gram_t, "loss": loss}


def kernel_runs(
    widths: Sequence[int],
    seeds: Sequence[int],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **config: Any,
) -> dict[int, dict[str, Tensor]]:
    """:func:`kernel_run` for every width and seed (each cached on its own, so experiments that
    share widths share runs): width -> results stacked over seeds (leading dimension)."""
    if not widths or not seeds:
        raise ValueError("widths and seeds must not be empty")
    out = {}
    for width in widths:
        runs = []
        for seed in seeds:
            if progress:
                print(f"\rwidth {width}, seed {seed} ", end="", flush=True)
            runs.append(
                cached(
                    cache,
                    "ntk-kernel-run",
                    kernel_run,
                    width=int(width),
                    seed=int(seed),
                    device=device,
                    **config,
                )
            )
        out[int(width)] = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}
    if progress:
        print("\r", end="")
    return out


def init_grams(
    width: int,
    seeds: Sequence[int],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    n_train: int = 16,
    data_seed: int = 0,
    device: str | torch.device | None = None,
) -> Tensor:
    """The empirical NTK Gram matrix Theta_0(X, X) on the training inputs of
    :func:`gaussian_task` at initialisation, for every seed: (S, n, n), float64, CPU. No
    training, so many initialisations are cheap (the statistics of Fig. 1 need them)."""
    check_int("width", width, 1)
    if not seeds:
        raise ValueError("seeds must not be empty")
    x, _ = gaussian_task(n_train, seed=data_seed)
    grams = []
    for seed in seeds:
        model, x_on = _net_with(2, width, depth, beta, int(seed), device, x)
        grams.append(ntk.empirical_ntk(model, x_on).cpu())
    return torch.stack(grams)


def relative_deviations(grams: Tensor, limit: Tensor) -> Tensor:
    """Per initialisation, RMS(Gram_0 - Gram_inf) / RMS(Gram_inf): the relative distance of
    each initial kernel from the limit, (S,) float64."""
    return ((grams - limit).pow(2).flatten(1).mean(1) / limit.pow(2).mean()).sqrt()


def slope_with_band(
    widths: Sequence[int],
    values: Sequence[Tensor],
    *,
    summary: str = "rms",
    level: float = 0.9,
    num_resamples: int = 2000,
    seed: int = 0,
) -> Any:
    """The log-log slope against width of a per-width summary of per-initialisation values
    (``"rms"``: sqrt of the mean square, for deviations; ``"mean"``), with a percentile
    bootstrap interval that resamples the initialisations within each width
    (:func:`gradcourse.stats.bootstrap`): a :class:`gradcourse.stats.Interval`."""
    from .. import stats
    from ..plotting import loglog_slope

    if summary not in ("rms", "mean"):
        raise ValueError(f"summary must be 'rms' or 'mean', got {summary!r}")
    if len(widths) != len(values) or len(widths) < 2:
        raise ValueError("need one array of values per width, for at least 2 widths")

    def slope(groups: list) -> float:
        if summary == "rms":
            return loglog_slope(widths, [float((g * g).mean()) ** 0.5 for g in groups])
        return loglog_slope(widths, [float(g.mean()) for g in groups])

    groups = [torch.as_tensor(v, dtype=torch.float64).numpy() for v in values]
    return stats.bootstrap(slope, groups, level=level, num_resamples=num_resamples, seed=seed)


def per_seed_change(runs: Mapping[str, Tensor]) -> Tensor:
    """||Gram_T - Gram_0||_F / ||Gram_0||_F for each seed of one width's runs, (S,)."""
    return _relative_change(runs["gram0"], runs["gramT"])


def per_seed_inflation(runs: Mapping[str, Tensor]) -> Tensor:
    """||Gram_T||_F / ||Gram_0||_F - 1 for each seed: how much the kernel grew in training."""
    return runs["gramT"].flatten(1).norm(dim=1) / runs["gram0"].flatten(1).norm(dim=1) - 1


def analytic_kernels(
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    n_train: int = 16,
    n_angles: int = 61,
    data_seed: int = 0,
) -> dict[str, Tensor]:
    """The infinite-width limits of :func:`kernel_run`'s kernels (:func:`gradcourse.ntk.analytic_ntk`):
    ``curve`` (m,) Theta(x0, x) on the circle and ``gram`` (n, n) on the training inputs."""
    x, _ = gaussian_task(n_train, seed=data_seed)
    xs, x0 = _probe_circle(n_angles)
    return {
        "angles": angle_grid(n_angles),
        "curve": analytic(xs, x0, depth=depth, beta=beta)[1][:, 0],
        "gram": analytic(x, depth=depth, beta=beta)[1],
    }


def kernel_statistics(runs: Mapping[str, Tensor], limit: Mapping[str, Tensor]) -> dict[str, float]:
    """Summaries of one width's runs (stacked over s seeds) against the analytic limit.

    - ``mean_error``: RMS over angles of (seed-mean of Theta_0(x0, x) - limit), over RMS(limit);
      ``mean_stderr``: the same for the standard error of the seed-mean (its sampling noise);
    - ``spread``: RMS over angles of the standard deviation over seeds of Theta_0(x0, x), over
      RMS(limit) (the fluctuation of the kernel around its mean);
    - ``deviation``: sqrt(mean over seeds and entries of (Gram_0 - Gram_inf)^2) / RMS(Gram_inf),
      the relative distance of the initial kernel from the limit on the training inputs;
    - ``change``: mean over seeds of ||Gram_T - Gram_0||_F / ||Gram_0||_F, the relative change of
      the kernel during training (Lee et al. 2019, Fig. 1: O(1 / sqrt(width))).
    """
    c0, lim = runs["curve0"], limit["curve"]
    s = c0.shape[0]
    if s < 2:
        raise ValueError(f"kernel_statistics needs >= 2 seeds, got {s}")
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    std = c0.std(0, correction=1)
    g0, glim = runs["gram0"], limit["gram"]
    return {
        "mean_error": rms(c0.mean(0) - lim) / rms(lim),
        "mean_stderr": rms(std / math.sqrt(s)) / rms(lim),
        "spread": rms(std) / rms(lim),
        "deviation": rms(g0 - glim) / rms(glim),
        "change": float(per_seed_change(runs).mean()),
        "curve_change": float(_relative_change(c0, runs["curveT"]).mean()),
    }


# ----------------------------------------------------------------------------- Fig. 2


def gaussian_limit(
    nngp_train: Tensor,
    nngp_test_train: Tensor,
    nngp_test_diag: Tensor,
    ntk_train: Tensor,
    ntk_test_train: Tensor,
    y_train: Tensor,
    *,
    lr: float = 1.0,
    steps: float = math.inf,
) -> dict[str, Tensor]:
    """The distribution of the infinite-width network after ``steps`` of GD (inf: the limit
    t -> infinity), over random initialisations (Jacot et al. 2018, section 5; Lee et al. 2019,
    eq. 15-16 with GD in place of gradient flow).

    At initialisation f0 is a centred Gaussian process with covariance K (the NNGP, Sigma^(L));
    training is kernel GD with the fixed NTK Theta, so on a test input x

        f_k(x) = f0(x) - A(x) (f0(X) - Y),   A(x) = Theta(x, X) Theta^{-1} (I - (I - lr Theta/n)^k)

    which is Gaussian with mean A(x) Y and variance K(x, x) - 2 A(x) K(X, x) + A(x) K(X, X) A(x)^T.
    At k = inf, A = Theta(x, X) Theta^{-1} and the mean is kernel regression with the NTK.
    Returns ``mean`` (m,), ``std`` (m,) and ``A`` (m, n) (for a given f0:
    f_k = f0(x) - A (f0(X) - Y)). A comes from the library's kernel gradient descent
    (:func:`gradcourse.ntk.gradient_descent_mse`), eigenvalues below n·eps·lambda_max of Theta
    treated as zero at k = inf.
    """
    n = ntk_train.shape[0]
    if ntk_train.shape != (n, n) or nngp_train.shape != (n, n):
        raise ValueError("ntk_train and nngp_train must be (n, n) matrices of the same n")
    m = ntk_test_train.shape[0]
    if ntk_test_train.shape != (m, n) or nngp_test_train.shape != (m, n):
        raise ValueError(f"ntk_test_train and nngp_test_train must have shape (m, {n})")
    if nngp_test_diag.shape != (m,):
        raise ValueError(f"nngp_test_diag must have shape ({m},)")
    lr = check_positive("lr", lr)
    steps = check_number("steps", steps, low=0, allow_inf=True)
    if not math.isinf(steps) and steps != round(steps):
        raise ValueError(f"steps must be a whole number of GD steps or inf, got {steps!r}")
    # A is linear in the targets: its column j is kernel GD's test prediction from f0 = 0 towards
    # the unit target e_j, so one predictor with the n unit targets as outputs gives all of A.
    # At steps = inf the limit is the same for every lr (the flow's, the pseudo-inverse).
    finite = not math.isinf(steps)
    unit_targets = torch.eye(n, dtype=ntk_train.dtype, device=ntk_train.device)
    predict = ntk.gradient_descent_mse(ntk_train, unit_targets, lr=lr if finite else None)
    a = predict(int(steps) if finite else None, k_test_train=ntk_test_train).test  # (m, n)
    y = y_train.reshape(n).to(a.dtype)
    mean = a @ y
    var = nngp_test_diag - 2 * (a * nngp_test_train).sum(1) + ((a @ nngp_train) * a).sum(1)
    return {"mean": mean, "std": var.clamp_min(0).sqrt(), "A": a}


def circle_task(train_angles: Sequence[float], n_grid: int = 121) -> dict[str, Tensor]:
    """Fig. 2's task: training points on the unit circle at ``train_angles`` with targets
    f*(x) = x1 x2, and a grid of ``n_grid`` test angles in [-pi, pi]."""
    if len(train_angles) < 1:
        raise ValueError("train_angles must hold at least one angle")
    x = circle(train_angles)
    grid = angle_grid(n_grid)
    return {"x": x, "y": (x[:, 0] * x[:, 1])[:, None], "grid": grid, "x_grid": circle(grid)}


def circle_limit(
    train_angles: Sequence[float],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    lr: float = 1.0,
    steps: float = math.inf,
    n_grid: int = 121,
) -> dict[str, Tensor]:
    """:func:`gaussian_limit` for Fig. 2's task with the analytic kernels of the paper's net."""
    task = circle_task(train_angles, n_grid)
    x, xg = task["x"], task["x_grid"]
    k_tt, t_tt = analytic(x, depth=depth, beta=beta)
    k_gt, t_gt = analytic(xg, x, depth=depth, beta=beta)
    k_gg = analytic(xg, depth=depth, beta=beta)[0].diagonal()
    return gaussian_limit(k_tt, k_gt, k_gg, t_tt, t_gt, task["y"], lr=lr, steps=steps)


def circle_fit_run(
    width: int,
    train_angles: Sequence[float],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 1000,
    lr: float = 1.0,
    n_grid: int = 121,
    linearized: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """One network of Fig. 2: trained by GD on the points of :func:`circle_task`; its function
    on the grid at initialisation (``f0_grid``) and after training (``fT_grid``), and its outputs
    on the training points at initialisation (``f0_train``) and the final loss.

    With ``linearized``, also ``flin_grid``: the same ``steps`` of GD on the network linearised
    at its initialisation (Lee et al. 2019), i.e. kernel GD with the net's own empirical NTK at
    initialisation (:func:`gradcourse.ntk.kernel_gradient_descent`), on the grid."""
    task = circle_task(train_angles, n_grid)
    model, x, y, xg = _net_with(
        2, width, depth, beta, seed, device, task["x"], task["y"], task["x_grid"]
    )
    f0_grid, f0_train = _function(model, xg), _function(model, x)
    out: dict[str, Tensor] = {}
    if linearized:
        theta_xx = ntk.empirical_ntk(model, x).cpu()
        theta_gx = ntk.empirical_ntk(model, xg, x).cpu()
        pred = ntk.kernel_gradient_descent(
            theta_xx,
            task["y"][:, 0].cpu(),
            lr,
            steps,
            ntk_test_train=theta_gx,
            f0_train=f0_train,
            f0_test=f0_grid,
        )
        out["flin_grid"] = pred.test
    loss = gradient_descent(model, x, y, lr=lr, steps=steps)
    ft_grid = _function(model, xg)
    return {"f0_grid": f0_grid, "f0_train": f0_train, "fT_grid": ft_grid, "loss": loss[-1:], **out}


# ----------------------------------------------------------------------------- Fig. 3


def pc_inputs(
    n: int,
    *,
    dataset: str = "mnist1d",
    seed: int = 0,
    device: str | torch.device | None = None,
    labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """A class-balanced batch of ``n`` training inputs, flattened, float64: ``"fashion_mnist"``
    (offline once installed) or ``"mnist"`` (raises gradcourse.data.DatasetUnavailable when its
    files are not on disk), pixels / 255 and nothing else, as in the paper; or ``"mnist1d"``
    (generated offline). With ``labels``, also their classes: (x, y)."""
    check_int("n", n, 2)
    if dataset == "mnist1d":
        ds = data.mnist1d(seed=42, dtype=DTYPE)
    elif dataset == "mnist":
        ds = data.mnist(n_train=n, n_test=10, standardize="none", seed=seed, dtype=DTYPE)
    elif dataset == "fashion_mnist":
        ds = data.fashion_mnist(n_train=n, n_test=10, standardize="none", seed=seed, dtype=DTYPE)
    else:
        raise ValueError(f"dataset must be 'fashion_mnist', 'mnist' or 'mnist1d', got {dataset!r}")
    idx = data.balanced_subset_indices(ds.y_train, n, seed=seed)
    x = ds.x_train[idx].flatten(1).to(device)
    return (x, ds.y_train[idx].to(device)) if labels else x


#: The top eigenvalues of Theta / N that Jacot et al. 2018 report for Fig. 3 (MNIST, N = 512,
#: depth 4, beta = 0.1), for comparison with ours.
PAPER_FIG3_EIGVALS = (0.0457, 0.00108, 0.00078)


def steps_to_learn(eigval: float, fraction: float = 0.9, *, lr: float = 1.0) -> int:
    """Kernel GD's number of steps to learn ``fraction`` of a component with eigenvalue
    ``eigval`` of Theta / N: the smallest t with 1 - (1 - lr eigval)^t >= fraction, about
    ln(1 / (1 - fraction)) / (lr eigval) (ln 2 / (lr eigval) for half of it)."""
    check_number("fraction", fraction, low=0, high=1)
    if not 0 < lr * eigval < 1:
        raise ValueError(f"lr * eigval must lie in (0, 1), got {lr * eigval!r}")
    if fraction in (0.0, 1.0):
        raise ValueError("fraction must lie strictly between 0 and 1")
    return math.ceil(math.log(1 - fraction) / math.log(1 - lr * eigval))


def kernel_pcs(
    x: Tensor, *, depth: int = PAPER_DEPTH, beta: float = PAPER_BETA, k: int = 8
) -> dict[str, Tensor]:
    """The top ``k`` principal components of the limiting NTK on the batch x (uncentred, as in
    the paper: the eigenvectors of the Gram matrix Theta(X, X)): ``eigvals`` (k,) of Theta / N
    (the eigenvalues of the kernel's integral operator on the empirical distribution) and ``pcs``
    (k, N), normalised as functions, 1/N sum_i pc(x_i)^2 = 1, each signed to have a positive sum."""
    n = x.shape[0]
    check_int("k", k, 1, n)
    theta = analytic(x.cpu(), depth=depth, beta=beta)[1]
    lam, vec = torch.linalg.eigh(theta)
    lam, vec = lam.flip(0)[:k], vec.flip(1)[:, :k].T
    sign = torch.where(vec.sum(1) < 0, -1.0, 1.0).to(vec.dtype)
    return {"eigvals": lam / n, "pcs": vec * sign[:, None] * math.sqrt(n)}


def pc_run(
    width: int,
    x: Tensor,
    pcs: Tensor,
    coeffs: Sequence[float],
    *,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1.0,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """One network of Fig. 3: GD towards f* = f_theta0 + sum_k coeffs[k] pcs[k] on the batch x.

    Records, at every step t, the coordinates of f_t - f_0 along the PCs,
    ``proj[t, k] = 1/N sum_i (f_t - f_0)(x_i) pcs[k](x_i)`` (kernel GD predicts
    coeffs[k] (1 - (1 - lr lambda_k)^t), lambda_k the eigenvalue of Theta/N), and ``orth[t]``,
    the RMS over the batch of the part of f_t - f_0 outside the span of the PCs."""
    n = x.shape[0]
    if pcs.ndim != 2 or pcs.shape[1] != n or len(coeffs) != pcs.shape[0]:
        raise ValueError(f"pcs must be (k, {n}) with one coefficient per row of pcs")
    model, x, pcs = _net_with(
        x.shape[1], width, depth, beta, seed, device, x.to(DTYPE), pcs.to(DTYPE)
    )
    with torch.no_grad():
        f0 = model(x)[:, 0]
    target = f0 + torch.as_tensor(coeffs, dtype=DTYPE, device=x.device) @ pcs
    q = torch.linalg.qr(pcs.T).Q  # orthonormal basis of the PCs' span, (N, k)
    proj = torch.empty(steps + 1, pcs.shape[0], dtype=DTYPE)
    orth = torch.empty(steps + 1, dtype=DTYPE)

    def record(t: int, out: Tensor) -> None:
        d = out[:, 0] - f0
        proj[t] = (pcs @ d / n).cpu()
        orth[t] = float((d - q @ (q.T @ d)).pow(2).mean().sqrt())

    loss = gradient_descent(model, x, target[:, None], lr=lr, steps=steps, record=record)
    return {"proj": proj, "orth": orth, "loss": loss}


def pc_prediction(eigvals: Tensor, coeffs: Sequence[float], *, lr: float, steps: int) -> Tensor:
    """Kernel GD's prediction for :func:`pc_run`'s ``proj``: (steps + 1, k),
    coeffs[k] (1 - (1 - lr eigvals[k])^t) at step t.

    A closed form over the eigenvalues, on purpose: the targets lie along the kernel's principal
    components, where kernel gradient descent (:func:`gradcourse.ntk.kernel_gradient_descent`)
    is one scalar recursion per component, and ``eigvals`` are already those of Theta / N, so
    there is no kernel left to diagonalise (a test holds the two equal on the PCs)."""
    t = torch.arange(steps + 1, dtype=DTYPE)[:, None]
    c = torch.as_tensor(coeffs, dtype=DTYPE)[None, :]
    return c * (1 - (1 - lr * eigvals.to(DTYPE)[None, :]) ** t)


# ----------------------------------------------------------------------------- explore


def explore_kernel(
    width: int,
    depth: int,
    beta: float,
    steps: int,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    n_train: int = 16,
    n_angles: int = 61,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Fig. 1 for the notebook's sliders: Theta(x0, x) on the circle at initialisation and after
    ``steps`` GD steps (lr 1.0) for a few seeds, and the analytic limit; validated with messages
    a reader can act on, each run cached."""
    check_int("width", width, 2, 8192)
    check_int("depth", depth, 1, 8)
    check_number("beta", beta, low=0, high=2)
    check_int("steps", steps, 0, 2000)
    config = dict(
        depth=depth, beta=float(beta), steps=steps, lr=1.0, n_train=n_train, n_angles=n_angles
    )
    runs = kernel_runs([width], list(seeds), cache=cache, device=device, **config)[width]
    limit = analytic_kernels(depth=depth, beta=float(beta), n_train=n_train, n_angles=n_angles)
    return {**runs, **limit, "stats": kernel_statistics(runs, limit)}


def half_times(proj: Tensor, coeffs: Sequence[float]) -> Tensor:
    """For each column k of ``proj`` (steps + 1, k), the first step t at which proj[t, k] has
    covered half of its target coeffs[k] (inf if never): the convergence time along PC k."""
    c = torch.as_tensor(coeffs, dtype=proj.dtype)
    if proj.ndim != 2 or proj.shape[1] != c.numel() or bool((c == 0).any()):
        raise ValueError("proj must be (steps + 1, k) with k non-zero coefficients")
    reached = proj / c >= 0.5
    first = torch.where(reached.any(0), reached.int().argmax(0).to(proj.dtype), math.inf)
    return first


def line_deviation(run: Mapping[str, Tensor], prediction: Tensor) -> Tensor:
    """The distance, at every step, of f_t - f_0 from kernel GD's prediction (a point moving on
    a straight line spanned by the PCs), in the empirical L2 norm:
    sqrt(sum_k (proj_k - pred_k)^2 + orth^2), using that the PCs are orthonormal in that norm."""
    return ((run["proj"] - prediction).pow(2).sum(1) + run["orth"].pow(2)).sqrt()


def pc_experiment(
    width: int,
    coeffs: Sequence[float],
    *,
    dataset: str = "mnist1d",
    n: int = 512,
    depth: int = PAPER_DEPTH,
    beta: float = PAPER_BETA,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1.0,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Fig. 3 from its configuration alone (so it can be cached): the batch of :func:`pc_inputs`,
    its top ``len(coeffs)`` limiting-kernel PCs (:func:`kernel_pcs`), and :func:`pc_run`."""
    x, y = pc_inputs(n, dataset=dataset, seed=0, labels=True)
    pc = kernel_pcs(x, depth=depth, beta=beta, k=len(coeffs))
    run = pc_run(
        width,
        x,
        pc["pcs"],
        coeffs,
        depth=depth,
        beta=beta,
        seed=seed,
        steps=steps,
        lr=lr,
        device=device,
    )
    return {**run, **pc, "labels": y.cpu()}
