"""Data-pruning scores: EL2N, GraNd, forgetting events; pruning by score; rank correlations.

Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet: Finding Important Examples Early
in Training" (NeurIPS, arXiv 2107.07075), section 2, score a training example (x, y) at time t
of training (w_t the weights, p(w_t, x) = softmax(f(x; w_t)), y one-hot):

- GraNd (Definition 2.1): chi_t(x, y) = E ||g_t(x, y)||_2, g_t = grad_{w_t} l(p(w_t, x), y), the
  per-example gradient of the loss over all weights (:mod:`gradcourse.pergrad`);
- EL2N (Definition 2.2): E ||p(w_t, x) - y||_2, the error vector's norm;

the expectations taken over independently initialised (and trained) networks. Both are
computed with the network in eval mode, so BatchNorm normalises with its running statistics and
the score of an example does not depend on the rest of the batch (a BatchNorm without running
statistics, ``track_running_stats=False``, would, and is refused). Toneva et al. 2019, "An
Empirical Study of Example Forgetting during Deep Neural Network Learning" (ICLR, arXiv
1812.05159), count *forgetting events*: transitions from correctly to incorrectly classified
between consecutive records of training (section 3).

A high score marks a hard (important) example; Paul et al. prune by keeping the highest scores
(:func:`prune`, ``mode="hardest"``), and with an offset that skips the very hardest (their
section 4, "window" here). :func:`spearman` compares two rankings (Kirsch 2023 compares GraNd at
initialisation with the input norm this way).

Results are tensors or dicts of tensors, so they can be stored with :mod:`gradcourse.cache`::

    cache.get_or_compute("el2n", config, lambda: score_runs(make_model, train_fn, x, y, ...))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import check_int, check_ints, check_number
from .functional import model_device_dtype, place
from .losses import LossFn
from .pergrad import _check_batchnorm, eval_mode, per_example_grad_norms

__all__ = [
    "MODES",
    "SCORES",
    "ForgettingRecorder",
    "el2n_scores",
    "forgetting_events",
    "grand_scores",
    "input_norm_scores",
    "never_learned",
    "prune",
    "rank",
    "score_models",
    "score_runs",
    "spearman",
    "spearman_matrix",
]

MODES: tuple[str, ...] = ("hardest", "easiest", "random", "window")
SCORES: tuple[str, ...] = ("el2n", "grand", "forgetting")


# ----------------------------------------------------------------------------- checks


def _check_labels(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("x and y must be tensors")
    if y.ndim != 1 or y.is_floating_point():
        raise ValueError(
            f"y must be a 1-D tensor of integer class labels, got {y.dtype} {tuple(y.shape)}"
        )
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(
            f"x and y must hold the same number (>= 1) of examples, got {len(x)} and {len(y)}"
        )


def _scores_1d(name: str, scores: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    t = torch.as_tensor(np.asarray(scores) if not isinstance(scores, Tensor) else scores)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of scores, got shape {tuple(t.shape)}"
        )
    t = t.detach().cpu().to(torch.float64)
    if not torch.isfinite(t).all():
        # inf is allowed (never-learned examples may be scored inf); nan is not
        if torch.isnan(t).any():
            raise ValueError(f"{name} must not contain nan")
    return t


# ----------------------------------------------------------------------------- EL2N, GraNd


def el2n_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> Tensor:
    """EL2N of one network: ||softmax(f(x_i)) - onehot(y_i)||_2 for every example (Paul et al.
    2021, Definition 2.2, before the average over networks; :func:`score_models` averages).

    Eval mode (modes restored afterwards), no_grad, in batches of ``batch_size``, on ``device``
    (default: the model's). The number of classes is the model's output width. Returns (n,) in
    the model's dtype on ``device``. A BatchNorm without running statistics is refused.
    """
    _check_labels(x, y)
    check_int("batch_size", batch_size, 1)
    _check_batchnorm(model)
    model_device, dtype = model_device_dtype(model)
    device = model_device if device is None else torch.device(device)
    if device != model_device:
        raise ValueError(
            f"device must be the model's device ({model_device}) or None, got {device}"
        )
    out = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = place(x[start : start + batch_size], device, dtype)
            yb = y[start : start + batch_size].to(device)
            logits = model(xb)
            if logits.ndim != 2 or logits.shape[1] < 2:
                raise ValueError(
                    f"EL2N needs class logits (n, k >= 2), got shape {tuple(logits.shape)}"
                )
            if int(yb.min()) < 0 or int(yb.max()) >= logits.shape[1]:
                raise ValueError(f"y must lie in [0, {logits.shape[1] - 1}] (the model's classes)")
            error = torch.softmax(logits, dim=1)
            error[torch.arange(len(yb), device=device), yb] -= 1.0
            out.append(error.norm(dim=1))
    return torch.cat(out)


def grand_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | LossFn = "ce",
    chunk_size: int | None = None,
    method: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Tensor:
    """GraNd of one network: ||grad_w l(f(x_i), y_i)||_2 over all weights (BatchNorm scale and
    shift included, running statistics not), in eval mode (Paul et al. 2021, Definition 2.1,
    before the average over networks). A thin wrapper of
    :func:`gradcourse.pergrad.per_example_grad_norms` with the paper's cross-entropy loss."""
    _check_labels(x, y)
    return per_example_grad_norms(
        model, loss, x, y, chunk_size=chunk_size, method=method, device=device, progress=progress
    )


def input_norm_scores(x: Tensor) -> Tensor:
    """||x_i||_2 of the flattened inputs: the baseline Kirsch (2023, arXiv 2303.14753) finds
    nearly rank-equivalent to GraNd at initialisation."""
    if not isinstance(x, Tensor) or x.ndim == 0 or len(x) == 0:
        raise ValueError("x must be a tensor holding at least one example")
    return x.flatten(1).norm(dim=1)


def score_models(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    score: str = "el2n",
    batch_size: int = 1024,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Tensor:
    """One score for several networks (e.g. independent initialisations, or checkpoints of
    several runs at the same epoch): a (runs, n) tensor on the CPU; ``.mean(0)`` is the paper's
    expectation over runs. ``score`` is ``"el2n"`` or ``"grand"``."""
    if score not in ("el2n", "grand"):
        raise ValueError(f"score must be 'el2n' or 'grand', got {score!r}")
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one network, got none")
    rows = []
    for model in tqdm(models, desc=score, disable=not progress, leave=False):
        if score == "el2n":
            s = el2n_scores(model, x, y, batch_size=batch_size, device=device)
        else:
            s = grand_scores(model, x, y, chunk_size=chunk_size, device=device)
        rows.append(s.detach().cpu())
    return torch.stack(rows)


# ----------------------------------------------------------------------------- forgetting


def _check_correct(correct: Tensor | np.ndarray) -> Tensor:
    c = torch.as_tensor(np.asarray(correct) if not isinstance(correct, Tensor) else correct)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(
            f"correct must be a (records >= 1, n >= 1) array of per-example correctness, got "
            f"shape {tuple(c.shape)}"
        )
    if c.dtype != torch.bool:
        if not ((c == 0) | (c == 1)).all():
            raise ValueError("correct must hold booleans (or 0 / 1)")
        c = c.bool()
    return c.cpu()


def never_learned(correct: Tensor | np.ndarray) -> Tensor:
    """Examples never classified correctly in any record of ``correct`` (records, n): (n,) bool."""
    return ~_check_correct(correct).any(dim=0)


def forgetting_events(
    correct: Tensor | np.ndarray, *, never_learned_value: float | None = None
) -> Tensor:
    """Number of forgetting events per example (Toneva et al. 2019, section 3).

    ``correct[t, i]`` says whether example i was classified correctly at record t (e.g. after
    each epoch, :class:`ForgettingRecorder`). A forgetting event is a transition from correct at
    record t to incorrect at record t + 1; learning events (incorrect -> correct) are not
    counted. Convention for examples never learned (incorrect at every record): Toneva et al.
    count them as forgotten infinitely often, so that they rank as the most forgettable; here
    they get ``never_learned_value``, by default T = the number of records, which is larger than
    any count an example that was learned can reach (at most floor(T / 2)). Pass ``math.inf``
    for the paper's convention. Returns (n,) float64 on the CPU.
    """
    c = _check_correct(correct)
    events = (c[:-1] & ~c[1:]).sum(dim=0).to(torch.float64)
    value = (
        float(c.shape[0])
        if never_learned_value is None
        else check_number("never_learned_value", never_learned_value, low=0, allow_inf=True)
    )
    events[~c.any(dim=0)] = value
    return events


class ForgettingRecorder:
    """A training callback that records which examples of (x, y) the model classifies correctly.

    ``callback(step, model)`` runs the model in eval mode under no_grad on all of x (in batches
    of ``batch_size``), appends the (n,) boolean row to :attr:`rows` and returns a small dict
    (the accuracy) for the training history; pass it to :func:`gradcourse.train.train` with
    ``every`` = steps per epoch to record once per epoch (Toneva et al. 2019 record each example
    when it is visited in a minibatch; an end-of-epoch pass over the full set is the common
    variant and does not depend on the batch order). :meth:`correct` stacks the rows into a
    (records, n) tensor and :meth:`forgetting_events` counts transitions. A model with a
    BatchNorm without running statistics is refused (ValueError, nothing recorded).

        rec = ForgettingRecorder(x, y)
        gc.train.train(model, x, y, loss="ce", optimizer="sgd", batch_size=128, lr=0.1,
                       epochs=20, callback=rec, every=math.ceil(len(x) / 128))
        counts = rec.forgetting_events()
    """

    def __init__(self, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> None:
        _check_labels(x, y)
        self.x, self.y = x, y
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.rows: list[Tensor] = []
        self.steps: list[int] = []

    def __call__(self, step: int, model: nn.Module) -> dict[str, Any]:
        _check_batchnorm(model)
        device, dtype = model_device_dtype(model)
        hits = []
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(self.x), self.batch_size):
                xb = place(self.x[start : start + self.batch_size], device, dtype)
                yb = self.y[start : start + self.batch_size].to(device)
                hits.append((model(xb).argmax(dim=1) == yb).cpu())
        row = torch.cat(hits)
        self.rows.append(row)
        self.steps.append(int(step))
        return {"train_accuracy_eval": float(row.double().mean())}

    def correct(self) -> Tensor:
        """The (records, n) boolean record."""
        if not self.rows:
            raise ValueError("nothing recorded yet: pass the recorder to train(callback=...)")
        return torch.stack(self.rows)

    def forgetting_events(self, *, never_learned_value: float | None = None) -> Tensor:
        """:func:`forgetting_events` of the record so far."""
        return forgetting_events(self.correct(), never_learned_value=never_learned_value)


# ----------------------------------------------------------------------------- several runs


def score_runs(
    make_model: Callable[[int], nn.Module],
    train_fn: Callable[..., Any] | None,
    x: Tensor,
    y: Tensor,
    *,
    seeds: Sequence[int],
    epoch: int,
    scores: Sequence[str] = ("el2n", "grand"),
    batch_size: int = 1024,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Scores of (x, y) averaged over independent runs (Paul et al. 2021: the expectation over
    initialisations in Definitions 2.1 and 2.2; Toneva et al. 2019 for forgetting).

    For each seed: ``model = make_model(seed)``; unless ``epoch == 0``,
    ``train_fn(model, seed=seed, epochs=epoch, callback=cb)`` trains it in place, where ``cb`` is
    a :class:`ForgettingRecorder` when ``"forgetting"`` is asked for (train_fn must call it once
    per epoch, e.g. ``gradcourse.train.train(..., callback=cb, every=steps_per_epoch)``) and None
    otherwise; then the scores named in ``scores`` (``"el2n"``, ``"grand"``, ``"forgetting"``) are
    computed on (x, y). ``epoch=0`` scores at initialisation (GraNd at init; forgetting needs
    training).

    Returns ``{"seeds": (runs,), name: (n,) mean over runs, name + "_runs": (runs, n)}``, CPU
    tensors (so the dict can go to :class:`gradcourse.cache.Cache`). Everything random is in the
    caller's ``make_model`` / ``train_fn``, keyed by the seed.
    """
    seeds = list(check_ints("seeds", seeds, 0, nonempty=True))
    check_int("epoch", epoch, 0)
    scores = tuple(scores)
    unknown = [s for s in scores if s not in SCORES]
    if unknown or not scores:
        raise ValueError(f"scores must be a non-empty subset of {SCORES}, got {scores!r}")
    if "forgetting" in scores and epoch == 0:
        raise ValueError("scores includes 'forgetting', which needs epoch >= 1 (training), got 0")
    if epoch > 0 and train_fn is None:
        raise ValueError(f"train_fn is None but epoch={epoch} >= 1 needs training")
    _check_labels(x, y)
    rows: dict[str, list[Tensor]] = {s: [] for s in scores}
    for seed in tqdm(seeds, desc=f"runs (epoch {epoch})", disable=not progress):
        model = make_model(seed)
        if device is not None:
            model.to(device)
        recorder = (
            ForgettingRecorder(x, y, batch_size=batch_size) if "forgetting" in scores else None
        )
        if epoch > 0:
            train_fn(model, seed=seed, epochs=epoch, callback=recorder)
        for s in scores:
            if s == "el2n":
                value = el2n_scores(model, x, y, batch_size=batch_size)
            elif s == "grand":
                value = grand_scores(model, x, y, chunk_size=chunk_size)
            else:
                if not recorder.rows:
                    raise ValueError("train_fn never called its callback: no forgetting record")
                value = recorder.forgetting_events()
            rows[s].append(value.detach().cpu().to(torch.float64))
    result: dict[str, Tensor] = {"seeds": torch.tensor(seeds, dtype=torch.int64)}
    for s, r in rows.items():
        stacked = torch.stack(r)
        result[s] = stacked.mean(0)
        result[f"{s}_runs"] = stacked
    return result


# ----------------------------------------------------------------------------- pruning


def prune(
    scores: Tensor | np.ndarray | Sequence[float],
    keep_fraction: float,
    *,
    mode: str = "hardest",
    offset: float = 0.0,
    seed: int = 0,
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
) -> Tensor:
    """Indices of the examples kept, sorted ascending: a (k,) int64 CPU tensor, with
    k = max(1, round(keep_fraction * n)).

    - ``"hardest"``: the k highest scores (Paul et al. 2021 keep these, section 3);
    - ``"easiest"``: the k lowest;
    - ``"random"``: k drawn uniformly without replacement from ``torch.Generator(seed)``
      (the scores only give n);
    - ``"window"``: skip the round(offset * n) highest scores, keep the next k (Paul et al.
      2021, section 4 / fig. 4, the offset experiment); offset + kept must fit in n.

    ``labels`` (n,) makes the pruning class-balanced: each class keeps the same fraction of
    its own examples, chosen by ``mode`` among that class only (the quotas k_c ~ keep_fraction
    n_c are rounded by largest remainder so that they add up to k; a window skips
    min(round(offset n_c), n_c - k_c) of each class, so a rounded-up quota always fits).
    Without it a score can keep almost nothing of a class whose examples are all easy (class
    collapse).

    Ties are broken by index (the lower index counts as harder, in every mode), so the result is
    deterministic and, on ties too, the k hardest and the n - k easiest are complements.
    ``offset`` is only used by ``"window"``.
    """
    s = _scores_1d("scores", scores)
    n = len(s)
    check_number("keep_fraction", keep_fraction, low=0, high=1, low_open=True)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_number("offset", offset, low=0, high=1, high_open=True)
    if offset and mode != "window":
        raise ValueError(
            f"offset is only used by mode='window', got offset={offset} with mode={mode!r}"
        )
    check_int("seed", seed, 0)
    k = max(1, round(keep_fraction * n))
    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        return _select(s, k, mode, round(offset * n), gen, offset, keep_fraction).sort().values
    y = torch.as_tensor(np.asarray(labels)).reshape(-1)
    if y.dtype.is_floating_point or len(y) != n:
        raise ValueError(
            f"labels must hold one integer class per score ({n}), got {tuple(y.shape)}"
        )
    classes = torch.unique(y)
    members = [torch.nonzero(y == c).flatten() for c in classes]
    quota = torch.tensor([keep_fraction * len(m) for m in members], dtype=torch.float64)
    counts = quota.floor().long()
    left = k - int(counts.sum())  # largest remainders first, ties by class order
    order = torch.sort(-(quota - counts), stable=True).indices
    counts[order[:left]] += 1
    # a window skips round(offset * n_c) of each class, fewer where the class's quota (rounded
    # up by largest remainder) would not fit after it: the skip gives way, the quota does not
    kept = [
        m[
            _select(
                s[m], c, mode, min(round(offset * len(m)), len(m) - c), gen, offset, keep_fraction
            )
        ]
        for m, c in zip(members, counts.tolist(), strict=True)
        if c > 0
    ]
    return torch.cat(kept).sort().values


def _select(
    s: Tensor, k: int, mode: str, skip: int, gen: torch.Generator, offset: float, fraction: float
) -> Tensor:
    """Positions of the k examples of ``s`` that ``mode`` keeps (see :func:`prune`)."""
    n = len(s)
    if mode == "random":
        return torch.randperm(n, generator=gen)[:k]
    # stable sort of -s: descending scores, ties in index order; "easiest" reads the same
    # total order from the other end, so on ties it keeps the complement of "hardest"
    hardest_first = torch.sort(-s, stable=True).indices
    if mode == "hardest":
        return hardest_first[:k]
    if mode == "easiest":
        return hardest_first.flip(0)[:k]
    if skip + k > n:
        raise ValueError(
            f"offset + keep_fraction must be <= 1: skipping {skip} and keeping {k} of n={n} "
            f"examples (offset={offset}, keep_fraction={fraction})"
        )
    return hardest_first[skip : skip + k]


# ----------------------------------------------------------------------------- rank correlation


def rank(values: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    """Ranks 1..n of ``values`` (ascending), ties given the average of the ranks they span:
    ``scipy.stats.rankdata(method="average")`` as a float64 CPU tensor."""
    from scipy.stats import rankdata

    v = _scores_1d("values", values)
    return torch.from_numpy(rankdata(v.numpy(), method="average").astype(np.float64))


def spearman(
    a: Tensor | np.ndarray | Sequence[float], b: Tensor | np.ndarray | Sequence[float]
) -> float:
    """Spearman's rank correlation (ties averaged): ``scipy.stats.spearmanr``. nan, without a
    warning, when either input is constant."""
    import warnings

    from scipy.stats import spearmanr

    va, vb = _scores_1d("a", a), _scores_1d("b", b)
    if len(va) != len(vb):
        raise ValueError(f"a and b must have the same length, got {len(va)} and {len(vb)}")
    if len(va) < 2 or bool((va == va[0]).all()) or bool((vb == vb[0]).all()):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(va.numpy(), vb.numpy()).statistic)


def spearman_matrix(scores: Mapping[str, Tensor | np.ndarray]) -> tuple[list[str], Tensor]:
    """Pairwise Spearman correlations of named scores: (names, (k, k) float64 tensor)."""
    names = list(scores)
    if not names:
        raise ValueError("scores must hold at least one named score, got none")
    k = len(names)
    out = torch.eye(k, dtype=torch.float64)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = spearman(scores[names[i]], scores[names[j]])
    return names, out
