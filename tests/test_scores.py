"""gradcourse.scores: EL2N and GraNd against hand computations, forgetting events on hand-made
records, pruning, rank correlations against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr
from torch import nn

from gradcourse import scores as S
from gradcourse.models import MLP
from gradcourse.train import train

N, K = 10, 3


def data(n: int = N, dim: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=dtype), torch.randint(0, K, (n,), generator=g)


# ----------------------------------------------------------------------------- EL2N, GraNd


def test_el2n_by_hand():
    model = MLP(5, [7], K, seed=0, dtype=torch.float64)
    x, y = data()
    got = S.el2n_scores(model, x, y, batch_size=4)
    with torch.no_grad():
        logits = model(x)
    ref = []
    for i in range(N):
        p = [math.exp(v) for v in logits[i].tolist()]
        p = [v / sum(p) for v in p]
        onehot = [1.0 if k == int(y[i]) else 0.0 for k in range(K)]
        ref.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(p, onehot, strict=True))))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    assert ((got >= 0) & (got <= math.sqrt(2))).all()


def test_el2n_uses_eval_mode_and_restores_it():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, K))
    model.double().train()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    x, y = data()
    a = S.el2n_scores(model, x, y)
    b = S.el2n_scores(model, x[:3], y[:3])  # eval mode: a batch of 3 gives the same scores
    torch.testing.assert_close(a[:3], b, rtol=1e-12, atol=0)
    assert model.training and model[1].training
    assert float(model[1].running_mean[0]) == 0.3


def test_batchnorm_without_running_stats_refused():
    """Batch statistics would make an example's score depend on the rest of the batch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, K)
        ).double()
    x, y = data()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        S.el2n_scores(model, x, y)
    recorder = S.ForgettingRecorder(x, y)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        recorder(0, model)
    assert recorder.rows == [] and recorder.steps == []
    with pytest.raises(ValueError, match="track_running_stats=False"):
        S.grand_scores(model, x, y)


def test_grand_at_init_matches_loop():
    model = MLP(5, [6], K, seed=3, dtype=torch.float64)
    x, y = data()
    got = S.grand_scores(model, x, y)
    ref = []
    for i in range(N):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        ref.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-10, atol=0)


def test_score_models_and_input_norm():
    models = [MLP(5, [6], K, seed=s, dtype=torch.float64) for s in range(3)]
    x, y = data()
    runs = S.score_models(models, x, y, score="grand", progress=False)
    assert runs.shape == (3, N)
    torch.testing.assert_close(runs[1], S.grand_scores(models[1], x, y))
    el2n = S.score_models(models, x, y, score="el2n", progress=False)
    torch.testing.assert_close(el2n[2], S.el2n_scores(models[2], x, y))
    torch.testing.assert_close(S.input_norm_scores(x), x.norm(dim=1))
    with pytest.raises(ValueError, match="score must be 'el2n' or 'grand'"):
        S.score_models(models, x, y, score="forgetting")
    with pytest.raises(ValueError, match="at least one network"):
        S.score_models([], x, y)


# ----------------------------------------------------------------------------- forgetting


