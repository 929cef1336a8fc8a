"""The layer-rule registry: a rule registered for a new layer type drives both the linear trick
of per-example gradient norms and the layerwise NTK, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcourse import layers as L
from gradcourse import ntk
from gradcourse import pergrad as PG
from gradcourse.models import NTKLinear
from gradcourse.ntk.empirical import _find_dense


class Scaled(nn.Linear):
    """z = s (W a + b): a Linear subclass whose forward the plain Linear rule would get wrong."""

    def __init__(self, n_in: int, n_out: int, s: float) -> None:
        super().__init__(n_in, n_out, dtype=torch.float64)
        self.s = s

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.s * super().forward(a)


@pytest.fixture
def scaled_rule():
    """Register a rule for Scaled for one test, then remove it."""

    @L.register(Scaled)
    class ScaledRule(L.LinearRule):
        def scales(self, m):
            return m.s, m.s

    yield ScaledRule
    del L._RULES[Scaled]


def toy(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(Scaled(5, 7, 2.5), nn.Tanh(), Scaled(7, 3, 0.3))


def loop_sq_norms(model, x, y):
    """||g_i||^2 by a per-sample loop of autograd on the cross-entropy of each example."""
    out = []
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        out.append(sum(p.grad.pow(2).sum() for p in model.parameters()))
    return torch.stack(out)


def test_registered_toy_layer_gives_exact_per_example_norms(scaled_rule):
    model = toy()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.arange(6) % 3
    assert isinstance(L.rule_for(model[0]), scaled_rule)
    assert PG.supports_linear_trick(model)
    got = PG.per_example_grad_norms(model, "ce", x, y, method="linear_trick", squared=True)
    torch.testing.assert_close(got, loop_sq_norms(model, x, y), rtol=1e-12, atol=0)


def test_registered_toy_layer_in_layerwise_ntk(scaled_rule):
    model = toy()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fn = ntk.empirical_ntk_fn(model, method="layerwise")
    got = fn(x)
    torch.testing.assert_close(got, ntk.empirical_ntk(model, x, method="jacobian"))
    dense, _ = _find_dense(fn._functional(None), x[:1])  # both layers by their rule
    assert sorted(dense) == ["0", "2"] and dense["0"].w_scale == 2.5


def test_rules_are_looked_up_by_exact_type():
    """Without a rule of its own the subclass is refused: the Linear rule would miss the scale."""
    model = toy()
    assert L.rule_for(model[0]) is None and not PG.supports_linear_trick(model)
    assert isinstance(L.rule_for(nn.Linear(2, 3)), L.LinearRule)
    assert isinstance(L.rule_for(NTKLinear(2, 3)), L.NTKLinearRule)
    assert L.rule_for(nn.Conv2d(1, 1, 3, groups=1)).unsupported("c", nn.Conv2d(1, 1, 3)) is None
    assert "groups=1" in L.rule_for(nn.Conv1d(2, 2, 3)).unsupported(
        "c", nn.Conv1d(2, 2, 3, groups=2)
    )
    with pytest.raises(ValueError, match="nn.Module subclasses"):
        L.register(int)


class ScaledConv(nn.Conv2d):
    """z = s conv(a; W, b): a Conv2d subclass whose rule must scale the grouped route too."""

    def __init__(self, c_in: int, c_out: int, s: float) -> None:
        super().__init__(c_in, c_out, 3, padding=1, dtype=torch.float64)
        self.s = s

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.s * super().forward(a)


def test_a_conv_subclass_rule_with_scales_is_exact_on_both_routes():
    """Many output positions take the grouped weight gradient, few the Gram route: the rule's
    scales apply on both (checked against the per-sample loop)."""

    @L.register(ScaledConv)
    class ScaledConvRule(L.ConvRule):
        def scales(self, m):
            return m.s, m.s

    try:
        g = torch.Generator().manual_seed(3)
        for side, c_in, c_out in ((12, 2, 3), (2, 8, 16)):  # grouped, then Gram
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = nn.Sequential(ScaledConv(c_in, c_out, 3.0), nn.Tanh(), nn.Flatten(),
                                      nn.Linear(c_out * side * side, 3, dtype=torch.float64))  # fmt: skip
            x = torch.randn(5, c_in, side, side, generator=g, dtype=torch.float64)
            y = torch.arange(5) % 3
            got = PG.per_example_grad_norms(model, "ce", x, y, method="linear_trick", squared=True)
            torch.testing.assert_close(got, loop_sq_norms(model, x, y), rtol=1e-12, atol=0)
    finally:
        del L._RULES[ScaledConv]


def test_capture_without_copies_names_the_layers_an_in_place_op_overwrote():
    import torch
    from torch import nn

    from gradcourse.layers import capture_layers

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2), nn.Tanh())
    layers = {"0": net[0], "2": net[2]}
    x = torch.randn(5, 3)
    with capture_layers(layers, clone=False) as cap:
        net(x)
    assert cap.overwritten() == ["0"]  # the in-place ReLU wrote into layer 0's output
    with capture_layers(layers, clone=True) as cap:
        out = net(x)
    assert cap.overwritten() == [] and torch.equal(out, net(x))
    _, z = cap.calls["0"][0]
    torch.testing.assert_close(z, net[0](x))  # the recorded node kept the pre-activation
    cap.clear()
    assert cap.calls == {"0": [], "2": []}


def _weighted_reference(model, layer, x, y, w):
    """d/d(layer params) of sum_i w_i l_i by autograd, in eval mode."""
    model.eval()
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    params = [p for p in layer.parameters() if p.requires_grad]
    return dict(zip(map(id, params), torch.autograd.grad((losses * w).sum(), params), strict=True))


def _weighted_by_rule(model, layer, x, y, w):
    model.eval()
    with L.capture_layers({"l": layer}) as cap:
        total = nn.functional.cross_entropy(model(x), y, reduction="sum")
    ((a, z),) = cap.calls["l"]
    (e,) = torch.autograd.grad(total, z)
    return {id(p): g for p, g in L.rule_for(layer).weighted_grads(layer, a, e, w)}


def _bn(kind: type[nn.Module], c: int) -> nn.Module:
    bn = kind(c, dtype=torch.float64)
    with torch.no_grad():  # running statistics and affine parameters away from their defaults
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


WEIGHTED_CASES = {
    "linear": (lambda: nn.Linear(5, 4, dtype=torch.float64), (7, 5), 4),
    "linear, no bias": (lambda: nn.Linear(5, 4, bias=False, dtype=torch.float64), (7, 5), 4),
    "linear on sequences": (lambda: nn.Linear(5, 4, dtype=torch.float64), (7, 3, 5), 12),
    "linear, wide output": (lambda: nn.Linear(2, 9, dtype=torch.float64), (7, 2), 9),
    "NTK linear": (lambda: NTKLinear(5, 4, dtype=torch.float64), (7, 5), 4),
    "conv1d, stride 2": (
        lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dtype=torch.float64), (7, 2, 9), 15),
    "conv2d, dilation": (
        lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=2, dtype=torch.float64), (7, 2, 6, 6), 108),
    "conv2d, few channels in": (
        lambda: nn.Conv2d(1, 6, 3, padding=1, dtype=torch.float64), (7, 1, 5, 5), 150),
    "batchnorm1d": (lambda: _bn(nn.BatchNorm1d, 5), (7, 5), 5),
    "batchnorm2d": (lambda: _bn(nn.BatchNorm2d, 2), (7, 2, 3, 3), 18),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WEIGHTED_CASES))
def test_weighted_grads_equal_the_gradient_of_the_reweighted_loss(case):
    """Each rule's sum_i w_i grad l_i (from the layer's input and output gradient, no second
    backward pass) equals autograd's gradient of sum_i w_i l_i, with signed weights, in a net
    where the layer sits between two others; also with the weight frozen."""
    make, shape, width = WEIGHTED_CASES[case]
    g = torch.Generator().manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        layer = make()
        head = nn.Linear(width, 3, dtype=torch.float64)
    model = nn.Sequential(nn.Tanh(), layer, nn.Flatten(), nn.Tanh(), head)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.arange(shape[0]) % 3
    w = torch.randn(shape[0], generator=g, dtype=torch.float64)
    for frozen in (False, True) if getattr(layer, "bias", None) is not None else (False,):
        if frozen:  # the bias alone
            layer.weight.requires_grad_(False)
        got = _weighted_by_rule(model, layer, x, y, w)
        expected = _weighted_reference(model, layer, x, y, w)
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14)


def test_weighted_grads_are_trusted_only_beside_the_norms_they_agree_with(scaled_rule):
    """A rule that changes the scales keeps the weighted gradients (they use the scales); a rule
    that rewrites ``sq_norms`` for a new kind of layer but inherits ``weighted_grads`` from
    another kind is not trusted with them, and one without them has none."""
    assert L.supports_weighted_grads(L.rule_for(nn.Conv2d(1, 1, 3)))
    assert L.supports_weighted_grads(L.rule_for(nn.BatchNorm1d(2)))
    assert L.supports_weighted_grads(scaled_rule())
    model = toy()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y, w = torch.arange(6) % 3, torch.linspace(-1, 2, 6, dtype=torch.float64)
    got = _weighted_by_rule(model, model[0], x, y, w)
    expected = _weighted_reference(model, model[0], x, y, w)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14)

    class OtherNorms(L.BatchNormRule):
        def sq_norms(self, m, a, e):
            return super().sq_norms(m, a, e)

    assert not L.supports_weighted_grads(OtherNorms())
    assert not L.supports_weighted_grads(L.LayerRule())
    assert not L.supports_weighted_grads(None)
