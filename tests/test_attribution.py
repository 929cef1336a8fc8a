"""gradcourse.attribution against independent references: finite differences for input
gradients, the closed form of Grad-CAM on a global-average-pooled linear head (CAM), an explicit
loop for SmoothGrad, the exact l_inf / l_2 attacks on a linear classifier for PGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcourse import attribution as at
from gradcourse.models import MLP, SmallCNN

F64 = torch.float64


def tiny_cnn(seed: int = 0) -> nn.Module:
    return SmallCNN(1, 3, channels=(4,), hidden=8, pool_size=2, seed=seed, dtype=F64)


class CamNet(nn.Module):
    """conv -> relu -> global average pool -> linear: Grad-CAM is CAM here (Selvaraju et al.,
    section 3.1), ReLU(sum_k w_ck A_k) / (h w) with A the ReLU's output."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(1, 5, 3, padding=1, dtype=F64)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 4, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def finite_difference(model, x, c, h=1e-6):
    out = torch.zeros_like(x)
    flat = out.view(len(x), -1)
    for i in range(len(x)):
        for j in range(flat.shape[1]):
            e = torch.zeros_like(x[i]).view(-1)
            e[j] = h
            e = e.view_as(x[i])
            with torch.no_grad():
                up = model((x[i] + e).unsqueeze(0))[0, c[i]]
                down = model((x[i] - e).unsqueeze(0))[0, c[i]]
            flat[i, j] = (up - down) / (2 * h)
    return out


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_input_gradients_match_finite_differences(arch):
    g = torch.Generator().manual_seed(0)
    if arch == "mlp":
        model = MLP(12, (7,), 3, activation="tanh", seed=1, dtype=F64)
        x = torch.randn(4, 12, generator=g, dtype=F64)
    else:
        model = tiny_cnn()
        x = torch.randn(3, 1, 6, 6, generator=g, dtype=F64)
    c = torch.tensor([0, 2, 1, 1][: len(x)])
    got = at.input_gradients(model, x, c)
    torch.testing.assert_close(got, finite_difference(model, x, c), rtol=1e-6, atol=1e-8)
    # default target: the predicted class; an int: that class for every example
    pred = model(x).argmax(1)
    torch.testing.assert_close(at.input_gradients(model, x), at.input_gradients(model, x, pred))
    torch.testing.assert_close(
        at.input_gradients(model, x, 1), at.input_gradients(model, x, torch.ones(len(x)).long())
    )
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="target must have shape"):
        at.input_gradients(model, x, torch.zeros(len(x) + 1).long())


def test_smoothgrad_is_the_mean_over_its_noise_draws():
    model = MLP(10, (6,), 3, activation="tanh", seed=2, dtype=F64)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    c = model(x).argmax(1)
    torch.testing.assert_close(at.smoothgrad(model, x, c, noise_std=0.0, samples=3),
                               at.input_gradients(model, x, c))  # fmt: skip
    gen = torch.Generator().manual_seed(9)
    spread = (x.max(1).values - x.min(1).values).view(-1, 1)
    expected = torch.zeros_like(x)
    for _ in range(4):
        z = torch.randn(x.shape, generator=gen, dtype=F64)
        expected += at.input_gradients(model, x + 0.2 * spread * z, c) / 4
    torch.testing.assert_close(
        at.smoothgrad(model, x, c, noise_std=0.2, samples=4, seed=9), expected
    )
    with pytest.raises(ValueError, match="noise_std must be"):
        at.smoothgrad(model, x, noise_std=-1.0)


def test_grad_cam_is_cam_on_an_average_pooled_linear_head():
    model = CamNet()
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    c = torch.tensor([0, 3, 1])
    cam = at.grad_cam(model, x, "act", c, resize=False)
    with torch.no_grad():
        acts = model.act(model.conv(x))
    w = model.fc.weight[c]  # (n, K)
    expected = F.relu((w[:, :, None, None] * acts).sum(1)) / (5 * 5)
    torch.testing.assert_close(cam, expected)
    resized = at.grad_cam(model, x, "act", c)
    assert resized.shape == (3, 5, 5)  # already the input's size: resizing is the identity
    torch.testing.assert_close(resized, expected)
    with pytest.raises(ValueError, match="layer must name a submodule"):
        at.grad_cam(model, x, "conv9", c)
    with pytest.raises(ValueError, match=r"must output \(n, K, h, w\)"):
        at.grad_cam(model, x, "fc", c)


