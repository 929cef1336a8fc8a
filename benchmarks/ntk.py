"""Benchmark the two empirical-NTK methods of gradcourse.ntk against a per-example loop.

    python benchmarks/ntk.py [--device cpu] [--repeats 3] [--sizes 32 128 256]

Four ways to get the full (N, N, O, O) empirical NTK of the same model on the same inputs,
float32, in one process:

- ``loop``: the baseline a user would write first: for each example and each output, one
  ``torch.autograd.grad`` call gives a row of the Jacobian J (N O rows of length P), then
  Theta = J J^T in one matrix product;
- ``jacobian``: ``gradcourse.ntk.empirical_ntk(method="jacobian")``, Jacobian contraction
  (``vmap(jacrev)`` + one matrix product), cost ~ N·O·[FP] + N²·O²·P;
- ``ntk_vp``: ``method="ntk_vp"``, NTK-vector products (vjp then jvp), cost ~ N²·O·[FP];
- ``layerwise``: ``method="layerwise"``, per-layer Gram factorisation: a dense layer's Jacobian
  rows are outer products g ⊗ a, so its part of the kernel is (a.a')(g.g'), cost
  ~ N·O·[FP] + N²·sum_l (in_l + O²·out_l); the CNN's convolutions go through Jacobian
  contraction, its dense head through the factorisation.

Models, on MNIST-1D-sized inputs (n, 40): the MLP of the course in the NTK parameterisation
(40 -> 64 -> 64 -> 10, P = 7.4k), the same with a scalar output (Jacot et al.'s setting), and
a 1-D SmallCNN (P = 10.5k). Each timing is the median of
``--repeats`` runs after one warm-up; every method's kernel is checked against the loop's.
Ratios (loop time / method time) are what to read; absolute times depend on the machine and on
whatever else it is doing. The library's ``method="auto"`` follows what this table shows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradcourse import ntk as N
from gradcourse.models import MLP, SmallCNN, count_params


def loop_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """Per-example, per-output loop of autograd gradients -> J (N O, P) -> J J^T."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], params, retain_graph=o < out.shape[0] - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows)  # (N O, P)
    n, o = x.shape[0], jac.shape[0] // x.shape[0]
    return (jac @ jac.T).reshape(n, o, n, o).permute(0, 2, 1, 3)


def median_time(
    fn: Callable[[], Tensor], repeats: int, sync: Callable[[], None]
) -> tuple[float, Tensor]:
    out = fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: stable timings on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    models = {
        "MLP": (
            MLP(40, [64, 64], 10, parameterization="ntk", seed=args.seed, device=device),
            (40,),
        ),
        "MLP-scalar": (
            MLP(40, [64, 64], 1, parameterization="ntk", seed=args.seed, device=device),
            (40,),
        ),
        "SmallCNN-1d": (
            SmallCNN(
                1, 10, conv_dim=1, channels=(16, 32), hidden=64, seed=args.seed, device=device
            ),
            (40,),
        ),
    }
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"median of {args.repeats}",
        flush=True,
    )
    header = f"{'model':12s} {'P':>7s} {'N':>5s} {'method':>9s} {'time [s]':>10s} {'loop/this':>10s} {'max rel err':>12s}"
    print(header)
    print("-" * len(header))
    winners = []
    for name, (model, shape) in models.items():
        p = count_params(model)
        for n in args.sizes:
            x = torch.randn(n, *shape, generator=gen).to(device)
            t_loop, ref = median_time(lambda m=model, x=x: loop_ntk(m, x), args.repeats, sync)
            if ref.shape[-1] == 1:  # scalar outputs: the library returns (N, N)
                ref = ref[..., 0, 0]
            scale = ref.abs().max()
            print(
                f"{name:12s} {p:7d} {n:5d} {'loop':>9s} {t_loop:10.4f} {1.0:10.2f} {'-':>12s}",
                flush=True,
            )
            best = ("loop", t_loop)
            for method in ("jacobian", "ntk_vp", "layerwise"):
                t, out = median_time(
                    lambda m=model, x=x, meth=method: N.empirical_ntk(m, x, method=meth),
                    args.repeats,
                    sync,
                )
                err = float((out - ref).abs().max() / scale)
                print(
                    f"{name:12s} {p:7d} {n:5d} {method:>9s} {t:10.4f} {t_loop / t:10.2f} {err:12.2e}",
                    flush=True,
                )
                if t < best[1]:
                    best = (method, t)
            fn = N.empirical_ntk_fn(model)
            fn(x)
            winners.append((name, n, best[0], fn.last_method))
    print()
    print(f"NTK_VP_OVERHEAD = {N.NTK_VP_OVERHEAD}")
    for name, n, method, auto in winners:
        print(f"{name:12s} N={n:4d}: fastest {method:9s} method='auto' picks {auto}")


if __name__ == "__main__":
    main()
