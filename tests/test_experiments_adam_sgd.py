"""gradcourse.experiments.adam_sgd: the trajectories and training runs of notebook 09."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradcourse.directional import DIRECTIONS, directional_sharpnesses, line_search
from gradcourse.experiments import adam_sgd as ax

TINY = dict(
    corpus_bytes=20_000, context=8, width=8, depth=1, heads=2, batch_size=4, steps=6, every=3
)


def test_config_checks_and_refuses_unknown_keys():
    assert ax.config(**TINY)["steps"] == 6
    with pytest.raises(ValueError, match="unknown"):
        ax.config(widht=3)
    with pytest.raises(ValueError, match="multiple of heads"):
        ax.config(width=10, heads=4)
    with pytest.raises(ValueError, match="every"):
        ax.config(steps=5, every=6)
    with pytest.raises(ValueError, match="optimizer"):
        ax.config(optimizer="lion")
    with pytest.raises(ValueError, match="task"):
        ax.config(task="cnn")


def test_batches_depend_on_the_seed_only():
    cfg = ax.config(**TINY)
    a, b = ax.batches(cfg, 1), ax.batches(ax.config(**TINY, optimizer="adam"), 1)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(next(ax.batches(cfg, 2))[0], next(ax.batches(cfg, 1))[0])


@pytest.mark.parametrize("task", ax.TASKS)
def test_trajectory_record_and_its_last_measurement_recomputed(task):
    cfg = ax.config(**TINY, task=task, n_train=200, mlp_width=8)
    r = ax.trajectory_run(cfg, 1)
    assert list(r["step"]) == [3, 6]
    assert r["S"].shape == r["decrease"].shape == (2, len(DIRECTIONS))
    assert np.isfinite(r["S"]).all() and (r["decrease"] >= 0).all()
    assert len(r["train_loss"]) == 6 and math.isfinite(r["val_loss"])
    assert r["hist"].sum() + r["zeros"] == r["params"]  # every coordinate binned or a zero
    assert r["top1_counts"].sum() == max(1, r["params"] // 100)
    assert len(r["tensor_names"]) == len(r["top1_counts"])
    assert ((0 < r["top1_share"]) & (r["top1_share"] <= 1)).all()
    # replay: same seed, same initialisation and batches; the driver's step 6 measured again
    model = ax.make_model(cfg, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["driver_lr"])
    from gradcourse.directional import PseudoUpdates

    pseudo = PseudoUpdates(seed=1)
    stream = ax.batches(cfg, 1)
    loss = ax.loss_of(cfg)
    from gradcourse.losses import get_loss

    for step in range(1, 7):
        x, y = next(stream)
        opt.zero_grad()
        get_loss(loss)(model(x), y).backward()
        pseudo.update([p.grad for p in model.parameters()])
        if step == 6:
            d = pseudo.directions()
            s = directional_sharpnesses(model, loss, x, y, d)
            np.testing.assert_allclose(r["S"][-1], [s[n] for n in DIRECTIONS], rtol=1e-4)
            dec = line_search(model, loss, x, y, d["sgd"]).decrease
            assert r["decrease"][-1][DIRECTIONS.index("sgd")] == pytest.approx(
                dec, rel=1e-4, abs=1e-7
            )
        opt.step()


def test_train_runs_are_deterministic_and_flag_divergence():
    cfg = ax.config(**TINY, optimizer="sgd_clip", lr=0.1)
    a, b = ax.train_run(cfg, 3), ax.train_run(cfg, 3)
    np.testing.assert_array_equal(a["train_loss"], b["train_loss"])
    assert not a["diverged"] and math.isfinite(a["val_loss"])
    bad = ax.train_run(ax.config(**TINY, optimizer="sgd", lr=1e6), 3)
    assert bad["diverged"] and bad["val_loss"] == math.inf


def test_tuned_lr_picks_the_lowest_validation_loss():
    runs = {0.1: dict(val_loss=2.0), 0.3: dict(val_loss=1.5), 1.0: dict(val_loss=math.inf)}
    assert ax.tuned_lr(runs) == 0.3
    with pytest.raises(ValueError, match="diverged"):
        ax.tuned_lr({1.0: dict(val_loss=math.inf)})


def test_kept_states_rebuild_the_checkpoint():
    cfg = ax.config(**TINY, keep_states=True)
    r = ax.trajectory_run(cfg, 2)
    assert r["states"]["params"].shape == (2, r["params"])
    model, x, y, dirs = ax.model_at(cfg, r, 1)
    s = directional_sharpnesses(model, ax.loss_of(cfg), x, y, dirs)
    for name in ("sgd", "momentum", "adam"):
        assert s[name] == pytest.approx(r["S"][1][DIRECTIONS.index(name)], rel=1e-4)
    with pytest.raises(ValueError, match="keep_states"):
        ax.model_at(ax.config(**TINY), ax.trajectory_run(ax.config(**TINY), 2), 0)
    with pytest.raises(ValueError, match="index"):
        ax.model_at(cfg, r, 2)
