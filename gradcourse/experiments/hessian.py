"""Notebook 01, the Hessian's bulk and outliers (Sagun et al. 2017, arXiv 1706.04454; Papyan
2019, 2020).

The experiment functions of the notebook: configuration in, a dict of tensors and numbers out
(so :class:`gradcourse.cache.Cache` can store them). The algorithms they call live in
:mod:`gradcourse.curvature` (exact Hessian, GGN / residual operators, Lanczos, stochastic
Lanczos quadrature) and :mod:`gradcourse.train`; this module adds what is specific to the paper:

- :func:`count_outliers`  the outlier-counting rule (largest multiplicative gap at the top);
- :func:`near_zero_fraction`, :func:`nonbulk_count`  the size of the bulk (eigenvalues small
  relative to the largest |eigenvalue|, or to lambda_K) and the number of eigenvalues outside
  it; :func:`outlier_bulk_scales`  the scale of the outliers and of the bulk, each on its own;
- :func:`simplex_classes`, :func:`fashion_pca`  the other two data sets of the notebook:
  equidistant overlapping classes (Papyan's regime, a known ground truth) and Fashion-MNIST
  reduced by PCA (real images, small enough for the exact Hessian);
- :func:`gradient_alignment`, :func:`project_out`, :func:`outlier_gaps`  where the gradient
  sits in the spectrum, and whether the gap rule can see the K - 1 outliers without it;
- :func:`spectrum_run`  one run of any of the three: spectra, counts, the gradient diagnostic
  (and its control, a random direction projected out), how far the class gradients cancel
  (:func:`class_gradient_ratio`), on request Papyan's class
  decomposition of the Gauss-Newton part and the spectrum at checkpoints along training;
- :func:`initial_spectrum`  the same at initialisation only, for any initialisation seed (the
  controls: an untrained net, a second independent initialisation);
- :func:`regime_table`, :func:`cached_run`  many runs, each cached;
- :func:`parts_summary`, :func:`subspace_overlaps`  how far the top of H is the between-class
  part's, by eigenvalues and by eigenvectors;
- :func:`batch_switch_experiment`  large batch then small batch (and the reverse), as in
  Sagun et al.'s section 4, with its controls (two independent solutions; the sharpness along
  the large-batch path, :func:`value_at_loss` and :func:`bracket_at_loss`, to compare ends at
  the same loss);
- :func:`interpolate`, :func:`barrier`  the loss on the straight line between two solutions;
- :func:`slq_experiment`  the spectral density of a larger net, checked against exact moments.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import curvature, data, models, train
from ..cache import Cache, cached  # cached: re-exported for the notebooks
from ..checks import check_int, check_ints, check_positive
from ..functional import FunctionalModel, flatten

DTYPE = torch.float64
#: prefix of this module's cache entries; raised when what a cached function returns changes
CACHE_PREFIX = "hessian3"


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


def near_zero_fraction(
    eigenvalues: Tensor | Sequence[float], rel: float = 0.01, k: int | None = None
) -> float:
    """Fraction of eigenvalues with |lambda| <= ``rel`` * a reference (the size of the bulk).

    The reference is max |lambda| (``k`` None) or the k-th largest eigenvalue lambda_k, e.g.
    the last of K outliers: a cut-off that does not rise when only the top outliers grow."""
    eig = _as_spectrum(eigenvalues)
    check_positive("rel", rel)
    if k is None:
        ref = eig.abs().max()
    else:
        check_int("k", k, 1, eig.numel())
        ref = eig.sort(descending=True).values[k - 1]
        if not ref > 0:
            raise ValueError(f"the {k}-th largest eigenvalue must be positive, got {float(ref):g}")
    return float((eig.abs() <= rel * ref).double().mean())


def nonbulk_count(eigenvalues: Tensor | Sequence[float], rel: float = 0.01) -> int:
    """Number of eigenvalues with |lambda| > ``rel`` * max |lambda|: those outside the bulk of
    :func:`near_zero_fraction` (P times one minus that fraction)."""
    eig = _as_spectrum(eigenvalues)
    return int((eig.abs() > check_positive("rel", rel) * eig.abs().max()).sum())


def outlier_bulk_scales(
    eigenvalues: Tensor | Sequence[float], n_outliers: int
) -> tuple[float, float]:
    """The scale of the top ``n_outliers`` eigenvalues (their geometric mean) and of the rest, the
    bulk (its mean |lambda|): how far a change of the data moves the outliers and the bulk
    (Sagun et al. 2017, section 3), each measured on its own."""
    eig = _as_spectrum(eigenvalues)
    check_int("n_outliers", n_outliers, 1, eig.numel() - 1)
    top = eig.sort(descending=True).values
    if not bool((top[:n_outliers] > 0).all()):
        raise ValueError(f"the top {n_outliers} eigenvalues must be positive")
    outliers = float(top[:n_outliers].log().mean().exp())
    return outliers, float(top[n_outliers:].abs().mean())


def _as_spectrum(eigenvalues: Tensor | Sequence[float]) -> Tensor:
    eig = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    if eig.numel() == 0:
        raise ValueError("eigenvalues must not be empty")
    if not bool(torch.isfinite(eig).all()):
        raise ValueError("eigenvalues must be finite")
    return eig


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


def simplex_classes(
    num_classes: int,
    *,
    n_train: int = 500,
    dim: int = 10,
    separation: float = 3.0,
    noise: float = 1.5,
    standardize: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """K equidistant, overlapping classes in float64: x = separation e_y + noise N(0, I).

    The class means are the first K unit vectors scaled by ``separation`` (all pairwise
    distances separation * sqrt(2)), so no class is closer to another than the rest; with
    noise / separation = 1/2 the classes overlap and cross-entropy stays finite. Labels cycle
    through 0 .. K - 1 (balanced). Synthetic on purpose: Papyan's K - 1 needs classes that are
    alike, a ground truth real data do not give. ``standardize``: each feature centred and
    divided by its standard deviation over the drawn set (:func:`gradcourse.data.standardize`),
    so every ``noise`` gives inputs of the same scale (mean squared norm ``dim``); the class
    means stay equidistant (the first K features are scaled alike).
    """
    check_int("num_classes", num_classes, 2)
    check_int("n_train", n_train, num_classes)
    check_int("dim", dim, num_classes)
    check_positive("separation", separation)
    check_positive("noise", noise)
    check_int("seed", seed, 0)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_train) % num_classes
    x = separation * nn.functional.one_hot(y, dim).to(DTYPE)
    x = x + noise * torch.randn(n_train, dim, generator=g, dtype=DTYPE)
    if standardize:
        x = data.standardize(x, x[:0], dims=0)[0]
    return x.to(device), y.to(device)


def fashion_pca(
    n_train: int = 3_000,
    *,
    dim: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """A class-balanced Fashion-MNIST training subset projected on its top ``dim`` principal
    components (fitted on that subset), each standardised: (x, y) in float64. Small inputs
    keep P in the hundreds, so the exact Hessian is affordable on a laptop."""
    check_int("n_train", n_train, 10, 60_000)
    check_int("dim", dim, 1, 784)
    ds = data.fashion_mnist(
        n_train=n_train, n_test=10, standardize="none", flatten=True, seed=seed, dtype=DTYPE
    )
    x = ds.x_train - ds.x_train.mean(dim=0)
    basis = torch.linalg.svd(x, full_matrices=False).Vh[:dim]
    z = x @ basis.T
    z = z / z.std(dim=0)
    return z.to(device), ds.y_train.to(device)


def _dataset(kind: str, num_classes: int, seed: int, device, **options: Any):
    if kind == "blobs":
        return blobs(num_classes, seed=seed, device=device, **options)
    if kind == "simplex":
        return simplex_classes(num_classes, seed=seed, device=device, **options)
    if kind == "fashion":
        if num_classes != 10:
            raise ValueError(f"Fashion-MNIST has 10 classes, got num_classes={num_classes}")
        return fashion_pca(seed=seed, device=device, **options)
    raise ValueError(f"data must be 'blobs', 'simplex' or 'fashion', got {kind!r}")


def gradient_alignment(hessian: Tensor, gradient: Tensor, top: int = 20) -> Tensor:
    """cos^2 between ``gradient`` and each of the ``top`` leading eigenvectors of the symmetric
    ``hessian`` (largest eigenvalue first). They sum to at most 1; a value near 1 at position i
    says the gradient *is* the i-th eigenvector."""
    check_int("top", top, 1)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square matrix, got shape {tuple(hessian.shape)}")
    if gradient.shape != (hessian.shape[0],):
        raise ValueError(
            f"gradient must have shape ({hessian.shape[0]},), got {tuple(gradient.shape)}"
        )
    norm = gradient.norm()
    if not norm > 0:
        raise ValueError("gradient must be non-zero")
    vecs = torch.linalg.eigh(hessian).eigenvectors.flip(1)[:, :top]
    return ((vecs.T @ (gradient / norm)) ** 2).cpu()


def project_out(matrix: Tensor, direction: Tensor) -> Tensor:
    """(I - u u^T) M (I - u u^T) with u = direction / |direction|: M with one direction removed
    (its eigenvalue becomes 0, the rest of the spectrum interlaces with M's)."""
    norm = direction.norm()
    if not norm > 0:
        raise ValueError("direction must be non-zero")
    u = direction / norm
    mu = matrix @ u
    # (I - uu^T) M (I - uu^T) = M - u (Mu)^T - (Mu) u^T + (u^T M u) u u^T
    return matrix - torch.outer(u, mu) - torch.outer(mu, u) + (u @ mu) * torch.outer(u, u)


def outlier_gaps(eigenvalues: Tensor | Sequence[float], k: int) -> tuple[float, float]:
    """For a spectrum whose K-th eigenvalue is the gradient's (claim 3 of notebook 01): the
    largest ratio lambda_i / lambda_{i+1} inside the top K - 1 (i < K - 1; 1.0 for K = 2) and
    the ratio lambda_{K-1} / lambda_{K+1} across the gradient's eigenvalue, from the K - 1 class
    outliers to the bulk. The gap rule finds K - 1 once the gradient is projected out only if
    the second is the larger (and no ratio below is larger still)."""
    check_int("k", k, 2)
    top = _as_spectrum(eigenvalues).sort(descending=True).values
    if top.numel() < k + 1 or not bool((top[: k + 1] > 0).all()):
        raise ValueError(f"the top {k + 1} eigenvalues must be positive")
    inner = float((top[: k - 2] / top[1 : k - 1]).max()) if k > 2 else 1.0
    return inner, float(top[k - 2] / top[k])


def _count_or_zero(eigenvalues: Tensor) -> int:
    """:func:`count_outliers`, or 0 for a spectrum without a positive eigenvalue."""
    return count_outliers(eigenvalues) if float(eigenvalues.max()) > 0 else 0


def _init_sagun_(model: nn.Module, seed: int) -> None:
    """Sagun et al.'s initialisation (their code): every weight and bias ~ 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def _model(x: Tensor, widths: Sequence[int], num_classes: int, seed: int, init: str) -> nn.Module:
    if init not in ("lecun", "sagun"):
        raise ValueError(f"init must be 'lecun' or 'sagun', got {init!r}")
    model = models.MLP(x.shape[1], widths, num_classes, seed=seed, dtype=DTYPE, device=x.device)
    if init == "sagun":
        _init_sagun_(model, seed)
    return model


def _eigvals(matrix: Tensor) -> Tensor:
    return torch.linalg.eigvalsh(matrix).cpu()


def subspace_overlaps(a: Tensor, b: Tensor, top: int = 20) -> Tensor:
    """How far the leading eigenvectors of two symmetric matrices span the same subspaces: for
    m = 1 .. ``top``, |U_m^T V_m|_F^2 / m with U_m, V_m the top m eigenvectors of ``a`` and
    ``b`` (largest eigenvalue first): the mean squared cosine of the m principal angles, 1 when
    the two top-m subspaces coincide, about m / P for unrelated ones (Papyan 2020 compares the
    top of the Hessian with the class means this way). Returns ``top`` values, float64 on the
    CPU."""
    check_int("top", top, 1)
    for name, m in (("a", a), ("b", b)):
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"{name} must be a square matrix, got shape {tuple(m.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b differ in shape: {tuple(a.shape)}, {tuple(b.shape)}")
    top = min(top, a.shape[0])
    u = torch.linalg.eigh(a).eigenvectors.flip(1)[:, :top]
    v = torch.linalg.eigh(b).eigenvectors.flip(1)[:, :top]
    cos2 = (u.T @ v) ** 2
    m = torch.arange(1, top + 1, dtype=cos2.dtype, device=cos2.device)
    sums = torch.stack([cos2[:i, :i].sum() for i in range(1, top + 1)])
    return (sums / m).to("cpu", DTYPE)


def _parts(model: nn.Module, loss: str, batch: tuple[Tensor, Tensor], hess: Tensor, prefix=""):
    """Spectra of G's between and within parts and of R = H - G (Papyan 2020, eq. 3), and
    :func:`subspace_overlaps` of H's top eigenvectors with the between part's."""
    parts = curvature.class_decomposition(model, loss, batch)
    return {
        f"{prefix}eig_ggn": _eigvals(parts.ggn),
        f"{prefix}eig_residual": _eigvals(hess - parts.ggn),
        f"{prefix}eig_between": _eigvals(parts.between),
        f"{prefix}eig_within": _eigvals(parts.within),
        f"{prefix}overlap_between": subspace_overlaps(hess, parts.between),
    }


def _loss_gradient(model: nn.Module, loss: str, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    targets = nn.functional.one_hot(y, num_classes).to(DTYPE) if loss == "mse" else y
    value = curvature.GGNOperator(model, loss, (x, y)).batch_loss(
        dict(model.named_parameters()), x, targets
    )
    params = list(model.parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]).detach()


def class_gradient_ratio(
    model: nn.Module, x: Tensor, y: Tensor, num_classes: int, loss: str = "ce"
) -> float:
    """|grad L| / sum_c pi_c |g_c|, with g_c the gradient of the mean loss over class c and
    pi_c its share of the examples (so grad L = sum_c pi_c g_c): 0 when the class gradients
    cancel (a stationary point, where they span at most K - 1 directions), 1 when they all
    point the same way. Scale-free: it does not change when the loss is rescaled."""
    grad = _loss_gradient(model, loss, x, y, num_classes)
    total = 0.0
    for c in range(num_classes):
        mask = y == c
        if mask.any():
            g_c = _loss_gradient(model, loss, x[mask], y[mask], num_classes)
            total += float(mask.double().mean()) * float(g_c.norm())
    return float(grad.norm()) / total if total > 0 else math.nan


def spectrum_run(
    data: str = "blobs",
    num_classes: int = 4,
    *,
    seed: int = 0,
    widths: Sequence[int] = (16, 16),
    lr: float = 0.1,
    max_steps: int = 2_000,
    grad_tol: float = 1e-4,
    init: str = "lecun",
    loss: str = "ce",
    decompose: bool = False,
    initial: bool = True,
    checkpoints: Sequence[int] = (),
    data_options: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train a ReLU MLP with full-batch GD on one of the notebook's data sets and take the exact
    Hessian at the end, and at initialisation too when ``initial`` (key ``eig_init``).

    ``data``: "blobs" (Sagun et al.'s separable blobs, :func:`blobs`), "simplex"
    (:func:`simplex_classes`) or "fashion" (:func:`fashion_pca`, K = 10); ``data_options`` go
    to that function. ``init``: "lecun" (the library's, zero biases) or "sagun" (every weight
    and bias 0.1 N(0, 1), as in the authors' code). Training stops at ``max_steps`` or when
    |grad L| <= ``grad_tol``. Returns the spectra (ascending), the outlier count by
    :func:`count_outliers`, the gradient diagnostic (alignment with the top K + 2 eigenvectors,
    the count once the gradient direction is projected out, and its control: the count once a
    random unit direction, drawn from ``seed``, is projected out instead) and, with
    ``decompose``, the spectra of G, R = H - G and of the between and within parts of G
    (:func:`curvature.class_decomposition`). ``checkpoints``: steps at which the run also takes
    the exact Hessian along the way (keys ``ckpt_*``: the step, the loss, the count, the top 20
    eigenvalues, and with ``decompose`` the largest within-part eigenvalue and the top 20 of the
    between part); a checkpoint past the step training stopped at is left out.
    """
    check_int("num_classes", num_classes, 2)
    check_int("max_steps", max_steps, 1)
    if loss not in ("ce", "mse"):
        raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}")
    widths = check_ints("widths", widths, 1)
    wanted = set(check_ints("checkpoints", checkpoints, 0))
    x, y = _dataset(data, num_classes, seed, device, **dict(data_options or {}))
    model = _model(x, widths, num_classes, seed, init)
    batch = (x, y)

    eig_init = _eigvals(curvature.exact_hessian(model, loss, batch)) if initial else None
    keys = ("step", "loss", "count", "top", "within_top", "between_top")
    ckpt: dict[str, list] = {key: [] for key in keys}

    def at_checkpoint(step: int, net: nn.Module) -> None:
        if step not in wanted:
            return
        hess = curvature.exact_hessian(net, loss, batch)
        eig = _eigvals(hess)
        top = eig.flip(0)[:20]
        ckpt["step"].append(step)
        ckpt["loss"].append(train.evaluate(net, x, y, loss=loss)["loss"])
        ckpt["count"].append(_count_or_zero(eig))
        ckpt["top"].append(torch.nn.functional.pad(top, (0, 20 - len(top)), value=math.nan))
        if decompose:
            parts = _parts(net, loss, batch, hess)
            between = parts["eig_between"].flip(0)[:20]
            ckpt["within_top"].append(float(parts["eig_within"].max()))
            ckpt["between_top"].append(
                torch.nn.functional.pad(between, (0, 20 - len(between)), value=math.nan)
            )

    history = train.train(
        model, x, y, loss=loss, lr=lr, steps=max_steps, log_every=50, progress=False,
        stop_when=lambda h: train.grad_norm(model, x, y, loss=loss) <= grad_tol,
        callback=at_checkpoint if wanted else None,
    )  # fmt: skip
    hess = curvature.exact_hessian(model, loss, batch)
    eig = _eigvals(hess)
    grad = _loss_gradient(model, loss, x, y, num_classes)
    top = min(num_classes + 2, eig.numel())
    count = _count_or_zero(eig)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(eig.numel(), generator=gen, dtype=DTYPE).to(hess.device)
    random_count = _count_or_zero(_eigvals(project_out(hess, direction)))
    if grad.norm() > 0:  # a net whose units are all dead has no gradient (and no outliers)
        alignment = gradient_alignment(hess, grad, top=top)
        projected = _count_or_zero(_eigvals(project_out(hess, grad)))
    else:
        alignment, projected = torch.zeros(top, dtype=DTYPE), count
    out: dict[str, Any] = {
        "eig_final": eig,
        "num_params": int(eig.numel()),
        "count": count,
        "count_projected": projected,
        "count_random": random_count,
        "alignment": alignment,
        "steps": int(history.step[-1]),
        "final_loss": float(history.loss[-1]),
        "accuracy": float(history.accuracy[-1]),
        "grad_norm": float(grad.norm()),
        "class_gradient_ratio": class_gradient_ratio(model, x, y, num_classes, loss),
    }
    if eig_init is not None:
        out["eig_init"] = eig_init
    if decompose:
        out.update(_parts(model, loss, batch, hess))
    if wanted:
        out["ckpt_step"] = torch.tensor(ckpt["step"], dtype=torch.long)
        out["ckpt_loss"] = torch.tensor(ckpt["loss"], dtype=DTYPE)
        out["ckpt_count"] = torch.tensor(ckpt["count"], dtype=torch.long)
        out["ckpt_top"] = torch.stack(ckpt["top"]) if ckpt["top"] else torch.zeros(0, 20)
        if decompose:
            out["ckpt_within_top"] = torch.tensor(ckpt["within_top"], dtype=DTYPE)
            out["ckpt_between_top"] = (
                torch.stack(ckpt["between_top"]) if ckpt["between_top"] else torch.zeros(0, 20)
            )
    return out


