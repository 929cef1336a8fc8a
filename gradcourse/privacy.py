"""Differentially private SGD: per-example clipping, Gaussian noise, and clipping's bias.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", arXiv 1607.00133,
Algorithm 1; DPSGD-GC in Zhang et al.) takes, at every step, a batch B_t, the per-example
gradients g_i (:mod:`gradcourse.pergrad`), clips each to norm C,

    clip(g, C) = g * min(1, C / ||g||),

adds Gaussian noise of standard deviation sigma * C to their sum, and divides by the batch size b:

    theta <- theta - lr * (sum_{i in B_t} clip(g_i, C) + N(0, sigma^2 C^2 I)) / b.

With Poisson sampling (each example joins the batch independently with rate q; the batch size
varies, b = q n is its expectation, as Opacus divides) the privacy of the released iterates is
that of the subsampled Gaussian mechanism, accounted by :func:`epsilon` with a well-kept library
(Opacus's RDP accountant; :func:`epsilon` can also ask Google's ``dp_accounting``, and a test
checks that the two agree). With ``sampling="shuffle"`` (fixed-size batches from a reshuffled
epoch, b the actual size) that accounting does not apply; it is there to compare with plain SGD.

Clipping is biased: clipped gradient descent converges to a zero of the *clipped* mean gradient,
which is not a stationary point of the loss unless C exceeds the per-example gradient norms.
For mean estimation in one dimension, l_i(theta) = (theta - y_i)^2 / 2, that point has a closed
form (:func:`clipped_mean`).

DiceSGD (Zhang, Bu, Wu & Hong, "Differentially Private SGD Without Clipping Bias: An
Error-Feedback Approach", ICLR 2024, arXiv 2311.14632, Algorithm 1) feeds back the error between
the unclipped and the clipped update, itself clipped at C2 >= C1, in a hidden state e_t:

    v_t = (1/b) sum_i clip(g_i, C1) + clip(e_t, C2)
    theta <- theta - lr * (v_t + w_t),                  w_t ~ N(0, s^2 I)
    e_{t+1} = e_t + (1/b) sum_i g_i - v_t,               e_0 = 0

so that the clipping error is eventually applied and the constant bias disappears. In
:func:`dp_train` the noise is s = sigma * C1 / b, with sigma the ``noise_multiplier`` passed.

**DiceSGD's privacy.** The hidden state carries unclipped information forward, so DiceSGD at
DP-SGD's noise is *not* DP-SGD's privacy; Zhang et al. prove a Renyi-DP bound of their own (an
algorithm-specific analysis of the released iterates with the hidden state, section 3 of the
paper) that needs more noise. This module does not re-derive that bound. :func:`dice_noise_multiplier`
applies the calibration of the authors' released code: DP-SGD's noise multiplier for the target
(epsilon, delta) at the same (q, T), times sqrt(1 + 2 C2 / C1). That code clips the error of
the *summed* update at C2 (``feedback_scale="sum"`` in :func:`dp_train`: C2 / b on the mean
update), so the fed-back term adds at most C2 to the sum, and the calibration is in those units.
An epsilon quoted for a DiceSGD run made that way is the authors' claim, through DP-SGD's
accountant (:func:`epsilon`); no library checks it. With the error clipped on the mean update
(``feedback_scale="mean"``, the update as the paper writes it), one example can move the fed-back
term by up to 2 C2 against C1 / b for its clipped gradient, and that calibration has no argument
we can check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap
from tqdm.auto import tqdm

from . import pergrad
from .checks import check_finite, check_int, check_nonnegative, check_number, check_positive
from .functional import flatten
from .layers import capture_layers, rule_for, supports_weighted_grads
from .losses import LossFn, get_loss
from .train import SCHEDULES, lr_factor

__all__ = [
    "ACCOUNTANTS",
    "FEEDBACK_SCALES",
    "METHODS",
    "SAMPLINGS",
    "clip",
    "clipped_mean",
    "clipped_sum",
    "dice_noise_multiplier",
    "feedback_noise_ratio",
    "dp_train",
    "epsilon",
    "noise_multiplier",
    "poisson_batches",
]

METHODS: tuple[str, ...] = ("sgd", "dpsgd", "dice")
SAMPLINGS: tuple[str, ...] = ("poisson", "shuffle")
FEEDBACK_SCALES: tuple[str, ...] = ("mean", "sum")
ACCOUNTANTS: tuple[str, ...] = ("opacus", "dp_accounting")


# ----------------------------------------------------------------------------- clipping


def clip(g: Tensor, threshold: float) -> Tensor:
    """Each row of ``g`` (n, P) scaled to norm at most ``threshold``: g_i * min(1, C / ||g_i||)
    (a zero row stays zero; ``threshold=inf`` returns ``g`` unchanged). A 1-D ``g`` is one row.

    The norms and the scaling are computed in float64 and the result cast back, so a float16
    row whose norm overflows float16 is still scaled to norm C. A row holding a nan or an
    infinity has no direction to keep: it is refused (ValueError naming the row)."""
    threshold = check_number("threshold", threshold, low=0, low_open=True, allow_inf=True)
    if not isinstance(g, Tensor) or not g.is_floating_point():
        got = g.dtype if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"g must be a floating-point tensor of gradients, got {got}")
    if g.ndim == 0:
        raise ValueError(
            "g must be a vector (one gradient) or a matrix (one per row), got a 0-d tensor"
        )
    rows = g.reshape(1, -1) if g.ndim == 1 else g.reshape(len(g), -1)
    check_finite("g", rows)
    if threshold == math.inf:
        return g
    wide = rows.double()
    norms = wide.norm(dim=1, keepdim=True)
    factor = torch.where(
        norms > threshold, threshold / norms.clamp_min(1e-300), torch.ones_like(norms)
    )
    return (wide * factor).to(g.dtype).reshape(g.shape)


def clipped_mean(y: Tensor | np.ndarray, threshold: float) -> float:
    """The fixed point of clipped gradient descent for mean estimation in one dimension: the
    theta with sum_i clip(theta - y_i, C) = 0 (per-example losses (theta - y_i)^2 / 2).

    h(theta) = sum_i clamp(theta - y_i, -C, C) is continuous, non-decreasing and piecewise
    linear with kinks at y_i +- C, so its zero is found exactly between two consecutive kinks
    (the midpoint of the flat piece if h vanishes on an interval). For C >= max |y_i - mean|
    it is the mean; as C -> 0 it tends to the median."""
    y = torch.as_tensor(np.asarray(y, dtype=np.float64)).flatten()
    if len(y) == 0 or not torch.isfinite(y).all():
        raise ValueError("y must hold at least one finite number")
    threshold = check_number("threshold", threshold, low=0, low_open=True, allow_inf=True)
    if threshold == math.inf:
        return float(y.mean())

    def h(theta: Tensor) -> Tensor:
        return (theta.reshape(-1, 1) - y).clamp(-threshold, threshold).sum(1)

    kinks = torch.cat([y - threshold, y + threshold]).unique()  # sorted
    values = h(kinks)  # h(kinks[0]) = -n C < 0 < n C = h(kinks[-1])
    zero = (values == 0).nonzero().flatten()
    if len(zero):  # h vanishes on [kinks[zero[0]], kinks[zero[-1]]]
        return float((kinks[zero[0]] + kinks[zero[-1]]) / 2)
    j = int((values > 0).nonzero()[0])  # first kink where h > 0: the zero is in (j-1, j)
    a, b, ha, hb = kinks[j - 1], kinks[j], values[j - 1], values[j]
    return float(a - ha * (b - a) / (hb - ha))


# ----------------------------------------------------------------------------- sampling


def poisson_batches(n: int, rate: float, *, seed: int = 0) -> Iterator[Tensor]:
    """Endless batches of indices: each example joins each batch independently with
    probability ``rate`` (a batch may be empty), from ``torch.Generator(seed)``."""
    check_int("n", n, 1)
    rate = check_number("rate", rate, low=0, high=1, low_open=True)
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.nonzero(torch.rand(n, generator=gen) < rate).flatten()


def _shuffle_batches(n: int, size: int, *, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        yield from perm.split(size)


# ----------------------------------------------------------------------------- training


def _flat_grads(model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor) -> Tensor:
    """(n, P): every example's gradient, flattened (``pergrad.per_example_grads``)."""
    return flatten(pergrad.per_example_grads(model, loss, x, y), batch_dims=1)


