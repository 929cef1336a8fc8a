"""The functional core, against independent references: a flat layout read off the module by
hand, outputs of ``model(x)`` itself, losses written out from their formulas (softmax
cross-entropy, 1/2 squared error with one-hot targets), and tensors placed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcourse.functional import (
    FunctionalModel,
    flatten,
    frozen_tensors,
    place,
    place_batch,
    select_params,
    unflatten,
)

F64 = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def test_flatten_follows_the_dict_order_and_unflatten_inverts_it():
    a, b = torch.arange(6.0).reshape(2, 3), torch.tensor([10.0, 11.0])
    flat = flatten({"a": a, "b": b})
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 11.0]
    assert flatten({"b": b, "a": a}).tolist()[:2] == [10.0, 11.0]
    back = unflatten(flat, {"a": a, "b": b})
    assert list(back) == ["a", "b"] and back["a"].shape == (2, 3)
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b)
    back["b"][0] = -1.0  # views of the vector
    assert flat[6] == -1.0
    assert flatten([a, b]).shape == (8,)  # a sequence as well as a dict
    with pytest.raises(RuntimeError, match="split_sizes to sum exactly to 7"):
        unflatten(torch.zeros(7), {"a": a, "b": b})


def test_flatten_keeps_leading_batch_dimensions():
    n, o = 5, 3
    jac = {"w": torch.randn(n, o, 4, 2), "b": torch.randn(n, o, 4), "s": torch.randn(n, o)}
    flat = flatten(jac, batch_dims=2)
    assert flat.shape == (n, o, 8 + 4 + 1)
    for i in range(n):
        for k in range(o):
            ref = torch.cat([jac["w"][i, k].reshape(-1), jac["b"][i, k], jac["s"][i, k, None]])
            assert torch.equal(flat[i, k], ref)
    grads = {"w": torch.randn(n, 4, 2), "b": torch.randn(n, 4)}
    assert torch.equal(
        flatten(grads, batch_dims=1)[2], flatten({k: g[2] for k, g in grads.items()})
    )


def test_layout_is_named_parameters_order_and_round_trips():
    model = _mlp()
    fm = FunctionalModel(model)
    assert list(fm.params) == [n for n, _ in model.named_parameters()]
    by_hand = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert fm.size == by_hand.numel() == 3 * 4 + 4 + 4 * 2 + 2
    assert torch.equal(fm.flatten(fm.params), by_hand)
    v = torch.randn(fm.size, dtype=F64)
    assert torch.equal(fm.flatten(fm.unflatten(v)), v)
    reordered = dict(reversed(list(fm.params.items())))
    assert torch.equal(fm.flatten(reordered), by_hand)  # read in the layout's order


def test_outputs_equal_the_module_and_follow_the_params():
    model = _mlp()
    x = torch.randn(7, 3, dtype=F64)
    fm = FunctionalModel(model)
    torch.testing.assert_close(fm.outputs(fm.params, x), model(x), rtol=0, atol=0)
    other = {n: p + 0.1 for n, p in fm.params.items()}
    h = torch.tanh(x @ other["0.weight"].T + other["0.bias"])
    torch.testing.assert_close(fm.outputs(other, x), h @ other["2.weight"].T + other["2.bias"])


def test_copy_detaches_and_clones_and_no_copy_shares_storage():
    model = _mlp()
    model[0].weight.requires_grad_(True)
    copied = FunctionalModel(model).params["0.weight"]
    shared = FunctionalModel(model, copy=False).params["0.weight"]
    assert not copied.requires_grad and not shared.requires_grad
    assert copied.data_ptr() != model[0].weight.data_ptr()
    assert shared.data_ptr() == model[0].weight.data_ptr()


def test_chosen_params_and_frozen_tensors():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    fm = FunctionalModel(model)
    assert list(fm.params) == ["0.weight", "2.weight", "2.bias"]
    assert list(fm.frozen) == ["0.bias"]
    last = {n: p for n, p in model.named_parameters() if n.startswith("2.")}
    fm = FunctionalModel(model, params=last)
    assert list(fm.params) == ["2.weight", "2.bias"] and list(fm.frozen) == ["0.weight", "0.bias"]
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(fm.outputs(fm.params, x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not parameters"):
        FunctionalModel(model, params={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="params0 has names that are not parameters"):
        FunctionalModel(model, params={"nope": torch.zeros(1)}, name="params0")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        FunctionalModel(model)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one floating dtype"):
        FunctionalModel(mixed)
    assert (
        select_params(_mlp(), None, None, copy=False).keys() == fm.params.keys() | fm.frozen.keys()
    )


def test_frozen_buffers_are_used_in_eval_mode():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(F64)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, dtype=F64) * 2 + 1)  # running statistics away from (0, 1)
    model.eval()
    fm = FunctionalModel(model)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(fm.frozen)
    assert "1.weight" in fm.params
    x = torch.randn(5, 3, dtype=F64)
    bn = model[1]
    z = model[0](x)
    by_hand = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(fm.outputs(fm.params, x), model[2](by_hand))
    torch.testing.assert_close(fm.outputs(fm.params, x[:1]), model(x)[:1])  # per example
    assert frozen_tensors(model, fm.params, None).keys() == fm.frozen.keys()


def test_tied_parameters_stay_tied():
    torch.manual_seed(2)
    enc, dec = nn.Linear(3, 3, bias=False).double(), nn.Linear(3, 3, bias=False).double()
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.Tanh(), dec)
    fm = FunctionalModel(model)
    assert list(fm.params) == ["0.weight"] and fm.size == 9  # registered once
    w = torch.randn(3, 3, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    ref = torch.tanh(x @ w.T) @ w.T  # both uses take the new value
    torch.testing.assert_close(fm.outputs({"0.weight": w}, x), ref)
    g = torch.func.grad(lambda p: fm.outputs(p, x).sum())({"0.weight": w})["0.weight"]
    ref_g = torch.autograd.functional.jacobian(lambda v: (torch.tanh(x @ v.T) @ v.T).sum(), w)
    torch.testing.assert_close(g, ref_g)  # the gradient sums over both uses


def test_loss_equals_the_formula_by_hand():
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1, 0])
    out = model(x).detach()
    ce = FunctionalModel(model, "ce")
    log_p = out - out.exp().sum(1, keepdim=True).log()
    torch.testing.assert_close(ce.loss(ce.params, x, y), -log_p[torch.arange(6), y].mean())
    mse = FunctionalModel(model, "mse")
    onehot = torch.zeros(6, 2, dtype=F64)
    onehot[torch.arange(6), y] = 1.0
    by_hand = 0.5 * ((out - onehot) ** 2).sum(1).mean()
    torch.testing.assert_close(mse.loss(mse.params, x, y), by_hand)
    targets = mse.targets(x, y)  # one-hot, made once outside vmap
    assert targets.dtype == F64 and torch.equal(targets, onehot)
    torch.testing.assert_close(mse.loss(mse.params, x, targets), by_hand)
    assert ce.targets(x, y) is y
    custom = FunctionalModel(model, lambda o, t: (o - t).abs().mean())
    t = torch.randn(6, 2, dtype=F64)
    torch.testing.assert_close(custom.loss(custom.params, x, t), (out - t).abs().mean())
    with pytest.raises(ValueError, match="loss must be one of"):
        FunctionalModel(model, "hinge")
    with pytest.raises(ValueError, match="without a loss"):
        FunctionalModel(model).loss(ce.params, x, y)
    assert math.isfinite(float(F.cross_entropy(out, y)))


def test_place_casts_floats_and_only_moves_integers():
    x = torch.randn(3, 2, dtype=torch.float32)
    labels = torch.tensor([0, 2, 1])
    assert place(x, "cpu", F64).dtype == F64
    assert place(labels, "cpu", F64).dtype == torch.int64
    assert place(torch.tensor([True]), "cpu", F64).dtype == torch.bool
    xb, yb = place_batch(x, labels, "meta", torch.float16)  # meta stands in for another device
    assert xb.device.type == yb.device.type == "meta"
    assert xb.dtype == torch.float16 and yb.dtype == torch.int64
    fm = FunctionalModel(_mlp())
    xf, yf = fm.place_batch(x, torch.randn(3, 2))
    assert xf.dtype == yf.dtype == F64
    torch.testing.assert_close(xf, x.double())


def test_from_split_takes_the_dicts_as_they_are():
    model = _mlp()
    fm = FunctionalModel(model, "mse")
    again = FunctionalModel.from_split(model, fm.params, fm.frozen, "mse")
    assert again.params is fm.params and again.frozen is fm.frozen
    assert (again.size, again.dtype, again.device) == (fm.size, fm.dtype, fm.device)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    torch.testing.assert_close(again.loss(again.params, x, y), fm.loss(fm.params, x, y))
    assert "FunctionalModel(Sequential, P=26" in repr(fm)
