"""gradcourse.experiments.coherence: configuration checks, the labels, a short run's records
against independent recomputation, and the analysis helpers on hand-made inputs."""

import math

import numpy as np
import pytest
import torch

from gradcourse import coherence as co
from gradcourse.experiments import coherence as E

SMALL = dict(
    n_train=200,
    n_test=100,
    width=16,
    depth=1,
    epochs=2,
    batch_size=50,
    measure=40,
    record_every=2,
    align_step=3,
)


def test_config_refuses_unknown_keys_and_bad_values_by_name():
    with pytest.raises(ValueError, match="unknown configuration keys \\['widht'\\]"):
        E.config(widht=3)
    with pytest.raises(ValueError, match="labels must be one of"):
        E.config(labels="shuffled")
    with pytest.raises(ValueError, match="aggregator must be one of"):
        E.config(aggregator="trimmed")
    with pytest.raises(ValueError, match="c must be an int in \\[0, 49\\]"):
        E.config(c=50)
    with pytest.raises(ValueError, match="noise must be"):
        E.config(noise=1.5)
    with pytest.raises(ValueError, match="measure must be"):
        E.config(n_train=100, measure=101)


def test_labels_real_random_and_noisy():
    real = E.load(E.config(**SMALL))
    assert torch.equal(real["y"], real["y_true"]) and not real["corrupted"].any()
    noisy = E.load(E.config(**SMALL, labels="noisy", noise=0.3))
    assert int(noisy["corrupted"].sum()) == 60  # exactly 30% of 200, each to another class
    assert torch.equal(noisy["corrupted"], noisy["y"] != noisy["y_true"])
    rnd = E.load(E.config(**SMALL, labels="random"))
    agree = float((rnd["y"] == rnd["y_true"]).float().mean())
    assert 0.03 < agree < 0.2  # uniform labels agree about a tenth of the time
    again = E.load(E.config(**{**SMALL, "n_test": 101}, labels="random"))
    assert torch.equal(again["y"], rnd["y"])  # fixed by data_seed, not by the training seed


def test_a_run_records_what_it_says_and_is_reproducible():
    cfg = E.config(**SMALL, labels="noisy", noise=0.5)
    r = E.train_run(cfg, 3)
    steps = 2 * 4
    assert r["steps"] == steps
    assert r["step"].tolist() == [0, 2, 4, 6, 8]
    for key in (
        "coherence_all",
        "coherence_clean",
        "coherence_corrupted",
        "floor_all",
        "clean_acc",
        "memorised",
        "test_acc",
        "train_loss",
        "shrink",
    ):
        assert r[key].shape == (5,), key
    assert r["correct"].shape == (3, 200) and r["alignment"].shape == (2, 200)
    assert np.all(r["shrink"] == 1.0)
    # the last record against a recomputation from a model trained the same way
    d = E.load(cfg)
    model = E.make_model(cfg, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        perm = torch.randperm(200, generator=gen)
        for i in range(0, 200, 50):
            idx = perm[i : i + 50]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(d["x"][idx]), d["y"][idx]).backward()
            opt.step()
    idx = torch.arange(40)
    want = co.coherence(model, "ce", d["x"][idx], d["y"][idx], method="vmap").ratio
    assert math.isclose(r["coherence_all"][-1], want, rel_tol=1e-4)
    ok = model(d["x"]).argmax(1) == d["y"]
    assert math.isclose(r["memorised"][-1], float(ok[d["corrupted"]].float().mean()))
    assert math.isclose(r["clean_acc"][-1], float(ok[~d["corrupted"]].float().mean()))
    assert np.array_equal(r["correct"][-1], ok.numpy().astype(np.uint8))
    again = E.train_run(cfg, 3)
    assert np.array_equal(again["coherence_all"], r["coherence_all"])


def test_a_robust_run_records_its_step_shrink():
    r = E.train_run(E.config(**SMALL, labels="noisy", aggregator="median_of_means", k=5), 0)
    assert np.all(r["shrink"][1:] > 0) and not np.all(r["shrink"][1:] == 1.0)
    assert r["shrink"][0] == 1.0


def test_learning_epochs():
    correct = np.array(
        [
            [1, 0, 1, 0, 1],
            [1, 1, 0, 0, 1],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
        ]
    )
    # always right: 0; right from row 1: 1; wrong at row 1 then right: 2; right at the end only:
    # 3; wrong at the end: not learned (rows = 4)
    assert E.learning_epochs(correct).tolist() == [0, 1, 2, 3, 4]


def test_early_late_gap_and_its_random_split_control():
    align = np.array([0.9, 0.8, 0.7, 0.1, 0.0, -0.1, 0.5, 0.4])
    learned = np.array([0, 0, 1, 5, 6, 9, 2, 3])
    # the first quarter (2 examples): 0.9, 0.8; the last: 0.0, -0.1
    assert math.isclose(E.early_late_gap(align, learned), 0.85 - (-0.05))
    assert math.isclose(
        E.early_late_gap(align, learned, fraction=0.5),
        (0.9 + 0.8 + 0.7 + 0.5) / 4 - (0.4 + 0.1 + 0.0 - 0.1) / 4,
    )
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert math.isclose(E.early_late_gap(align, learned, fraction=0.5, mask=mask), 0.85 - 0.4)
    with pytest.raises(ValueError, match="fraction"):
        E.early_late_gap(align, learned, fraction=0.6)


def test_at_clean_accuracy_takes_the_first_record_reaching_the_level():
    run = dict(
        step=np.array([0, 10, 20, 30]),
        clean_acc=np.array([0.1, 0.8, 0.7, 0.9]),
        memorised=np.array([0.0, 0.1, 0.2, 0.3]),
        test_acc=np.array([0.1, 0.7, 0.6, 0.8]),
    )
    assert E.at_clean_accuracy(run, 0.75) == {"step": 10.0, "memorised": 0.1, "test_acc": 0.7}
    assert math.isnan(E.at_clean_accuracy(run, 0.95)["step"])


def test_early_late_gap_by_class_compares_within_each_class_and_its_shuffle_is_near_zero():
    # class 0: alignment follows learning order; class 1: the reverse; a pooled gap would mix
    align = np.array([0.9, 0.8, 0.1, 0.0, 0.0, 0.1, 0.8, 0.9])
    learned = np.array([0, 1, 5, 6, 0, 1, 5, 6])
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # class 0: first quarter (1 example) 0.9, last 0.0 -> 0.9; class 1: 0.0 - 0.9 -> -0.9
    assert math.isclose(E.early_late_gap_by_class(align, learned, classes), 0.0, abs_tol=1e-12)
    rng = np.random.default_rng(0)
    a = rng.normal(size=4000)
    e = np.argsort(np.argsort(-a))  # learned in order of alignment: a large gap
    c = rng.integers(0, 4, 4000)
    assert E.early_late_gap_by_class(a, e, c) > 2
    assert abs(E.early_late_gap_by_class(a, e, c, shuffle=True, seed=1)) < 0.15
