"""Notebook 04, data pruning with early-training scores (Paul, Ganguli & Dziugaite 2021, arXiv
2107.07075; the reproduction of Kirsch 2023, arXiv 2303.14753).

The experiment functions of the notebook: a configuration (a flat dict of numbers, strings and
tuples) in, a dict of tensors out, cached with :class:`gradcourse.cache.Cache`. The scores and
the pruning rule live in :mod:`gradcourse.scores` (EL2N, GraNd, forgetting events, input norm,
``prune``, ``spearman``) and :mod:`gradcourse.pergrad`; training in :mod:`gradcourse.train`.
This module adds what is specific to the paper's protocol:

- :func:`load_data`, :func:`make_model`, :func:`noise_seed`  the data set (Fashion-MNIST,
  MNIST-1D, scikit-learn's digits or CIFAR-10, optionally with flipped labels, drawn from a
  stream of their own) and net (``init="torch"``: PyTorch's
  default draw, non-zero biases);
- :func:`score_experiment`  train ``len(score_seeds)`` networks once each on all the data and
  take EL2N and GraNd at every epoch of ``score_epochs`` (0 = initialisation), forgetting
  events over the whole run, the input norm, and the full-data test accuracy;
- :func:`method_scores`, :func:`kept_indices`, :func:`class_counts`  the ranking of one method,
  the subset it keeps (the highest scores, as in the paper, or the lowest with
  ``mode="easiest"``; within each class with ``balanced=True``) and its classes;
- :func:`prune_curve`  retrain from scratch on the kept subsets, with the same number of
  optimisation steps as the full-data run (Paul et al. 2021, section 3), over seeds, with the
  test accuracy of every class (:func:`class_accuracy`);
- :func:`prune_curves`  several curves of one configuration by name, with one progress bar;
- :func:`grand_at_init`, :func:`init_spearman`, :func:`first_layer_scales`  GraNd of untrained
  networks and its rank correlation with the input norm, one value per initialisation (Kirsch's
  check), and the size of the first layer's biases next to its pre-activations;
- :func:`run_scores`, :func:`per_run_spearman`, :func:`between_run_spearman`,
  :func:`mean_interval`  statistics over scoring runs: a score's agreement with another within
  each run, with itself between runs, and a t-interval over runs;
- :func:`single_run`, :func:`class_shares`, :func:`least_kept_shares`,
  :func:`random_least_shares`  what a subset keeps of each class, by the averaged score, by
  each run's score, and for the random subsets (the control);
- :func:`top_k_precision`, :func:`top_k_per_run`, :func:`random_top_k`, :func:`top_k_band`,
  :func:`spearman_band`, :func:`find_curve`  the statistics the claims use (accuracy
  differences are paired over seeds with :func:`gradcourse.stats.paired_interval`).

Every random choice is keyed by a seed (network init, batch order, random subsets, label noise),
so running a configuration twice gives identical numbers on the same machine. The label noise
draws from a stream of its own (:func:`noise_seed`), never the one of a subset or batch order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import data, models, scores, stats, train
from ..cache import Cache
from ..checks import check_int, check_ints, check_nonnegative, check_number, check_positive
from . import with_defaults

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist1d", "digits", "cifar10")
ARCHS: tuple[str, ...] = ("mlp", "small_cnn", "resnet18")
METHODS: tuple[str, ...] = ("el2n", "grand", "forgetting", "input_norm", "random")
EPOCH_METHODS: tuple[str, ...] = ("el2n", "grand")  # scores taken at a chosen epoch
KEEP_MODES: tuple[str, ...] = ("hardest", "easiest")  # which end of a ranking is kept
# "standard": gc.models.MLP (LeCun-normal weights, zero biases: positively homogeneous in x with
# ReLU); "torch": PyTorch's default nn.Linear draw (uniform weights and biases, not homogeneous)
INITS: tuple[str, ...] = ("standard", "torch")

# The MNIST-1D pool the data module caches (the package's standard 4,000 / 1,000 split).
_MNIST1D_TRAIN, _MNIST1D_TEST = 4000, 1000

DEFAULTS: dict[str, Any] = dict(
    dataset="mnist1d",  # the tests' small default; notebook 04 runs Fashion-MNIST
    n_train=1000,
    n_test=1000,
    data_seed=0,
    noise=0.0,
    arch="mlp",
    widths=(100, 100),
    channels=(16, 32),
    hidden=64,
    epochs=40,
    batch_size=200,
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="constant",
    score_seeds=(0, 1),
    score_epochs=(0, 2),
    init="standard",
)


# ----------------------------------------------------------------------------- checks


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused), lists made tuples,
    and checked: a configuration every function of this module accepts."""
    cfg = with_defaults(DEFAULTS, overrides)
    # every key checked here, when the configuration is made (not when a model is built)
    cfg["widths"] = check_ints("widths", cfg["widths"], 1, nonempty=True)
    cfg["channels"] = check_ints("channels", cfg["channels"], 1, nonempty=True)
    cfg["score_seeds"] = check_ints("score_seeds", cfg["score_seeds"], 0, nonempty=True)
    cfg["score_epochs"] = check_ints("score_epochs", cfg["score_epochs"], 0, nonempty=True)
    check_int("hidden", cfg["hidden"], 1)
    check_positive("lr", cfg["lr"])
    check_number("momentum", cfg["momentum"], low=0, high=1, high_open=True)
    check_number("weight_decay", cfg["weight_decay"], low=0)
    if cfg["dataset"] not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {cfg['dataset']!r}")
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg['arch']!r}")
    check_int("n_train", cfg["n_train"], 10)
    check_int("n_test", cfg["n_test"], 1)
    check_int("data_seed", cfg["data_seed"], 0)
    check_number("noise", cfg["noise"], low=0, high=1)
    check_int("epochs", cfg["epochs"], 1)
    if cfg["init"] not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {cfg['init']!r}")
    if cfg["init"] == "torch" and cfg["arch"] != "mlp":
        raise ValueError(f"init='torch' is only used with arch='mlp', got arch={cfg['arch']!r}")
    if cfg["schedule"] not in train.SCHEDULES:
        raise ValueError(f"schedule must be one of {train.SCHEDULES}, got {cfg['schedule']!r}")
    check_int("batch_size", cfg["batch_size"], 1, cfg["n_train"])
    check_ints("score_seeds", cfg["score_seeds"], 0, nonempty=True)
    if not cfg["score_epochs"] or sorted(set(cfg["score_epochs"])) != list(cfg["score_epochs"]):
        raise ValueError(
            f"score_epochs must be distinct epochs in increasing order, got {cfg['score_epochs']}"
        )
    check_ints("score_epochs", cfg["score_epochs"], 0, cfg["epochs"])
    return cfg


