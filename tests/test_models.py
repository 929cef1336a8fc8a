"""Models: shapes, initialisation statistics against closed forms, determinism, torch.func."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vmap

from gradcourse.losses import mse
from gradcourse.models import (
    MLP,
    BasicBlock,
    DiagonalLinear,
    LeNet,
    NTKLinear,
    SmallCNN,
    build_model,
    count_params,
    resnet18,
    two_layer_relu,
)

# ----------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "linear", "softplus"])
@pytest.mark.parametrize("parameterization", ["standard", "ntk"])
def test_mlp_output_shapes(activation, parameterization):
    model = MLP(12, [7, 5], 3, activation=activation, parameterization=parameterization)
    assert model(torch.randn(4, 12)).shape == (4, 3)
    assert model(torch.randn(4, 3, 4)).shape == (4, 3)  # flattened from dim 1
    scalar = MLP(12, [7], 1, activation=activation, parameterization=parameterization)
    assert scalar(torch.randn(4, 12)).shape == (4, 1)
    linear = MLP(12, [], 2, parameterization=parameterization)
    assert len(linear.layers) == 1 and linear(torch.randn(4, 12)).shape == (4, 2)


def test_mlp_float64_and_no_bias():
    model = MLP(3, [4], 2, bias=False, parameterization="ntk", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert [n for n, _ in model.named_parameters()] == ["layers.0.weight", "layers.1.weight"]
    assert model(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_ntk_forward_is_the_explicit_formula():
    """a~ = sigma_w W x / sqrt(n) + beta b (Jacot et al. 2018), W, b stored as raw N(0, 1)."""
    torch.manual_seed(0)
    sw, beta = 1.7, 0.3
    model = MLP(
        5, [6], 2, parameterization="ntk", weight_scale=sw, bias_scale=beta, dtype=torch.float64
    )
    x = torch.randn(3, 5, dtype=torch.float64)
    l1, l2 = model.layers
    assert isinstance(l1, NTKLinear)
    h = sw * x @ l1.weight.T / math.sqrt(5) + beta * l1.bias
    f = sw * torch.relu(h) @ l2.weight.T / math.sqrt(6) + beta * l2.bias
    torch.testing.assert_close(model(x), f, rtol=1e-12, atol=1e-12)


def test_ntk_params_are_standard_normal():
    model = MLP(400, [300], 200, parameterization="ntk", weight_scale=3.0, bias_scale=0.5)
    w = model.layers[0].weight.detach()
    assert abs(float(w.mean())) < 0.01  # 120k draws: se 0.003
    assert abs(float(w.var()) - 1.0) < 0.02  # se of the variance ~ sqrt(2/120k) = 0.004
    b = torch.cat([model.layers[0].bias, model.layers[1].bias]).detach()
    assert abs(float(b.var()) - 1.0) < 0.3  # 500 draws: se ~ 0.06


def _output_variance_check(samples: torch.Tensor, expected: float) -> None:
    """E f = 0, so Var f = E f^2; test the sample mean of f^2 within 4 standard errors.

    ``samples`` is (seeds, outputs): the outputs of one net are independent given its hidden
    layer, so each seed's mean of f_k^2 is one unbiased, i.i.d.-across-seeds draw."""
    sq = samples.pow(2).mean(dim=1)
    se = float(sq.std()) / math.sqrt(len(sq))
    assert abs(float(sq.mean()) - expected) < 4 * se, (float(sq.mean()), expected, se)


def test_ntk_output_variance_at_init_matches_closed_form():
    """One hidden ReLU layer, NTK param.: h_j ~ N(0, q), q = sigma_w^2 ||x||^2 / n0 + beta^2,
    so Var f = sigma_w^2 E[relu(h)^2] + beta^2 = sigma_w^2 q / 2 + beta^2 (exact at any width)."""
    sw, beta, n0 = 1.3, 1.0, 3
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    q = sw**2 * float(x.pow(2).sum()) / n0 + beta**2
    expected = sw**2 * q / 2 + beta**2
    samples = torch.stack(
        [
            two_layer_relu(
                n0,
                16,
                8,
                parameterization="ntk",
                weight_scale=sw,
                bias_scale=beta,
                seed=s,
                dtype=torch.float64,
            )(x)[0]
            for s in range(3000)
        ]
    ).detach()
    _output_variance_check(samples, expected)


