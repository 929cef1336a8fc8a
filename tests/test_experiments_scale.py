"""Fast tests of notebook 08's experiment functions (gradcourse.experiments.scale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcourse import optim as go
from gradcourse.cache import Cache
from gradcourse.experiments import scale as sx

TINY = dict(n_train=200, n_test=100, width=16, epochs=2, batch_size=50, record_every=2)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(colour="red"), "unknown configuration keys"),
        (dict(optimizer="lion"), "optimizer must be one of"),
        (dict(lr=0.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(schedule="step"), "schedule must be"),
        (dict(n_train=100_000), "n_train must be an int"),
    ],
)
def test_config_refuses_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        sx.config(**overrides)


def test_config_fills_the_rate_by_family():
    assert sx.config(optimizer="sgdp")["lr"] == 0.1
    assert sx.config(optimizer="diffgrad")["lr"] == 1e-3
    assert sx.config(optimizer="adam", lr=3e-3)["lr"] == 3e-3


def test_hidden_weights_are_exactly_scale_invariant_in_training_mode():
    model = sx.make_model(sx.config(**TINY, depth=3, bn_eps=1e-12), seed=0).double()
    names = sx.hidden_weights(model)
    assert names == ["0.weight", "3.weight", "6.weight"]
    x = torch.randn(40, 784, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = model(x)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:  # rescale every row by its own factor: BatchNorm undoes it
            w = params[n]
            w.mul_(torch.linspace(0.5, 3.0, w.shape[0], dtype=torch.float64)[:, None])
    torch.testing.assert_close(model(x), out, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        params["9.weight"].mul_(2.0)  # the last layer is not scale-invariant
    assert not torch.allclose(model(x), out, rtol=1e-3)


def test_make_model_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = sx.make_model(sx.config(**TINY), seed=4)
    assert torch.equal(torch.rand(1), expected)
    b = sx.make_model(sx.config(**TINY), seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sgd", torch.optim.SGD),
        ("sgdp", go.SGDP),
        ("adam", torch.optim.Adam),
        ("adam_half", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("adamp", go.AdamP),
        ("diffgrad", go.DiffGrad),
        ("diffgrad_aliased", go.DiffGrad),
    ],
)
def test_make_optimizer_builds_each_named_optimiser(name, kind):
    model = sx.make_model(sx.config(**TINY), seed=0)
    opt = sx.make_optimizer(sx.config(**TINY, optimizer=name), model.parameters())
    assert isinstance(opt, kind)
    lr = opt.param_groups[0]["lr"]
    assert lr == (sx.config(optimizer=name)["lr"] / (2 if name == "adam_half" else 1))
    if name.startswith("diffgrad"):
        assert opt.param_groups[0]["aliased"] == (name == "diffgrad_aliased")


def test_train_run_records_norms_effective_steps_and_angles(tmp_path):
    cfg = sx.config(**TINY, optimizer="sgd")
    rec = sx.cached_run(cfg, 0, cache=Cache(tmp_path))
    n_records = 1 + (2 * 4) // 2  # the start, then every 2 of 8 steps
    assert rec["names"] == ["0.weight", "3.weight"] and rec["other_names"] == ["6.weight"]
    assert rec["other_norms"].shape == (5, 1)
    assert rec["norms"].shape == rec["effective_steps"].shape == (n_records, 2)
    assert list(rec["steps"]) == [0, 2, 4, 6, 8]
    assert np.all(rec["angles"][0] == 0) and np.all(rec["angles"][1:] > 0)
    assert rec["xi_quantiles"].shape == (0, 5) and 0 <= rec["accuracy"] <= 1
    # the effective step is the scheduled rate over the squared norm (cosine: below lr later)
    assert rec["effective_steps"][0] == pytest.approx(0.1 / rec["norms"][0] ** 2)
    assert np.all(rec["effective_steps"][-1] < 0.1 / rec["norms"][-1] ** 2)
    again = sx.cached_run(cfg, 0, cache=Cache(tmp_path))
    assert again["seconds"] == rec["seconds"]


def test_sgd_momentum_grows_the_hidden_norms_more_than_sgdp():
    grow = {}
    for name in ("sgd", "sgdp"):
        rec = sx.train_run(
            sx.config(**{**TINY, "epochs": 4}, optimizer=name, schedule="constant"), 1
        )
        grow[name] = rec["norms"][-1] ** 2 - rec["norms"][0] ** 2
    assert np.all(grow["sgd"] > 3 * grow["sgdp"]) and np.all(grow["sgdp"] >= -1e-6)


def test_diffgrad_records_xi_and_the_aliased_version_has_xi_one_half():
    fixed = sx.train_run(sx.config(**TINY, optimizer="diffgrad"), 2)
    aliased = sx.train_run(sx.config(**TINY, optimizer="diffgrad_aliased"), 2)
    assert fixed["xi_quantiles"].shape == (4, 5)
    assert np.all(fixed["xi_quantiles"] >= 0) and np.all(fixed["xi_quantiles"][:, 4] > 0)
    assert np.all(aliased["xi_quantiles"] == 0)


def test_norm_identity_run_meets_the_identity_to_rounding():
    rec = sx.norm_identity_run(sx.config(**TINY), 0, steps=20, beta=0.9, lr=0.2)
    assert rec["norms_sq"].shape == (21, 2) and rec["buffers_sq"].shape == (20, 2)
    for j in range(2):
        want = go.momentum_norm_prediction(rec["norms_sq"][0, j], rec["buffers_sq"][:, j], 0.2, 0.9)
        np.testing.assert_allclose(want.numpy(), rec["norms_sq"][:, j], rtol=1e-10)
    assert np.all(np.diff(rec["norms_sq"], axis=0) > 0)  # every step adds to the norm