def _clipped_sums(
    model: nn.Module,
    loss: str | LossFn,
    x: Tensor,
    y: Tensor,
    threshold: float,
    *,
    with_plain: bool = False,
) -> Tensor:
    """(K, P), flattened, in eval mode: row 0 the gradient of sum_i min(1, C / ||g_i||) l_i,
    that is sum_i clip(g_i, C) (all ones when C is infinite); with ``with_plain`` a row 1, the
    gradient of sum_i l_i. One forward pass. Where the linear trick applies, one backward pass
    to the layer outputs through that forward's graph gives the per-example norms (as Opacus's
    ghost clipping); the rows then come from the same layer inputs and output gradients,
    rescaled per example (each layer rule's ``weighted_grads``: "book-keeping", no second
    backward pass), or, for a layer whose rule has none, from one more backward pass per row.
    Otherwise the norms come from :func:`gradcourse.pergrad.per_example_grad_norms` (vmap)
    first and each row from one backward pass."""
    if threshold != math.inf:
        pergrad._check_batchnorm(model)  # the norms need running statistics, as pergrad's
    params = [p for p in model.parameters() if p.requires_grad]
    fm, x, y = pergrad._prepare(model, loss, x, y, None)
    one = vmap(lambda o, t: fm.loss_of_outputs(o.unsqueeze(0), t.unsqueeze(0)))
    layers: dict[str, nn.Module] = {}
    norms = errors = None
    with pergrad.eval_mode(model):
        if threshold != math.inf:
            try:
                layers = pergrad._trick_setup(fm, x[:1])
            except pergrad._Unsupported:
                norms = pergrad.per_example_grad_norms(model, loss, x, y, method="vmap")
        book_keeping = bool(layers) and all(
            supports_weighted_grads(rule_for(m)) for m in layers.values()
        )
        # the layers' outputs are differentiated against as they are (no copy) unless an
        # in-place op overwrote one during the forward pass: then once more, with copies
        for clone in (False, True):
            with capture_layers(layers, clone=clone) as cap, torch.enable_grad():
                losses = one(model(x), y)
            if not cap.overwritten():
                break
        if layers:
            with torch.enable_grad():
                try:
                    errors = pergrad._trick_errors(
                        layers, cap, losses.sum(), retain_graph=not book_keeping
                    )
                    norms = pergrad._trick_norms(layers, cap, errors).sqrt()
                except pergrad._Unsupported:  # a layer ran twice: the graph stays for the sums
                    book_keeping, errors = False, None
                    norms = pergrad.per_example_grad_norms(model, loss, x, y, method="vmap")
        if norms is None:
            weights = [torch.ones(len(x), dtype=torch.float64)]
        else:
            norms = norms.detach().double().cpu()
            bad = (~torch.isfinite(norms)).nonzero().flatten()
            if len(bad):  # finite inputs (checked), yet a gradient overflowed: say which
                raise ValueError(
                    f"the gradient of example {int(bad[0])} is not finite (norm "
                    f"{float(norms[bad[0]])}), {len(bad)} of {len(norms)} in the batch: its loss "
                    "or the model's weights overflow; clipping it would hide that"
                )
            weights = [torch.where(norms > threshold, threshold / norms.clamp_min(1e-300), 1.0)]
        if with_plain:
            weights.append(torch.ones_like(weights[0]))
        rows = []
        for k, w in enumerate(weights):
            w = w.to(x.device, fm.dtype)
            if book_keeping:
                grads = _weighted_layer_grads(layers, cap, errors, w, params)
            else:
                grads = torch.autograd.grad(
                    (losses * w).sum(), params, retain_graph=k < len(weights) - 1, allow_unused=True
                )
            # a trainable parameter the loss does not use (an auxiliary head) gets zero
            rows.append(
                flatten(
                    torch.zeros_like(p) if g is None else g
                    for p, g in zip(params, grads, strict=True)
                )
            )
    return torch.stack(rows)


