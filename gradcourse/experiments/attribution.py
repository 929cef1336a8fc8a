"""Notebook 06 (in progress), input-gradient attributions on two-block images (Shah, Jain &
Netrapalli 2021, arXiv 2102.12781; Grad-CAM: Selvaraju et al. 2017, arXiv 1610.02391).

Two classes of Fashion-MNIST, each image stacked with a fixed "null" block above or below it
(:func:`gradcourse.data.block_images`), so that the pixels that can tell the classes apart are
known. A standard and an adversarially trained model (:func:`gradcourse.attribution.pgd`) per
seed, cached (:func:`cached_model`); the share of each attribution's mass on the signal block
(:func:`attribution_mass`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import attribution as at
from .. import data, models
from ..cache import Cache
from ..checks import check_int, check_positive

__all__ = [
    "ARCHS",
    "DEFAULTS",
    "METHODS",
    "attribution_mass",
    "cached_model",
    "config",
    "last_conv",
    "load_blocks",
    "make_model",
    "train_model",
]

ARCHS: tuple[str, ...] = ("mlp", "small_cnn")
METHODS: tuple[str, ...] = ("gradient", "smoothgrad", "gradcam")

DEFAULTS: dict[str, Any] = dict(
    classes=(0, 1),  # Fashion-MNIST's T-shirt/top against trouser
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
    pgd_steps=7,
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **overrides}
    for key in ("classes", "widths", "channels"):
        cfg[key] = tuple(cfg[key])
    if len(cfg["classes"]) != 2 or len(set(cfg["classes"])) != 2:
        raise ValueError(f"classes must be two different classes, got {cfg['classes']}")
    for i, c in enumerate(cfg["classes"]):
        check_int(f"classes[{i}]", c, 0, 9)
    check_int("n_train", cfg["n_train"], 2, 12_000)
    check_int("n_test", cfg["n_test"], 1, 2_000)
    check_int("data_seed", cfg["data_seed"], 0)
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg['arch']!r}")
    check_int("epochs", cfg["epochs"], 1)
    check_int("batch_size", cfg["batch_size"], 1, cfg["n_train"])
    check_int("pgd_steps", cfg["pgd_steps"], 1)
    check_positive("lr", cfg["lr"])
    eps = cfg["eps"]
    if not (isinstance(eps, (int, float)) and 0 <= eps <= 1):
        raise ValueError(f"eps must be a number in [0, 1] (pixels are in [0, 1]), got {eps!r}")
    return cfg


def load_blocks(
    cfg: Mapping[str, Any], device: str | torch.device | None = None
) -> tuple[data.Dataset, Tensor, Tensor]:
    """The two classes of Fashion-MNIST (pixels in [0, 1], not standardised), labels 0 and 1
    in the order of ``classes``, the first ``n_train`` / ``n_test`` of them, each stacked with
    the null block (:func:`gradcourse.data.block_images`; training seed ``data_seed``, test seed
    ``data_seed + 1``). Returns the dataset of (n, 1, 56, 28) images and the ``top`` flags of
    the training and test images (True: the signal is the upper block)."""
    cfg = config(**cfg)
    ds = data.fashion_mnist(standardize="none")
    a, b = cfg["classes"]

    def pick(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
        keep = (y == a) | (y == b)
        return x[keep][:n], (y[keep][:n] == b).long()

    x_tr, y_tr = pick(ds.x_train, ds.y_train, cfg["n_train"])
    x_te, y_te = pick(ds.x_test, ds.y_test, cfg["n_test"])
    blocks_tr, top_tr = data.block_images(x_tr, y_tr, seed=cfg["data_seed"])
    blocks_te, top_te = data.block_images(x_te, y_te, seed=cfg["data_seed"] + 1)
    names = None if ds.classes is None else (ds.classes[a], ds.classes[b])
    out = data.Dataset(blocks_tr, y_tr, blocks_te, y_te, 2, "block_fashion_mnist", names)
    return out.to(device), top_tr, top_te


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


def train_model(
    cfg: Mapping[str, Any], seed: int, *, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Train :func:`make_model` with Adam for ``epochs`` on batches reshuffled each epoch
    (from ``seed``), on PGD examples at ``eps`` (l_inf, ``pgd_steps`` steps, pixels kept in
    [0, 1]; ``eps = 0``: the clean images). Returns the ``state`` dict and the clean and
    adversarial (at ``eps``, or 0.1 for a standard model) test accuracies."""
    cfg = config(**cfg)
    ds, _, _ = load_blocks(cfg, device)
    model = make_model(cfg, seed=seed, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(ds.n_train, generator=gen).to(ds.x_train.device)
        for i in range(0, ds.n_train, cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            at.adversarial_step(model, opt, ds.x_train[idx], ds.y_train[idx], eps=cfg["eps"],
                                steps=cfg["pgd_steps"], clamp=(0.0, 1.0), seed=seed * 100_003 + step)  # fmt: skip
            step += 1
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
        else cache.get_or_compute("attr-model", {**cfg, "seed": seed}, compute)
    )
    model = make_model(cfg, seed=seed, device=device)
    model.load_state_dict(rec["state"])
    return model.eval(), rec


def last_conv(model: nn.Module) -> str:
    """The name of the model's last ``nn.Conv2d``, where Grad-CAM is usually taken."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError("Grad-CAM needs a convolutional layer; this model has none")
    return names[-1]


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
    """Per example, the share of ``method``'s absolute attribution on the signal block
    (:func:`gradcourse.attribution.mass_on`) for the true class ``y``: ``"gradient"`` (input
    gradients), ``"smoothgrad"`` (``samples`` draws, seeded) or ``"gradcam"`` (the last
    convolutional layer; a CNN only; nan where its ReLU leaves an all-zero map). Half the pixels
    are signal: 0.5 is no preference."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mask = data.block_mask(top, x.shape[-2] // 2, x.shape[-1]).to(x.device)
    if method == "gradient":
        return at.mass_on(at.input_gradients(model, x, y), mask)
    if method == "smoothgrad":
        return at.mass_on(at.smoothgrad(model, x, y, samples=samples, seed=seed), mask)
    cam = at.grad_cam(model, x, last_conv(model), y)
    return at.mass_on(cam, mask[:, 0])
