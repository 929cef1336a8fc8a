"""Notebook 10, coherent gradients: coherence along training on real, random and noisy labels,
which examples are learned first, and robust averaging against memorisation (Chatterjee &
Zielinski 2022, arXiv 2203.10036; Zielinski et al. 2020, arXiv 2003.07422).

One run (:func:`train_run`, cached by :func:`cached_run`) trains an MLP on a Fashion-MNIST subset
whose labels are the real ones, uniformly random ones, or the real ones with a fraction flipped
to another class ("corrupted"), by plain SGD with the batch's gradient aggregated as
:func:`gradcourse.coherence.robust_gradient` says (the mean, a winsorised mean, a median of
group means). Along training it records the coherence ratio alpha/alpha_perp of fixed
measurement samples (and the same ratio with random signs, the orthogonal floor), the accuracy
on the clean and the corrupted examples and on the test set; after every epoch, which training
examples are classified as labelled; at two early steps, every training example's alignment
with the mean gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import coherence as co
from .. import data, models
from ..cache import Cache
from ..checks import check_int, check_number, check_positive
from ..functional import flatten
from . import seeded_run, seeded_runs, with_defaults

__all__ = [
    "AGGREGATORS",
    "DEFAULTS",
    "LABELS",
    "at_clean_accuracy",
    "cached_run",
    "cached_runs",
    "config",
    "early_late_gap",
    "early_late_gap_by_class",
    "learning_epochs",
    "load",
    "make_model",
    "train_run",
]

LABELS: tuple[str, ...] = ("real", "random", "noisy")
AGGREGATORS = co.AGGREGATORS

DEFAULTS: dict[str, Any] = dict(
    n_train=2_000,
    n_test=2_000,
    data_seed=0,
    labels="real",
    noise=0.5,  # the fraction of labels flipped to another class when labels == "noisy"
    width=256,
    depth=2,
    aggregator="mean",
    c=2,  # winsorised mean: clip at the (c+1)-th most extreme value
    k=9,  # median of k group means
    lr=0.1,
    batch_size=100,
    epochs=40,
    measure=500,  # examples in each coherence measurement sample
    record_every=20,  # steps between two records
    align_step=20,  # the second step at which alignments are recorded (the first is 0)
)


def config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys refused) and checked."""
    cfg = with_defaults(DEFAULTS, overrides)
    check_int("n_train", cfg["n_train"], 20, 60_000)
    check_int("n_test", cfg["n_test"], 10, 10_000)
    check_int("data_seed", cfg["data_seed"], 0)
    if cfg["labels"] not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {cfg['labels']!r}")
    check_number("noise", cfg["noise"], low=0, high=1)
    check_int("width", cfg["width"], 1)
    check_int("depth", cfg["depth"], 1)
    if cfg["aggregator"] not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {cfg['aggregator']!r}")
    check_int("batch_size", cfg["batch_size"], 2, cfg["n_train"])
    check_int("c", cfg["c"], 0, (cfg["batch_size"] - 1) // 2)
    check_int("k", cfg["k"], 1, cfg["batch_size"])
    check_positive("lr", cfg["lr"])
    check_int("epochs", cfg["epochs"], 1)
    check_int("measure", cfg["measure"], 2, cfg["n_train"])
    check_int("record_every", cfg["record_every"], 1)
    check_int("align_step", cfg["align_step"], 1)
    return cfg


_DATA: dict[tuple[Any, ...], dict[str, Any]] = {}


def load(cfg: Mapping[str, Any], device: str | torch.device | None = None) -> dict[str, Any]:
    """The data of a configuration: Fashion-MNIST (class-balanced subsets under ``data_seed``,
    flattened, standardised), the training labels the configuration trains on (``y``), the true
    ones (``y_true``) and the mask of corrupted examples (label != true label). Random labels
    are uniform over the 10 classes (about a tenth agree with the truth by chance); noisy ones
    flip exactly ``noise`` of the examples to another class. Both are drawn from ``data_seed``,
    the same for every training seed."""
    cfg = config(**cfg)
    key = (
        cfg["n_train"],
        cfg["n_test"],
        cfg["data_seed"],
        cfg["labels"],
        cfg["noise"],
        str(device),
    )
    if key not in _DATA:
        ds = data.fashion_mnist(
            n_train=cfg["n_train"], n_test=cfg["n_test"], seed=cfg["data_seed"], flatten=True
        )
        y_true = ds.y_train
        if cfg["labels"] == "real":
            y = y_true.clone()
        elif cfg["labels"] == "random":
            gen = torch.Generator().manual_seed(10_000 + cfg["data_seed"])
            y = torch.randint(0, 10, (len(y_true),), generator=gen)
        else:
            y, _ = data.label_noise(y_true, cfg["noise"], 10, seed=cfg["data_seed"])
        _DATA[key] = dict(
            x=ds.x_train.to(device),
            y=y.to(device),
            y_true=y_true.to(device),
            corrupted=(y != y_true).to(device),
            x_test=ds.x_test.to(device),
            y_test=ds.y_test.to(device),
        )
    return _DATA[key]


def make_model(
    cfg: Mapping[str, Any], *, seed: int, device: str | torch.device | None = None
) -> nn.Module:
    """MLP 784 -> ``width`` x ``depth`` (ReLU) -> 10 with PyTorch's default initialisation
    (uniform +-1/sqrt(fan_in), weights and biases) drawn from ``seed``."""
    cfg = config(**cfg)
    check_int("seed", seed, 0)
    net = models.MLP(28 * 28, [cfg["width"]] * cfg["depth"], 10, seed=seed)
    return models.torch_default_init_(net, seed).to(device)


def _measurement_samples(d: Mapping[str, Tensor], m: int) -> dict[str, Tensor]:
    """Index sets of the coherence samples: ``all`` (the first m examples), and ``clean`` /
    ``corrupted`` (the first m of each, when both exist)."""
    n = len(d["y"])
    out = {"all": torch.arange(min(m, n))}
    bad = torch.nonzero(d["corrupted"].cpu()).flatten()
    good = torch.nonzero(~d["corrupted"].cpu()).flatten()
    if len(bad) >= 2 and len(good) >= 2:
        out["clean"], out["corrupted"] = good[:m], bad[:m]
    return out


def _correct(model: nn.Module, x: Tensor, y: Tensor, batch: int = 5_000) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(x), batch)]
        )


