"""gradcourse.pergrad against a per-sample loop (one forward / backward pass per example)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcourse import pergrad as PG
from gradcourse.losses import get_loss, targets_for
from gradcourse.models import MLP, SmallCNN

N, K = 12, 4


@pytest.fixture(autouse=True)
def _restore_global_rng():
    """Tests seed torch's global RNG for nn default inits; give it back as it was."""
    with torch.random.fork_rng(devices=[]):
        yield


def loop_grads(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor):
    """Per-example gradients by brute force, in eval mode: dict name -> (n, *shape)."""
    was = model.training
    model.eval()
    fn = get_loss(loss)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1])
        target = targets_for(loss, y[i : i + 1], out.shape[1], out.dtype)
        grads = torch.autograd.grad(fn(out, target), list(params.values()))
        rows.append(grads)
    model.train(was)
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(params)}


def loop_norms(model, loss, x, y):
    grads = loop_grads(model, loss, x, y)
    return torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in grads.values()))


def bn_model(dtype: torch.dtype) -> nn.Sequential:
    """Conv + BatchNorm2d + in-place ReLU + Linear + BatchNorm1d, with non-trivial running
    statistics and affine parameters, left in train mode."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # default inits draw from the global RNG
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, stride=2),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 8),
            nn.BatchNorm1d(8),
            nn.Tanh(),
            nn.Linear(8, K),
        ).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.train()


def problem(name: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model, x = MLP(6, [8, 5], K, seed=0, dtype=dtype), torch.randn(N, 6, generator=g)
    elif name == "mlp_ntk":
        model = MLP(6, [8], K, parameterization="ntk", seed=0, dtype=dtype)
        x = torch.randn(N, 6, generator=g)
    elif name == "cnn1d":
        model = SmallCNN(1, K, conv_dim=1, channels=(3, 4), hidden=6, pool_size=2, dtype=dtype)
        x = torch.randn(N, 16, generator=g)
    elif name == "cnn2d":
        model = SmallCNN(2, K, conv_dim=2, channels=(3, 4), hidden=6, pool_size=2, dtype=dtype)
        x = torch.randn(N, 2, 8, 8, generator=g)
    else:
        model, x = bn_model(dtype), torch.randn(N, 3, 8, 8, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    return model, x.to(dtype), y


MODELS = ("mlp", "mlp_ntk", "cnn1d", "cnn2d", "bn")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_norms_match_loop_float64(name, loss):
    model, x, y = problem(name, torch.float64)
    ref = loop_norms(model, loss, x, y)
    for method in ("vmap", "linear_trick", "auto"):
        got = PG.per_example_grad_norms(model, loss, x, y, method=method, chunk_size=5)
        assert got.dtype == torch.float64 and got.shape == (N,)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    sq = PG.per_example_grad_norms(model, loss, x, y, squared=True)
    torch.testing.assert_close(sq, ref**2, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "bn"])
def test_norms_match_loop_float32(name):
    model, x, y = problem(name, torch.float32)
    ref = loop_norms(model, "ce", x, y)
    for method in ("vmap", "linear_trick"):
        got = PG.per_example_grad_norms(model, "ce", x, y, method=method)
        assert got.dtype == torch.float32
        assert ((got - ref).abs() / ref).max() < 1e-5


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "bn"])
def test_full_grads_match_loop(name):
    model, x, y = problem(name, torch.float64)
    ref = loop_grads(model, "ce", x, y)
    got = PG.per_example_grads(model, "ce", x, y, chunk_size=5)
    assert list(got) == list(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-13)


def test_conv_gram_route_and_strided_dilated_conv():
    """A conv whose per-example weight gradient is cheaper as <A^T A, E^T E> (few positions,
    many channels), a strided and dilated Conv1d, a bias-free conv and a Linear on sequences."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 40, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(40, 48, 3, padding=1),
        nn.Flatten(2),  # (n, 48, 9): a "sequence" of 48 positions of dim 9
        nn.Linear(9, 5),  # a Linear applied at 48 positions
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48 * 5, K),
    ).double()
    x = torch.randn(N, 8, 3, 3, dtype=torch.float64)
    y = torch.randint(0, K, (N,))
    ref = loop_norms(model, "ce", x, y)
    got = PG.per_example_grad_norms(model, "ce", x, y, method="linear_trick")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)

    conv1d = nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=1), nn.Flatten(), nn.LazyLinear(K)
    ).double()
    x1 = torch.randn(N, 2, 11, dtype=torch.float64)
    conv1d(x1)  # materialise the lazy layer
    ref1 = loop_norms(conv1d, "mse", x1, y)
    got1 = PG.per_example_grad_norms(conv1d, "mse", x1, y, method="linear_trick")
    torch.testing.assert_close(got1, ref1, rtol=1e-10, atol=0)


