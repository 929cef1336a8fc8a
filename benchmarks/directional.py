"""Time of the directional sharpness of several updates (notebook 09) against plain torch.func.

    python benchmarks/directional.py [--repeats 7] [--threads 1]

At one point of notebook 09's transformer (its ``cpu`` profile: 137k parameters, a batch of
32 windows of 64 bytes), S(u) = u^T H u / ||u||^2 for the 7 directions of
``gc.directional.PseudoUpdates``. Routes:

- ours: ``gc.directional.directional_sharpnesses``: one graph of the gradient (double backward
  through the module, attention under the math kernel), one more backward per direction;
- ``torch.func``: ``jvp(grad(loss))`` per direction, forward-over-reverse, the route a user of
  ``torch.func`` writes (also under the math kernel, without which it raises);
- ``torch.func`` batched: the same ``jvp`` under ``vmap`` over the 7 directions at once;
- ours, one call per direction: ``directional_sharpness`` 7 times (the graph rebuilt each time).

One gradient (forward and backward) is the unit. Medians of ``--repeats`` runs after one warm-up,
wall clock; ratios are "baseline / ours" (> 1: ours is faster). The largest relative difference
between the routes' values is printed to show they compute the same numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call, grad, jvp, vmap

from gradcourse import directional as dr
from gradcourse.experiments import adam_sgd as ax
from gradcourse.functional import math_attention


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = ax.config()  # notebook 09's cpu profile: the defaults
    model = ax.make_model(cfg, seed=1)
    stream = ax.batches(cfg, 1)
    pseudo = dr.PseudoUpdates(seed=1)
    params = list(model.parameters())
    for _ in range(5):
        x, y = next(stream)
        model.zero_grad()
        ax.loss_of(cfg)(model(x), y).backward()
        pseudo.update([p.grad for p in params])
    dirs = pseudo.directions()
    loss = ax.loss_of(cfg)
    names = dict(model.named_parameters())
    theta = {k: v.detach() for k, v in names.items()}
    sizes = [v.numel() for v in theta.values()]

    def unflat(v):
        return {k: c.view_as(theta[k]) for k, c in zip(theta, v.split(sizes), strict=True)}

    def f(p):
        return loss(functional_call(model, p, (x,)), y)

    def gradient():
        model.zero_grad()
        loss(model(x), y).backward()

    def ours():
        return dr.directional_sharpnesses(model, loss, x, y, dirs)

    def per_call():
        return {k: dr.directional_sharpness(model, loss, x, y, u) for k, u in dirs.items()}

    def func_loop():
        out = {}
        with math_attention():
            for k, u in dirs.items():
                hv = jvp(grad(f), (theta,), (unflat(u),))[1]
                flat = torch.cat([hv[n].reshape(-1) for n in theta])
                out[k] = float(flat @ u / (u @ u))
        return out

    def func_vmap():
        stack = torch.stack(list(dirs.values()))
        with math_attention():

            def hvp(u):
                hv = jvp(grad(f), (theta,), (unflat(u),))[1]
                return torch.cat([hv[n].reshape(-1) for n in theta])

            hv = vmap(hvp)(stack)
        s = (hv * stack).sum(1) / (stack * stack).sum(1)
        return dict(zip(dirs, s.tolist(), strict=True))

    t_grad, _ = timed(gradient, args.repeats)
    t_ours, s_ours = timed(ours, args.repeats)
    print(
        f"transformer, {sum(sizes):,} parameters, batch {tuple(x.shape)}, {args.threads} thread(s)"
    )
    print(f"one gradient: {1e3 * t_grad:.1f} ms")
    print(f"ours, 7 directions: {1e3 * t_ours:.0f} ms ({t_ours / t_grad:.1f} gradients)")
    for label, fn in (
        ("torch.func jvp(grad), loop", func_loop),
        ("torch.func jvp(grad), vmap", func_vmap),
        ("ours, one call per direction", per_call),
    ):
        t, s = timed(fn, args.repeats)
        diff = max(abs(s[k] - s_ours[k]) / abs(s_ours[k]) for k in s_ours)
        print(
            f"{label}: {1e3 * t:.0f} ms ({t / t_grad:.1f} gradients); ratio {t / t_ours:.2f}; largest relative difference {diff:.1e}"
        )


if __name__ == "__main__":
    main()
