"""The models of the course, small enough to read in one sitting.

- :class:`MLP`: fully connected net in the standard or the NTK parameterisation (Jacot et al. 2018).
- :func:`two_layer_relu`: one hidden ReLU layer (the setting of Wu & Su 2023).
- :class:`DiagonalLinear`: f(x) = <u * v, x> (Woodworth et al. 2020; HaoChen et al. 2021).
- :class:`SmallCNN`: two conv-relu-pool stages and a small classifier, for 1-D or 2-D inputs.
- :func:`resnet18`: the CIFAR ResNet-18 of He et al. 2016 (3x3 stem, no max-pool), as in Data Diet.
- :class:`CausalTransformer`: a small GPT-style language model over tokens (pre-LayerNorm
  blocks of causal self-attention and a GELU MLP; Radford et al. 2019), for notebook 09.

Every model builds its parameters from its own ``torch.Generator(seed)`` on the CPU (the global
RNG is never touched) and then moves to ``device``, so a seed gives the same network on every
machine. Scalar-output models return shape (n, 1). All but the ResNet (BatchNorm) are pure
functions of their parameters, usable with ``torch.func.functional_call``, ``vmap``, ``jvp``
and ``jacrev``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checks import check_int, check_ints, check_nonnegative, check_positive

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "softplus": F.softplus,
    "linear": lambda x: x,
}
PARAMETERIZATIONS: tuple[str, ...] = ("standard", "ntk")


# ----------------------------------------------------------------------------- checks and init


def _generator(seed: int) -> torch.Generator:
    check_int("seed", seed, low=0)
    return torch.Generator().manual_seed(seed)


def _default_init_(module: nn.Module, g: torch.Generator) -> None:
    """PyTorch's default init for Linear / Conv, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from g."""
    fan_in = module.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        module.weight.uniform_(-bound, bound, generator=g)
        if module.bias is not None:
            module.bias.uniform_(-bound, bound, generator=g)


# ----------------------------------------------------------------------------- MLP


