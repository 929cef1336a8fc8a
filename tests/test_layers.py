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