def test_forgetting_events_on_hand_made_record():
    correct = torch.tensor(
        [  # records (rows) x examples (columns)
            [0, 1, 1, 0, 1, 0],
            [1, 0, 1, 0, 1, 1],
            [0, 1, 1, 0, 0, 1],
            [1, 0, 1, 0, 1, 1],
            [1, 1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    # ex 0: 0 1 0 1 1 -> one forgetting (1->0 at t=1->2)
    # ex 1: 1 0 1 0 1 -> two; ex 2: always right -> 0; ex 3: never learned -> T = 5
    # ex 4: 1 1 0 1 0 -> two; ex 5: learned at t=1, never forgotten -> 0
    expected = torch.tensor([1, 2, 0, 5, 2, 0], dtype=torch.float64)
    torch.testing.assert_close(S.forgetting_events(correct), expected)
    torch.testing.assert_close(S.forgetting_events(correct.int().numpy()), expected)
    inf = S.forgetting_events(correct, never_learned_value=math.inf)
    assert math.isinf(inf[3]) and inf[0] == 1
    assert S.never_learned(correct).tolist() == [False, False, False, True, False, False]
    # a single record: nothing can be forgotten; wrong there = never learned (T = 1)
    assert S.forgetting_events(correct[:1]).tolist() == [1, 0, 0, 1, 0, 1]


def test_forgetting_bad_inputs():
    with pytest.raises(ValueError, match=r"correct must be a \(records >= 1, n >= 1\)"):
        S.forgetting_events(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="booleans"):
        S.forgetting_events(torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="never_learned_value must be a number >= 0"):
        S.forgetting_events(torch.ones(2, 3, dtype=torch.bool), never_learned_value=-1)


def test_forgetting_recorder_with_train():
    x, y = data(n=24)
    model = MLP(5, [8], K, seed=0, dtype=torch.float64)
    recorder = S.ForgettingRecorder(x, y, batch_size=7)
    history = train(
        model, x, y, loss="ce", optimizer="sgd", batch_size=8, lr=0.5, epochs=4,
        callback=recorder, every=3, progress=False,
    )  # fmt: skip
    correct = recorder.correct()
    assert correct.shape == (5, 24)  # steps 0, 3, 6, 9, 12 (the last)
    assert recorder.steps == [0, 3, 6, 9, 12]
    assert [r["step"] for r in history.records] == recorder.steps
    with torch.no_grad():
        final = model(x).argmax(1) == y
    assert torch.equal(correct[-1], final)
    torch.testing.assert_close(
        recorder.forgetting_events(), S.forgetting_events(correct), rtol=0, atol=0
    )
    empty = S.ForgettingRecorder(x, y)
    with pytest.raises(ValueError, match="nothing recorded"):
        empty.correct()


def test_score_runs_averages_over_seeds():
    x, y = data(n=16)

    def make_model(seed):
        return MLP(5, [6], K, seed=seed, dtype=torch.float64)

    def train_fn(model, *, seed, epochs, callback):
        train(
            model, x, y, loss="ce", optimizer="sgd", batch_size=8, lr=0.3, epochs=epochs,
            seed=seed, callback=callback, every=2, progress=False,
        )  # fmt: skip

    out = S.score_runs(
        make_model, train_fn, x, y, seeds=[0, 1], epoch=2,
        scores=("el2n", "grand", "forgetting"), progress=False,
    )  # fmt: skip
    assert out["seeds"].tolist() == [0, 1]
    for name in ("el2n", "grand", "forgetting"):
        assert out[f"{name}_runs"].shape == (2, 16)
        torch.testing.assert_close(out[name], out[f"{name}_runs"].mean(0))
    # the run with seed 1 by hand
    model = make_model(1)
    train_fn(model, seed=1, epochs=2, callback=None)
    torch.testing.assert_close(out["el2n_runs"][1], S.el2n_scores(model, x, y))
    torch.testing.assert_close(out["grand_runs"][1], S.grand_scores(model, x, y))
    # at initialisation no training is needed
    init = S.score_runs(
        make_model, None, x, y, seeds=[0], epoch=0, scores=("grand",), progress=False
    )
    torch.testing.assert_close(init["grand"], S.grand_scores(make_model(0), x, y))
    with pytest.raises(ValueError, match="needs epoch >= 1"):
        S.score_runs(make_model, train_fn, x, y, seeds=[0], epoch=0, scores=("forgetting",))
    with pytest.raises(ValueError, match=r"scores must be a non-empty subset"):
        S.score_runs(make_model, train_fn, x, y, seeds=[0], epoch=1, scores=("loss",))
    with pytest.raises(ValueError, match=r"seeds\[1\] must be an int >= 0"):
        S.score_runs(make_model, train_fn, x, y, seeds=[0, -1], epoch=1)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        S.score_runs(make_model, train_fn, x, y, seeds=[0], epoch=-1)
    with pytest.raises(ValueError, match="train_fn is None"):
        S.score_runs(make_model, None, x, y, seeds=[0], epoch=1)


# ----------------------------------------------------------------------------- pruning


SCORES_10 = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
# descending order of indices: 1 (0.9), 5, 3, 7, 0, 8, 4, 6, 2, 9 (0.0)


def test_prune_modes():
    assert S.prune(SCORES_10, 0.3).tolist() == [1, 3, 5]
    assert S.prune(SCORES_10, 0.3, mode="easiest").tolist() == [2, 6, 9]
    assert S.prune(SCORES_10, 0.3, mode="window", offset=0.2).tolist() == [0, 3, 7]
    assert S.prune(SCORES_10, 0.3, mode="window").tolist() == [1, 3, 5]
    assert S.prune(SCORES_10, 0.5, mode="window", offset=0.5).tolist() == [2, 4, 6, 8, 9]
    assert S.prune(SCORES_10, 1.0).tolist() == list(range(10))
    assert S.prune(SCORES_10, 0.01).tolist() == [1]  # at least one example is kept
    assert S.prune(np.asarray(SCORES_10), 0.3).tolist() == [1, 3, 5]


def test_prune_random_and_ties():
    a = S.prune(SCORES_10, 0.4, mode="random", seed=0)
    assert len(a) == 4 and len(set(a.tolist())) == 4 and a.tolist() == sorted(a.tolist())
    assert torch.equal(a, S.prune(SCORES_10, 0.4, mode="random", seed=0))
    draws = {tuple(S.prune(SCORES_10, 0.4, mode="random", seed=s).tolist()) for s in range(10)}
    assert len(draws) > 5
    state = torch.random.get_rng_state()
    S.prune(SCORES_10, 0.4, mode="random", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert S.prune(ties, 0.4).tolist() == [1, 2]  # lower index counts as harder
    assert S.prune(ties, 0.4, mode="easiest").tolist() == [0, 4]
    scores = torch.tensor([1.0, math.inf, 0.0])  # never-learned examples may score inf
    assert S.prune(scores, 0.34).tolist() == [1]


def test_prune_hardest_and_easiest_rank_ties_alike():
    """On ties the lower index counts as harder in both modes, so keeping the k hardest and the
    n - k easiest splits the examples in two (forgetting counts tie at 0 for most examples)."""
    equal = torch.zeros(10)
    assert S.prune(equal, 0.5).tolist() == [0, 1, 2, 3, 4]
    assert S.prune(equal, 0.5, mode="easiest").tolist() == [5, 6, 7, 8, 9]
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert S.prune(ties, 0.2, mode="easiest").tolist() == [4]
    assert S.prune(ties, 0.6, mode="easiest").tolist() == [0, 3, 4]  # 3 is the easiest of the 2s
    assert S.prune(ties, 0.8, mode="easiest").tolist() == [0, 2, 3, 4]
    g = torch.Generator().manual_seed(0)
    for scores in (equal, ties, torch.randint(0, 3, (10,), generator=g).double()):
        n = len(scores)
        for k in range(1, n):
            hard = set(S.prune(scores, k / n).tolist())
            easy = set(S.prune(scores, (n - k) / n, mode="easiest").tolist())
            assert hard.isdisjoint(easy) and hard | easy == set(range(n))


def test_prune_bad_inputs():
    with pytest.raises(ValueError, match=r"keep_fraction must be a number in \(0, 1\]"):
        S.prune(SCORES_10, 0.0)
    with pytest.raises(ValueError, match=r"keep_fraction"):
        S.prune(SCORES_10, 1.5)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        S.prune(SCORES_10, 0.5, mode="middle")
    with pytest.raises(ValueError, match=r"offset must be a number in \[0, 1\)"):
        S.prune(SCORES_10, 0.5, mode="window", offset=1.0)
    with pytest.raises(ValueError, match=r"offset \+ keep_fraction must be <= 1"):
        S.prune(SCORES_10, 0.5, mode="window", offset=0.6)
    with pytest.raises(ValueError, match=r"offset is only used by mode='window'"):
        S.prune(SCORES_10, 0.5, offset=0.1)
    with pytest.raises(ValueError, match=r"seed must be an int >= 0"):
        S.prune(SCORES_10, 0.5, mode="random", seed=-1)
    with pytest.raises(ValueError, match="nan"):
        S.prune(torch.tensor([1.0, math.nan]), 0.5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        S.prune(torch.ones(2, 2), 0.5)


# ----------------------------------------------------------------------------- rank correlation


def test_rank_and_spearman_against_scipy():
    g = np.random.default_rng(0)
    for trial in range(5):
        a = g.integers(0, 6, size=40).astype(float)  # many ties
        b = a + g.normal(size=40) * trial
        np.testing.assert_allclose(S.rank(a).numpy(), rankdata(a), rtol=0, atol=1e-12)
        assert S.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
        assert S.spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(
            spearmanr(a, b).statistic, abs=1e-12
        )
    x = g.normal(size=30)
    assert S.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert S.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(S.spearman(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="same length"):
        S.spearman(np.arange(3.0), np.arange(4.0))


def test_spearman_matrix():
    g = np.random.default_rng(1)
    named = {"a": g.normal(size=20), "b": g.normal(size=20), "c": g.normal(size=20)}
    names, m = S.spearman_matrix(named)
    assert names == ["a", "b", "c"] and m.shape == (3, 3)
    torch.testing.assert_close(m, m.T)
    assert torch.all(m.diagonal() == 1)
    assert float(m[0, 2]) == pytest.approx(spearmanr(named["a"], named["c"]).statistic)


def test_label_checks():
    model = MLP(5, [6], K, seed=0, dtype=torch.float64)
    x, y = data()
    with pytest.raises(ValueError, match="y must be a 1-D tensor of integer class labels"):
        S.el2n_scores(model, x, y.double())
    with pytest.raises(ValueError, match="same number"):
        S.el2n_scores(model, x, y[:-1])
    with pytest.raises(ValueError, match=r"y must lie in \[0, 2\]"):
        S.el2n_scores(model, x, y + K)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        S.el2n_scores(model, x, y, batch_size=0)


def brute_force_balanced(scores, labels, fraction, mode):
    """Per class, by sorting a Python list: the highest (or lowest) scores of that class."""
    n, k = len(scores), max(1, round(fraction * len(scores)))
    classes = sorted(set(labels))
    members = {c: [i for i in range(n) if labels[i] == c] for c in classes}
    quota = {c: fraction * len(members[c]) for c in classes}
    counts = {c: math.floor(quota[c]) for c in classes}
    by_remainder = sorted(classes, key=lambda c: (-(quota[c] - counts[c]), classes.index(c)))
    for c in by_remainder[: k - sum(counts.values())]:
        counts[c] += 1
    kept = []
    for c in classes:
        ranked = sorted(members[c], key=lambda i: (-scores[i], i))  # hardest first, ties by index
        kept += ranked[: counts[c]] if mode == "hardest" else ranked[::-1][: counts[c]]
    return sorted(kept)


@pytest.mark.parametrize("mode", ["hardest", "easiest"])
@pytest.mark.parametrize("fraction", [0.1, 0.33, 0.5, 0.9])
def test_class_balanced_prune_matches_a_per_class_sort(mode, fraction):
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (53,), generator=gen)
    scores = torch.randint(0, 6, (53,), generator=gen).double()  # many ties
    kept = S.prune(scores, fraction, mode=mode, labels=labels)
    expected = brute_force_balanced(scores.tolist(), labels.tolist(), fraction, mode)
    assert kept.tolist() == expected
    assert len(kept) == max(1, round(fraction * 53))


def test_class_balanced_prune_prevents_class_collapse():
    # class 0 is all easy (low scores): global "hardest" at 50% keeps none of it
    labels = torch.tensor([0] * 10 + [1] * 10)
    scores = torch.cat([torch.linspace(0, 1, 10), torch.linspace(2, 3, 10)])
    collapsed = S.prune(scores, 0.5)
    assert torch.bincount(labels[collapsed], minlength=2).tolist() == [0, 10]
    kept = S.prune(scores, 0.5, labels=labels)
    assert torch.bincount(labels[kept], minlength=2).tolist() == [5, 5]
    assert kept.tolist() == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]  # the top half of each class
    rand = S.prune(scores, 0.5, mode="random", labels=labels, seed=3)
    assert torch.bincount(labels[rand], minlength=2).tolist() == [5, 5]
    assert rand.tolist() == S.prune(scores, 0.5, mode="random", labels=labels, seed=3).tolist()
    window = S.prune(scores, 0.3, mode="window", offset=0.2, labels=labels)
    assert window.tolist() == [5, 6, 7, 15, 16, 17]  # skip the top 2 of each class, keep 3


def test_balanced_window_fits_a_rounded_up_quota():
    """Classes of 7 and 9 at offset = fraction = 0.5: quotas 4 and 4 (3.5 rounded up first by
    class order, 4.5 down), skips round(3.5) = 4 and round(4.5) = 4; the class of 7 cannot skip 4
    and keep 4, so its skip gives way to 3 and it keeps its 4 lowest scores."""
    labels = torch.tensor([0] * 7 + [1] * 9)
    scores = torch.cat([torch.arange(7, 0, -1), torch.arange(9, 0, -1)]).double()  # descending
    kept = S.prune(scores, 0.5, mode="window", offset=0.5, labels=labels)
    assert kept.tolist() == [3, 4, 5, 6, 11, 12, 13, 14]  # class 0: skip 3; class 1: skip 4
    unbalanced = S.prune(scores, 0.5, mode="window", offset=0.5)
    assert len(unbalanced) == len(kept) == 8
    with pytest.raises(ValueError, match="labels must hold one integer class per score"):
        S.prune(scores, 0.5, labels=labels[:5])
    with pytest.raises(ValueError, match="labels"):
        S.prune(scores, 0.5, labels=labels.double())
