"""Time per training step in a random subspace (:mod:`gradcourse.subspace`) against direct
training, for each projection and several d: the measurement behind the default projection of
notebook 07 (Li et al. 2018 report, on their 1M-parameter net, 2.7 ms direct, 11-18 ms dense for
d = 100-500, 4.4 ms sparse, 22 ms Fastfood flat in d).

    python benchmarks/subspace.py [--dims 100 500 1000] [--repeats 15] [--threads 1]

One step: forward and backward of the cross-entropy on a batch of 128 (random inputs and labels
of MNIST's shape) and an Adam update, on the paper's FC net 784-200-200-10 (D = 199,210). The
subspace models' steps include the projection P theta_d and its transpose in the backward pass.
Medians of ``--repeats`` steps after two warm-up steps, wall clock, in one process; ratios are
"subspace time / direct time" (> 1: slower than direct). Also printed: the numbers each
projection stores and the time to build it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gradcourse import models
from gradcourse.subspace import SubspaceModel, make_projection


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 784, generator=gen), torch.randint(10, (128,), generator=gen)
    direct = models.MLP(784, [200, 200], 10, seed=0)
    size = sum(p.numel() for p in direct.parameters())
    base = step_time(direct, x, y, args.repeats)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); FC 784-200-200-10, D = {size:,}"
    )
    print(f"direct training: {1e3 * base:.2f} ms per step")
    print(
        f"{'projection':>10} {'d':>6} {'ms/step':>9} {'x direct':>9} {'stored':>12} {'build s':>8}"
    )
    for kind in ("dense", "sparse", "fastfood"):
        for d in args.dims:
            start = time.perf_counter()
            projection = make_projection(kind, size, d, seed=0)
            built = time.perf_counter() - start
            sub = SubspaceModel(models.MLP(784, [200, 200], 10, seed=0), projection)
            t = step_time(sub, x, y, args.repeats)
            print(
                f"{kind:>10} {d:>6} {1e3 * t:9.2f} {t / base:9.2f} "
                f"{projection.stored_numbers():>12,} {built:8.2f}"
            )


if __name__ == "__main__":
    main()