def test_linear_trick_equals_vmap_and_chunking_independent():
    model, x, y = problem("cnn2d", torch.float64)
    trick = PG.per_example_grad_norms(model, "ce", x, y, method="linear_trick")
    for chunk in (1, 5, N, 100):
        torch.testing.assert_close(
            PG.per_example_grad_norms(model, "ce", x, y, method="vmap", chunk_size=chunk),
            trick,
            rtol=1e-12,
            atol=0,
        )
        torch.testing.assert_close(
            PG.per_example_grad_norms(model, "ce", x, y, method="linear_trick", chunk_size=chunk),
            trick,
            rtol=1e-12,
            atol=0,
        )


def test_mode_restored_and_model_untouched():
    model, x, y = problem("bn", torch.float64)
    model[1].eval()  # a mix of modes, each restored as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in PG.METHODS:
        PG.per_example_grad_norms(model, "ce", x, y, method=method)
    PG.per_example_grads(model, "ce", x, y)
    PG.per_example_losses(model, "ce", x, y)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics not updated
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model[0]._forward_hooks


def test_auto_falls_back_to_vmap():
    """Unsupported layers (a free parameter, a layer run twice) go to vmap under "auto" and are
    refused by "linear_trick"."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, K).double()
            self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

        def forward(self, x):
            return self.scale * self.lin(x)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6).double()
            self.out = nn.Linear(6, K).double()

        def forward(self, x):
            return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    torch.manual_seed(0)
    x = torch.randn(N, 6, dtype=torch.float64)
    y = torch.randint(0, K, (N,))
    for model in (Scaled(), Twice()):
        ref = loop_norms(model, "ce", x, y)
        torch.testing.assert_close(
            PG.per_example_grad_norms(model, "ce", x, y), ref, rtol=1e-10, atol=0
        )
        with pytest.raises(ValueError, match="linear_trick"):
            PG.per_example_grad_norms(model, "ce", x, y, method="linear_trick")
    assert not PG.supports_linear_trick(Scaled())
    assert PG.supports_linear_trick(Twice())  # known only when it runs


def test_frozen_parameters_are_excluded():
    model, x, y = problem("mlp", torch.float64)
    model.layers[0].weight.requires_grad_(False)
    ref = loop_norms(model, "ce", x, y)
    for method in ("vmap", "linear_trick"):
        got = PG.per_example_grad_norms(model, "ce", x, y, method=method)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    assert "layers.0.weight" not in PG.per_example_grads(model, "ce", x, y)


def test_callable_loss_and_per_example_losses():
    model, x, y = problem("mlp", torch.float64)

    def smooth_ce(out, t):  # a mean loss of our own
        return nn.functional.cross_entropy(out, t, label_smoothing=0.1)

    fn = get_loss("ce")
    model.eval()
    ref_norms = []
    for i in range(N):
        g = torch.autograd.grad(
            smooth_ce(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
        )
        ref_norms.append(torch.sqrt(sum(t.pow(2).sum() for t in g)))
    for method in ("vmap", "linear_trick"):
        got = PG.per_example_grad_norms(model, smooth_ce, x, y, method=method)
        torch.testing.assert_close(got, torch.stack(ref_norms), rtol=1e-10, atol=0)
    losses = PG.per_example_losses(model, "ce", x, y, batch_size=5)
    ref = torch.stack([fn(model(x[i : i + 1]), y[i : i + 1]) for i in range(N)]).detach()
    torch.testing.assert_close(losses, ref, rtol=1e-12, atol=0)


def test_batchnorm_without_running_stats_refused():
    model = nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, K)
    )
    x, y = torch.randn(N, 6), torch.randint(0, K, (N,))
    with pytest.raises(ValueError, match="track_running_stats"):
        PG.per_example_grad_norms(model, "ce", x, y)
    with pytest.raises(ValueError, match="track_running_stats"):
        PG.per_example_grads(model, "ce", x, y)
    with pytest.raises(ValueError, match="track_running_stats"):
        PG.per_example_losses(model, "ce", x, y)
    from gradcourse import privacy

    with pytest.raises(ValueError, match="track_running_stats"):  # its norms need them too
        privacy.clipped_sum(model, "ce", x, y, 1.0)


def test_trick_chunk_keeps_a_convolutions_per_example_gradients_under_budget():
    """Up to 1024 examples, fewer when a convolution's per-example weight gradients (its
    grouped route) would pass 2^26 numbers: 256 x 256 x 3 x 3 weights give 113 examples."""
    small = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    wide = nn.Sequential(nn.Conv2d(256, 256, 3, bias=False), nn.Flatten(), nn.LazyLinear(2))
    assert PG._trick_chunk(small, 5000) == 1024 and PG._trick_chunk(small, 10) == 10
    assert PG._trick_chunk(wide, 5000) == 2**26 // (256 * 256 * 9) == 113


def test_bad_inputs():
    model, x, y = problem("mlp", torch.float32)
    with pytest.raises(ValueError, match=r"chunk_size must be None or an int >= 1"):
        PG.per_example_grad_norms(model, "ce", x, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_size"):
        PG.per_example_grads(model, "ce", x, y, chunk_size=2.5)
    with pytest.raises(ValueError, match=r"method must be one of"):
        PG.per_example_grad_norms(model, "ce", x, y, method="backpack")
    with pytest.raises(ValueError, match=r"loss must be one of"):
        PG.per_example_grad_norms(model, "hinge", x, y)
    with pytest.raises(ValueError, match=r"same number of examples"):
        PG.per_example_grad_norms(model, "ce", x, y[:-1])
    with pytest.raises(ValueError, match=r"at least one example"):
        PG.per_example_grad_norms(model, "ce", x[:0], y[:0])
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        PG.per_example_losses(model, "ce", x, y, batch_size=0)
    frozen = MLP(6, [4], K)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        PG.per_example_grad_norms(frozen, "ce", x, y)


def test_device_argument_and_result_device():
    model, x, y = problem("mlp", torch.float64)
    got = PG.per_example_grad_norms(model, "ce", x, y, device="cpu")
    assert got.device.type == "cpu"
    if torch.cuda.is_available():
        on_gpu = PG.per_example_grad_norms(model, "ce", x, y, device="cuda")
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), got, rtol=1e-10, atol=0)
        vm = PG.per_example_grad_norms(model, "ce", x, y, device="cuda", method="vmap")
        torch.testing.assert_close(vm.cpu(), got, rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", ["linear_trick", "auto", "vmap"])
def test_batchnorm_on_another_device(method):
    """BatchNorm's running statistics come from the copies moved to ``device``, not from the
    module (the meta device stands in for CUDA: no data, but devices are checked)."""
    model, x, y = problem("bn", torch.float32)
    got = PG.per_example_grad_norms(model, "ce", x, y, device="meta", method=method)
    assert got.device.type == "meta" and got.shape == (N,)
    assert model[1].running_mean.device.type == "cpu"  # the model itself is not moved
    if torch.cuda.is_available():
        ref = PG.per_example_grad_norms(model, "ce", x, y, method=method)
        on_gpu = PG.per_example_grad_norms(model, "ce", x, y, device="cuda", method=method)
        torch.testing.assert_close(on_gpu.cpu(), ref, rtol=1e-5, atol=1e-6)


def test_global_rng_untouched():
    model, x, y = problem("cnn2d", torch.float32)
    state = torch.random.get_rng_state()
    PG.per_example_grad_norms(model, "ce", x, y, progress=True)
    PG.per_example_grads(model, "ce", x, y)
    assert torch.equal(torch.random.get_rng_state(), state)


def tied_model() -> nn.Sequential:
    """Two Linear layers sharing one weight (b.weight = a.weight), then a head."""
    torch.manual_seed(0)
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_tied_weights_take_the_exact_route(loss):
    # a per-layer rule would add ||g_a||^2 + ||g_b||^2 for the shared weight instead of
    # ||g_a + g_b||^2 (2-8% off on such nets); auto must take vmap, which keeps the tie
    model = tied_model()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % 3
    assert len(dict(model.named_parameters())) == 5  # the shared weight counted once
    reference = loop_norms(model, loss, x, y)
    torch.testing.assert_close(PG.per_example_grad_norms(model, loss, x, y), reference)
    torch.testing.assert_close(
        PG.per_example_grad_norms(model, loss, x, y, method="vmap"), reference
    )
    assert not PG.supports_linear_trick(model)
    with pytest.raises(ValueError, match=r"0\.weight = 2\.weight is shared"):
        PG.per_example_grad_norms(model, loss, x, y, method="linear_trick")


class TiedByCall(nn.Module):
    """An autoencoder whose decoder reuses the encoder's weight through a function call: the
    weight is registered once, so only the forward pass shows the tie."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.enc = nn.Linear(6, 3, bias=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t()))