def test_grad_cam_resizes_a_coarse_layer():
    model = tiny_cnn()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    small = at.grad_cam(model, x, name, resize=False)
    big = at.grad_cam(model, x, name)
    assert big.shape == (2, 8, 8) and (big >= 0).all()
    torch.testing.assert_close(
        big, F.interpolate(small[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    )


def test_grad_cam_rectified_is_grad_cam_after_the_relu():
    """rectify=True against two references. CamNet (conv -> ReLU -> mean -> linear) in closed
    form: R = relu(conv(x)), and d f_c / d R_k = w_ck / (h w) where R_k > 0, 0 where the
    model's own ReLU is flat (PyTorch's derivative at 0), so alpha_k = w_ck p_k / (h w), p_k the
    share of R_k's positions above zero. SmallCNN, whose ReLUs are functions, by hand: the
    rectified maps as a leaf, the rest of the forward pass run on them, alpha the spatial mean
    of d f_c / d R."""
    model = CamNet()
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    c = torch.tensor([0, 3, 1])
    with torch.no_grad():
        rect = F.relu(model.conv(x))
    share_up = (rect > 0).double().mean(dim=(2, 3))  # (n, K)
    alpha = model.fc.weight[c] * share_up / 25
    expected = F.relu((alpha[:, :, None, None] * rect).sum(1))
    got = at.grad_cam(model, x, "conv", c, resize=False, rectify=True)
    torch.testing.assert_close(got, expected)
    net = SmallCNN(1, 3, channels=(3, 4), hidden=8, pool_size=2, seed=5, dtype=F64)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    c = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        before = net(x)
        h = F.max_pool2d(F.relu(net.convs[0](x)), 2)
    r = F.relu(net.convs[1](h)).requires_grad_(True)
    z = F.adaptive_avg_pool2d(F.max_pool2d(F.relu(r), 2), 2).flatten(1)
    out = net.fc2(F.relu(net.fc1(z)))
    torch.testing.assert_close(out.detach(), before)  # the hand forward pass is the model's
    (dr,) = torch.autograd.grad(out.gather(1, c.view(-1, 1)).sum(), r)
    alpha = dr.mean(dim=(2, 3), keepdim=True)
    expected = F.relu((alpha * r.detach()).sum(1))
    got = at.grad_cam(net, x, "convs.1", c, resize=False, rectify=True)
    torch.testing.assert_close(got, expected)
    # on the raw convolution outputs the negative parts enter the sum: the maps differ
    raw = at.grad_cam(net, x, "convs.1", c, resize=False)
    assert not torch.allclose(raw, got)
    # the hook is gone and the model computes what it computed before
    assert not net.convs[1]._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)
    assert all(p.grad is None for p in net.parameters())


def test_grad_cam_rectify_refuses_a_layer_without_a_relu_after_it():
    class NoRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1, dtype=F64)
            self.fc = nn.Linear(3, 2, dtype=F64)

        def forward(self, x):
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = NoRelu()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    at.grad_cam(model, x, "conv", 0)  # without rectify: the raw outputs, allowed
    with pytest.raises(ValueError, match="needs a layer whose output the model passes through"):
        at.grad_cam(model, x, "conv", 0, rectify=True)
    assert not model.conv._forward_hooks


def linear_pair():
    """Two-class linear logits W x: the cross-entropy's input gradient points along
    w_other - w_y whatever x is, so the best attack in a ball is known in closed form."""
    model = nn.Linear(6, 2, bias=False, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 6, generator=torch.Generator().manual_seed(5), dtype=F64))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(6), dtype=F64)
    y = torch.tensor([0, 1, 1, 0])
    direction = model.weight[1 - y] - model.weight[y]
    return model, x, y, direction


