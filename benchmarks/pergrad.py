"""Benchmark gradcourse.pergrad's per-example gradient norms against a per-sample loop,
BackPACK's ``BatchL2Grad`` and Opacus's ``GradSampleModule``, on the same model and batch.

    python benchmarks/pergrad.py [--batch 128] [--repeats 7] [--device cpu] [--threads 1]
        [--clock cpu]

Needs ``backpack-for-pytorch`` next to gradcourse (a missing peer, or one that fails on the
installed torch, is reported and skipped); Opacus is a dependency of the course. Models,
float32, cross-entropy, eval mode:

- mlp:    MLP 784-512-512-10 (gradcourse.models.MLP, P ~ 670k) on MNIST-sized inputs;
- cnn2d:  SmallCNN(1, 10, conv_dim=2) on 28x28 images;
- cnn2d 3x32x32: SmallCNN(3, 10, channels=(16, 32), conv_dim=2) on CIFAR-sized images;
- cnn1d:  SmallCNN(1, 10, conv_dim=1) on MNIST-1D-sized signals (length 40).
- with ``--extra``, convolutions of other shapes (``conv_shapes``): wide channels on 4x4 inputs,
  stride and dilation, a 1-D net with large kernels, a VGG-like block.

Opacus, each mode on its own copy of the model (in train mode: Opacus's hooks skip modules in
eval mode; these models have no dropout or BatchNorm, so the function is the same), loss summed
so that the i-th per-sample gradient is that of l_i:

- ``Opacus hooks``: ``GradSampleModule`` (its default), per-layer per-sample gradients from
  module hooks (``grad_sample``), then the norms;
- ``Opacus functorch``: the same with ``force_functorch=True`` (``vmap`` per layer);
- ``Opacus ew``: ``GradSampleModuleExpandedWeights`` (torch's ExpandedWeights);
- ``Opacus ghost``: ``GradSampleModuleFastGradientClipping`` (ghost clipping), which gives the
  norms themselves (``get_norm_sample``) without per-sample gradients of its linear layers
  (convolutions: per-layer per-sample gradients, then their norms).

Each method computes ||grad_w l_i||_2 for the whole batch; the table gives the median wall time
of ``--repeats`` calls (after one warm-up call), its ratio to the loop and to BackPACK, and the
largest relative error against the loop. The row ``batch gradient`` is not a method but a reference:
one forward and one backward pass of the whole batch (the mean loss's gradient, what one
training step costs). A per-example method must run the forward pass and the backward pass to
every layer's output, most of that work (the linear trick skips the batch's weight gradients,
so it can come in slightly under it, as for the MLP), so loop / batch gradient is about the
most any per-example method can gain over the loop on that machine. On one CPU thread a
convolution costs the same flops batched or not, and that ceiling is only a few x. Timings are from one run on whatever else the machine
is doing: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradcourse import pergrad
from gradcourse.models import MLP, SmallCNN

try:
    import backpack
    from backpack.extensions import BatchL2Grad

    PEER = "backpack-for-pytorch: imported"
except Exception as err:  # reported in the output, never fatal
    backpack = None
    PEER = f"backpack-for-pytorch: not available ({type(err).__name__}: {err})"

try:
    import opacus
    from opacus.grad_sample import (
        GradSampleModule,
        GradSampleModuleExpandedWeights,
        GradSampleModuleFastGradientClipping,
    )

    OPACUS = f"opacus {opacus.__version__}"
except Exception as err:  # reported in the output, never fatal
    opacus = None
    OPACUS = f"opacus: not available ({type(err).__name__}: {err})"

FAILURES: list[str] = []
# BackPACK's module hooks make torch warn on every backward pass; the warnings say nothing here.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Extension saving to batch_l2 does not have")


def clock(kind: str) -> Callable[[], float]:
    """``wall``: time.perf_counter; ``cpu``: this process's CPU time (all threads), which other
    jobs on a shared machine do not inflate (use it with --threads 1)."""
    return time.perf_counter if kind == "wall" else time.process_time


def timed_all(
    name: str, methods: dict[str, Callable[[], Tensor]], repeats: int, now: Callable[[], float]
) -> dict[str, tuple[float, Tensor]]:
    """Median time of ``repeats`` calls of each method, after one warm-up call each. The repeats
    are interleaved (each round runs every method once, in a shuffled order), so a burst of load on a shared machine hits
    every method alike. A method that raises is recorded in FAILURES and dropped."""
    results: dict[str, Tensor] = {}
    times: dict[str, list[float]] = {}
    for label, fn in methods.items():
        try:
            results[label] = fn()
            times[label] = []
        except Exception as err:
            last = traceback.extract_tb(err.__traceback__)[-1]
            FAILURES.append(f"{name} / {label}: {type(err).__name__}: {err} (line {last.lineno})")
    order = list(times)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)  # no method always runs right after the memory-hungry vmap of the MLP
        for label in order:
            start = now()
            results[label] = methods[label]()
            if results[label].is_cuda:
                torch.cuda.synchronize()
            times[label].append(now() - start)
    return {label: (statistics.median(ts), results[label]) for label, ts in times.items()}


def loop_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The per-sample loop: one forward and one backward pass per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(out)


def func_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Plain ``torch.func``, as a user would write it: ``vmap`` of ``grad`` over the examples
    (all parameters, the buffers passed along), then the norms."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


def batch_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The floor: one forward and one backward pass of the whole batch (mean loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    return torch.sqrt(sum(g.pow(2).sum() for g in grads)).expand(len(x))


def backpack_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """BackPACK's BatchL2Grad: ||grad of the i-th term of the loss||^2 per parameter, summed.

    With reduction="sum" the i-th term is l_i itself (with "mean" it would be l_i / n)."""
    loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    model.zero_grad(set_to_none=True)
    with backpack.backpack(BatchL2Grad()):
        loss_fn(model(x), y).backward()
    sq = sum(p.batch_l2 for p in model.parameters())
    for p in model.parameters():
        p.grad = None
        del p.batch_l2
    return sq.sqrt()


def make_opacus(model: nn.Module, mode: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-example gradient norms from Opacus, ``mode`` one of hooks, functorch, ew, ghost."""
    copy_ = copy.deepcopy(model).train()  # Opacus's hooks skip modules in eval mode
    if mode == "ghost":
        wrapped = GradSampleModuleFastGradientClipping(copy_, loss_reduction="sum")
    elif mode == "ew":
        wrapped = GradSampleModuleExpandedWeights(copy_, loss_reduction="sum")
    else:
        wrapped = GradSampleModule(copy_, loss_reduction="sum", force_functorch=mode == "functorch")
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def run(x: Tensor, y: Tensor) -> Tensor:
        wrapped.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
        if mode == "ghost":
            norms = wrapped.get_norm_sample()
        else:
            norms = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in params))
        for p in params:
            p.grad = None
            p.grad_sample = None
        return norms

    return run