def test_standard_init_variance_and_output_variance():
    """W ~ N(0, sigma_w^2 / n_in), b = 0; one hidden ReLU layer: Var f = sigma_w^4 ||x||^2/(2 n0)."""
    sw = 2.0
    model = MLP(500, [400], 10, weight_scale=sw)
    w = model.layers[0].weight.detach()
    assert abs(float(w.var()) * 500 / sw**2 - 1.0) < 0.02
    assert all(float(layer.bias.detach().abs().max()) == 0.0 for layer in model.layers)

    n0 = 4
    x = torch.tensor([[0.5, 1.0, -1.5, 2.0]], dtype=torch.float64)
    expected = sw**4 * float(x.pow(2).sum()) / (2 * n0)
    samples = torch.stack(
        [
            two_layer_relu(n0, 16, 8, weight_scale=sw, seed=s, dtype=torch.float64)(x)[0]
            for s in range(3000)
        ]
    ).detach()
    _output_variance_check(samples, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: MLP(6, [8, 8], 3, seed=s),
        lambda s: MLP(6, [8], 3, parameterization="ntk", seed=s),
        lambda s: DiagonalLinear(6, init="random", seed=s),
        lambda s: SmallCNN(conv_dim=1, seed=s),
        lambda s: resnet18(seed=s),
    ],
)
def test_init_is_deterministic_under_seed_and_differs_across_seeds(make):
    a, b, c = make(0), make(0), make(1)
    for (na, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), na
        if (
            pa.numel() > 1 and float(pa.detach().std()) > 0
        ):  # BatchNorm weights are constant by design
            assert not torch.equal(pa, pc), na