def test_pgd_finds_the_closed_form_attack_on_a_linear_classifier():
    model, x, y, d = linear_pair()
    kw = dict(steps=3, step_size=0.3, random_start=False)
    linf = at.pgd(model, x, y, eps=0.3, norm="linf", **kw)
    torch.testing.assert_close(linf, x + 0.3 * d.sign())
    l2 = at.pgd(model, x, y, eps=0.3, norm="l2", **kw)
    torch.testing.assert_close(l2, x + 0.3 * d / d.norm(dim=1, keepdim=True))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_and_raises_the_loss(norm):
    model = tiny_cnn(1)
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(7), dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps = 0.1 if norm == "linf" else 0.5
    adv = at.pgd(model, x, y, eps=eps, norm=norm, steps=10, seed=3)
    delta = (adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-9).all()
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    torch.testing.assert_close(adv, at.pgd(model, x, y, eps=eps, norm=norm, steps=10, seed=3))
    clamped = at.pgd(model, x, y, eps=eps, norm=norm, steps=5, clamp=(0.0, 1.0))
    assert clamped.min() >= 0 and clamped.max() <= 1
    with pytest.raises(ValueError, match="norm must be one of"):
        at.pgd(model, x, y, eps=eps, norm="l1")


def test_adversarial_step_is_plain_sgd_at_zero_eps_and_trains_on_pgd_otherwise():
    model, x, y, _ = linear_pair()
    ref = nn.Linear(6, 2, bias=False, dtype=F64)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = at.adversarial_step(model, opt, x, y, eps=0.0)
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    with torch.no_grad():
        expected = ref.weight - 0.1 * ref.weight.grad
    assert loss == pytest.approx(ref_loss.item())
    torch.testing.assert_close(model.weight.detach(), expected)
    adv = at.pgd(model, x, y, eps=0.2, steps=4, seed=1)
    with torch.no_grad():
        expected_loss = F.cross_entropy(model(adv), y).item()
    assert at.adversarial_step(model, opt, x, y, eps=0.2, steps=4, seed=1) == pytest.approx(
        expected_loss
    )


def test_mass_on_by_hand():
    a = torch.tensor([[[1.0, -3.0], [0.0, 4.0]]])  # (1, 2, 2)
    top = torch.tensor([[[True, True], [False, False]]])
    assert at.mass_on(a, top).tolist() == [pytest.approx(0.5)]
    images = torch.stack([a, 2 * a], dim=0)  # (2, 1, 2, 2), masks (2, 1, 2, 2) broadcast
    assert at.mass_on(images, top.unsqueeze(0).expand(2, 1, 2, 2)).tolist() == pytest.approx(
        [0.5, 0.5]
    )
    with pytest.raises(ValueError, match="does not broadcast"):
        at.mass_on(a, torch.ones(3, 3, dtype=torch.bool))


def test_keep_ranked_by_hand_with_ties():
    x = torch.tensor([[[10.0, 20.0], [30.0, 40.0]]])  # (1, 2, 2)
    a = torch.tensor([[[-2.0, 1.0], [2.0, 0.5]]])  # |a| ranks: 0 and 2 tie, then 1, then 3
    assert at.keep_ranked(x, a, 0.25).tolist() == [[[10.0, 0.0], [0.0, 0.0]]]  # earlier wins
    assert at.keep_ranked(x, a, 0.5).tolist() == [[[10.0, 0.0], [30.0, 0.0]]]
    assert at.keep_ranked(x, a, 0.5, highest=False).tolist() == [[[0.0, 20.0], [0.0, 40.0]]]
    assert at.keep_ranked(x, a, 0.25, highest=False, fill=-1.0).tolist() == [
        [[-1.0, -1.0], [-1.0, 40.0]]
    ]
    assert at.keep_ranked(x, a, 1.0).equal(x)


def test_keep_ranked_against_a_per_example_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 5, 4, generator=g) + 1.0  # no zeros, so kept entries are visible
    a = torch.randint(-3, 4, (6, 1, 5, 4), generator=g).double()  # many ties
    for frac in (0.1, 0.35, 0.5, 0.9):
        k = round(frac * 20)
        top = at.keep_ranked(x, a, frac)
        bottom = at.keep_ranked(x, a, 1 - k / 20, highest=False)
        for i in range(6):
            rank = sorted(range(20), key=lambda j: (-abs(a[i].flatten()[j].item()), j))
            want = torch.zeros(20)
            want[rank[:k]] = x[i].flatten()[rank[:k]]
            assert top[i].flatten().equal(want)
        # the top k and the bottom d - k split every image's entries between them
        assert ((top != 0) ^ (bottom != 0)).all()
        assert (top + bottom).equal(x)


