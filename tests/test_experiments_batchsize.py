"""gradcourse.experiments.batchsize: configuration checks, the checkpoint, and each experiment's
result against an independent recomputation on a small setting."""

import math

import numpy as np
import pytest
import torch

from gradcourse import batchsize as bs
from gradcourse.experiments import batchsize as bx

SMALL = dict(
    n_train=120,
    n_test=50,
    width=8,
    warmup_epochs=1,
    spectrum_sizes=(8, 32),
    draws=2,
    lr_sizes=(8, 120),
    lr_steps=3,
    deep_depth=4,
    deep_width=6,
    deep_n_train=200,
    deep_steps=250,
    deep_batch=20,
)


def test_config_refuses_unknown_keys_and_bad_values_by_name():
    with pytest.raises(ValueError, match="unknown configuration keys"):
        bx.config(draw=3)
    with pytest.raises(ValueError, match="spectrum_sizes"):
        bx.config(n_train=100, spectrum_sizes=(8, 100), lr_sizes=(8,))
    with pytest.raises(ValueError, match="lr_sizes"):
        bx.config(n_train=100, spectrum_sizes=(8,), lr_sizes=(8, 101))
    with pytest.raises(ValueError, match="deep_poor_std"):
        bx.config(deep_poor_std=0.0)
    with pytest.raises(ValueError, match="deep_extra_std"):
        bx.config(deep_extra_std=-0.1)
    with pytest.raises(ValueError, match="deep_noise_until"):
        bx.config(deep_steps=100, deep_noise_until=101)


def test_the_checkpoint_is_deterministic():
    a, b = bx.checkpoint(SMALL), bx.checkpoint(SMALL)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_spectrum_run_equals_the_library_call_at_the_checkpoint():
    cfg = bx.config(**SMALL)
    r = bx.spectrum_run(cfg, 3)
    ds = bx.load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    spec = bs.minibatch_spectrum(
        bx.checkpoint(cfg), "ce", ds.x_train, ds.y_train, (8, 32), draws=2, seed=3
    )
    assert np.allclose(r["deviation"], spec.deviation) and np.allclose(
        r["lambda_batch"], spec.lambda_batch
    )
    assert r["lambda_full"] == spec.lambda_full


def test_stable_lr_run_sits_at_the_criterions_threshold():
    cfg = bx.config(**SMALL)
    lr = bx.stable_lr_run(cfg, "sgd", 8, 0)["lr"]
    ds = bx.load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    stable = bs.loss_decreases(
        bx.checkpoint(cfg),
        "ce",
        ds.x_train,
        ds.y_train,
        optimizer="sgd",
        batch_size=8,
        steps=3,
        seed=0,
    )
    assert stable(lr)
    assert not stable(lr * (1e6) ** (2**-12) * 1.01)  # one bisection step above is unstable


def test_stable_lr_table_is_each_run_in_place_and_caches_them(tmp_path, monkeypatch):
    """Rows are batch sizes, columns seeds, each entry stable_lr_run's rate with the options
    passed on; a second call reads every entry from the cache."""
    from gradcourse.cache import Cache

    cfg = bx.config(**SMALL)
    cache = Cache(tmp_path)
    table = bx.stable_lr_table(cache, cfg, "adam", (8, 16), (0, 1), betas=(0.0, 0.999))
    assert table.shape == (2, 2)
    for i, b in enumerate((8, 16)):
        for j, s in enumerate((0, 1)):
            assert table[i, j] == bx.stable_lr_run(cfg, "adam", b, s, betas=(0.0, 0.999))["lr"]
    assert table[0, 0] != bx.stable_lr_run(cfg, "adam", 8, 0)["lr"]  # the option reached it
    calls = []
    original = bx.stable_lr_run
    monkeypatch.setattr(bx, "stable_lr_run", lambda *a, **k: calls.append(a) or original(*a, **k))
    again = bx.stable_lr_table(cache, cfg, "adam", (8, 16), (0, 1), betas=(0.0, 0.999))
    assert np.array_equal(again, table) and calls == []
    bx.stable_lr_table(cache, cfg, "adam", (8,), (2,), betas=(0.0, 0.999))
    assert len(calls) == 1  # a new seed is computed: the check above could fail
    plain = bx.stable_lr_table(cache, cfg, "adam", (8,), (0,))  # the options are in the key
    assert len(calls) == 2 and plain[0, 0] != table[0, 0]