def test_init_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    MLP(4, [5], 2, seed=3)
    MLP(4, [5], 2, parameterization="ntk", seed=3)
    DiagonalLinear(4, init="random", seed=3)
    SmallCNN(seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_mlp_validation():
    with pytest.raises(ValueError, match="activation"):
        MLP(3, [4], 1, activation="sigmoid")
    with pytest.raises(ValueError, match="parameterization"):
        MLP(3, [4], 1, parameterization="mup")
    with pytest.raises(ValueError, match=r"widths\[1\]"):
        MLP(3, [4, 0], 1)
    with pytest.raises(ValueError, match="in_dim"):
        MLP(0, [4], 1)
    with pytest.raises(ValueError, match="weight_scale"):
        MLP(3, [4], 1, weight_scale=0.0)
    with pytest.raises(ValueError, match="bias_scale"):
        MLP(3, [4], 1, bias_scale=-1.0)
    with pytest.raises(ValueError, match="seed"):
        MLP(3, [4], 1, seed=-1)


# ----------------------------------------------------------------------------- others


def test_diagonal_linear_output_is_inner_product_with_uv():
    model = DiagonalLinear(5, init_scale=0.3, dtype=torch.float64)
    torch.testing.assert_close(model.beta, torch.full((5,), 0.09, dtype=torch.float64))
    with torch.no_grad():
        model.u.copy_(torch.arange(5.0))
        model.v.copy_(torch.linspace(-1, 1, 5))
    x = torch.randn(7, 5, dtype=torch.float64)
    expected = (x @ (model.u * model.v)).unsqueeze(1)
    out = model(x)
    assert out.shape == (7, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model.beta, torch.arange(5.0, dtype=torch.float64) * model.v)
    rand = DiagonalLinear(5, init="random", init_scale=2.0)
    assert not torch.equal(rand.u, rand.v)
    with pytest.raises(ValueError, match="init"):
        DiagonalLinear(5, init="zeros")


def test_small_cnn_1d_and_2d():
    cnn1 = SmallCNN(conv_dim=1, num_classes=10)
    assert cnn1(torch.randn(3, 40)).shape == (3, 10)  # MNIST-1D signals, channel dim added
    assert cnn1(torch.randn(3, 1, 40)).shape == (3, 10)
    cnn2 = SmallCNN(in_channels=1, num_classes=4)
    assert cnn2(torch.randn(3, 28, 28)).shape == (3, 4)
    assert cnn2(torch.randn(3, 1, 8, 8)).shape == (3, 4)
    cnn3 = SmallCNN(in_channels=3, channels=(8, 8, 8), dtype=torch.float64)
    assert cnn3(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cnn3.modules())
    with pytest.raises(ValueError, match="conv_dim"):
        SmallCNN(conv_dim=3)


def test_resnet18_shape_and_param_count():
    model = resnet18(num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_params(model) == 11_173_962  # the CIFAR ResNet-18, "11.2M"
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


# ----------------------------------------------------------------------------- CNN / ResNet forward
# The forward passes rebuilt from each module's own weights with torch.nn.functional convolutions
# and by-hand pooling, ReLU and BatchNorm (eval mode: the running statistics), so a dropped ReLU,
# a dropped shortcut or a swapped pooling changes the output.


def max_pool2_by_hand(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Non-overlapping max over windows of 2 in each of the last ``dims`` axes (floor mode)."""
    for axis in range(x.dim() - dims, x.dim()):
        size = x.shape[axis] // 2
        x = x.narrow(axis, 0, 2 * size)
        x = x.unflatten(axis, (size, 2)).amax(axis + 1)
    return x


def adaptive_avg_by_hand(x: torch.Tensor, out: int, dims: int) -> torch.Tensor:
    """Adaptive average pooling: bin i of an axis of length L averages the positions
    floor(i L / out) .. ceil((i + 1) L / out) - 1 (bins overlap when out does not divide L)."""
    for axis in range(x.dim() - dims, x.dim()):
        length = x.shape[axis]
        bins = [
            x.narrow(
                axis, (i * length) // out, -(-(i + 1) * length // out) - (i * length) // out
            ).mean(axis, keepdim=True)
            for i in range(out)
        ]
        x = torch.cat(bins, axis)
    return x


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def small_cnn_by_hand(model: SmallCNN, x: torch.Tensor, dims: int, k: int, pool: int):
    conv = F.conv1d if dims == 1 else F.conv2d
    h = x.unsqueeze(1) if x.dim() == dims + 1 else x
    for layer in model.convs:
        h = max_pool2_by_hand(relu(conv(h, layer.weight, layer.bias, padding=k // 2)), dims)
    h = adaptive_avg_by_hand(h, pool, dims).flatten(1)
    h = relu(h @ model.fc1.weight.T + model.fc1.bias)
    return h @ model.fc2.weight.T + model.fc2.bias


@pytest.mark.parametrize(
    ("dims", "in_shape", "kernel", "pool"),
    [(1, (37,), 3, 4), (1, (2, 41), 5, 3), (2, (13, 11), 3, 2), (2, (2, 15, 12), 3, 3)],
)
def test_small_cnn_forward_is_the_explicit_formula(dims, in_shape, kernel, pool):
    """[conv(same padding) -> relu -> maxpool 2] x 2, adaptive average pool, linear-relu-linear.
    Odd lengths exercise the floor of the max-pool and overlapping adaptive-pool bins."""
    in_channels = in_shape[0] if len(in_shape) == dims + 1 else 1
    model = SmallCNN(
        in_channels,
        num_classes=3,
        conv_dim=dims,
        channels=(4, 5),
        hidden=6,
        kernel_size=kernel,
        pool_size=pool,
        seed=3,
        dtype=torch.float64,
    )
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = small_cnn_by_hand(model, x, dims, kernel, pool)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_small_cnn_init_is_the_documented_uniform():
    """Weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default): bounded by
    the bound, reaching close to it, with variance bound^2 / 3 (36,864 draws: relative standard
    error of the variance 0.5%, tested within 3%)."""
    model = SmallCNN(1, conv_dim=2, channels=(8, 64, 64), seed=1)
    conv = model.convs[2]
    bound = 1 / math.sqrt(64 * 3 * 3)
    w = conv.weight.detach().double()
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert abs(float(w.mean())) < 4 * bound / math.sqrt(3 * w.numel())
    assert float(w.pow(2).mean()) == pytest.approx(bound**2 / 3, rel=0.03)
    assert float(conv.bias.detach().abs().max()) <= bound
    fc1_bound = 1 / math.sqrt(64 * 4 * 4)
    assert float(model.fc1.weight.detach().abs().max()) <= fc1_bound
    assert float(model.fc1.weight.detach().abs().max()) > 0.99 * fc1_bound


def test_lenet_has_the_papers_parameter_count_and_is_the_explicit_formula():
    """D = 44,426 with 10 classes (Li et al. 2018's LeNet), and its forward pass is the
    documented composition written out with torch.nn.functional."""
    model = LeNet(seed=2)
    assert count_params(model) == 44_426 and build_model("lenet", seed=2) is not model
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    h = F.max_pool2d(F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, model.conv2.weight, model.conv2.bias)), 2).flatten(1)
    h = F.relu(F.linear(h, model.fc1.weight, model.fc1.bias))
    h = F.relu(F.linear(h, model.fc2.weight, model.fc2.bias))
    torch.testing.assert_close(model(x), F.linear(h, model.fc3.weight, model.fc3.bias))
    torch.testing.assert_close(model(x[:, 0]), model(x))  # (n, 28, 28) accepted
    assert torch.equal(LeNet(seed=2).fc1.weight, model.fc1.weight)
    assert not torch.equal(LeNet(seed=3).fc1.weight, model.fc1.weight)
    bound = 1 / math.sqrt(6 * 5 * 5)
    assert float(model.conv2.weight.abs().max()) <= bound


def randomize_batchnorm_(model: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c, dt = m.num_features, m.weight.dtype
                m.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=dt))
                m.bias.copy_(0.3 * torch.randn(c, generator=g, dtype=dt))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g, dtype=dt))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=dt))
    model.eval()


def bn_by_hand(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    def per_channel(v):
        return v[None, :, None, None]

    scale = per_channel(bn.weight) / torch.sqrt(per_channel(bn.running_var) + bn.eps)
    return (x - per_channel(bn.running_mean)) * scale + per_channel(bn.bias)


def basic_block_by_hand(block: nn.Module, x: torch.Tensor, c_in: int, c_out: int, stride: int):
    """relu(bn2(conv3x3(relu(bn1(conv3x3_stride(x))))) + shortcut(x)), He et al. 2016 fig. 2;
    shortcut = x, or bn(conv1x1_stride(x)) when the shape changes (option B)."""
    out = relu(bn_by_hand(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
    out = bn_by_hand(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
    if stride != 1 or c_in != c_out:
        proj, bn = block.shortcut[0], block.shortcut[1]
        assert proj.weight.shape == (c_out, c_in, 1, 1)
        shortcut = bn_by_hand(F.conv2d(x, proj.weight, stride=stride), bn)
    else:
        assert count_params(block.shortcut) == 0
        shortcut = x
    return relu(out + shortcut)


@pytest.mark.parametrize(("c_in", "c_out", "stride"), [(4, 4, 1), (4, 6, 2), (3, 5, 1)])
def test_basic_block_forward_is_the_explicit_formula(c_in, c_out, stride):
    g = torch.Generator().manual_seed(0)
    block = BasicBlock(c_in, c_out, stride, torch.float64)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 4:  # skip_init leaves the convs uninitialised: fill them
                p.normal_(0.0, 0.3, generator=g)
    randomize_batchnorm_(block, seed=1)
    x = torch.randn(3, c_in, 7, 6, generator=g, dtype=torch.float64)
    expected = basic_block_by_hand(block, x, c_in, c_out, stride)
    assert expected.shape == (3, c_out, (7 - 1) // stride + 1, (6 - 1) // stride + 1)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_resnet18_forward_is_the_explicit_formula():
    """relu(bn(conv3x3 stride 1)), no max-pool; stages of two BasicBlocks, widths 64-128-256-512
    with strides 1-2-2-2; global average pool; linear. 16x16 inputs: a 2x2 map is pooled."""
    model = resnet18(num_classes=7, in_channels=2, seed=0, dtype=torch.float64)
    randomize_batchnorm_(model, seed=2)
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = relu(bn_by_hand(F.conv2d(x, model.conv1.weight, padding=1), model.bn1))
    c_in = 64
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    for stage, (c_out, stride) in zip(stages, ((64, 1), (128, 2), (256, 2), (512, 2)), strict=True):
        assert len(stage) == 2
        h = basic_block_by_hand(stage[0], h, c_in, c_out, stride)
        h = basic_block_by_hand(stage[1], h, c_out, c_out, 1)
        c_in = c_out
    assert h.shape == (2, 512, 2, 2)
    expected = h.mean((2, 3)) @ model.fc.weight.T + model.fc.bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)


def test_resnet18_init_is_kaiming_normal_fan_out():
    """Convs ~ N(0, 2 / (c_out k^2)) (Kaiming normal, fan_out, ReLU), BatchNorm weight 1 and bias
    0, linear ~ U(+-1/sqrt(512)). Tolerances are ~4 standard errors of the sample variance,
    sqrt(2 / N) relative; fan_in instead of fan_out would be off by a factor 2 to 21."""
    model = resnet18(seed=0)
    checks = [
        (model.conv1, 64 * 9, 0.15),  # 1,728 draws; fan_in would be 27 (factor 21)
        (model.layer2[0].shortcut[0], 128, 0.07),  # 8,192 draws; fan_in 64 (factor 2)
        (model.layer4[1].conv2, 512 * 9, 0.01),  # 2.4M draws
    ]
    for conv, fan_out, rel in checks:
        w = conv.weight.detach().double()
        assert abs(float(w.mean())) < 4 * math.sqrt(2 / fan_out / w.numel())
        assert float(w.pow(2).mean()) == pytest.approx(2 / fan_out, rel=rel)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    bound, fc_max = 1 / math.sqrt(512), float(model.fc.weight.detach().abs().max())
    assert fc_max <= bound < 1.01 * fc_max


def test_count_params_and_build_model():
    model = MLP(3, [4], 2)
    assert count_params(model) == 3 * 4 + 4 + 4 * 2 + 2
    model.layers[0].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 4 + 4 * 2 + 2
    built = build_model("mlp", in_dim=3, widths=[4], out_dim=2)
    assert isinstance(built, MLP)
    for p, q in zip(built.parameters(), MLP(3, [4], 2).parameters(), strict=True):
        assert torch.equal(p, q)
    assert isinstance(build_model("diagonal_linear", dim=3), DiagonalLinear)
    assert isinstance(build_model("two_layer_relu", in_dim=3, width=4), MLP)
    assert isinstance(build_model("small_cnn", conv_dim=1), SmallCNN)
    with pytest.raises(ValueError, match="model name"):
        build_model("vgg11")


# ----------------------------------------------------------------------------- torch.func


FUNC_MODELS = {
    "mlp_standard": (lambda: MLP(6, [5, 4], 3, activation="tanh", dtype=torch.float64), (6,), 3),
    "mlp_ntk": (lambda: MLP(6, [5], 3, parameterization="ntk", dtype=torch.float64), (6,), 3),
    "two_layer_relu": (lambda: two_layer_relu(6, 5, dtype=torch.float64), (6,), 1),
    "diagonal_linear": (lambda: DiagonalLinear(6, init="random", dtype=torch.float64), (6,), 1),
    "small_cnn_1d": (
        lambda: SmallCNN(conv_dim=1, num_classes=3, channels=(4, 4), hidden=8, dtype=torch.float64),
        (20,),
        3,
    ),
    "small_cnn_2d": (
        lambda: SmallCNN(2, num_classes=3, channels=(4,), hidden=8, dtype=torch.float64),
        (2, 8, 8),
        3,
    ),
}


@pytest.mark.parametrize("name", list(FUNC_MODELS))
def test_per_example_gradients_with_vmap_match_a_loop(name):
    make, in_shape, out_dim = FUNC_MODELS[name]
    model = make()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, *in_shape, generator=g, dtype=torch.float64)
    y = torch.randn(5, out_dim, generator=g, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return mse(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        model.zero_grad()
        mse(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_example[k][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp_ntk", "small_cnn_1d"])
def test_jvp_matches_jacrev_contraction(name):
    make, in_shape, _ = FUNC_MODELS[name]
    model = make()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, *in_shape, dtype=torch.float64)
    tangent = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        return functional_call(model, p, (x,))

    _, jvp_out = jvp(f, (params,), (tangent,))
    jac = jacrev(f)(params)
    contracted = sum(
        (jac[k].flatten(2) @ tangent[k].flatten()) for k in params
    )  # (n, out) = sum_k J_k t_k
    torch.testing.assert_close(jvp_out, contracted, rtol=1e-10, atol=1e-12)


def test_forward_does_not_modify_input():
    x = torch.randn(4, 40)
    x0 = x.clone()
    for model in (MLP(40, [8], 2), SmallCNN(conv_dim=1), DiagonalLinear(40)):
        model(x)
        assert torch.equal(x, x0)
