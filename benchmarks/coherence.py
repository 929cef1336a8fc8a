"""Time of the coherence of a batch (notebook 10) against materialising the per-example gradients.

    python benchmarks/coherence.py [--batch 500] [--repeats 11] [--threads 1]

``gc.coherence.coherence`` takes sum_i ||g_i||^2 from the linear trick (one batched backward
pass through the layers' outputs) and sum_i g_i from one batch gradient; the baselines
materialise every g_i, by plain ``torch.func`` ``vmap(grad)`` (the route a user would write) and
by a per-sample loop, and sum them. One batch gradient is timed as the unit. Models: notebook
10's MLP 784-256-256-10 and a wider 784-1024-1024-10. Medians of ``--repeats`` runs after one
warm-up, wall clock; ratios are "baseline / ours" (> 1: ours is faster). The two routes' ratios
are also printed, to check that they compute the same number.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call, grad, vmap

from gradcourse import coherence as co
from gradcourse import models


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def vmap_ratio(model, x, y) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(len(x), -1) for v in g.values()], dim=1)
    return float(flat.sum(0).pow(2).sum() / flat.pow(2).sum())


def loop_ratio(model, x, y) -> float:
    total, sq = None, 0.0
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        total = g.clone() if total is None else total + g
        sq += float(g.pow(2).sum())
    return float(total.pow(2).sum()) / sq


def batch_grad(model, x, y) -> None:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 784, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    for widths in ((256, 256), (1024, 1024)):
        model = models.MLP(784, list(widths), 10, seed=0)
        t_ours, c = timed(lambda model=model: co.coherence(model, "ce", x, y), args.repeats)
        t_vmap, r_vmap = timed(lambda model=model: vmap_ratio(model, x, y), args.repeats)
        t_loop, r_loop = timed(
            lambda model=model: loop_ratio(model, x, y), max(1, args.repeats // 4)
        )
        t_grad, _ = timed(lambda model=model: batch_grad(model, x, y), args.repeats)
        print(
            f"MLP 784-{widths[0]}-{widths[1]}-10: ours {1e3 * t_ours:.1f} ms "
            f"({t_ours / t_grad:.1f} batch gradients); vmap(grad) {1e3 * t_vmap:.1f} ms "
            f"({t_vmap / t_ours:.1f}x ours); per-sample loop {1e3 * t_loop:.1f} ms "
            f"({t_loop / t_ours:.1f}x ours); ratios {c.ratio:.6f} / {r_vmap:.6f} / {r_loop:.6f}"
        )


if __name__ == "__main__":
    main()
