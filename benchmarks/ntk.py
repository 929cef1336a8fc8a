"""Benchmark the two empirical-NTK methods of gradcourse.ntk against a per-example loop.

    python benchmarks/ntk.py [--device cpu] [--repeats 3] [--sizes 32 128 256] [--clock cpu]
        [--jax-path DIR] [--no-jax]

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

The peer, in the same run: neural-tangents' ``empirical_ntk_fn`` (jit-compiled, its default
implementation and its structured derivatives) on the two MLPs, with the torch weights copied
in, run by ``benchmarks/ntk_neural_tangents.py`` in a subprocess whose PYTHONPATH starts with
``--jax-path`` (neural-tangents 0.6.5 needs jax 0.4.23 and numpy < 2, which must not shadow the
torch side's numpy). Its kernels are checked against the loop's like ours; its first (compiling)
call is reported apart. Without jax or neural-tangents the rows are skipped, with the reason.
With ``--threads 1`` the subprocess gets ``XLA_FLAGS`` for one intra-op thread. ``--clock cpu``
times both sides in process CPU time (all threads), which other jobs on a shared machine do not
inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
    fn: Callable[[], Tensor],
    repeats: int,
    sync: Callable[[], None],
    now: Callable[[], float] = time.perf_counter,
) -> tuple[float, Tensor]:
    out = fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = now()
        out = fn()
        sync()
        times.append(now() - start)
    return statistics.median(times), out


def neural_tangents_rows(
    cases: list[tuple[str, MLP, Tensor]], args: argparse.Namespace
) -> tuple[dict, dict[str, Tensor]]:
    """Run benchmarks/ntk_neural_tangents.py in a subprocess on the MLPs' weights and inputs;
    returns its report (versions, per-row times, or why it was skipped) and its kernels."""
    import numpy as np

    meta = {"clock": args.clock, "repeats": args.repeats, "cases": []}
    arrays = {}
    for key, model, x in cases:
        linears = list(model.layers)
        meta["cases"].append(
            {
                "key": key,
                "dims": [model.in_dim, *model.widths, model.out_dim],
                "weight_scale": linears[0].weight_scale,
                "bias_scale": linears[0].bias_scale,
            }
        )
        for i, layer in enumerate(linears):
            arrays[f"{key}/W{i}"] = layer.weight.detach().cpu().numpy()
            arrays[f"{key}/b{i}"] = layer.bias.detach().cpu().numpy()
        arrays[f"{key}/x"] = x.detach().cpu().numpy()
    env = dict(os.environ)
    if args.jax_path:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (args.jax_path, env.get("PYTHONPATH", "")) if p
        )
    if args.threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ntk_neural_tangents.py")
    with tempfile.TemporaryDirectory() as tmp:
        path_in, path_out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(path_in, meta=np.array(json.dumps(meta)), **arrays)
        proc = subprocess.run(
            [sys.executable, worker, path_in, path_out], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0 or not os.path.exists(path_out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"skipped": f"subprocess exited {proc.returncode}: {' | '.join(tail)}"}, {}
        with np.load(path_out) as out:
            report = json.loads(str(out["report"]))
            kernels = {k: torch.from_numpy(out[k]) for k in out.files if k != "report"}
    return report, kernels


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
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: process CPU time, all threads (use with --threads 1)",
    )
    parser.add_argument(
        "--jax-path",
        default=None,
        help="directory with jax, jaxlib and neural-tangents, put first on the PYTHONPATH of the "
        "neural-tangents subprocess only",
    )
    parser.add_argument("--no-jax", action="store_true", help="skip the neural-tangents rows")
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU time: use it with --device cpu")
    now = time.perf_counter if args.clock == "wall" else time.process_time
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
    inputs = {  # drawn in the order the timing loop used to draw them
        (name, n): torch.randn(n, *shape, generator=gen).to(device)
        for name, (_, shape) in models.items()
        for n in args.sizes
    }
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{args.clock} clock, median of {args.repeats}",
        flush=True,
    )
    peer: dict = {"skipped": "--no-jax", "rows": []}
    peer_kernels: dict[str, Tensor] = {}
    if not args.no_jax:
        cases = [
            (f"{name}-{n}", model, x)
            for (name, n), x in inputs.items()
            for model in [models[name][0]]
            if isinstance(model, MLP)
        ]
        peer, peer_kernels = neural_tangents_rows(cases, args)
    if peer.get("skipped"):
        print(f"neural-tangents rows skipped: {peer['skipped']}", flush=True)
    else:
        print(peer["versions"], flush=True)
    header = f"{'model':12s} {'P':>7s} {'N':>5s} {'method':>31s} {'time [s]':>10s} {'loop/this':>10s} {'max rel err':>12s}"
    print(header)
    print("-" * len(header))
    winners, versus = [], []
    for name, (model, _) in models.items():
        p = count_params(model)
        for n in args.sizes:
            x = inputs[name, n]
            t_loop, ref = median_time(lambda m=model, x=x: loop_ntk(m, x), args.repeats, sync, now)
            if ref.shape[-1] == 1:  # scalar outputs: the library returns (N, N)
                ref = ref[..., 0, 0]
            scale = ref.abs().max()
            print(
                f"{name:12s} {p:7d} {n:5d} {'loop':>31s} {t_loop:10.4f} {1.0:10.2f} {'-':>12s}",
                flush=True,
            )
            best = ("loop", t_loop)
            ours = {}
            for method in ("jacobian", "ntk_vp", "layerwise"):
                t, out = median_time(
                    lambda m=model, x=x, meth=method: N.empirical_ntk(m, x, method=meth),
                    args.repeats,
                    sync,
                    now,
                )
                ours[method] = t
                err = float((out - ref).abs().max() / scale)
                print(
                    f"{name:12s} {p:7d} {n:5d} {method:>31s} {t:10.4f} {t_loop / t:10.2f} {err:12.2e}",
                    flush=True,
                )
                if t < best[1]:
                    best = (method, t)
            fn = N.empirical_ntk_fn(model)  # configured once, as neural-tangents' jitted fn
            fn(x)  # the first call finds the layers (its "compile"); later calls reuse that
            t_fn, out = median_time(lambda fn=fn, x=x: fn(x), args.repeats, sync, now)
            err = float((out - ref).abs().max() / scale)
            label = f"auto, fn reused ({fn.last_method})"
            print(
                f"{name:12s} {p:7d} {n:5d} {label:>31s} {t_fn:10.4f} {t_loop / t_fn:10.2f} {err:12.2e}",
                flush=True,
            )
            winners.append((name, n, best[0], fn.last_method))
            for row in peer["rows"]:
                if row["key"] != f"{name}-{n}":
                    continue
                label = row["label"]
                if row["error"]:
                    print(f"{name:12s} {p:7d} {n:5d} {label:>31s} failed: {row['error']}")
                    continue
                kernel = peer_kernels[f"{name}-{n}/{label}"].to(ref.device)
                if ref.dim() == 2:
                    kernel = kernel[..., 0, 0]
                err = float((kernel - ref).abs().max() / scale)
                t = row["time"]
                print(
                    f"{name:12s} {p:7d} {n:5d} {label:>31s} {t:10.4f} {t_loop / t:10.2f} "
                    f"{err:12.2e}  (first call, compiling: {row['compile']:.2f} s)",
                    flush=True,
                )
                versus.append((name, n, label, t / ours[fn.last_method], t / t_fn, fn.last_method))
    print()
    print(f"NTK_VP_OVERHEAD = {N.NTK_VP_OVERHEAD}")
    for name, n, method, auto in winners:
        print(f"{name:12s} N={n:4d}: fastest {method:9s} method='auto' picks {auto}")
    if versus:
        print(
            "\nneural-tangents time (jitted, after its compiling call) / ours (> 1: ours is "
            "faster),\nours one call of empirical_ntk | ours a configured empirical_ntk_fn after "
            "its first call:"
        )
        for name, n, label, once, reused, auto in versus:
            print(f"{name:12s} N={n:4d}: {label:31s} {once:8.2f}x | {reused:8.2f}x  (ours: {auto})")


if __name__ == "__main__":
    main()