def test_keep_ranked_refuses_bad_arguments():
    x = torch.ones(2, 1, 3, 3)
    for bad in (0, 1.5, -0.1, "half"):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            at.keep_ranked(x, x, bad)
    with pytest.raises(ValueError, match="rounds to none"):
        at.keep_ranked(x, x, 0.01)
    with pytest.raises(ValueError, match="attribution must have x's shape"):
        at.keep_ranked(x, torch.ones(2, 9), 0.5)


def test_grad_cam_matches_captum_layer_grad_cam():
    from captum.attr import LayerGradCam

    model = tiny_cnn(2)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=F64)
    c = torch.tensor([0, 1, 2, 1])
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            ours = at.grad_cam(model, x, name, c, resize=False)
            theirs = LayerGradCam(model, module).attribute(x, target=c, relu_attributions=True)
            torch.testing.assert_close(ours, theirs[:, 0])


# ------------------------------------------------------------------- the edges (issue #28)


class ConvThenModuleReLU(nn.Module):
    """A convolution followed by a ReLU *module* that may act in place on its output."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_grad_cam_is_unchanged_by_an_in_place_relu_after_the_layer_and_by_freezing():
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, inplace = ConvThenModuleReLU(False), ConvThenModuleReLU(True)
    inplace.load_state_dict(plain.state_dict())
    reference = at.grad_cam(plain, x, "conv", 1)
    torch.testing.assert_close(at.grad_cam(inplace, x, "conv", 1), reference)
    inplace.requires_grad_(False)  # a pretrained net under analysis
    torch.testing.assert_close(at.grad_cam(inplace, x, "conv", 1), reference)
    assert not any(p.requires_grad for p in inplace.parameters())


def test_a_target_out_of_range_or_of_the_wrong_type_is_refused_by_name():
    model = tiny_cnn()
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    for call in (
        lambda t: at.input_gradients(model, x, t),
        lambda t: at.grad_cam(model, x, at_last_conv(model), t),
    ):
        with pytest.raises(ValueError, match=r"target must lie in \[0, 2\]"):
            call(3)
        with pytest.raises(ValueError, match="target must be integer class labels"):
            call(torch.tensor([0.0, 1.0, 2.0]))
        with pytest.raises(ValueError, match="target must be an int"):
            call(1.5)
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="x must hold finite numbers: example 1"):
        at.input_gradients(model, bad, 0)


def at_last_conv(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


def test_mass_on_aligns_a_per_example_mask_on_the_batch_even_when_n_equals_c():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 3, 4, 4, generator=gen)  # n = C = 3
    mask = torch.rand(3, 4, 4, generator=gen) < 0.5
    by_hand = torch.stack([(a[i].abs() * mask[i]).sum() / a[i].abs().sum() for i in range(3)])
    torch.testing.assert_close(at.mass_on(a, mask), by_hand)
    shared = mask[0]  # a mask without a batch dimension is shared by every example
    by_hand = torch.stack([(a[i].abs() * shared).sum() / a[i].abs().sum() for i in range(3)])
    torch.testing.assert_close(at.mass_on(a, shared), by_hand)


def test_pgd_and_adversarial_training_refuse_empty_batches_and_reversed_bounds():
    model, x, y = tiny_cnn(), torch.rand(4, 1, 8, 8, dtype=F64), torch.arange(4) % 3
    with pytest.raises(ValueError, match=r"clamp must be \(low, high\) with low < high"):
        at.pgd(model, x, y, eps=0.1, clamp=(1.0, 0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="at least one example|same number"):
        at.adversarial_step(model, opt, x[:0], y[:0], eps=0.1)
    with pytest.raises(ValueError, match="same number"):
        at.pgd(model, x, y[:2], eps=0.1)


def test_batchnorm_without_running_statistics_is_refused_as_by_every_route():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).eval()  # fmt: skip
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match="track_running_stats=False: .* input gradient"):
        at.input_gradients(net, x, 0)
    with pytest.raises(ValueError, match="track_running_stats=False: .* Grad-CAM"):
        at.grad_cam(net, x, "0", 0)