def problems(batch: int, device: str) -> dict[str, tuple[nn.Module, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "mlp 784-512-512-10": (
            MLP(784, [512, 512], 10, seed=0, device=device),
            torch.randn(batch, 784, generator=g).to(device),
        ),
        "SmallCNN 2d 28x28": (
            SmallCNN(1, 10, conv_dim=2, seed=0, device=device),
            torch.randn(batch, 1, 28, 28, generator=g).to(device),
        ),
        "SmallCNN 2d 3x32x32": (  # the CNN of the library review: conv 3->16->32, CIFAR-sized
            SmallCNN(3, 10, channels=(16, 32), conv_dim=2, seed=0, device=device),
            torch.randn(batch, 3, 32, 32, generator=g).to(device),
        ),
        "SmallCNN 1d L=40": (
            SmallCNN(1, 10, conv_dim=1, seed=0, device=device),
            torch.randn(batch, 1, 40, generator=g).to(device),
        ),
    }


def conv_shapes(batch: int, device: str) -> dict[str, tuple[nn.Module, Tensor]]:
    """Convolutions of other shapes (``--extra``), for the linear trick's two conv routes:
    wide channels on 4x4 inputs (few positions: the Gram route), stride and dilation, a 1-D
    net with large kernels, and a VGG-like block (many positions: the grouped weight
    gradient)."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    shapes = {
        "wide 64-256-256 4x4": (
            nn.Sequential(nn.Conv2d(64, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3),
                          nn.Flatten(), nn.LazyLinear(10)),
            (64, 4, 4),
        ),
        "strided, dilated": (
            nn.Sequential(nn.Conv2d(3, 32, 5, stride=2, dilation=2, padding=2), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, stride=2), nn.Flatten(), nn.LazyLinear(10)),
            (3, 64, 64),
        ),
        "1-D, kernels 15, 9": (
            nn.Sequential(nn.Conv1d(4, 64, 15, padding=7), nn.ReLU(), nn.Conv1d(64, 64, 9, stride=3),
                          nn.Flatten(), nn.LazyLinear(10)),
            (4, 200),
        ),
        "VGG-like 3-64-128": (
            nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.LazyLinear(10)),
            (3, 32, 32),
        ),
    }  # fmt: skip
    out = {}
    for name, (model, shape) in shapes.items():
        x = torch.randn(batch, *shape, generator=g)
        model(x[:1])  # materialise the lazy head
        out[name] = (model.to(device), x.to(device))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--extra", action="store_true", help="also convolutions of other shapes (conv_shapes)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU time: use it with --device cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(PEER)
    print(OPACUS)
    print(
        f"batch {args.batch}, float32, cross-entropy, {args.clock} clock, median of "
        f"{args.repeats} interleaved repeats\n"
    )

    header = (
        f"{'model':<20} {'method':<16} {'time [ms]':>10} {'vs loop':>9} {'vs BackPACK':>12} "
        f"{'vs Opacus':>10} {'max rel err':>12}"
    )
    print(header)
    print("-" * len(header))
    cases = problems(args.batch, args.device)
    if args.extra:
        cases.update(conv_shapes(args.batch, args.device))
    for name, (model, x) in cases.items():
        model.eval()
        y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
        y = y.to(args.device)
        methods: dict[str, Callable[[], Tensor]] = {
            "loop": lambda m=model, x=x, y=y: loop_norms(m, x, y),
            "vmap": lambda m=model, x=x, y=y: pergrad.per_example_grad_norms(
                m, "ce", x, y, method="vmap", chunk_size=len(x)
            ),
            "linear_trick": lambda m=model, x=x, y=y: pergrad.per_example_grad_norms(
                m, "ce", x, y, method="linear_trick"
            ),
            "auto (default)": lambda m=model, x=x, y=y: pergrad.per_example_grad_norms(
                m, "ce", x, y
            ),
            "torch.func": lambda m=model, x=x, y=y: func_norms(m, x, y),
            "batch gradient": lambda m=model, x=x, y=y: batch_gradient(m, x, y),
        }
        if backpack is not None:
            try:
                peer_model = backpack.extend(copy.deepcopy(model))  # its own hooks
                methods["BackPACK"] = lambda m=peer_model, x=x, y=y: backpack_norms(m, x, y)
            except Exception as err:
                FAILURES.append(f"{name}: backpack.extend: {type(err).__name__}: {err}")
        if opacus is not None:
            for mode in ("hooks", "functorch", "ew", "ghost"):
                try:
                    run = make_opacus(model, mode)
                    methods[f"Opacus {mode}"] = lambda run=run, x=x, y=y: run(x, y)
                except Exception as err:
                    FAILURES.append(f"{name}: Opacus {mode}: {type(err).__name__}: {err}")
        results = timed_all(name, methods, args.repeats, clock(args.clock))
        t_loop, ref = results["loop"]
        t_peer = results["BackPACK"][0] if "BackPACK" in results else None
        t_opacus = results["Opacus hooks"][0] if "Opacus hooks" in results else None
        for label, (t, norms) in results.items():
            err = f"{((norms - ref).abs() / ref).max().item():>12.1e}"
            if label == "batch gradient":  # not per-example: no error to report
                err = f"{'(floor)':>12}"
            vs_peer = f"{t_peer / t:>11.2f}x" if t_peer else f"{'-':>12}"
            vs_opacus = f"{t_opacus / t:>9.2f}x" if t_opacus else f"{'-':>10}"
            print(
                f"{name:<20} {label:<16} {1e3 * t:>10.2f} {t_loop / t:>8.1f}x {vs_peer} "
                f"{vs_opacus} {err}"
            )
        if "auto (default)" in results:  # the parity summary: peer time / auto time
            t_auto, auto = results["auto (default)"]
            parts = [
                f"{results[lab][0] / t_auto:.2f}x {lab}"
                for lab in ("torch.func", "BackPACK", "Opacus hooks")
                if lab in results
            ]
            best = min(
                (lab for lab in results if lab.startswith("Opacus")),
                key=lambda lab: results[lab][0],
                default=None,
            )
            if best is not None:
                norms = results[best][1]
                agree = ((norms - auto).abs() / auto).max().item()
                parts.append(
                    f"{results[best][0] / t_auto:.2f}x the fastest Opacus mode ({best}, norms "
                    f"{agree:.1e} relative from auto's)"
                )
            print(f"{name:<20} auto (>1: faster): " + ", ".join(parts))
        print()
    print(
        "vs loop / vs BackPACK / vs Opacus: how many times faster than the loop / than BackPACK /"
        " than Opacus's default GradSampleModule (hooks) (>1: faster)."
        "\nbatch gradient: one forward + backward of the batch (a training step), a reference, not a "
        "method: its 'vs loop' is about the most batching can gain here."
    )
    if FAILURES:
        print("\nFailures:")
        for line in FAILURES:
            print("  " + line)


if __name__ == "__main__":
    main()