def _weighted_layer_grads(
    layers: dict[str, nn.Module],
    cap: capture_layers,
    errors: dict[str, Tensor | None],
    w: Tensor,
    params: list[nn.Parameter],
) -> list[Tensor | None]:
    """sum_i w_i grad l_i for each of ``params`` (None where the loss does not reach it), from
    each layer's captured input and output gradient (:meth:`LayerRule.weighted_grads`)."""
    found: dict[int, Tensor] = {}
    with torch.no_grad():
        for name, m in layers.items():
            if errors[name] is not None:
                for p, g in rule_for(m).weighted_grads(m, cap.calls[name][0][0], errors[name], w):
                    found[id(p)] = g
    return [found.get(id(p)) for p in params]


def clipped_sum(
    model: nn.Module, loss: str | LossFn, x: Tensor, y: Tensor, threshold: float
) -> Tensor:
    """sum_i clip(g_i, C) as one flat (P,) vector, without forming the per-example gradients:
    sum_i min(1, C / ||g_i||) g_i is the gradient of the reweighted loss
    sum_i min(1, C / ||g_i||) l_i ("ghost clipping": Goodfellow 2015; Lee & Kifer 2021). Where
    the linear trick of :mod:`gradcourse.pergrad` applies, one forward and one backward pass
    serve both: the backward pass to the layer outputs gives the norms, and each layer's
    gradient of the reweighted loss is formed from the same layer inputs and output
    gradients, rescaled per example ("book-keeping": Bu, Wang, Zha & Karypis 2023, arXiv
    2210.00038), with no second backward pass (a layer rule without ``weighted_grads`` costs
    one). Otherwise the norms come from ``vmap`` first and the sum from one backward pass.
    Eval mode, as the norms. ``threshold=inf``: the plain sum (one backward pass)."""
    threshold = check_number("threshold", threshold, low=0, low_open=True, allow_inf=True)
    return _clipped_sums(model, loss, x, y, threshold)[0]