def test_a_weight_tied_by_a_function_call_takes_the_exact_route():
    model = TiedByCall().double()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    reference = loop_norms(model, "mse", x, y)
    torch.testing.assert_close(PG.per_example_grad_norms(model, "mse", x, y), reference)
    with pytest.raises(ValueError, match=r"\['enc'\] are also used outside their layer"):
        PG.per_example_grad_norms(model, "mse", x, y, method="linear_trick")


def test_conv_rule_routes_match_the_loop_and_auto_takes_the_trick(monkeypatch):
    """Convolutions with many output positions go through the grouped weight gradient, with
    few positions and many channels through the Gram route; stride, dilation, padding, Conv1d,
    no bias and a frozen weight included. Norms against the per-sample loop; ``auto`` takes the
    trick (the private route that runs is spied on)."""
    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1), nn.Tanh(),
                      nn.Flatten(), nn.LazyLinear(3)),  # L = 16 (L (K + O) > O K): grouped
        nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.Tanh(), nn.Flatten(),
                      nn.LazyLinear(3)),  # L = 4, K = 72, O = 16: Gram
        nn.Sequential(nn.Conv1d(2, 4, 5, padding=2, stride=3), nn.Tanh(), nn.Flatten(),
                      nn.LazyLinear(3)),
    ]  # fmt: skip
    inputs = [torch.randn(5, 2, 9, 9), torch.randn(5, 8, 4, 4), torch.randn(5, 2, 20)]
    calls = []
    for name in ("_vmap_sq_norms", "_trick_sq_norms"):
        real = getattr(PG, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(PG, name, spy)
    y = torch.arange(5) % 3
    for model, x in zip(models, inputs, strict=True):
        model(x[:1])  # materialise the lazy layer
        model.double()
        x = x.double()
        for frozen in (False, True):
            model[0].weight.requires_grad_(not frozen)
            calls.clear()
            got = PG.per_example_grad_norms(model, "ce", x, y)
            assert calls == ["_trick_sq_norms"]
            torch.testing.assert_close(got, loop_norms(model, "ce", x, y), rtol=1e-10, atol=0)