class NTKLinear(nn.Module):
    """Linear layer in the NTK parameterisation (Jacot et al. 2018, eq. 1 / section 6).

    a~ = sigma_w * W a / sqrt(n_in) + beta * b, with the stored parameters W, b ~ N(0, 1);
    the scaling happens in ``forward``, so gradient descent on W, b is the paper's dynamics.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_scale: float = 1.0,
        bias_scale: float = 0.1,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.weight_scale = check_positive("weight_scale", weight_scale)
        self.bias_scale = check_nonnegative("bias_scale", bias_scale)
        shape = (out_features, in_features)
        self.weight = nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        if bias:
            b = torch.randn(out_features, generator=generator, dtype=dtype)
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight) * (self.weight_scale / math.sqrt(self.in_features))
        if self.bias is not None:
            out = out + self.bias_scale * self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight_scale={self.weight_scale}, "
            f"bias_scale={self.bias_scale}"
        )


def _standard_linear(
    n_in: int, n_out: int, bias: bool, weight_scale: float, g: torch.Generator, dtype: torch.dtype
) -> nn.Linear:
    """nn.Linear with W ~ N(0, sigma_w^2 / n_in) and b = 0 (no global RNG used)."""
    layer = torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0.0, weight_scale / math.sqrt(n_in), generator=g)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


class MLP(nn.Module):
    """Fully connected network ``in_dim -> widths... -> out_dim``; input flattened from dim 1.

    ``parameterization="ntk"`` (Jacot et al. 2018, section 2): every layer is an
    :class:`NTKLinear`, a~ = sigma_w W a / sqrt(n_in) + beta b with W, b ~ N(0, 1).
    ``parameterization="standard"``: ``nn.Linear`` layers with W ~ N(0, sigma_w^2 / n_in) and
    zero bias (``bias_scale`` is unused). With beta = 0 both draw functions from the same
    distribution at initialisation; they differ in how gradient descent moves them (the
    NTK-parameterised gradient w.r.t. W is 1/sqrt(n_in) smaller). No activation after the last
    layer.
    """

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        out_dim: int,
        *,
        activation: str = "relu",
        bias: bool = True,
        parameterization: str = "standard",
        weight_scale: float = 1.0,
        bias_scale: float = 0.1,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("in_dim", in_dim, 1)
        check_int("out_dim", out_dim, 1)
        widths = check_ints("widths", widths, 1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
            )
        weight_scale = check_positive("weight_scale", weight_scale)
        bias_scale = check_nonnegative("bias_scale", bias_scale)
        g = _generator(seed)

        self.in_dim, self.widths, self.out_dim = in_dim, widths, out_dim
        self.activation, self.parameterization = activation, parameterization
        dims = (in_dim, *widths, out_dim)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(dims[:-1], dims[1:], strict=True):
            if parameterization == "ntk":
                layer = NTKLinear(
                    n_in,
                    n_out,
                    bias,
                    weight_scale=weight_scale,
                    bias_scale=bias_scale,
                    generator=g,
                    dtype=dtype,
                )
            else:
                layer = _standard_linear(n_in, n_out, bias, weight_scale, g, dtype)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.to(device)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = act(h)
        return h


def two_layer_relu(
    in_dim: int,
    width: int,
    out_dim: int = 1,
    *,
    parameterization: str = "standard",
    bias: bool = True,
    weight_scale: float = 1.0,
    bias_scale: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> MLP:
    """f(x) = W2 relu(W1 x + b1) + b2, one hidden ReLU layer (Wu & Su 2023, section 4)."""
    return MLP(
        in_dim,
        [width],
        out_dim,
        activation="relu",
        bias=bias,
        parameterization=parameterization,
        weight_scale=weight_scale,
        bias_scale=bias_scale,
        seed=seed,
        device=device,
        dtype=dtype,
    )


# ----------------------------------------------------------------------------- diagonal linear


class DiagonalLinear(nn.Module):
    """Diagonal linear network f(x) = <u * v, x>, output shape (n, 1).

    The effective linear predictor is beta = u * v (HaoChen et al. 2021; Wu & Su 2023, section 3;
    Woodworth et al. 2020 study the equivalent u^2 - v^2). ``init="constant"`` sets u = v =
    alpha * 1, so beta = alpha^2 * 1 and small alpha is the "rich" regime; ``init="random"``
    draws u, v ~ N(0, alpha^2) independently.
    """

    def __init__(
        self,
        dim: int,
        *,
        init_scale: float = 1.0,
        init: str = "constant",
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        alpha = check_nonnegative("init_scale", init_scale)
        if init == "constant":
            u = torch.full((dim,), alpha, dtype=dtype)
            v = torch.full((dim,), alpha, dtype=dtype)
        elif init == "random":
            g = _generator(seed)
            u = alpha * torch.randn(dim, generator=g, dtype=dtype)
            v = alpha * torch.randn(dim, generator=g, dtype=dtype)
        else:
            raise ValueError(f"init must be 'constant' or 'random', got {init!r}")
        self.init_scale, self.init = alpha, init
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(v)
        self.to(device)

    @property
    def beta(self) -> Tensor:
        """The linear predictor u * v (detached; compute ``model.u * model.v`` for gradients)."""
        return (self.u * self.v).detach()

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ (self.u * self.v).unsqueeze(1)


# ----------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """[conv3-relu-maxpool2] x len(channels), adaptive average pool to ``pool_size``, then
    linear-relu-linear. ``conv_dim=1`` takes signals (n, L) or (n, C, L), e.g. MNIST-1D (n, 40);
    ``conv_dim=2`` takes images (n, C, H, W), or (n, H, W) when ``in_channels=1``.

    No BatchNorm, so it is a pure function of its parameters (torch.func friendly). Weights use
    PyTorch's default distribution U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from the seed.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        conv_dim: int = 2,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        kernel_size: int = 3,
        pool_size: int = 4,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        if conv_dim not in (1, 2):
            raise ValueError(f"conv_dim must be 1 or 2, got {conv_dim!r}")
        channels = check_ints("channels", channels, 1, nonempty=True)
        check_int("hidden", hidden, 1)
        check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        check_int("pool_size", pool_size, 1)
        g = _generator(seed)

        self.in_channels, self.num_classes, self.conv_dim = in_channels, num_classes, conv_dim
        Conv = nn.Conv1d if conv_dim == 1 else nn.Conv2d
        convs = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels, strict=True):
            conv = torch.nn.utils.skip_init(
                Conv, c_in, c_out, kernel_size, padding=kernel_size // 2, dtype=dtype
            )
            _default_init_(conv, g)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        self.pool_size = pool_size
        flat = channels[-1] * pool_size**conv_dim
        self.fc1 = torch.nn.utils.skip_init(nn.Linear, flat, hidden, dtype=dtype)
        self.fc2 = torch.nn.utils.skip_init(nn.Linear, hidden, num_classes, dtype=dtype)
        _default_init_(self.fc1, g)
        _default_init_(self.fc2, g)
        self.to(device)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == self.conv_dim + 1:  # no channel dim: (n, L) or (n, H, W)
            x = x.unsqueeze(1)
        max_pool = F.max_pool1d if self.conv_dim == 1 else F.max_pool2d
        avg_pool = F.adaptive_avg_pool1d if self.conv_dim == 1 else F.adaptive_avg_pool2d
        for conv in self.convs:
            x = max_pool(F.relu(conv(x)), 2)
        x = avg_pool(x, self.pool_size).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class LeNet(nn.Module):
    """LeNet-5 for 28x28 images (LeCun et al. 1998), the network of Li et al. 2018's MNIST runs:
    conv5 (6 channels, no padding) - ReLU - maxpool2 - conv5 (16) - ReLU - maxpool2 - linear 120
    - ReLU - linear 84 - ReLU - linear ``num_classes``. With 10 classes D = 44,426 parameters,
    the paper's count. Takes (n, 1, 28, 28) or (n, 28, 28). Weights use PyTorch's default
    distribution U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from the seed."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        g = _generator(seed)
        self.num_classes = num_classes
        shapes = [
            (nn.Conv2d, 1, 6, 5),
            (nn.Conv2d, 6, 16, 5),
            (nn.Linear, 16 * 4 * 4, 120),
            (nn.Linear, 120, 84),
            (nn.Linear, 84, num_classes),
        ]
        layers = []
        for kind, *args in shapes:
            layer = torch.nn.utils.skip_init(kind, *args, dtype=dtype)
            _default_init_(layer, g)
            layers.append(layer)
        self.conv1, self.conv2, self.fc1, self.fc2, self.fc3 = layers
        self.to(device)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.fc3(x)


# ----------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """relu(BN(conv3(relu(BN(conv3(x))))) + shortcut(x)), He et al. 2016, fig. 2 (left)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dtype: torch.dtype) -> None:
        super().__init__()
        conv = torch.nn.utils.skip_init
        self.conv1 = conv(nn.Conv2d, c_in, c_out, 3, stride, 1, bias=False, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(c_out, dtype=dtype)
        self.conv2 = conv(nn.Conv2d, c_out, c_out, 3, 1, 1, bias=False, dtype=dtype)
        self.bn2 = nn.BatchNorm2d(c_out, dtype=dtype)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(
                conv(nn.Conv2d, c_in, c_out, 1, stride, bias=False, dtype=dtype),
                nn.BatchNorm2d(c_out, dtype=dtype),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (stride 1, no max-pool), BasicBlocks [2, 2, 2, 2] of widths
    64-128-256-512, global average pool, linear. Convs: Kaiming normal (fan_out, ReLU);
    BatchNorm: weight 1, bias 0; linear: PyTorch's default distribution. All from the seed."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        g = _generator(seed)
        skip = torch.nn.utils.skip_init
        self.conv1 = skip(nn.Conv2d, in_channels, 64, 3, 1, 1, bias=False, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(64, dtype=dtype)
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(c_in, c_out, stride, dtype), BasicBlock(c_out, c_out, 1, dtype)
                )
            )
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = skip(nn.Linear, 512, num_classes, dtype=dtype)

        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    std = math.sqrt(2.0 / (m.out_channels * m.weight[0, 0].numel()))
                    m.weight.normal_(0.0, std, generator=g)
        _default_init_(self.fc, g)
        self.to(device)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet18(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> ResNet18:
    """CIFAR ResNet-18 (He et al. 2016; the Data Diet network, Paul et al. 2021), 11.2M params."""
    return ResNet18(num_classes, in_channels=in_channels, seed=seed, device=device, dtype=dtype)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=-1)
        q, k, v = (z.view(n, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, w))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CausalTransformer(nn.Module):
    """A small causal language model: token and learned position embeddings, ``depth``
    pre-LayerNorm blocks (``heads``-head causal self-attention by
    ``F.scaled_dot_product_attention``, then a 4x GELU MLP), a final LayerNorm and an untied
    linear head. Input (n, T) integer tokens with T <= ``context``; output (n, T, vocab)
    logits, position t predicting token t + 1 (:func:`gradcourse.losses.token_cross_entropy`).

    Initialisation as GPT-2 (Radford et al. 2019): weights and embeddings ~ N(0, 0.02^2),
    biases 0, LayerNorm gain 1, and the projections back into the residual stream scaled by
    1/sqrt(2 depth); drawn from ``torch.Generator(seed)``.
    """

    def __init__(
        self,
        vocab: int = 256,
        context: int = 64,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        vocab = check_int("vocab", vocab, 2)
        self.context = check_int("context", context, 1)
        width = check_int("width", width, 1)
        depth = check_int("depth", depth, 1)
        heads = check_int("heads", heads, 1)
        if width % heads:
            raise ValueError(f"width must be a multiple of heads ({heads}), got {width}")
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.empty(self.context, width))
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        g = _generator(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln"):
                    p.fill_(1.0)
                else:
                    std = (
                        0.02 / math.sqrt(2 * depth)
                        if name.endswith(("proj.weight", "out.weight"))
                        else 0.02
                    )
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        if device is not None:
            self.to(device)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise ValueError(
                f"tokens must be an (n, T) integer tensor, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length must be at most context={self.context}, got {t}")
        x = self.embed(tokens) + self.position[:t]
        return self.head(self.ln(self.blocks(x)))


# ----------------------------------------------------------------------------- registry


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "two_layer_relu": two_layer_relu,
    "diagonal_linear": DiagonalLinear,
    "small_cnn": SmallCNN,
    "lenet": LeNet,
    "resnet18": resnet18,
    "causal_transformer": CausalTransformer,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name, e.g. ``build_model("mlp", in_dim=2, widths=[10, 5], out_dim=2)``."""
    if name not in MODELS:
        raise ValueError(f"model name must be one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)


def torch_default_init_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every ``nn.Linear`` of ``model`` the way PyTorch's ``reset_parameters`` does,
    from a seeded generator: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Kaiming
    uniform with a = sqrt(5)). The initialisation Cohen et al. 2021 and Wu, Ma & E 2018 used
    (their code builds plain ``nn.Linear`` layers); the global RNG is untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        u = torch.rand(p.shape, generator=g, dtype=torch.float64)
                        p.copy_(((2 * u - 1) * bound).to(p.dtype))
    return model