def dp_train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    method: str = "dpsgd",
    loss: str | LossFn = "ce",
    lr: float,
    steps: int,
    batch_size: int,
    clip_norm: float = 1.0,
    feedback_clip: float | None = None,
    feedback_scale: str = "mean",
    noise_multiplier: float = 0.0,
    sampling: str = "poisson",
    seed: int = 0,
    callback: Callable[[int, nn.Module], dict[str, Any] | None] | None = None,
    every: int = 1,
    schedule: str = "constant",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` in place for ``steps`` updates with ``method``:

    - ``"sgd"``: theta <- theta - lr * (1/b) sum_i g_i (no clipping, no noise);
    - ``"dpsgd"``: DP-SGD, per-example clipping at ``clip_norm`` and noise of standard deviation
      ``noise_multiplier * clip_norm`` on the sum (module docstring);
    - ``"dice"``: DiceSGD with C1 = ``clip_norm``, C2 = ``feedback_clip`` (default C1; must be
      >= C1) and noise of standard deviation ``noise_multiplier * clip_norm`` on the sum, as
      DP-SGD: for the authors' privacy calibration pass :func:`dice_noise_multiplier`'s value
      (module docstring). ``feedback_scale="mean"`` clips the error of the mean update at C2
      (Algorithm 1 as written); ``"sum"`` clips the error of the *summed* update at C2, as the
      authors' released code does, which is the mean update's error clipped at C2 / b.

    Batches: ``sampling="poisson"`` with rate q = batch_size / n, the sums divided by the expected
    size b = q n; ``"shuffle"``, reshuffled epochs cut into batches of ``batch_size`` (the last
    one of an epoch may be smaller), divided by the actual size. The clipped sums come from
    :func:`clipped_sum` (per-example norms and the reweighted sum from one backward pass; eval mode: no
    BatchNorm statistics, no dropout in the gradient). All randomness (batches, noise) is drawn from generators seeded by
    ``seed``; the global RNG is untouched.

    The step size of update t is ``lr`` times :func:`gradcourse.train.lr_factor` of ``schedule``
    (``"constant"``, ``"step"`` or ``"cosine"`` over ``steps``).

    ``callback(step, model)`` runs at steps 0, every, 2 every, ... and after the last update;
    the dicts it returns (with their step) are returned as a list.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    get_loss(loss)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.ndim == 0 or y.ndim == 0:
        raise ValueError("x and y must be tensors with one example per row (dim 0)")
    n = len(x)
    if n == 0:
        raise ValueError("x must hold at least one example, got 0")
    if len(y) != n:
        raise ValueError(
            f"x and y must hold the same number of examples (dim 0), got {n} and {len(y)}"
        )
    check_finite("x", x)
    check_finite("y", y)
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1, n)
    check_int("every", every, 1)
    check_int("seed", seed, 0)
    lr = check_positive("lr", lr)
    c1 = check_number("clip_norm", clip_norm, low=0, low_open=True, allow_inf=True)
    c2 = (
        c1
        if feedback_clip is None
        else check_number("feedback_clip", feedback_clip, low=0, low_open=True, allow_inf=True)
    )
    if c2 < c1:
        raise ValueError(f"feedback_clip must be >= clip_norm ({c1:g}), got {c2!r}")
    if feedback_scale not in FEEDBACK_SCALES:
        raise ValueError(f"feedback_scale must be one of {FEEDBACK_SCALES}, got {feedback_scale!r}")
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    if sigma > 0 and (method == "sgd" or c1 == math.inf):
        raise ValueError(
            "noise_multiplier > 0 needs clipping: method 'dpsgd' or 'dice' with a finite clip_norm"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    theta = nn.utils.parameters_to_vector(params).detach()
    error = torch.zeros_like(theta)
    noise_gen = torch.Generator(device=theta.device).manual_seed(seed + 1)
    if sampling == "poisson":
        batches = poisson_batches(n, batch_size / n, seed=seed)
    else:
        batches = _shuffle_batches(n, batch_size, seed=seed)
    records: list[dict[str, Any]] = []

    def record(step: int) -> None:
        if callback is not None:
            out = callback(step, model)
            if out is not None:
                records.append({"step": step, **out})

    for t in tqdm(range(steps), desc=method, disable=not progress, leave=False):
        if t % every == 0:
            record(t)
        idx = next(batches).to(x.device)
        b = batch_size if sampling == "poisson" else max(len(idx), 1)
        empty = len(idx) == 0
        if empty:
            plain = clipped = theta.new_zeros(len(theta))
        elif method == "sgd":
            plain = clipped_sum(model, loss, x[idx], y[idx], math.inf)
        elif method == "dpsgd":
            clipped = clipped_sum(model, loss, x[idx], y[idx], c1)
        else:  # DiceSGD: both sums from one forward pass
            clipped, plain = _clipped_sums(model, loss, x[idx], y[idx], c1, with_plain=True)
        if method == "sgd":
            update = plain.to(theta) / b
        else:
            update = clipped.to(theta) / b
            if sigma > 0:
                noise = torch.randn(theta.shape, generator=noise_gen, device=theta.device)
                noise = noise.to(theta) * (sigma * c1 / b)
            else:
                noise = torch.zeros_like(theta)
            if method == "dice":
                v = update + clip(error, c2 if feedback_scale == "mean" else c2 / b)
                error = error + plain.to(theta) / b - v
                update = v
            update = update + noise
        theta = theta - lr * lr_factor(schedule, t, steps) * update
        nn.utils.vector_to_parameters(theta, params)
    record(steps)
    return records


# ----------------------------------------------------------------------------- accounting


def _check_accounting(sample_rate: float, steps: int, delta: float) -> tuple[float, float]:
    q = check_number("sample_rate", sample_rate, low=0, high=1, low_open=True)
    check_int("steps", steps, 1)
    delta = check_number("delta", delta, low=0, high=1, low_open=True, high_open=True)
    return q, delta


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "opacus",
) -> float:
    """epsilon of DP-SGD with Poisson sampling at ``sample_rate`` after ``steps`` steps at
    ``delta``, by Renyi-DP accounting of the subsampled Gaussian mechanism (Mironov 2017;
    Mironov, Talwar & Zhang 2019), from Opacus's ``RDPAccountant`` or Google's
    ``dp_accounting`` (``RdpAccountant``). Both are well-kept libraries; neither is
    re-implemented here. DP-SGD only: see the module docstring for DiceSGD."""
    sigma = check_positive("noise_multiplier", noise_multiplier)
    q, delta = _check_accounting(sample_rate, steps, delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if accountant == "opacus":
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        return float(acc.get_epsilon(delta))
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier sigma (to Opacus's search precision, 0.01 in epsilon)
    whose DP-SGD run reaches at most ``target_epsilon`` (Opacus's ``get_noise_multiplier``
    with its RDP accountant)."""
    eps = check_positive("target_epsilon", target_epsilon)
    q, delta = _check_accounting(sample_rate, steps, delta)
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search visits tiny sigmas whose best order is the largest
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp"
            )
        except ValueError as err:  # Opacus: "The privacy budget is too low."
            raise ValueError(
                f"target_epsilon = {eps:g} is out of reach for sample_rate = {q:g}, steps = {steps}, "
                f"delta = {delta:g}: Opacus's search found no noise multiplier ({err})"
            ) from err
        return float(sigma)


def dice_noise_multiplier(noise_multiplier: float, clip_norm: float, feedback_clip: float) -> float:
    """DiceSGD's noise multiplier as the authors' released code calibrates it (module
    docstring): ``noise_multiplier`` (DP-SGD's, e.g. from :func:`noise_multiplier` for the target
    epsilon) times sqrt(1 + 2 C2 / C1), C1 = ``clip_norm``, C2 = ``feedback_clip`` >= C1. Pass the
    result to :func:`dp_train` with ``method="dice"``. Not an accountant: this rescales, it does
    not prove."""
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    c1 = check_positive("clip_norm", clip_norm)
    c2 = check_positive("feedback_clip", feedback_clip)
    if c2 < c1:
        raise ValueError(f"feedback_clip must be >= clip_norm ({c1:g}), got {feedback_clip!r}")
    return sigma * math.sqrt(1.0 + 2.0 * c2 / c1)


def feedback_noise_ratio(
    noise_multiplier: float,
    clip_norm: float,
    feedback_clip: float,
    batch_size: int,
    feedback_scale: str = "mean",
) -> float:
    """A worst-case check of DiceSGD's fed-back term alone: the noise's standard deviation on the
    mean update, ``noise_multiplier * clip_norm / b``, divided by the largest change one example
    can make to clip(e_t, C2) in one step when nothing is assumed about how e_t was built
    (2 C2 on the mean update; 2 C2 / b with ``feedback_scale="sum"``). That is the noise
    multiplier the term would have as a Gaussian mechanism of its own; since e_t carries every
    past batch, no subsampling amplification applies to it. A small value means this simple
    argument gives no useful privacy; the paper's theorem uses the structure of e_t instead."""
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    c1 = check_positive("clip_norm", clip_norm)
    c2 = check_positive("feedback_clip", feedback_clip)
    check_int("batch_size", batch_size, 1)
    if feedback_scale not in FEEDBACK_SCALES:
        raise ValueError(f"feedback_scale must be one of {FEEDBACK_SCALES}, got {feedback_scale!r}")
    change = 2 * c2 if feedback_scale == "mean" else 2 * c2 / batch_size
    return sigma * c1 / batch_size / change
