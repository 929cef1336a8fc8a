"""Benchmark one DP-SGD step's clipped sum, sum_i clip(g_i, C), in gradcourse.privacy against
Opacus's GradSampleModule, a per-sample loop, and one batch gradient (reference), on the same
model and batch.

    python benchmarks/dpsgd.py [--batch 256] [--repeats 7] [--threads 1] [--clip 1.0] [--model mlp|cnn]

Model: MLP 784-256-256-10 (gradcourse.models.MLP), or with ``--model cnn`` SmallCNN(1, 10,
conv_dim=2) on 28x28 images; float32, cross-entropy, MNIST-sized inputs.
``gradcourse.privacy.clipped_sum`` never forms the per-example gradients: their norms
(``pergrad``'s linear trick), then each layer's gradient of the reweighted loss from the same
layer inputs and output gradients ("book-keeping": one backward pass in all);
the row "vmap + clip" forms them all, as Opacus does. Each method returns the clipped
(noiseless) sum as one flat vector; the table gives the median
wall time of ``--repeats`` calls after one warm-up, the ratio to the loop and to Opacus, and the
largest relative difference to the loop's vector (the sums must agree: same clipping, no noise).
Opacus is a dependency of the course (its accountant); its ``GradSampleModule`` forms the
per-sample gradients from module hooks, and its ghost clipping
(``GradSampleModuleFastGradientClipping``, the row "opacus ghost clipping") takes their norms
from the hooks without forming them, then backpropagates the reweighted loss (a second
backward pass, which ours does not take)
(its coefficients are C / (norm + 1e-6), ours C / norm: the sums differ by about 1e-6).
Timings come from one run on whatever else the machine is doing: read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradcourse import privacy
from gradcourse.models import MLP, SmallCNN

warnings.filterwarnings("ignore", message=".*Full backward hook.*")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")


def ours(model: nn.Module, x: Tensor, y: Tensor, c: float) -> Tensor:
    return privacy.clipped_sum(model, "ce", x, y, c)


def ours_materialised(model: nn.Module, x: Tensor, y: Tensor, c: float) -> Tensor:
    return privacy.clip(privacy._flat_grads(model, "ce", x, y), c).sum(0)


def loop(model: nn.Module, x: Tensor, y: Tensor, c: float) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params))
    for i in range(len(x)):
        g = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params
        )
        flat = torch.cat([t.flatten() for t in g])
        total += flat * min(1.0, c / float(flat.norm()))
    return total


def make_opacus(model: nn.Module) -> Callable[[nn.Module, Tensor, Tensor, float], Tensor]:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(copy.deepcopy(model))

    def run(_: nn.Module, x: Tensor, y: Tensor, c: float) -> Tensor:
        wrapped.zero_grad(set_to_none=True)
        for p in wrapped.parameters():
            p.grad_sample = None
        nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
        per = torch.cat([p.grad_sample.reshape(len(x), -1) for p in wrapped.parameters()], dim=1)
        norms = per.norm(dim=1, keepdim=True)
        return (per * (c / norms).clamp(max=1.0)).sum(0)

    return run


def make_opacus_ghost(
    model: nn.Module, c: float
) -> Callable[[nn.Module, Tensor, Tensor, float], Tensor]:
    """Opacus's ghost clipping (``GradSampleModuleFastGradientClipping``), the two backward
    passes its ``DPLossFastGradientClipping.backward`` runs: per-sample norms from the hooks,
    then the loss reweighted by the clipping coefficients with the hooks off."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model).train(), max_grad_norm=c, use_ghost_clipping=True, loss_reduction="sum"
    )
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def run(_: nn.Module, x: Tensor, y: Tensor, c_: float) -> Tensor:
        assert c_ == c, "the clipping threshold is fixed when the module is wrapped"
        wrapped.zero_grad(set_to_none=True)
        per_sample = nn.functional.cross_entropy(wrapped(x), y, reduction="none")
        per_sample.sum().backward(retain_graph=True)
        wrapped.zero_grad(set_to_none=True)
        coef = wrapped.get_clipping_coef()
        wrapped.disable_hooks()
        (coef * per_sample).sum().backward()
        wrapped.enable_hooks()
        return torch.cat([p.grad.flatten() for p in params])

    return run


def batch_gradient(model: nn.Module, x: Tensor, y: Tensor, c: float) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y, reduction="sum"), params)
    return torch.cat([t.flatten() for t in g])


def median_time(fn: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: MLP 784-256-256-10; cnn: SmallCNN 2-D on 28x28 images",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}")
    gen = torch.Generator().manual_seed(0)
    if args.model == "mlp":
        x = torch.randn(args.batch, 784, generator=gen)
        model = MLP(784, (256, 256), 10, seed=0)
    else:
        x = torch.randn(args.batch, 1, 28, 28, generator=gen)
        model = SmallCNN(1, 10, conv_dim=2, seed=0)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    print(
        f"model {args.model}: {type(model).__name__}, P = {sum(p.numel() for p in model.parameters())}"
    )
    methods: dict[str, Callable[[nn.Module, Tensor, Tensor, float], Tensor]] = {
        "per-sample loop": loop,
        "gradcourse.privacy": ours,
        "vmap + clip (materialised)": ours_materialised,
    }
    try:
        methods["opacus GradSampleModule"] = make_opacus(model)
    except Exception as err:  # reported, never fatal
        print(f"opacus: not available ({type(err).__name__}: {err})")
    try:
        methods["opacus ghost clipping"] = make_opacus_ghost(model, args.clip)
    except Exception as err:  # reported, never fatal
        print(f"opacus ghost clipping: not available ({type(err).__name__}: {err})")
    methods["batch gradient (reference)"] = batch_gradient
    results = {
        name: median_time(lambda f=f: f(model, x, y, args.clip), args.repeats)
        for name, f in methods.items()
    }
    t_loop, ref = results["per-sample loop"]
    t_peer = results.get("opacus GradSampleModule", (None, None))[0]
    print(f"{'method':<28} {'ms':>9} {'vs loop':>8} {'vs opacus':>10} {'rel. diff':>10}")
    for name, (t, out) in results.items():
        vs_peer = f"{t_peer / t:>9.2f}x" if t_peer else f"{'-':>10}"
        diff = "" if "reference" in name else f"{float((out - ref).norm() / ref.norm()):>10.1e}"
        print(f"{name:<28} {1e3 * t:>9.2f} {t_loop / t:>7.1f}x {vs_peer} {diff}")


if __name__ == "__main__":
    main()
