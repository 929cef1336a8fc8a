"""Time of one optimiser step of :mod:`gradcourse.optim` against the authors' ``adamp`` package
and ``torch.optim`` (notebook 08's optimisers).

    python benchmarks/optim.py [--model mlp|resnet18] [--repeats 21] [--threads 1]

One step is ``optimizer.step()`` alone, on the gradients of one batch computed once (random
inputs and labels, seeded; the scale-invariant weights' gradients are then orthogonal to them,
so AdamP's test passes and the projection runs, as in training), so the forward and backward
passes, the same for every optimiser, are not timed. Models: an MLP
784-1024-1024-10 whose hidden layers are bias-free and followed by BatchNorm (2.9M parameters,
two of its three weight matrices scale-invariant), or ResNet-18 for CIFAR-10
(``gradcourse.models.resnet18``, 11.2M parameters, every convolution scale-invariant). Medians
of ``--repeats`` steps after two warm-up steps, wall clock; ratios are "ours / theirs" (> 1:
ours is slower). ``torch.optim``'s SGD and Adam use their default (``foreach``) kernels and do
no projection: the price of the projection itself.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradcourse import models
from gradcourse import optim as go


def make_model(name: str) -> nn.Module:
    if name == "resnet18":
        return models.resnet18(num_classes=10, seed=0)
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 1024, bias=False),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 1024, bias=False),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def step_time(model: nn.Module, make_opt, repeats: int, name: str) -> float:
    gen = torch.Generator().manual_seed(1)
    shape = (64, 3, 32, 32) if name == "resnet18" else (64, 784)
    x, y = torch.randn(*shape, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    torch.nn.functional.cross_entropy(model(x), y).backward()  # real gradients: orthogonal to
    opt = make_opt(model.parameters())  # the scale-invariant weights, which are then projected
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "resnet18"], default="mlp")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import adamp

    model = make_model(args.model)
    size = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.model}, {size:,} parameters"
    )
    rows = [
        ("SGDP", lambda p: go.SGDP(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
         "adamp.SGDP", lambda p: adamp.SGDP(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
         "torch SGD", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)),
        ("AdamP", lambda p: go.AdamP(p, lr=1e-3, weight_decay=1e-2),
         "adamp.AdamP", lambda p: adamp.AdamP(p, lr=1e-3, weight_decay=1e-2),
         "torch AdamW", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2)),
        ("DiffGrad", lambda p: go.DiffGrad(p, lr=1e-3),
         "-", None,
         "torch Adam", lambda p: torch.optim.Adam(p, lr=1e-3)),
    ]  # fmt: skip
    print(
        f"{'ours':>9} {'ms':>7} | {'peer':>12} {'ms':>7} {'ratio':>6} | {'torch.optim':>12} {'ms':>7} {'ratio':>6}"
    )
    for name, ours, peer_name, peer, base_name, base in rows:
        t_ours = step_time(make_model(args.model), ours, args.repeats, args.model)
        t_base = step_time(make_model(args.model), base, args.repeats, args.model)
        if peer is not None:
            t_peer = step_time(make_model(args.model), peer, args.repeats, args.model)
            peer_cols = f"{peer_name:>12} {1e3 * t_peer:7.2f} {t_ours / t_peer:6.2f}"
        else:
            peer_cols = f"{peer_name:>12} {'':>7} {'':>6}"
        print(
            f"{name:>9} {1e3 * t_ours:7.2f} | {peer_cols} | {base_name:>12} "
            f"{1e3 * t_base:7.2f} {t_ours / t_base:6.2f}"
        )


if __name__ == "__main__":
    main()