def initial_spectrum(
    data: str = "blobs",
    num_classes: int = 4,
    *,
    seed: int = 0,
    init_seed: int | None = None,
    widths: Sequence[int] = (16, 16),
    init: str = "lecun",
    loss: str = "ce",
    decompose: bool = False,
    data_options: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The untrained net of :func:`spectrum_run`: the data of ``seed``, the initialisation of
    ``init_seed`` (default ``seed``, i.e. :func:`spectrum_run`'s ``eig_init``). Returns
    ``eig`` (the Hessian's spectrum, ascending), ``count`` and, with ``decompose``, the spectra
    of the between and within parts of G and of R (``eig_between``, ``eig_within``,
    ``eig_residual``, ``eig_ggn``): the controls of claims about training."""
    check_int("num_classes", num_classes, 2)
    if loss not in ("ce", "mse"):
        raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}")
    widths = check_ints("widths", widths, 1)
    init_seed = seed if init_seed is None else check_int("init_seed", init_seed, 0)
    x, y = _dataset(data, num_classes, seed, device, **dict(data_options or {}))
    model = _model(x, widths, num_classes, init_seed, init)
    hess = curvature.exact_hessian(model, loss, (x, y))
    eig = _eigvals(hess)
    out: dict[str, Any] = {"eig": eig, "count": _count_or_zero(eig), "num_params": eig.numel()}
    if decompose:
        out.update(_parts(model, loss, (x, y), hess))
    return out


def parts_summary(
    hessian: Tensor, between: Tensor, within: Tensor, residual: Tensor, k: int
) -> dict[str, float]:
    """How far the top of H is the between-class part's (Papyan 2019, 2020), from the four
    spectra of a run (any order):

    - ``between_match``: max over i <= k of |lambda_i(between) / lambda_i(H) - 1|, the largest
      relative mismatch between the top k eigenvalues of H and of the between part;
    - ``within_ratio``: lambda_max(within) / lambda_k(H);
    - ``residual_ratio``: max |lambda(R)| / lambda_max(H).
    """
    check_int("k", k, 1)
    top = [torch.as_tensor(t, dtype=torch.float64).flatten().sort(descending=True).values
           for t in (hessian, between, within)]  # fmt: skip
    h, b, w = top
    if h.numel() < k or b.numel() < k:
        raise ValueError(f"k must be at most the number of eigenvalues, got k={k}")
    if not bool((h[:k] > 0).all()):
        raise ValueError(f"the top {k} eigenvalues of H must be positive")
    res = torch.as_tensor(residual, dtype=torch.float64)
    return {
        "between_match": float((b[:k] / h[:k] - 1).abs().max()),
        "within_ratio": float(w[0] / h[k - 1]),
        "residual_ratio": float(res.abs().max() / h[0]),
    }


def _share_k_or_nan(eig: Tensor, k: int) -> float:
    try:
        return near_zero_fraction(eig, k=k)
    except ValueError:  # lambda_K not positive
        return math.nan


def _scales_or_nan(eig: Tensor, n_outliers: int) -> tuple[float, float]:
    try:
        return outlier_bulk_scales(eig, n_outliers)
    except ValueError:  # fewer than n_outliers positive eigenvalues
        return math.nan, math.nan


def _gaps_or_nan(eig: Tensor, k: int) -> tuple[float, float]:
    try:
        return outlier_gaps(eig, k)
    except ValueError:  # fewer than K + 1 positive eigenvalues
        return math.nan, math.nan


def cached_run(cache: Cache | None, fn, **config: Any) -> Any:
    """``fn(**config)`` (one of this module's experiment functions) through ``cache``, under
    the name ``<CACHE_PREFIX>-<fn name>``; the device is not part of the key."""
    return cached(cache, f"{CACHE_PREFIX}-{fn.__name__}", fn, **config)


def regime_table(
    data: str,
    ks: Sequence[int],
    seeds: Sequence[int],
    *,
    cache: Cache | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    **config: Any,
) -> dict[str, Any]:
    """:func:`spectrum_run` for every K in ``ks`` and seed in ``seeds`` (each run cached).

    Arrays of shape (len(ks), len(seeds)): ``count``, ``count_projected``, ``count_random``,
    ``count_init`` (NaN for runs without the initial spectrum), ``align_at_k`` (cos^2 of the
    gradient with the K-th eigenvector), ``align_max`` and ``align_position`` (the largest
    cos^2 and the 1-based position of the eigenvector it belongs to), ``frac_init`` (NaN
    without the initial spectrum), ``frac_final`` (:func:`near_zero_fraction`), ``frac_init_k``
    and ``frac_final_k`` (the same with the cut-off relative to lambda_K), ``outlier_scale`` and
    ``bulk_scale`` (:func:`outlier_bulk_scales` with K - 1 outliers), ``nonbulk``
    (:func:`nonbulk_count`), ``top_over_mean`` (lambda_max / mean |lambda|), ``final_loss``,
    ``accuracy``, ``grad_norm``, ``class_gradient_ratio``, ``steps``, ``top`` (the largest
    eigenvalue), ``num_params``, ``inner_ratio`` and ``gap_ratio`` (:func:`outlier_gaps`, NaN
    without K + 1 positive eigenvalues); and per-K medians over seeds (the lower median for an even number of
    seeds) of the counts: ``median_count``, ``median_projected``, ``median_random``,
    ``median_init``.
    """
    from tqdm.auto import tqdm

    ks, seeds = [int(k) for k in ks], [int(s) for s in seeds]
    if not ks or not seeds:
        raise ValueError("ks and seeds must not be empty")
    keys = ("count", "count_projected", "count_random", "count_init", "align_at_k", "align_max",
            "align_position", "frac_init", "frac_final", "frac_init_k", "frac_final_k",
            "outlier_scale", "bulk_scale", "nonbulk", "top_over_mean",
            "final_loss", "accuracy", "grad_norm", "class_gradient_ratio", "steps", "top",
            "num_params", "inner_ratio", "gap_ratio")  # fmt: skip
    table = {key: torch.zeros(len(ks), len(seeds), dtype=torch.float64) for key in keys}
    bar = tqdm(total=len(ks) * len(seeds), desc=f"{data} runs", disable=not progress, leave=False)
    for i, k in enumerate(ks):
        for j, seed in enumerate(seeds):
            r = cached_run(cache, spectrum_run, data=data, num_classes=k, seed=seed,
                           device=device, **config)  # fmt: skip
            align, eig, has_init = r["alignment"], r["eig_final"], "eig_init" in r
            values = (r["count"], r["count_projected"], r["count_random"],
                      _count_or_zero(r["eig_init"]) if has_init else math.nan,
                      float(align[k - 1]), float(align.max()), int(torch.argmax(align)) + 1,
                      near_zero_fraction(r["eig_init"]) if has_init else math.nan,
                      near_zero_fraction(eig),
                      _share_k_or_nan(r["eig_init"], k) if has_init else math.nan,
                      _share_k_or_nan(eig, k), *_scales_or_nan(eig, k - 1),
                      nonbulk_count(eig),
                      float(eig.max() / eig.abs().mean()), r["final_loss"], r["accuracy"],
                      r["grad_norm"], r["class_gradient_ratio"], r["steps"], float(eig.max()),
                      r["num_params"], *_gaps_or_nan(eig, k))  # fmt: skip
            for key, value in zip(keys, values, strict=True):
                table[key][i, j] = float(value)
            bar.update()
    bar.close()
    out: dict[str, Any] = {"ks": torch.tensor(ks), "seeds": torch.tensor(seeds), **table}
    for name, key in (("median_count", "count"), ("median_projected", "count_projected"),
                      ("median_random", "count_random"), ("median_init", "count_init")):  # fmt: skip
        out[name] = table[key].median(dim=1).values
    return out


def explore_spectrum(
    num_classes: int,
    width: int,
    spread: float,
    steps: int,
    *,
    data: str = "blobs",
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The spectrum for the notebook's sliders, validated with messages a reader can act on and
    cached per setting. ``data="blobs"``: K separable blobs in 10 dimensions (200 points, GD lr
    0.1), ``spread`` their standard deviation; ``data="simplex"``: K equidistant classes
    (500 points, GD lr 0.05), ``spread`` the noise around each class mean (separation 3). Two
    hidden layers of ``width``; at most ``steps`` GD steps."""
    check_int("num_classes (K)", num_classes, 2, 10)
    check_int("width", width, 1, 32)
    check_positive("spread", spread)
    check_int("steps", steps, 1, 5_000)
    if data == "blobs":
        options, lr = dict(n_train=200, dim=10, spread=spread), 0.1
    elif data == "simplex":
        options, lr = dict(n_train=500, dim=10, noise=spread), 0.05
    else:
        raise ValueError(f"data must be 'blobs' or 'simplex', got {data!r}")
    config = dict(
        data=data, num_classes=num_classes, widths=(width, width), lr=lr, max_steps=steps,
        data_options=options,
    )  # fmt: skip
    return cached(cache, f"{CACHE_PREFIX}-explore", spectrum_run, device=device, **config)


# ----------------------------------------------------------------------------- small vs large batch


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
    vectors in ``model.named_parameters()`` order (:class:`gradcourse.functional.FunctionalModel`
    over every parameter; x and y placed by its ``place_batch``). Returns float64 on the CPU."""
    if theta_a.shape != theta_b.shape:
        raise ValueError(f"theta_a and theta_b differ in shape: {theta_a.shape}, {theta_b.shape}")
    # every parameter, in named_parameters() order: the flat layout of theta_a and theta_b
    fm = FunctionalModel(model, "ce", params=dict(model.named_parameters()), copy=False)
    if theta_a.numel() != fm.size:
        raise ValueError(
            f"theta_a must have {fm.size} entries (the model's), got {theta_a.numel()}"
        )
    x, y = fm.place_batch(x, y)
    losses = []
    with torch.no_grad():
        for alpha in torch.as_tensor(alphas, dtype=torch.float64).tolist():
            theta = (1 - alpha) * theta_a + alpha * theta_b
            losses.append(float(fm.loss(fm.unflatten(theta), x, y)))
    return torch.tensor(losses, dtype=torch.float64)


def barrier(alphas: Tensor | Sequence[float], losses: Tensor | Sequence[float]) -> float:
    """max over alpha strictly between 0 and 1 of L(alpha) - ((1 - alpha) L(0) + alpha L(1)).

    At or below zero: no bump above the chord between the two solutions (below zero: the line
    lies under its chord). The two ends themselves, where the chord meets the line up to
    rounding, are left out. Needs alpha = 0, alpha = 1 and a value between them in ``alphas``.
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
    inside = (a > 0) & (a < 1) & ~at0 & ~at1
    if not inside.any():
        raise ValueError("alphas must include a value strictly between 0 and 1")
    chord = (1 - a[inside]) * l0 + a[inside] * l1
    return float((losses[inside] - chord).max())


def value_at_loss(
    losses: Tensor | Sequence[float], values: Tensor | Sequence[float], target: float
) -> float:
    """A quantity recorded along a training path, read off where the path's loss first falls to
    ``target``: linear in the loss between the two records around that crossing. NaN when the
    path starts at or below ``target`` or never reaches it (no matched point on the path)."""
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if losses.shape != values.shape or losses.numel() < 2:
        raise ValueError("losses and values must be 1-D, of equal length, at least 2")
    if not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target!r}")
    if losses[0] <= target:
        return math.nan
    below = torch.nonzero(losses <= target).flatten()
    if below.numel() == 0:
        return math.nan
    i = int(below[0])
    l0, l1, v0, v1 = losses[i - 1], losses[i], values[i - 1], values[i]
    return float(v0 + (v1 - v0) * (l0 - target) / (l0 - l1))


def bracket_at_loss(
    losses: Tensor | Sequence[float], values: Tensor | Sequence[float], target: float
) -> tuple[float, float]:
    """The two recorded values around the crossing of :func:`value_at_loss` (the record before
    the path's loss first falls to ``target`` and the one at or after it), smaller first: a
    band for the matched value where the path is recorded sparsely. NaNs where
    :func:`value_at_loss` is NaN."""
    if math.isnan(value_at_loss(losses, values, target)):
        return math.nan, math.nan
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    i = int(torch.nonzero(losses <= target).flatten()[0])
    a, b = float(values[i - 1]), float(values[i])
    return min(a, b), max(a, b)


def _top_eigenvalue(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> float:
    op = curvature.HessianOperator(model, "ce", (x, y))
    return float(curvature.lanczos(op, k=1, seed=seed).eigenvalues[0])


def batch_switch_experiment(
    *,
    data: str = "fashion",
    num_classes: int = 10,
    widths: Sequence[int] = (16, 16),
    lr: float = 0.1,
    large_batch: int = 1_000,
    small_batch: int = 10,
    steps_first: int = 1_500,
    steps_second: int = 1_500,
    num_alphas: int = 41,
    path_every: int = 100,
    data_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Sagun et al.'s section 4 protocol: train one initialisation with SGD at ``large_batch``
    for ``steps_first`` updates, then continue from there with ``small_batch`` for
    ``steps_second``; and the reverse (small first, then large), with the same lr throughout.

    For each switch (keys prefixed ``large_small_`` and ``small_large_``): the distance the
    second phase moved relative to the norm of the parameters at the switch, the training loss
    on the line between the two ends (alpha in [-0.5, 1.5]), its :func:`barrier`, the barrier
    relative to the mean loss of the two ends, the top Hessian eigenvalue (Lanczos) and the
    loss at each end; and ``matched_top``, the top eigenvalue of the large-batch path where
    its loss equals the small-batch end's (:func:`value_at_loss`), with ``matched_ratio`` = the
    small-batch end's top eigenvalue over it. The large-batch path is the first phase of
    ``large_small`` continued at the large batch for ``steps_second`` more steps (the batches
    its second phase would have drawn), recorded every ``path_every`` steps as ``path_step``,
    ``path_loss`` and ``path_top``. The control of the barrier (keys ``independent_``): a second, independent
    initialisation trained like the first phase of ``large_small``; the line between the two
    large-batch solutions, its relative barrier and their relative distance."""
    check_int("large_batch", large_batch, 1)
    check_int("small_batch", small_batch, 1)
    check_int("steps_first", steps_first, 1)
    check_int("steps_second", steps_second, 1)
    check_int("num_alphas", num_alphas, 5)
    check_int("path_every", path_every, 1)
    x, y = _dataset(data, num_classes, seed, device, **dict(data_options or {}))
    if large_batch > len(x) or small_batch > len(x):
        raise ValueError(f"batch sizes must be <= the {len(x)} training examples")
    alphas = torch.linspace(-0.5, 1.5, num_alphas, dtype=torch.float64)
    alphas = torch.unique(torch.cat([alphas, torch.tensor([0.0, 1.0], dtype=torch.float64)]))
    out: dict[str, Any] = {"alphas": alphas, "n_train": len(x)}

    def net(init_seed: int) -> nn.Module:
        return models.MLP(x.shape[1], tuple(widths), num_classes, seed=init_seed, dtype=DTYPE,
                          device=x.device)  # fmt: skip

    def sgd(model: nn.Module, batch: int, steps: int, phase: int, callback=None):
        return train.train(
            model, x, y, loss="ce", lr=lr, optimizer="sgd", batch_size=batch, steps=steps,
            seed=seed + phase, log_every=10**9, progress=False, callback=callback,
            every=path_every,
        )  # fmt: skip

    def on_path(step: int, model: nn.Module) -> dict[str, float]:
        loss = train.evaluate(model, x, y, loss="ce")["loss"]
        return {"loss": loss, "top": _top_eigenvalue(model, x, y, seed)}

    def line_between(model: nn.Module, a: Tensor, b: Tensor, losses: list, prefix: str) -> None:
        line = interpolate(model, a, b, x, y, alphas)
        bump = barrier(alphas, line)
        out.update({
            f"{prefix}_loss": line,
            f"{prefix}_barrier": bump,
            f"{prefix}_relative_barrier": bump / (0.5 * (losses[0] + losses[1])),
            f"{prefix}_distance": float((b - a).norm() / a.norm()),
            f"{prefix}_end_loss": losses,
        })  # fmt: skip

    def end_of(model: nn.Module) -> tuple[Tensor, float]:
        theta = flatten(p.detach() for p in model.parameters())
        return theta, train.evaluate(model, x, y, loss="ce")["loss"]

    for name, (first, second) in (
        ("large_small", (large_batch, small_batch)),
        ("small_large", (small_batch, large_batch)),
    ):
        model = net(seed)
        ends, tops, losses = [], [], []
        for phase, (batch, steps) in enumerate(((first, steps_first), (second, steps_second))):
            record = name == "large_small" and phase == 0
            history = sgd(model, batch, steps, phase, on_path if record else None)
            if record:  # the large-batch path, continued at the large batch past the switch
                onward = copy.deepcopy(model)
                more = sgd(onward, large_batch, steps_second, 1, on_path).records[1:]
                records = history.records + [r | {"step": r["step"] + steps} for r in more]
                for key in ("step", "loss", "top"):
                    out[f"path_{key}"] = torch.tensor(
                        [r[key] for r in records], dtype=torch.float64
                    )
            theta, loss = end_of(model)
            ends.append(theta)
            losses.append(loss)
            tops.append(_top_eigenvalue(model, x, y, seed))
        line_between(model, ends[0], ends[1], losses, name)
        small = 1 if first == large_batch else 0  # the small-batch end
        matched = value_at_loss(out["path_loss"], out["path_top"], losses[small])
        out.update({
            f"{name}_top": tops,
            f"{name}_matched_top": matched,
            f"{name}_matched_ratio": tops[small] / matched,
        })  # fmt: skip
        if name == "large_small":
            large_end, large_loss = ends[0], losses[0]
    other = net(seed + 10_000)
    sgd(other, large_batch, steps_first, 0)
    theta, loss = end_of(other)
    line_between(other, large_end, theta, [large_loss, loss], "independent")
    return out


# ----------------------------------------------------------------------------- SLQ at scale


def slq_experiment(
    *,
    dataset: str = "mnist1d",
    model: str = "mlp",
    n_train: int = 200,
    pca_dim: int | None = None,
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

    ``dataset``: "fashion_mnist" (offline once installed; ``pca_dim`` projects it on that many
    principal components, :func:`fashion_pca`, for a net small enough for exact moments),
    "mnist1d" (offline) or "cifar10" (needs the files on disk);
    ``model``: "mlp" (one hidden layer of ``hidden``) or "cnn" (gc.models.SmallCNN).
    Trained with SGD (``batch_size``, ``lr``) for ``epochs``; the Hessian operator averages over
    the training set in chunks of ``eval_batch``. Returns the quadrature nodes and weights.
    """
    if dataset not in ("fashion_mnist", "mnist1d", "cifar10"):
        raise ValueError(
            f"dataset must be 'fashion_mnist', 'mnist1d' or 'cifar10', got {dataset!r}"
        )
    if pca_dim is not None and (dataset != "fashion_mnist" or model != "mlp"):
        raise ValueError("pca_dim applies to dataset='fashion_mnist' with model='mlp' only")
    if model not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    dtype = DTYPE if exact else torch.float32
    if dataset == "fashion_mnist" and pca_dim is not None:
        x, y = fashion_pca(n_train, dim=pca_dim, seed=seed)
        x, y = x.to(device, dtype), y.to(device)
    else:
        if dataset == "mnist1d":
            ds = data.mnist1d(seed=42)
            ds = ds.subset(n_train, seed=seed) if n_train < ds.n_train else ds
        elif dataset == "fashion_mnist":
            ds = data.fashion_mnist(n_train=n_train, n_test=10, seed=seed)
        else:
            ds = data.cifar10(n_train=n_train, n_test=100, seed=seed)
        ds = ds.to(device, dtype)
        x, y = ds.x_train, ds.y_train
    in_channels = 3 if dataset == "cifar10" else 1
    if model == "mlp":
        net: nn.Module = models.MLP(
            math.prod(x.shape[1:]), (hidden,), 10, seed=seed, dtype=dtype, device=x.device
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