def _key(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a configuration that determines results (everything but the device); with
    label noise, also the seed of its own stream (:func:`noise_seed`)."""
    key = {k: cfg[k] for k in DEFAULTS}
    if cfg["noise"] > 0:
        key["noise_seed"] = noise_seed(cfg["data_seed"])
    return key


def noise_seed(data_seed: int) -> int:
    """The seed of the label noise of ``data_seed``: a stream of its own, derived from
    ``("label_noise", data_seed)`` (SHA-256, 63 bits).

    Random subsets (:func:`kept_indices`), batch orders and initialisations all draw from
    ``torch.Generator().manual_seed(seed)`` with small integer seeds. Seeding the noise with
    ``data_seed`` itself made ``randperm(n)`` of the flips the same permutation as that of the
    random subset (and of the first epoch's batches) of seed ``data_seed``: the random half of
    seed 0 held every flipped label (40% of it flipped at a noise rate of 20%)."""
    check_int("data_seed", data_seed, 0)
    digest = hashlib.sha256(f"label_noise/{data_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- data and models


def available(dataset: str) -> bool:
    """Whether ``dataset`` can be loaded here without a download (CIFAR-10 needs its files)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset != "cifar10":
        return True
    try:
        data.cifar10(n_train=10, n_test=10)
    except data.DatasetUnavailable:
        return False
    return True


def load_data(cfg: Mapping[str, Any], device: str | torch.device | None = None):
    """``(dataset, flipped)``: the training split of ``n_train`` examples (class-balanced subset
    under ``data_seed``) with a fraction ``noise`` of its labels flipped
    (:func:`gradcourse.data.label_noise`, seeded by :func:`noise_seed` of ``data_seed``: a
    stream apart from the subsets and batch orders), the first ``n_test`` test
    examples (labels never flipped), and the boolean mask of flipped training labels.

    MNIST-1D comes from the cached 4,000 / 1,000 pool when that is large enough, else a larger
    pool is generated (``gc.data.mnist1d(n_train, n_test)``). CIFAR-10 raises
    :class:`gradcourse.data.DatasetUnavailable` when its files are absent."""
    cfg = config(**cfg)
    n_train, n_test, seed = cfg["n_train"], cfg["n_test"], cfg["data_seed"]
    if cfg["dataset"] == "mnist1d":
        if n_train <= _MNIST1D_TRAIN and n_test <= _MNIST1D_TEST:
            ds = data.mnist1d()
        else:
            ds = data.mnist1d(n_train=n_train, n_test=n_test)
    elif cfg["dataset"] == "fashion_mnist":
        ds = data.fashion_mnist(n_train=n_train, n_test=n_test, seed=seed)
    elif cfg["dataset"] == "digits":
        ds = data.digits(seed=seed)
    else:
        ds = data.cifar10(n_train=n_train, n_test=n_test, seed=seed)
    if n_train > ds.n_train or n_test > ds.n_test:
        raise ValueError(
            f"n_train <= {ds.n_train} and n_test <= {ds.n_test} for {cfg['dataset']}, got "
            f"n_train={n_train}, n_test={n_test}"
        )
    if n_train < ds.n_train:
        ds = ds.subset(n_train, seed=seed)
    ds = data.Dataset(
        ds.x_train, ds.y_train, ds.x_test[:n_test], ds.y_test[:n_test], ds.num_classes, ds.name
    )
    flipped = torch.zeros(ds.n_train, dtype=torch.bool)
    if cfg["noise"] > 0:
        noisy, flipped = data.label_noise(
            ds.y_train, cfg["noise"], ds.num_classes, seed=noise_seed(seed)
        )
        ds = data.Dataset(ds.x_train, noisy, ds.x_test, ds.y_test, ds.num_classes, ds.name)
    return ds.to(device), flipped.cpu()


def make_model(
    cfg: Mapping[str, Any],
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The network of ``cfg["arch"]``, initialised from ``seed``: an MLP with hidden ``widths``
    (ReLU; ``init="torch"`` re-draws it as PyTorch's default, biases included), a
    :class:`gradcourse.models.SmallCNN` (1-D for signals, 2-D for images) with
    ``channels`` and ``hidden``, or the CIFAR ResNet-18 of the paper."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    shape = tuple(input_shape)
    if cfg["arch"] == "mlp":
        net = models.MLP(math.prod(shape), cfg["widths"], num_classes, seed=seed)
        if cfg["init"] == "torch":
            models.torch_default_init_(net, seed)
        return net.to(device)
    if cfg["arch"] == "small_cnn":
        conv_dim = 1 if len(shape) == 1 else 2
        in_channels = 1 if len(shape) == 1 else shape[0]
        return models.SmallCNN(
            in_channels,
            num_classes,
            conv_dim=conv_dim,
            channels=cfg["channels"],
            hidden=cfg["hidden"],
            seed=seed,
            device=device,
        )
    in_channels = shape[0] if len(shape) == 3 else 1
    return models.resnet18(num_classes, in_channels=in_channels, seed=seed, device=device)


def steps_for(cfg: Mapping[str, Any]) -> int:
    """Optimisation steps of the full-data run: epochs * ceil(n_train / batch_size). A pruned
    run takes the same number (Paul et al. 2021, section 3)."""
    cfg = config(**cfg)
    return cfg["epochs"] * math.ceil(cfg["n_train"] / cfg["batch_size"])


def _train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: Mapping[str, Any],
    *,
    steps: int,
    seed: int,
    callback: Any = None,
    every: int = 1,
) -> train.History:
    """SGD with Nesterov momentum and weight decay, the learning rate following
    ``cfg["schedule"]`` over the ``steps`` updates, batches drawn without replacement under
    ``seed``."""
    return train.train(
        model,
        x,
        y,
        loss="ce",
        lr=cfg["lr"],
        optimizer="sgd",
        batch_size=min(cfg["batch_size"], len(x)),
        momentum=cfg["momentum"],
        nesterov=cfg["momentum"] > 0,
        weight_decay=cfg["weight_decay"],
        schedule=cfg["schedule"],
        steps=steps,
        callback=callback,
        every=every,
        seed=seed,
        progress=False,
    )


def _test_accuracy(model: nn.Module, ds: data.Dataset) -> float:
    """Accuracy on the (clean) test split, in eval mode, in batches of at most 1,024."""
    batch = min(1024, ds.n_test)
    return train.evaluate(model, ds.x_test, ds.y_test, loss="ce", batch_size=batch)["accuracy"]


def class_accuracy(model: nn.Module, ds: data.Dataset) -> Tensor:
    """(num_classes,) float64 CPU: the accuracy on the test examples of each class (eval mode,
    no grad, batches of at most 1,024; NaN for a class absent from the test split)."""
    was_training = model.training
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, ds.n_test, 1024):
            preds.append(model(ds.x_test[i : i + 1024]).argmax(1).cpu())
    model.train(was_training)
    y = ds.y_test.cpu()
    correct = (torch.cat(preds) == y).double()
    total = torch.bincount(y, minlength=ds.num_classes).double()
    hits = torch.bincount(y, weights=correct, minlength=ds.num_classes)
    return torch.where(total > 0, hits / total.clamp(min=1), torch.nan)


# ----------------------------------------------------------------------------- scores


def score_experiment(
    cfg: Mapping[str, Any],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Scores of every training example, over ``score_seeds`` independent runs.

    Each run trains one network on all ``n_train`` examples for ``epochs`` epochs and, at the
    end of each epoch in ``score_epochs`` (0: at initialisation), takes EL2N and GraNd of every
    example (:func:`gradcourse.scores.el2n_scores`, :func:`gradcourse.scores.grand_scores`, eval
    mode); a :class:`gradcourse.scores.ForgettingRecorder` records which examples are classified
    correctly after every epoch, giving forgetting events over the whole run (Toneva et al.
    2019). Returns CPU tensors::

        epochs (E,), el2n (E, runs, n), grand (E, runs, n), forgetting (runs, n),
        input_norm (n,), test_accuracy (runs,), flipped (n,) bool, labels (n,), steps ()

    ``progress`` shows a bar over the scoring runs (``tqdm.auto``).
    """
    from tqdm.auto import tqdm

    cfg = config(**cfg)
    ds, flipped = load_data(cfg, device)
    x, y = ds.x_train, ds.y_train
    per_epoch = math.ceil(ds.n_train / cfg["batch_size"])
    epochs = cfg["score_epochs"]
    el2n = torch.zeros(len(epochs), len(cfg["score_seeds"]), ds.n_train, dtype=torch.float64)
    grand = torch.zeros_like(el2n)
    forgetting = torch.zeros(len(cfg["score_seeds"]), ds.n_train, dtype=torch.float64)
    test_accuracy = torch.zeros(len(cfg["score_seeds"]), dtype=torch.float64)
    runs = tqdm(
        cfg["score_seeds"], desc=f"scoring runs ({ds.n_train} examples)", disable=not progress,
        leave=False,
    )  # fmt: skip
    for r, seed in enumerate(runs):
        model = make_model(cfg, ds.input_shape, ds.num_classes, seed=seed, device=device)
        recorder = scores.ForgettingRecorder(x, y)

        def callback(step: int, net: nn.Module, r: int = r, recorder=recorder) -> None:
            epoch = step // per_epoch
            if step > 0:  # forgetting counts transitions between the ends of epochs
                recorder(step, net)
            if epoch in epochs:
                e = epochs.index(epoch)
                el2n[e, r] = scores.el2n_scores(net, x, y).double().cpu()
                grand[e, r] = scores.grand_scores(net, x, y).double().cpu()

        _train(
            model,
            x,
            y,
            cfg,
            steps=cfg["epochs"] * per_epoch,
            seed=seed,
            callback=callback,
            every=per_epoch,
        )
        forgetting[r] = recorder.forgetting_events()
        test = _test_accuracy(model, ds)
        test_accuracy[r] = test
    return {
        "epochs": torch.tensor(epochs, dtype=torch.int64),
        "el2n": el2n,
        "grand": grand,
        "forgetting": forgetting,
        "input_norm": scores.input_norm_scores(x).double().cpu(),
        "test_accuracy": test_accuracy,
        "flipped": flipped,
        "labels": y.cpu(),
        "steps": torch.tensor(cfg["epochs"] * per_epoch),
    }


def correctness_record(
    cfg: Mapping[str, Any], seed: int, *, device: str | torch.device | None = None
) -> Tensor:
    """(epochs, n_train) bool: which training examples scoring run ``seed`` of
    :func:`score_experiment` classifies correctly at the end of each epoch, the record its
    forgetting events count. Trains that run again (the same model, data, batches and steps;
    without the scores, which do not change the run)."""
    cfg = config(**cfg)
    ds, _ = load_data(cfg, device)
    per_epoch = math.ceil(ds.n_train / cfg["batch_size"])
    model = make_model(cfg, ds.input_shape, ds.num_classes, seed=seed, device=device)
    recorder = scores.ForgettingRecorder(ds.x_train, ds.y_train)

    def callback(step: int, net: nn.Module) -> None:
        if step > 0:
            recorder(step, net)

    _train(
        model,
        ds.x_train,
        ds.y_train,
        cfg,
        steps=cfg["epochs"] * per_epoch,
        seed=seed,
        callback=callback,
        every=per_epoch,
    )
    return recorder.correct()


def cached_scores(
    cfg: Mapping[str, Any],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """:func:`score_experiment` through ``cache`` (None: computed every time); ``progress``
    shows a bar while it computes."""
    cfg = config(**cfg)
    if cache is None:
        return score_experiment(cfg, device=device, progress=progress)
    return cache.get_or_compute(
        "datadiet-scores",
        _key(cfg),
        lambda: score_experiment(cfg, device=device, progress=progress),
    )


def method_scores(
    result: Mapping[str, Tensor], method: str, epoch: int | None = None
) -> Tensor | None:
    """The (n,) ranking score of ``method`` from a :func:`score_experiment` result, averaged
    over runs (the paper's expectation): EL2N or GraNd at ``epoch`` (one of ``result["epochs"]``),
    forgetting events, the input norm; None for ``"random"``. ``epoch`` is only used (and
    required) by EL2N and GraNd."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "random":
        return None
    if method not in EPOCH_METHODS:
        return result[method].mean(0) if result[method].ndim == 2 else result[method]
    epochs = result["epochs"].tolist()
    if epoch not in epochs:
        raise ValueError(
            f"epoch must be one of the scored epochs {epochs} for {method}, got {epoch!r}"
        )
    return result[method][epochs.index(epoch)].mean(0)


def kept_indices(
    result: Mapping[str, Tensor],
    method: str,
    epoch: int | None,
    fraction: float,
    *,
    offset: float = 0.0,
    seed: int = 0,
    mode: str = "hardest",
    balanced: bool = False,
) -> Tensor:
    """Indices kept when keeping ``fraction`` of the examples by ``method``: the highest scores
    (:func:`gradcourse.scores.prune`, ``"hardest"``), or after skipping the ``offset`` fraction of
    highest scores (``"window"``), or the lowest scores with ``mode="easiest"`` (Sorscher et al.
    2022: the better choice when data are scarce), or a random subset drawn from ``seed`` for
    ``"random"`` (which ignores ``mode``). ``balanced=True`` applies the rule within each class,
    every class keeping ``fraction`` of its own examples (``prune(..., labels=...)``)."""
    fraction = check_number("fraction", fraction, low=0, high=1, low_open=True)
    _check_mode(mode, offset)
    if not isinstance(balanced, bool):
        raise ValueError(f"balanced must be True or False, got {balanced!r}")
    s = method_scores(result, method, epoch)
    n = len(result["labels"])
    labels = result["labels"] if balanced else None
    if s is None:
        if offset:
            raise ValueError(f"offset is not used by method 'random', got offset={offset}")
        return scores.prune(torch.zeros(n), fraction, mode="random", seed=seed, labels=labels)
    if mode == "easiest":
        return scores.prune(s, fraction, mode="easiest", labels=labels)
    mode = "window" if offset else "hardest"
    return scores.prune(s, fraction, mode=mode, offset=offset, labels=labels)


def class_counts(result: Mapping[str, Tensor], kept: Tensor, num_classes: int = 10) -> Tensor:
    """(num_classes,) int64: how many of the ``kept`` indices fall in each class (the labels of
    a :func:`score_experiment` result, flipped ones included)."""
    check_int("num_classes", num_classes, 1)
    labels = result["labels"].cpu()[torch.as_tensor(kept).cpu().long()]
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"num_classes must exceed the largest label {int(labels.max())}")
    return torch.bincount(labels, minlength=num_classes)


def _check_mode(mode: object, offset: float) -> None:
    if mode not in KEEP_MODES:
        raise ValueError(f"mode must be one of {KEEP_MODES}, got {mode!r}")
    if offset and mode != "hardest":
        raise ValueError(
            f"offset (skip the highest scores) is only used with mode='hardest', got "
            f"offset={offset} with mode={mode!r}"
        )


# ----------------------------------------------------------------------------- pruning


def prune_curve(
    cfg: Mapping[str, Any],
    method: str,
    epoch: int | None,
    fractions: Sequence[float],
    seeds: Sequence[int],
    *,
    offset: float = 0.0,
    mode: str = "hardest",
    balanced: bool = False,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Final test accuracy after training from scratch on the subset ``method`` keeps, for each
    fraction kept and seed: ``{"fractions": (F,), "accuracy": (F, S), "class_accuracy":
    (F, S, K), "seeds": (S,)}``, K the number of classes. The subset is that of
    :func:`kept_indices` with ``offset``, ``mode`` (``"hardest"``, the paper's rule, or
    ``"easiest"``) and ``balanced``.

    The scores come from :func:`cached_scores` of ``cfg`` (averaged over ``score_seeds``). Each
    run initialises the network from ``seed`` (also the batch order, and the subset for
    ``"random"``) and takes :func:`steps_for` ``cfg`` optimisation steps, however small the
    subset: the same number as the full-data run. Cached per fraction when ``cache`` is given,
    so a curve over (0.3, 0.5) and a later one at 0.3 alone share the runs at 0.3.
    ``progress`` shows a bar over the seeds of each fraction that is computed (not read from
    the cache).
    """
    from tqdm.auto import tqdm

    cfg = config(**cfg)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    epoch = epoch if method in EPOCH_METHODS else None
    fractions = tuple(
        check_number(f"fractions[{i}]", f, low=0, high=1, low_open=True)
        for i, f in enumerate(fractions)
    )
    seeds = check_ints("seeds", seeds, 0)
    if not fractions or not seeds:
        raise ValueError("fractions and seeds must each hold at least one value")
    check_number("offset", offset, low=0, high=1, high_open=True)
    _check_mode(mode, offset)
    if not isinstance(balanced, bool):
        raise ValueError(f"balanced must be True or False, got {balanced!r}")
    mode = "hardest" if method == "random" else mode  # random ignores it: one cached curve

    def compute(fraction: float) -> dict[str, Tensor]:
        result = cached_scores(cfg, cache=cache, device=device, progress=progress)
        ds, _ = load_data(cfg, device)
        steps = steps_for(cfg)
        accuracy = torch.zeros(len(seeds), dtype=torch.float64)
        per_class = torch.zeros(len(seeds), ds.num_classes, dtype=torch.float64)
        label = curve_key(method, epoch, offset, mode, balanced)
        bar = tqdm(seeds, desc=f"{label} at {fraction:g}", disable=not progress, leave=False)
        for j, seed in enumerate(bar):
            kept = kept_indices(
                result,
                method,
                epoch,
                fraction,
                offset=offset,
                seed=seed,
                mode=mode,
                balanced=balanced,
            )
            kept = kept.to(ds.x_train.device)
            model = make_model(cfg, ds.input_shape, ds.num_classes, seed=seed, device=device)
            _train(model, ds.x_train[kept], ds.y_train[kept], cfg, steps=steps, seed=seed)
            accuracy[j] = _test_accuracy(model, ds)
            per_class[j] = class_accuracy(model, ds)
        return {"accuracy": accuracy, "class_accuracy": per_class}

    # cached per fraction, so curves that share a fraction share its runs
    key = dict(cfg=_key(cfg), method=method, epoch=epoch, seeds=seeds, offset=offset)
    if mode != "hardest":  # defaults stay out of the key
        key["mode"] = mode
    if balanced:
        key["balanced"] = True
    parts = [
        compute(f)
        if cache is None
        else cache.get_or_compute("datadiet-prune", {**key, "fraction": f}, lambda f=f: compute(f))
        for f in fractions
    ]
    return {
        "fractions": torch.tensor(fractions, dtype=torch.float64),
        "accuracy": torch.stack([p["accuracy"] for p in parts]),
        "class_accuracy": torch.stack([p["class_accuracy"] for p in parts]),
        "seeds": torch.tensor(seeds, dtype=torch.int64),
    }


_CURVE_SPEC: tuple[str, ...] = ("method", "epoch", "fractions", "offset", "mode", "balanced")


def prune_curves(
    cfg: Mapping[str, Any],
    specs: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """Several :func:`prune_curve` runs on one configuration, by name: ``specs`` maps a name to
    one curve's ``method``, ``fractions`` and, optionally, ``epoch``, ``offset``, ``mode`` and
    ``balanced``; every curve uses ``seeds``. ``progress`` shows one bar over the curves.
    Returns ``{name: curve}`` in the order given."""
    out = {}
    names = list(specs)
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="pruning curves", disable=not progress, leave=False):
        spec = dict(specs[name])
        unknown = sorted(set(spec) - set(_CURVE_SPEC))
        if unknown or "method" not in spec or "fractions" not in spec:
            raise ValueError(
                f"specs[{name!r}] needs 'method' and 'fractions' and may hold {_CURVE_SPEC}, "
                f"got keys {sorted(spec)}"
            )
        method, epoch, fractions = (
            spec.pop("method"),
            spec.pop("epoch", None),
            spec.pop("fractions"),
        )
        out[name] = prune_curve(
            cfg, method, epoch, fractions, seeds, cache=cache, device=device, **spec
        )  # fmt: skip
    return out


def curve_key(
    method: str,
    epoch: int | None = None,
    offset: float = 0.0,
    mode: str = "hardest",
    balanced: bool = False,
) -> str:
    """A short label for a curve: ``"el2n@5"``, ``"grand@0"``, ``"random"``, ``"el2n@5+skip0.1"``,
    ``"el2n@5 easiest"``, ``"el2n@5 balanced"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_mode(mode, offset)
    label = f"{method}@{epoch}" if method in EPOCH_METHODS else method
    label += f"+skip{offset:g}" if offset else ""
    label += " easiest" if mode == "easiest" and method != "random" else ""
    return label + (" balanced" if balanced else "")


def find_curve(
    curves: Mapping[str, Mapping[str, Tensor]], method: str, epoch: int | None = None
) -> Mapping[str, Tensor]:
    """The curve of ``method`` (at ``epoch`` for EL2N / GraNd) among computed ``curves`` (keyed
    by :func:`curve_key`); ValueError listing what was computed otherwise."""
    key = curve_key(method, epoch)
    if key not in curves:
        raise ValueError(
            f"no pruning curve was computed for {key} at this profile; computed: "
            f"{', '.join(sorted(curves))}"
        )
    return curves[key]


def accuracy_at(curve: Mapping[str, Tensor], fraction: float) -> Tensor:
    """The (S,) accuracies of ``curve`` at ``fraction`` kept; ValueError if not computed."""
    fraction = check_number("fraction", fraction, low=0, high=1, low_open=True)
    fractions = curve["fractions"].tolist()
    for i, f in enumerate(fractions):
        if abs(f - fraction) < 1e-9:
            return curve["accuracy"][i]
    raise ValueError(
        f"fraction kept {fraction:g} was not computed; computed: "
        f"{', '.join(f'{f:g}' for f in fractions)}"
    )


def top_k_precision(score: Tensor, flipped: Tensor, k: int | None = None) -> float:
    """Fraction of flipped examples among the ``k`` highest scores (default: k = the number of
    flipped examples, so a perfect detector gives 1 and a random ranking the noise rate)."""
    score = torch.as_tensor(score, dtype=torch.float64).flatten()
    flipped = torch.as_tensor(flipped).flatten().bool()
    if len(score) != len(flipped) or len(score) == 0:
        raise ValueError(
            f"score and flipped must have the same length >= 1, got {len(score)}, {len(flipped)}"
        )
    k = int(flipped.sum()) if k is None else k
    check_int("k", k, 1, len(score))
    top = scores.prune(score, k / len(score), mode="hardest")
    return float(flipped[top].double().mean())


def top_k_per_run(result: Mapping[str, Tensor], method: str, epoch: int | None = None) -> Tensor:
    """(runs,) :func:`top_k_precision` of each scoring run's own score (:func:`run_scores`)
    against the flipped labels of a :func:`score_experiment` result: one value per run, the unit
    of replication for an interval over runs (:func:`mean_interval`)."""
    flipped = result["flipped"]
    if int(flipped.sum()) == 0:
        raise ValueError("the result has no flipped label (noise = 0)")
    rows = run_scores(result, method, epoch)
    return torch.tensor([top_k_precision(r, flipped) for r in rows], dtype=torch.float64)


def random_top_k(flipped: Tensor, seeds: Sequence[int]) -> Tensor:
    """(len(seeds),) :func:`top_k_precision` of a random ranking drawn from each seed (a
    generator of its own, ``torch.Generator().manual_seed(seed)``): the control for a score
    that finds flipped labels; its expectation is the noise rate."""
    seeds = check_ints("seeds", seeds, 0)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    flipped = torch.as_tensor(flipped).flatten().bool()
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        out.append(
            top_k_precision(torch.rand(len(flipped), generator=g, dtype=torch.float64), flipped)
        )
    return torch.tensor(out, dtype=torch.float64)


def top_k_band(
    score: Tensor, flipped: Tensor, *, level: float = 0.95, num_resamples: int = 1000, seed: int = 0
) -> stats.Interval:
    """:func:`top_k_precision` with a percentile bootstrap band over the training examples
    (each resample draws n examples with replacement, k = the flipped ones it holds)."""
    score = torch.as_tensor(score, dtype=torch.float64).flatten()
    flipped = torch.as_tensor(flipped).flatten().bool()
    if len(score) != len(flipped) or int(flipped.sum()) == 0:
        raise ValueError("score and flipped must have the same length, with >= 1 flipped example")
    s, f = score.numpy(), flipped.numpy()

    def statistic(groups: list[np.ndarray]) -> float:
        idx = groups[0].astype(np.int64)
        if not f[idx].any():
            return 0.0
        return top_k_precision(torch.from_numpy(s[idx]), torch.from_numpy(f[idx]))

    return stats.bootstrap(
        statistic, [np.arange(len(s))], level=level, num_resamples=num_resamples, seed=seed
    )


def spearman_band(
    a: Tensor, b: Tensor, *, level: float = 0.95, num_resamples: int = 1000, seed: int = 0
) -> stats.Interval:
    """Spearman's rank correlation of ``a`` and ``b`` (:func:`gradcourse.scores.spearman`) with
    a percentile bootstrap band over the examples (pairs (a_i, b_i) resampled together)."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"a and b must have the same length >= 3, got {len(a)}, {len(b)}")

    def statistic(groups: list[np.ndarray]) -> float:
        idx = torch.from_numpy(groups[0].astype(np.int64))
        return scores.spearman(a[idx], b[idx])

    return stats.bootstrap(
        statistic, [np.arange(len(a))], level=level, num_resamples=num_resamples, seed=seed
    )


def grand_at_init(
    cfg: Mapping[str, Any],
    seeds: Sequence[int],
    *,
    bias_std: float | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """(len(seeds), n) GraNd at initialisation of the networks ``cfg`` builds from each seed
    (no training: Paul et al.'s GraNd at epoch 0), on ``cfg``'s training data; CPU float64.

    A ReLU MLP with zero biases is positively homogeneous, f(c x) = c f(x) for c > 0, which
    ties its activations to the input norm; non-zero biases break that. ``init="torch"`` gives
    PyTorch's default biases, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which are small next to
    the pre-activations of standardised inputs; ``bias_std`` redraws every bias of every
    ``nn.Linear`` and convolution as N(0, bias_std^2) (a generator seeded by the run's seed),
    to see how far the input-norm ranking survives larger ones."""
    cfg = config(**cfg)
    seeds = check_ints("seeds", seeds, 0)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    if bias_std is not None:
        check_nonnegative("bias_std", bias_std)
    ds, _ = load_data(cfg, device)
    out = torch.zeros(len(seeds), ds.n_train, dtype=torch.float64)
    for r, seed in enumerate(seeds):
        model = make_model(cfg, ds.input_shape, ds.num_classes, seed=seed, device=device)
        if bias_std is not None:
            _redraw_biases_(model, bias_std, seed)
        out[r] = scores.grand_scores(model, ds.x_train, ds.y_train).double().cpu()
    return out


def _redraw_biases_(model: nn.Module, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and layer.bias is not None:
                draw = torch.randn(layer.bias.shape, generator=g, dtype=torch.float64) * std
                layer.bias.copy_(draw.to(layer.bias))


# ----------------------------------------------------------------------------- per-run statistics


def run_scores(result: Mapping[str, Tensor], method: str, epoch: int | None = None) -> Tensor:
    """(runs, n) the score of ``method`` in each scoring run of a :func:`score_experiment`
    result, not averaged (EL2N / GraNd at ``epoch``, forgetting events); the input norm, the same
    in every run, as (1, n). :func:`method_scores` is the mean of these rows."""
    if method not in METHODS or method == "random":
        raise ValueError(f"method must be one of {METHODS[:-1]}, got {method!r}")
    if method == "input_norm":
        return result["input_norm"].reshape(1, -1)
    if method == "forgetting":
        return result["forgetting"]
    epochs = result["epochs"].tolist()
    if epoch not in epochs:
        raise ValueError(
            f"epoch must be one of the scored epochs {epochs} for {method}, got {epoch!r}"
        )
    return result[method][epochs.index(epoch)]


def per_run_spearman(
    result: Mapping[str, Tensor],
    a: tuple[str, int | None],
    b: tuple[str, int | None],
) -> Tensor:
    """(runs,) Spearman's rank correlation of score ``a`` with score ``b`` within each scoring
    run (each a ``(method, epoch)`` pair as in :func:`run_scores`; the input norm pairs with
    every run). Its spread over runs is the run-to-run variation that a bootstrap over examples
    of the averaged scores leaves out."""
    sa, sb = run_scores(result, *a), run_scores(result, *b)
    runs = max(len(sa), len(sb))
    sa, sb = sa.expand(runs, -1), sb.expand(runs, -1)
    return torch.tensor([scores.spearman(sa[r], sb[r]) for r in range(runs)], dtype=torch.float64)


def between_run_spearman(
    result: Mapping[str, Tensor], method: str, epoch: int | None = None
) -> Tensor:
    """(runs (runs - 1) / 2,) Spearman's correlation of one score between every two scoring runs
    r < s: how reproducible the score is from one run to the next."""
    s = run_scores(result, method, epoch)
    if len(s) < 2:
        raise ValueError(f"between-run correlations need >= 2 scoring runs, got {len(s)}")
    pairs = [(r, q) for r in range(len(s)) for q in range(r + 1, len(s))]
    return torch.tensor([scores.spearman(s[r], s[q]) for r, q in pairs], dtype=torch.float64)


def mean_interval(values: Tensor | Sequence[float], *, level: float = 0.95) -> stats.Interval:
    """The mean of ``values`` (one per run) with Student's t-interval at ``level``
    (:func:`gradcourse.stats.paired_interval` against zero); needs >= 2 values."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    return stats.paired_interval(v.numpy(), np.zeros(len(v)), level=level)


def init_spearman(
    cfg: Mapping[str, Any],
    seeds: Sequence[int],
    *,
    bias_std: float | None = None,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """(len(seeds),) Spearman's correlation between GraNd at initialisation of each seed's
    network (:func:`grand_at_init`, with ``bias_std``) and the input norm, on ``cfg``'s training
    data: Kirsch's (2023) check, one value per initialisation. Cached when ``cache`` is given."""
    cfg = config(**cfg)
    seeds = check_ints("seeds", seeds, 0)
    if bias_std is not None:
        bias_std = float(check_nonnegative("bias_std", bias_std))

    def compute() -> dict[str, Tensor]:
        g = grand_at_init(cfg, seeds, bias_std=bias_std, device=device)
        ds, _ = load_data(cfg)
        norm = scores.input_norm_scores(ds.x_train).double()
        rho = torch.tensor([scores.spearman(row, norm) for row in g], dtype=torch.float64)
        return {"rho": rho}

    if cache is None:
        return compute()["rho"]
    key = dict(cfg=_key(cfg), seeds=seeds, bias_std=bias_std)
    return cache.get_or_compute("datadiet-init-rho", key, compute)["rho"]


def first_layer_scales(cfg: Mapping[str, Any], seed: int) -> dict[str, float]:
    """The standard deviations, over the training examples and units, of the first layer's
    pre-activations W x (without the bias) and of its biases, for the MLP ``cfg`` builds from
    ``seed``: how large the biases are next to what they are added to."""
    cfg = config(**cfg)
    if cfg["arch"] != "mlp":
        raise ValueError(f"first_layer_scales needs arch='mlp', got {cfg['arch']!r}")
    ds, _ = load_data(cfg)
    net = make_model(cfg, ds.input_shape, ds.num_classes, seed=seed)
    first = next(m for m in net.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        pre = ds.x_train.flatten(1).to(first.weight) @ first.weight.T
        return {"preactivation_std": float(pre.std()), "bias_std": float(first.bias.std())}


def single_run(result: Mapping[str, Tensor], run: int) -> dict[str, Tensor]:
    """A :func:`score_experiment` result holding scoring run ``run`` only, so that
    :func:`method_scores` and :func:`kept_indices` rank by that run's scores alone."""
    runs = len(result["test_accuracy"])
    check_int("run", run, 0, runs - 1)
    out = dict(result)
    for key in ("el2n", "grand"):
        out[key] = result[key][:, run : run + 1]
    out["forgetting"] = result["forgetting"][run : run + 1]
    out["test_accuracy"] = result["test_accuracy"][run : run + 1]
    return out


def class_shares(result: Mapping[str, Tensor], kept: Tensor, fraction: float) -> Tensor:
    """(num_classes,) float64: each class's kept examples over its fair share, ``fraction``
    times its size (1: the class keeps its share; 0: it is dropped; NaN: a class with no
    training examples)."""
    fraction = check_number("fraction", fraction, low=0, high=1, low_open=True)
    size = class_counts(result, torch.arange(len(result["labels"]))).double()
    share = class_counts(result, kept).double() / (fraction * size.clamp(min=1))
    return torch.where(size > 0, share, torch.nan)


def _least(shares: Tensor) -> float:
    return float(shares[~shares.isnan()].min())


def least_kept_shares(
    result: Mapping[str, Tensor],
    method: str,
    epoch: int | None,
    fraction: float,
    *,
    mode: str = "hardest",
) -> Tensor:
    """(1 + runs,) the smallest :func:`class_shares` of the subset that ``method`` keeps,
    ranked by the averaged score (first) and by each scoring run's own score (then)."""
    if method == "random":
        raise ValueError("least_kept_shares ranks by a score; for random use random_least_shares")
    results = [result] + [single_run(result, r) for r in range(len(result["test_accuracy"]))]
    return torch.tensor(
        [
            _least(class_shares(r, kept_indices(r, method, epoch, fraction, mode=mode), fraction))
            for r in results
        ],
        dtype=torch.float64,
    )


def random_least_shares(
    result: Mapping[str, Tensor], fraction: float, seeds: Sequence[int]
) -> Tensor:
    """(len(seeds),) the smallest :func:`class_shares` of the random subset drawn from each seed
    (the subsets :func:`prune_curve` trains on for ``"random"``): the control for a score that
    starves a class."""
    seeds = check_ints("seeds", seeds, 0)
    return torch.tensor(
        [
            _least(
                class_shares(
                    result, kept_indices(result, "random", None, fraction, seed=s), fraction
                )
            )
            for s in seeds
        ],
        dtype=torch.float64,
    )