def test_stable_lr_run_scaled_from_uses_the_sqrt_rules_adam():
    """scaled_from=B0 bisects with sqrt_scaled_adam(B, B0)'s betas and eps; at B = B0 that is
    Adam's defaults, so the rate is the unscaled one; SGD refuses it."""
    cfg = bx.config(**SMALL)
    plain = bx.stable_lr_run(cfg, "adam", 8, 0)["lr"]
    assert bx.stable_lr_run(cfg, "adam", 8, 0, scaled_from=8)["lr"] == plain
    scaled = bx.stable_lr_run(cfg, "adam", 16, 0, scaled_from=4)["lr"]  # kappa = 4
    ds = bx.load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    stable = bs.loss_decreases(
        bx.checkpoint(cfg), "ce", ds.x_train, ds.y_train, optimizer="adam", batch_size=16,
        steps=cfg["lr_steps"], seed=0, optimizer_kwargs=bs.sqrt_scaled_adam(16, 4),
    )  # fmt: skip
    assert stable(scaled) and not stable(scaled * (1e7) ** (2**-12) * 1.01)
    with pytest.raises(ValueError, match="scaled_from is for optimizer 'adam'"):
        bx.stable_lr_run(cfg, "sgd", 8, 0, scaled_from=8)


def test_stable_lr_run_betas_runs_adam_with_them():
    cfg = bx.config(**SMALL)
    lr = bx.stable_lr_run(cfg, "adam", 8, 0, betas=(0.0, 0.999))["lr"]
    ds = bx.load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    stable = bs.loss_decreases(
        bx.checkpoint(cfg), "ce", ds.x_train, ds.y_train, optimizer="adam", batch_size=8,
        steps=cfg["lr_steps"], seed=0, optimizer_kwargs={"betas": (0.0, 0.999)},
    )  # fmt: skip
    assert stable(lr) and not stable(lr * (1e7) ** (2**-12) * 1.01)
    with pytest.raises(ValueError, match="betas is for optimizer 'adam'"):
        bx.stable_lr_run(cfg, "sgd", 8, 0, betas=(0.0, 0.999))
    with pytest.raises(ValueError, match="not both"):
        bx.stable_lr_run(cfg, "adam", 8, 0, scaled_from=8, betas=(0.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        bx.stable_lr_run(cfg, "adam", 8, 0, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="betas must be a pair"):
        bx.stable_lr_run(cfg, "adam", 8, 0, betas=(0.9,))


def test_stable_lr_run_frozen_adam_is_sgd_with_adams_expected_preconditioner():
    cfg = bx.config(**SMALL)
    lr = bx.stable_lr_run(cfg, "sgd", 8, 0, frozen_adam=True)["lr"]
    ds = bx.load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    model = bx.checkpoint(cfg)
    mean, var = bs.gradient_moments(model, "ce", ds.x_train, ds.y_train)
    kept = bx.checkpoint_moments(cfg)
    assert torch.equal(kept[0], mean) and torch.equal(kept[1], var)
    assert bx.checkpoint_moments(cfg)[0] is kept[0]  # computed once per checkpoint
    stable = bs.loss_decreases(
        model, "ce", ds.x_train, ds.y_train, optimizer="sgd", batch_size=8,
        steps=cfg["lr_steps"], seed=0,
        preconditioner=bs.adam_preconditioner(mean, var, 8, cfg["n_train"]),
    )  # fmt: skip
    assert stable(lr) and not stable(lr * (1e7) ** (2**-12) * 1.01)  # Adam's bracket
    with pytest.raises(ValueError, match="frozen_adam preconditions optimizer 'sgd'"):
        bx.stable_lr_run(cfg, "adam", 8, 0, frozen_adam=True)


def test_one_step_run_equals_the_library_call_over_the_three_smallest_sizes():
    cfg = bx.config(**{**SMALL, "lr_sizes": (8, 16, 32, 120)})
    r = bx.one_step_run(cfg, "adam", 30, 2)
    ds = bx.load(cfg["n_train"], cfg["n_test"], cfg["data_seed"])
    lib = bs.one_step_rate(
        bx.checkpoint(cfg), "ce", ds.x_train, ds.y_train, (8, 16, 32),
        preconditioner="adam", examples=30, seed=2,
    )  # fmt: skip
    assert list(r["batch_sizes"]) == [8, 16, 32] and r["examples"] == 30
    assert np.allclose(r["rate"], lib.rate, rtol=1e-6)
    assert np.allclose(r["noise_share"], lib.noise_share, rtol=1e-6)
    # more examples than the training set: all of them
    assert bx.one_step_run(cfg, "sgd", 10_000)["examples"] == cfg["n_train"]


def test_deep_model_initialisations():
    cfg = bx.config(**SMALL)
    poor, good = bx.deep_model(cfg, "poor", 1), bx.deep_model(cfg, "good", 1)
    w_poor = poor.layers[1].weight
    assert abs(float(w_poor.detach().std()) - 0.12) < 0.04
    assert float(poor.layers[1].bias.detach().abs().max()) == 0
    assert abs(float(good.layers[1].weight.detach().std()) - math.sqrt(2 / 6)) < 0.2
    with pytest.raises(ValueError, match="init must be"):
        bx.deep_model(cfg, "bad", 1)


@pytest.mark.parametrize("init", ["poor", "good"])
def test_deep_extra_std_enlarges_every_weight_from_the_same_draws(init):
    """Each weight becomes w * sqrt(std^2 + s^2) / std for the layer's own std (the same draws);
    for the poor initialisation that is the same network as a larger deep_poor_std."""
    cfg = bx.config(**SMALL)
    s = 0.1
    plain = bx.deep_model(cfg, init, 4)
    wider = bx.deep_model({**cfg, "deep_extra_std": s}, init, 4)
    for a, b in zip(plain.layers, wider.layers, strict=True):
        std = 0.12 if init == "poor" else math.sqrt(2 / a.in_features)
        assert torch.allclose(b.weight, a.weight * math.sqrt(std**2 + s**2) / std, rtol=1e-6)
        assert float(b.bias.detach().abs().max()) == 0
    if init == "poor":
        same = bx.deep_model({**cfg, "deep_poor_std": math.sqrt(0.12**2 + s**2)}, init, 4)
        assert all(
            torch.equal(p, q) for p, q in zip(wider.parameters(), same.parameters(), strict=True)
        )


def test_deep_run_is_reproducible_and_noise_changes_it():
    cfg = bx.config(**SMALL)
    a, b = bx.deep_run(cfg, "good", 0.0, 2), bx.deep_run(cfg, "good", 0.0, 2)
    assert a["test_acc"] == b["test_acc"] and np.array_equal(a["losses"], b["losses"])
    c = bx.deep_run(cfg, "good", 0.5, 2)
    assert not np.array_equal(a["losses"][1:], c["losses"][1:])
    assert a["losses"][0] == c["losses"][0]  # the first loss is before any (noisy) step
    assert not a["diverged"]
    assert bx.deep_run(cfg, "good", 1e12, 2)["diverged"]  # absurd noise: a non-finite loss


def test_deep_noise_until_stops_the_noise_in_the_same_run():
    """The noise stopped at step 0 is no noise; at the last step, the noisy run itself; at
    step 150 of 250, the noisy run's losses up to step 100, then another run."""
    cfg = bx.config(**SMALL)
    none, noisy = bx.deep_run(cfg, "good", 0.0, 2), bx.deep_run(cfg, "good", 0.5, 2)

    def until(k):
        return bx.deep_run({**cfg, "deep_noise_until": k}, "good", 0.5, 2)

    assert np.array_equal(until(0)["losses"], none["losses"])
    assert np.array_equal(until(cfg["deep_steps"])["losses"], noisy["losses"])
    mid = until(150)["losses"]  # losses are kept every 100 steps: steps 0, 100, 200
    assert np.array_equal(mid[:2], noisy["losses"][:2]) and mid[2] != noisy["losses"][2]


def test_deep_run_order_changes_only_the_batches():
    """order=0 is the default run; another order draws other batches for the same network and
    noise, so its losses differ; a negative order is refused."""
    cfg = bx.config(**SMALL)
    a, b = bx.deep_run(cfg, "poor", 0.0, 3), bx.deep_run(cfg, "poor", 0.0, 3, order=0)
    assert np.array_equal(a["losses"], b["losses"])
    c = bx.deep_run(cfg, "poor", 0.0, 3, order=1)
    assert not np.array_equal(a["losses"], c["losses"])
    with pytest.raises(ValueError, match="order"):
        bx.deep_run(cfg, "poor", 0.0, 3, order=-1)
