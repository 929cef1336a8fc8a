"""Notebook 06 (in progress), input-gradient attributions on two-block images (Shah, Jain &
Netrapalli 2021, arXiv 2102.12781; Grad-CAM: Selvaraju et al. 2017, arXiv 1610.02391).

Two classes of Fashion-MNIST, each image stacked with a fixed "null" block above or below it
(:func:`gradcourse.data.block_images`), so that the pixels that can tell the classes apart are
known. A standard and an adversarially trained model (:func:`gradcourse.attribution.pgd`) per
seed, cached (:func:`cached_model`); the share of each attribution's mass on the signal block
(:func:`attribution_mass`, over many models :func:`share_table`); and Shah et al.'s DiffROAR in
small form (:func:`diffroar`): retrain on the pixels an attribution ranks highest, and on those it
ranks lowest, and compare. :func:`cached_models` and :func:`cached_diffroars` run many cached
jobs under one progress bar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import attribution as at
from .. import data, models
from ..cache import Cache
from ..checks import check_int, check_ints, check_number, check_positive
from ..stats import Interval
from . import with_defaults

__all__ = [
    "ARCHS",
    "DATASETS",
    "DEFAULTS",
    "METHODS",
    "INPUTS",
    "PLACEMENTS",
    "attribution_map",
    "attribution_mass",
    "cached_diffroar",
    "cached_diffroars",
    "cached_model",
    "cached_models",
    "config",
    "diffroar",
    "kept_nonzero",
    "last_conv",
    "load_blocks",
    "make_model",
    "seeds_and_images_interval",
    "share_table",
    "train_model",
]

ARCHS: tuple[str, ...] = ("mlp", "small_cnn")
DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist")  # MNIST: the paper's, when on disk
METHODS: tuple[str, ...] = ("gradient", "smoothgrad", "gradcam")

DEFAULTS: dict[str, Any] = dict(
    dataset="fashion_mnist",
    classes=(0, 1),  # Fashion-MNIST's T-shirt/top against trouser (MNIST: the paper's 0 and 1)
    n_train=4000,
    n_test=1000,
    data_seed=0,
    arch="mlp",
    widths=(256,),  # one hidden layer: the model of Shah et al.'s theory
    channels=(16, 32),
    hidden=64,
    epochs=5,
    batch_size=64,
    lr=1e-3,  # Adam
    eps=0.0,  # l_inf radius of adversarial training (0: standard training)
    pgd_steps=7,  # 0 with eps > 0: training on uniform noise in the ball, a control
    placement="random",  # where the signal block goes: "random" (BlockMNIST) or always "top"
)
PLACEMENTS: tuple[str, ...] = ("random", "top")
# keys added after models were cached: left out of a cache key at their default value, so that
# the entries cached before them stay valid
_LATER_KEYS: dict[str, Any] = {"placement": "random"}


def _cache_key(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not (k in _LATER_KEYS and v == _LATER_KEYS[k])}


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    cfg["classes"] = check_ints("classes", cfg["classes"], 0, 9)
    cfg["widths"] = check_ints("widths", cfg["widths"], 1, nonempty=True)
    cfg["channels"] = check_ints("channels", cfg["channels"], 1, nonempty=True)
    if len(cfg["classes"]) != 2 or len(set(cfg["classes"])) != 2:
        raise ValueError(f"classes must be two different classes, got {cfg['classes']}")
    if cfg["dataset"] not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {cfg['dataset']!r}")
    check_ints("classes", cfg["classes"], 0, 9)
    check_int("n_train", cfg["n_train"], 2, 12_000)
    check_int("n_test", cfg["n_test"], 1, 2_000)
    check_int("data_seed", cfg["data_seed"], 0)
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg['arch']!r}")
    check_int("epochs", cfg["epochs"], 1)
    check_int("batch_size", cfg["batch_size"], 1, cfg["n_train"])
    check_int("pgd_steps", cfg["pgd_steps"], 0)
    if cfg["placement"] not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {cfg['placement']!r}")
    check_positive("lr", cfg["lr"])
    check_number("eps", cfg["eps"], low=0, high=1)  # pixels are in [0, 1]
    return cfg


def load_blocks(
    cfg: Mapping[str, Any], device: str | torch.device | None = None
) -> tuple[data.Dataset, Tensor, Tensor]:
    """The two classes of Fashion-MNIST (``dataset="mnist"``: MNIST, from
    :func:`gradcourse.data.mnist`'s files; pixels in [0, 1], not standardised), labels 0 and 1
    in the order of ``classes``, the first ``n_train`` / ``n_test`` of them, each stacked with
    the null block (:func:`gradcourse.data.block_images`; training seed ``data_seed``, test seed
    ``data_seed + 1``). ``placement="top"``: the same images with the signal always the upper
    block, a control where a feature can never sit in the other block. Returns the dataset of
    (n, 1, 56, 28) images and the ``top`` flags of the training and test images (True: the
    signal is the upper block)."""
    cfg = config(**cfg)
    if cfg["dataset"] == "mnist":
        ds = data.mnist(standardize="none")
    else:
        ds = data.fashion_mnist(standardize="none")
    a, b = cfg["classes"]

    def pick(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
        keep = (y == a) | (y == b)
        return x[keep][:n], (y[keep][:n] == b).long()

    x_tr, y_tr = pick(ds.x_train, ds.y_train, cfg["n_train"])
    x_te, y_te = pick(ds.x_test, ds.y_test, cfg["n_test"])
    for split, n, want in (
        ("n_train", len(y_tr), cfg["n_train"]),
        ("n_test", len(y_te), cfg["n_test"]),
    ):
        if n < want:
            raise ValueError(
                f"{split}={want}, but {ds.name} has only {n} images of classes {cfg['classes']} "
                f"in that split; lower {split}"
            )
    if cfg["placement"] == "random":
        blocks_tr, top_tr = data.block_images(x_tr, y_tr, seed=cfg["data_seed"])
        blocks_te, top_te = data.block_images(x_te, y_te, seed=cfg["data_seed"] + 1)
    else:
        blocks_tr, top_tr = _signal_on_top(x_tr)
        blocks_te, top_te = _signal_on_top(x_te)
    names = (str(a), str(b)) if ds.classes is None else (ds.classes[a], ds.classes[b])
    out = data.Dataset(blocks_tr, y_tr, blocks_te, y_te, 2, f"block_{cfg['dataset']}", names)
    return out.to(device), top_tr, top_te


def _signal_on_top(images: Tensor) -> tuple[Tensor, Tensor]:
    """Each (1, H, W) image above the null block (:func:`gradcourse.data.null_patch`)."""
    h, w = images.shape[-2:]
    null = data.null_patch(h).to(images).expand(len(images), 1, h, w)
    return torch.cat([images, null], dim=2), torch.ones(len(images), dtype=torch.bool)


def make_model(
    cfg: Mapping[str, Any], *, seed: int, device: str | torch.device | None = None
) -> nn.Module:
    """An MLP 1568 -> ``widths`` -> 2 (ReLU, PyTorch's default initialisation from ``seed``) or
    a :class:`gradcourse.models.SmallCNN` with ``channels`` and ``hidden``."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    if cfg["arch"] == "mlp":
        net: nn.Module = models.MLP(56 * 28, cfg["widths"], 2, seed=seed)
        return models.torch_default_init_(net, seed).to(device)
    return models.SmallCNN(
        1, 2, channels=cfg["channels"], hidden=cfg["hidden"], seed=seed, device=device
    )


def _fit(cfg: Mapping[str, Any], seed: int, x: Tensor, y: Tensor, device: Any) -> nn.Module:
    """:func:`make_model` from ``seed`` trained on (x, y) as :func:`train_model` describes."""
    model = make_model(cfg, seed=seed, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(x), cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            at.adversarial_step(model, opt, x[idx], y[idx], eps=cfg["eps"], steps=cfg["pgd_steps"],
                                clamp=(0.0, 1.0), seed=seed * 100_003 + step)  # fmt: skip
            step += 1
    return model.eval()


def train_model(
    cfg: Mapping[str, Any], seed: int, *, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Train :func:`make_model` with Adam for ``epochs`` on batches reshuffled each epoch
    (from ``seed``), on PGD examples at ``eps`` (l_inf, ``pgd_steps`` steps, pixels kept in
    [0, 1]; ``eps = 0``: the clean images; ``pgd_steps = 0``: the clean images plus uniform
    noise in the ball, PGD's random start without its steps). Returns the ``state`` dict and the clean and
    adversarial (at ``eps``, or 0.1 for a standard model) test accuracies."""
    cfg = config(**cfg)
    ds, _, _ = load_blocks(cfg, device)
    model = _fit(cfg, seed, ds.x_train, ds.y_train, device)
    attack = cfg["eps"] if cfg["eps"] > 0 else 0.1
    adv = at.pgd(model, ds.x_test, ds.y_test, eps=attack, steps=10, clamp=(0.0, 1.0), seed=seed)
    with torch.no_grad():
        clean = (model(ds.x_test).argmax(1) == ds.y_test).double().mean().item()
        robust = (model(adv).argmax(1) == ds.y_test).double().mean().item()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state": state, "accuracy": clean, "robust_accuracy": robust, "attack_eps": attack}


def cached_model(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`train_model` through ``cache``; returns the model (weights loaded) and the run's
    record."""
    cfg = config(**cfg)

    def compute() -> dict[str, Any]:
        return train_model(cfg, seed, device=device)

    rec = (
        compute()
        if cache is None
        else cache.get_or_compute("attr-model", {**_cache_key(cfg), "seed": seed}, compute)
    )
    model = make_model(cfg, seed=seed, device=device)
    model.load_state_dict(rec["state"])
    return model.eval(), rec


def cached_models(
    jobs: Mapping[Any, tuple[Mapping[str, Any], int]],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "models",
) -> dict[Any, tuple[nn.Module, dict[str, Any]]]:
    """:func:`cached_model` for every job ``{key: (cfg, seed)}``, under one progress bar
    (``tqdm.auto``; a cached model passes at once). Returns ``{key: (model, record)}`` in the
    order of ``jobs``."""
    from tqdm.auto import tqdm

    out: dict[Any, tuple[nn.Module, dict[str, Any]]] = {}
    for key, (cfg, seed) in tqdm(list(jobs.items()), desc=desc, disable=not progress, leave=False):
        out[key] = cached_model(cfg, seed, cache=cache, device=device)
    return out


def last_conv(model: nn.Module) -> str:
    """The name of the model's last ``nn.Conv2d``, where Grad-CAM is usually taken."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError("Grad-CAM needs a convolutional layer; this model has none")
    return names[-1]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def attribution_map(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    method: str,
    *,
    samples: int = 10,
    seed: int = 0,
) -> Tensor:
    """Per example, the attribution map (n, H, W) of ``method`` for the true class ``y`` of
    one-channel images (n, 1, H, W): ``"gradient"``, the absolute input gradient;
    ``"smoothgrad"``, the absolute SmoothGrad (``samples`` draws, seeded by ``seed``);
    ``"gradcam"``, Grad-CAM on the rectified maps of the last convolution
    (:func:`gradcourse.attribution.grad_cam` with ``rectify=True``; a CNN only), resized to
    (H, W)."""
    _check_method(method)
    if method == "gradcam":
        return at.grad_cam(model, x, last_conv(model), y, rectify=True)
    if method == "gradient":
        g = at.input_gradients(model, x, y)
    else:
        g = at.smoothgrad(model, x, y, samples=samples, seed=seed)
    return g.abs()[:, 0]


def attribution_mass(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    top: Tensor,
    method: str,
    *,
    samples: int = 10,
    seed: int = 0,
) -> Tensor:
    """Per example, the share of :func:`attribution_map`'s mass on the signal block
    (:func:`gradcourse.attribution.mass_on`) for the true class ``y``: ``"gradient"`` (input
    gradients), ``"smoothgrad"`` (``samples`` draws, seeded) or ``"gradcam"`` (the last
    convolution's rectified maps; a CNN only; nan where Grad-CAM's ReLU leaves an all-zero
    map). Half the pixels are signal: 0.5 is no preference."""
    _check_method(method)
    mask = data.block_mask(top, x.shape[-2] // 2, x.shape[-1]).to(x.device)
    maps = attribution_map(model, x, y, method, samples=samples, seed=seed)
    return at.mass_on(maps, mask[:, 0])


def share_table(
    models: Mapping[Any, Sequence[nn.Module]],
    methods: Mapping[Any, Sequence[str]],
    x: Tensor,
    y: Tensor,
    top: Tensor,
    *,
    progress: bool = True,
) -> tuple[dict[tuple[Any, str], np.ndarray], dict[tuple[Any, str], list[list[int]]]]:
    """For every key of ``models`` (a list of models, one per seed) and every method in
    ``methods[key]``: :func:`attribution_mass` of every model on every example, an array
    (models, examples), nan where a map is all zero (only Grad-CAM's can be); and per model
    the number of such maps among the examples of class 0 and of class 1. Returns
    ``({(key, method): shares}, {(key, method): [[zeros class 0, zeros class 1], ...]})``,
    with one progress bar (``tqdm.auto``) over the models."""
    from tqdm.auto import tqdm

    for key in models:
        for method in methods[key]:
            _check_method(method)
    jobs = [(key, method) for key in models for method in methods[key]]
    share: dict[tuple[Any, str], np.ndarray] = {}
    zeros: dict[tuple[Any, str], list[list[int]]] = {}
    total = sum(len(models[k]) for k, _ in jobs)
    bar = tqdm(total=total, desc="attributions", disable=not progress, leave=False)
    for key, method in jobs:
        rows, counts = [], []
        for model in models[key]:
            m = attribution_mass(model, x, y, top, method)
            counts.append([int(m[y == c].isnan().sum()) for c in (0, 1)])
            rows.append(m.detach().cpu().double().numpy())
            bar.update()
        share[key, method] = np.stack(rows)
        zeros[key, method] = counts
    bar.close()
    return share, zeros


def seeds_and_images_interval(values: Any, *, level: float = 0.95) -> Interval:
    """The mean of ``values`` (seeds, images): one measurement per training seed and test image,
    the same test images for every seed, with an interval that covers both a redraw of the
    seeds and a redraw of the test images. Its variance is that of the seeds' means over the
    number of seeds (the t-interval over seeds) plus that of the images' means (over seeds)
    over the number of images; under a two-way model v = m + a_seed + b_image + e, this counts
    a / seeds, b / images and, twice, e / (seeds images), so it errs wide. Student's t with
    seeds - 1 degrees of freedom. A paired comparison passes the per-image differences."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[0] < 2 or v.shape[1] < 2:
        raise ValueError(f"values must be (seeds, images) with both >= 2, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite (leave out the images without a value first)")
    level = check_number("level", level, low=0, high=1, low_open=True, high_open=True)
    from scipy.stats import t

    n_seeds, n_images = v.shape
    var = v.mean(axis=1).var(ddof=1) / n_seeds + v.mean(axis=0).var(ddof=1) / n_images
    half = float(t.ppf(0.5 + level / 2, df=n_seeds - 1)) * float(np.sqrt(var))
    mean = float(v.mean())
    return Interval(mean, mean - half, mean + half, level, n_seeds)


INPUTS: tuple[str, ...] = ("pixels", "mask")


def _ranking(source: nn.Module | str, x: Tensor, gen: torch.Generator) -> Tensor:
    """What :func:`diffroar` ranks pixels by: the absolute input gradient of ``source``'s
    log-odds f_1 - f_0 (the two classes' logit difference, which alone decides a two-class
    softmax), the same whatever the image's label, so that which pixels are kept cannot spell
    out the label; or (``"random"``) uniform noise drawn from ``gen``."""
    if isinstance(source, str):
        if source != "random":
            raise ValueError(f"source must be a model or 'random', got {source!r}")
        return torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    return at.input_gradients(source, x, 1) - at.input_gradients(source, x, 0)


def kept_nonzero(
    source: nn.Module | str, x: Tensor, fraction: float, *, seed: int = 0
) -> dict[str, float]:
    """Of the pixels :func:`diffroar` keeps in images ``x`` (the ``fraction`` that ``source``'s
    absolute log-odds gradient ranks highest, ``"top"``, and lowest, ``"bottom"``), the share
    whose value is not 0: neither background nor the fill, so not the same as a pixel removed.
    ``source="random"`` draws its ranking from ``seed`` (one draw over ``x``)."""
    check_int("seed", seed, 0)
    rank = _ranking(source, x, torch.Generator().manual_seed(seed))
    out: dict[str, float] = {}
    for name, highest in (("top", True), ("bottom", False)):
        kept = at.keep_ranked(torch.ones_like(x), rank, fraction, highest=highest).bool()
        out[name] = float((x[kept] != 0).double().mean())
    return out


def diffroar(
    cfg: Mapping[str, Any],
    source: nn.Module | str,
    fraction: float,
    *,
    seed: int,
    inputs: str = "pixels",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """DiffROAR in small form (after Shah, Jain & Netrapalli 2021, section 3): rank every
    training and test image's pixels by ``source``'s absolute log-odds gradient (or at random,
    ``source="random"``, from ``seed``), keep the ``fraction`` ranked highest (the rest set to 0,
    :func:`gradcourse.attribution.keep_ranked`), train a fresh model from ``seed`` as ``cfg``
    says on those images and measure its test accuracy on the same kind of images; then the
    same with the ``fraction`` ranked lowest. Returns both accuracies, ``diffroar`` = top -
    bottom, and per test image whether each retrained model got it right (``top_correct``,
    ``bottom_correct``: 0/1 arrays, for intervals over test images). ``inputs="mask"``: the retrained model sees only *which* pixels were kept (1 where
    kept, 0 elsewhere), a control for how much the positions alone tell it. The ranking never
    uses the label; the positions of the kept pixels still carry what the image's shape tells."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    ds, _, _ = load_blocks(cfg, device)
    gen = torch.Generator().manual_seed(seed)  # one stream per seed: training, then test
    rank_tr = _ranking(source, ds.x_train, gen)
    rank_te = _ranking(source, ds.x_test, gen)
    out: dict[str, Any] = {"fraction": float(fraction)}
    for name, highest in (("top", True), ("bottom", False)):
        kept = []
        for x, rank in ((ds.x_train, rank_tr), (ds.x_test, rank_te)):
            shown = x if inputs == "pixels" else torch.ones_like(x)
            kept.append(at.keep_ranked(shown, rank, fraction, highest=highest))
        model = _fit(cfg, seed, kept[0], ds.y_train, device)
        with torch.no_grad():
            correct = model(kept[1]).argmax(1) == ds.y_test
        out[f"{name}_correct"] = correct.cpu().numpy().astype(np.uint8)
        out[name] = correct.double().mean().item()
    out["diffroar"] = out["top"] - out["bottom"]
    return out


def cached_diffroar(
    cfg: Mapping[str, Any],
    source: Mapping[str, Any] | str,
    fraction: float,
    *,
    seed: int,
    inputs: str = "pixels",
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """:func:`diffroar` through ``cache``, the ranking from the model :func:`cached_model`
    trains with configuration ``source`` and ``seed`` (or ``"random"``); the retrained model
    is ``cfg``'s, also from ``seed``."""
    cfg = config(**cfg)
    key = {**_cache_key(cfg), "seed": seed, "fraction": fraction, "inputs": inputs}
    key["per_image"] = True  # the record holds the per-image correctness too
    if isinstance(source, str):
        key["source"] = source
    else:
        key["source"] = sorted(_cache_key(config(**source)).items())

    def compute() -> dict[str, Any]:
        model: nn.Module | str = (
            source
            if isinstance(source, str)
            else cached_model(source, seed, cache=cache, device=device)[0]
        )
        return diffroar(cfg, model, fraction, seed=seed, inputs=inputs, device=device)

    return compute() if cache is None else cache.get_or_compute("attr-diffroar", key, compute)


def cached_diffroars(
    jobs: Mapping[Any, tuple[Mapping[str, Any], Mapping[str, Any] | str, float, int, str]],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "DiffROAR",
) -> dict[Any, dict[str, Any]]:
    """:func:`cached_diffroar` for every job ``{key: (cfg, source, fraction, seed, inputs)}``,
    under one progress bar (``tqdm.auto``; a cached job passes at once). Returns
    ``{key: result}`` in the order of ``jobs``."""
    from tqdm.auto import tqdm

    out: dict[Any, dict[str, Any]] = {}
    for key, (cfg, source, fraction, seed, inputs) in tqdm(
        list(jobs.items()), desc=desc, disable=not progress, leave=False
    ):
        out[key] = cached_diffroar(
            cfg, source, fraction, seed=seed, inputs=inputs, cache=cache, device=device
        )
    return out