def train_run(
    cfg: Mapping[str, Any], seed: int, *, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Train :func:`make_model` from ``seed`` by plain SGD (constant ``lr``, batches reshuffled
    each epoch from ``seed``, cross-entropy), each step's gradient the batch's ``aggregator``
    (:func:`gradcourse.coherence.robust_gradient`; ``"mean"`` is ordinary SGD). Returns records
    at steps 0, ``record_every``, ... and the last step:

    - ``coherence_<sample>``: alpha/alpha_perp on each measurement sample (``all``, and for
      noisy labels ``clean`` and ``corrupted``), labelled as trained; ``floor_all``: the same
      with random signs (:func:`~gradcourse.coherence.sign_flip_coherence`);
    - ``clean_acc`` (training examples whose label is true, classified as labelled),
      ``memorised`` (corrupted examples classified as their wrong label; nan without any),
      ``test_acc``, ``train_loss`` (mean over the training set);
    - ``shrink``: ||aggregated gradient|| / ||mean gradient|| on the step's batch (1 for the
      mean);

    ``correct`` (epochs + 1, n) whether each training example is classified as labelled at the
    start and after every epoch; ``alignment`` (2, n) each example's cosine with the training
    set's mean gradient at steps 0 and ``align_step``; ``seconds`` of training.
    """
    cfg = config(**cfg)
    d = load(cfg, device)
    model = make_model(cfg, seed=seed, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    samples = _measurement_samples(d, cfg["measure"])
    n, bs = len(d["y"]), cfg["batch_size"]
    steps_per_epoch = math.ceil(n / bs)
    total = cfg["epochs"] * steps_per_epoch
    rec: dict[str, list[float]] = {"step": []}
    correct = [_correct(model, d["x"], d["y"]).cpu().numpy()]
    alignment: list[np.ndarray] = []
    seconds = 0.0

    def record(step: int, shrink: float) -> None:
        rec["step"].append(step)
        for name, idx in samples.items():
            c = co.coherence(model, "ce", d["x"][idx], d["y"][idx])
            rec.setdefault(f"coherence_{name}", []).append(c.ratio)
            if name == "all":
                floor = co.sign_flip_coherence(  # signs drawn afresh per run and record
                    model,
                    "ce",
                    d["x"][idx],
                    d["y"][idx],
                    seed=1_000_003 * seed + step,
                    sum_sq_norms=c.sum_sq_norms,
                )
                rec.setdefault("floor_all", []).append(floor)
        ok = _correct(model, d["x"], d["y"])
        bad = d["corrupted"]
        rec.setdefault("clean_acc", []).append(float(ok[~bad].float().mean()))
        rec.setdefault("memorised", []).append(
            float(ok[bad].float().mean()) if bool(bad.any()) else math.nan
        )
        rec.setdefault("test_acc", []).append(
            float(_correct(model, d["x_test"], d["y_test"]).float().mean())
        )
        with torch.no_grad():
            rec.setdefault("train_loss", []).append(float(F.cross_entropy(model(d["x"]), d["y"])))
        rec.setdefault("shrink", []).append(shrink)

    def align(step: int) -> None:
        alignment.append(co.alignment(model, "ce", d["x"], d["y"]).cpu().numpy())

    record(0, 1.0)
    align(0)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=gen).to(d["x"].device)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            t0 = time.perf_counter()
            xb, yb = d["x"][idx], d["y"][idx]
            opt.zero_grad(set_to_none=True)
            if cfg["aggregator"] == "mean":
                F.cross_entropy(model(xb), yb).backward()
            else:
                co.robust_gradient(
                    model, "ce", xb, yb, cfg["aggregator"], c=cfg["c"], k=cfg["k"], set_grad=True
                )
            if not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
                raise FloatingPointError(f"a non-finite gradient at step {step}: lower lr")
            seconds += time.perf_counter() - t0
            recording = (step + 1) % cfg["record_every"] == 0 or step + 1 == total
            shrink = 1.0
            if recording and cfg["aggregator"] != "mean":  # not timed
                mean = flatten(co.mean_gradient(model, "ce", xb, yb)).norm()
                used = flatten([p.grad for p in model.parameters()]).norm()
                shrink = float(used / mean.clamp_min(1e-30))
            t0 = time.perf_counter()
            opt.step()
            seconds += time.perf_counter() - t0
            step += 1
            if recording:
                record(step, shrink)
            if step == cfg["align_step"]:
                align(step)
        correct.append(_correct(model, d["x"], d["y"]).cpu().numpy())
    if len(alignment) < 2:  # align_step beyond the run: recorded at its end
        align(step)
    out: dict[str, Any] = {key: np.asarray(v, dtype=np.float64) for key, v in rec.items()}
    out.update(
        correct=np.stack(correct).astype(np.uint8),
        alignment=np.stack(alignment),
        corrupted=d["corrupted"].cpu().numpy().astype(np.uint8),
        seconds=seconds,
        steps=total,
    )
    return out


def cached_run(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """:func:`train_run` through ``cache`` (keyed by the full configuration and the seed)."""
    return seeded_run("coherence-run", train_run, config(**cfg), seed, cache=cache, device=device)


def cached_runs(
    jobs: Mapping[Any, tuple[Mapping[str, Any], int]],
    *,
    cache: Cache | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "runs",
) -> dict[Any, dict[str, Any]]:
    """:func:`cached_run` for every job ``{key: (cfg, seed)}`` under one progress bar (a cached
    run passes at once). Returns ``{key: record}`` in job order."""
    return seeded_runs(cached_run, jobs, cache=cache, device=device, progress=progress, desc=desc)


# ----------------------------------------------------------------------------- analysis


def learning_epochs(correct: np.ndarray) -> np.ndarray:
    """For ``correct`` (epochs + 1, n), row e whether each example is classified as labelled
    after e epochs: the first e from which it stays so to the end (0: already at the start);
    examples wrong at the end get epochs + 1 (not learned)."""
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2 or len(c) < 1:
        raise ValueError(f"correct must be 2-d (epochs + 1, n), got shape {c.shape}")
    rows = len(c)
    # the index of the last row in which the example is wrong (-1: never wrong)
    wrong_after = np.where(~c, np.arange(rows)[:, None], -1).max(axis=0)
    return np.where(c[-1], wrong_after + 1, rows).astype(np.int64)


def early_late_gap(
    align: np.ndarray,
    learned: np.ndarray,
    *,
    fraction: float = 0.25,
    seed: int = 0,
    mask: np.ndarray | None = None,
) -> float:
    """mean(alignment of the ``fraction`` of examples learned first) - mean(alignment of the
    ``fraction`` learned last, unlearned last of all); ties in learning epoch broken at random
    (``seed``). ``mask`` restricts both groups to some examples."""
    a, e = np.asarray(align, dtype=np.float64), np.asarray(learned, dtype=np.float64)
    if a.shape != e.shape or a.ndim != 1:
        raise ValueError(f"align and learned must be 1-d of one length, got {a.shape}, {e.shape}")
    check_number("fraction", fraction, low=0, high=0.5, low_open=True)
    if mask is not None:
        keep = np.asarray(mask, dtype=bool)
        a, e = a[keep], e[keep]
    q = max(1, int(round(fraction * len(a))))
    if 2 * q > len(a):
        raise ValueError(f"too few examples ({len(a)}) for two groups of {q}")
    tie = np.random.default_rng(seed).random(len(a))
    order = np.lexsort((tie, e))
    return float(a[order[:q]].mean() - a[order[-q:]].mean())


def early_late_gap_by_class(
    align: np.ndarray,
    learned: np.ndarray,
    classes: np.ndarray,
    *,
    fraction: float = 0.25,
    seed: int = 0,
    shuffle: bool = False,
) -> float:
    """:func:`early_late_gap` within each class (the quarters taken among the examples of one
    class), averaged over the classes: how early an example is learned and how it aligns both
    depend on its class, and this compares examples of the same class only. With ``shuffle``
    the learning epochs are first permuted at random within each class (``seed``): the
    control, whose expected gap is 0."""
    e = np.asarray(learned).copy()
    cls = np.asarray(classes)
    if cls.shape != e.shape:
        raise ValueError(f"classes must have the shape of learned {e.shape}, got {cls.shape}")
    rng = np.random.default_rng(seed)
    gaps = []
    for k in np.unique(cls):
        idx = np.flatnonzero(cls == k)
        if shuffle:
            e[idx] = rng.permutation(e[idx])
        gaps.append(early_late_gap(align, e, fraction=fraction, seed=seed, mask=cls == k))
    return float(np.mean(gaps))


def at_clean_accuracy(run: Mapping[str, Any], level: float) -> dict[str, float]:
    """The record at the first step where ``clean_acc`` reaches ``level``: its step,
    ``memorised`` and ``test_acc`` (all nan if the run never reaches it)."""
    check_number("level", level, low=0, high=1)
    hit = np.flatnonzero(np.asarray(run["clean_acc"]) >= level)
    if not len(hit):
        return {"step": math.nan, "memorised": math.nan, "test_acc": math.nan}
    i = int(hit[0])
    return {
        "step": float(run["step"][i]),
        "memorised": float(run["memorised"][i]),
        "test_acc": float(run["test_acc"][i]),
    }


def seeds_array(runs: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """``run[key]`` of every run stacked (seeds, records)."""
    return np.stack([np.asarray(r[key], dtype=np.float64) for r in runs])
