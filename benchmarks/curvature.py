"""Benchmark gradcourse.curvature against PyHessian and curvlinops on the same model and data.

    python benchmarks/curvature.py [--device cpu] [--repeats 3] [--threads N] [--clock cpu]
                                   [--parts trace,hvp]

Needs ``pyhessian`` and ``curvlinops-for-pytorch`` next to gradcourse (a missing peer, or a peer
function that fails on the installed torch, is reported and skipped). Two problems, one
process, float32 everywhere:

- small: an MLP (P ~ 1.5k) whose Hessian is diagonalised exactly in float64, so every method's
  error is measured against the true spectrum;
- large: an MLP (P ~ 27k); errors against a tight float64 Lanczos run.

Tables: top-10 eigenvalues, trace, spectral density (matvecs, median wall time, ratio to ours,
error), and the cost of one Hessian-vector product relative to one gradient. The methods of a
table are timed in interleaved rounds, so a load that changes during the run hits them alike;
still, read ratios, not absolute times. On a shared machine, ``--threads 1 --clock cpu``
(process CPU time, CPU device only) keeps other jobs' load out of the times.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradcourse import curvature as C
from gradcourse.losses import cross_entropy

PEER_STATUS: dict[str, str] = {}
try:
    import pyhessian

    # pyhessian/__init__ rebinds the name pyhessian.hessian to the class: fetch the module itself
    pyhessian_module = importlib.import_module("pyhessian.hessian")
    PEER_STATUS["pyhessian"] = "imported"
except Exception as err:
    pyhessian = None
    PEER_STATUS["pyhessian"] = f"not available ({type(err).__name__}: {err})"
try:
    import curvlinops

    PEER_STATUS["curvlinops"] = "imported"
except Exception as err:
    curvlinops = None
    PEER_STATUS["curvlinops"] = f"not available ({type(err).__name__}: {err})"

FAILURES: list[str] = []
# the clock of compare(): wall time by default, process CPU time with --clock cpu
CLOCK: Callable[[], float] = time.perf_counter
# PyHessian calls loss.backward(create_graph=True), on which torch warns (every call) of a
# parameter <-> gradient reference cycle that leaks memory; reported once in NOTES instead.
warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
NOTES = [
    "pyhessian: hessian() switches the model it is given to eval mode and calls "
    "loss.backward(create_graph=True), which torch warns leaks memory (parameter <-> .grad "
    "reference cycle); it is run on a deep copy of the model",
    "pyhessian: eigenvalues() returns the top-n by magnitude (deflated power iteration)",
]


# ------------------------------------------------------------------------------- problems


@dataclass
class Problem:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def operator(self, **kwargs: Any) -> C.HessianOperator:
        return C.HessianOperator(self.model, "ce", (self.x, self.y), **kwargs)


def gaussian_mixture(n: int, dim: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return means[y] + torch.randn(n, dim, generator=gen), y


def make_problem(name: str, dim: int, width: int, classes: int, n: int, device: str) -> Problem:
    """A tanh MLP dim-width-width-classes trained 200 Adam steps (full batch) on a mixture."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(dim, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, classes),
    ).to(device)
    x, y = gaussian_mixture(n, dim, classes, seed=1)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return Problem(name, model.eval(), x, y)


# ------------------------------------------------------------------------------- timing


@dataclass
class Method:
    """A method to time: ``run()`` returns (matvecs it used, its result)."""

    label: str
    run: Callable[[], tuple[int, Any]]
    seconds: float = 0.0
    matvecs: int = 0
    result: Any = None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(methods: list[Method], repeats: int, warmup: bool = False) -> list[Method]:
    """Time the methods in ``repeats`` interleaved rounds; keep the median time of each.

    A method that raises in its first call is recorded in FAILURES and dropped.
    """
    alive = []
    for method in methods:
        try:
            if warmup:
                method.run()
            alive.append(method)
        except Exception as err:
            FAILURES.append(f"{method.label}: {_describe(err)}")
    times: dict[str, list[float]] = {m.label: [] for m in alive}
    for _ in range(repeats):
        for method in list(alive):
            _sync()
            start = CLOCK()
            try:
                method.matvecs, method.result = method.run()
            except Exception as err:
                FAILURES.append(f"{method.label}: {_describe(err)}")
                alive.remove(method)
                continue
            _sync()
            times[method.label].append(CLOCK() - start)
    for method in alive:
        method.seconds = statistics.median(times[method.label])
    return alive


def _describe(err: Exception) -> str:
    """'Type: first line of the message (in the peer's function, file:line that called it)'."""
    lines = str(err).strip().splitlines()
    frames = traceback.extract_tb(err.__traceback__)
    in_peer = [f for f in frames if "pyhessian" in f.filename or "curvlinops" in f.filename]
    frame = (in_peer or frames)[-1]
    where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
    return f"{type(err).__name__}: {lines[0] if lines else ''} (in {frame.name}, {where})"


class CountCalls:
    """Wrap a function and count its calls (or the columns it is applied to)."""

    def __init__(self, fn: Callable, columns: Callable[..., int] | None = None) -> None:
        self.fn, self.columns, self.count = fn, columns, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += self.columns(*args) if self.columns else 1
        return self.fn(*args, **kwargs)


# ------------------------------------------------------------------------------- peers


def pyhessian_for(problem: Problem):
    model = copy.deepcopy(problem.model)
    data = (problem.x, problem.y)
    return pyhessian.hessian(model, cross_entropy, data=data, cuda=problem.x.is_cuda)


def pyhessian_hvp_counter() -> CountCalls:
    """Count PyHessian's Hessian-vector products (installs a counter once; returns it reset)."""
    counter = pyhessian_module.hessian_vector_product
    if not isinstance(counter, CountCalls):
        counter = CountCalls(counter)
        pyhessian_module.hessian_vector_product = counter
    counter.count = 0
    return counter


_CURVLINOPS_OPS: dict[str, Any] = {}


def curvlinops_for(problem: Problem):
    """curvlinops' Hessian operator, with its matvecs counted (columns of each product).

    Built once per problem and not timed: its constructor checks that model and data are
    deterministic by running them twice, a one-time cost.
    """
    if problem.name not in _CURVLINOPS_OPS:
        op = curvlinops.HessianLinearOperator(
            problem.model,
            nn.CrossEntropyLoss(),
            list(problem.model.parameters()),
            [(problem.x, problem.y)],
        )
        op._matmat = CountCalls(op._matmat, columns=lambda X: X[0].shape[-1])
        _CURVLINOPS_OPS[problem.name] = op
    return _CURVLINOPS_OPS[problem.name]


# ------------------------------------------------------------------------------- output


def rel_error(found: Any, exact: Tensor) -> float:
    found = torch.as_tensor(np.asarray(found, dtype=np.float64)).flatten()
    found = found.sort(descending=True).values
    return float(((found - exact) / exact.abs()).abs().max())


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        parts = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in pairs]
        print("  " + "  ".join(parts))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


# ------------------------------------------------------------------------------- references


def exact_spectrum(problem: Problem) -> Tensor:
    model64 = copy.deepcopy(problem.model).double()
    hess = C.exact_hessian(model64, "ce", (problem.x.double(), problem.y))
    return torch.linalg.eigvalsh(hess.cpu())


def reference_top10(problem: Problem) -> Tensor:
    model64 = copy.deepcopy(problem.model).double()
    op = C.HessianOperator(model64, "ce", (problem.x.double(), problem.y))
    return C.lanczos(op, k=10, tol=1e-10).eigenvalues


# ------------------------------------------------------------------------------- benchmarks


def bench_top10(problem: Problem, top10: Tensor, repeats: int) -> None:
    methods = []
    for tol in (None, 1e-2):

        def ours(tol: float | None = tol) -> tuple[int, Tensor]:
            result = C.lanczos(problem.operator(), k=10, tol=tol)
            return result.num_matvecs, result.eigenvalues

        label = "ours: lanczos " + ("(default tol)" if tol is None else f"tol={tol:g}")
        methods.append(Method(label, ours))
    if pyhessian is not None:
        for tol in (1e-3, 1e-6):

            def power(tol: float = tol) -> tuple[int, list[float]]:
                counter = pyhessian_hvp_counter()
                evals = pyhessian_for(problem).eigenvalues(top_n=10, tol=tol)[0]
                return counter.count, evals

            methods.append(Method(f"pyhessian: eigenvalues(top_n=10, tol={tol:g})", power))
    if curvlinops is not None:
        from scipy.sparse.linalg import eigsh

        def arpack() -> tuple[int, Any]:
            op = curvlinops_for(problem)
            before = op._matmat.count
            evals = eigsh(op.to_scipy(), k=10, which="LA", return_eigenvectors=False)
            return op._matmat.count - before, evals

        methods.append(Method("curvlinops operator + scipy eigsh (ARPACK)", arpack))
    done = compare(methods, repeats)
    base = done[0].seconds
    rows = [
        [m.label, m.matvecs, m.seconds, m.seconds / base, rel_error(m.result, top10)] for m in done
    ]
    table(
        f"top-10 eigenvalues, {problem.name} (P={problem.size})",
        ["method", "matvecs", "time [s]", "x ours", "max rel err"],
        rows,
    )


def bench_trace(problem: Problem, exact_trace: float | None, repeats: int) -> None:
    def ours() -> tuple[int, C.Estimate]:
        return 100, C.hutchinson_trace(problem.operator(), 100, seed=0)

    def ours_pp() -> tuple[int, C.Estimate]:
        return 99, C.hutchpp_trace(problem.operator(), 99, seed=0)

    methods = [
        Method("ours: hutchinson_trace(100)", ours),
        Method("ours: hutchpp_trace(99)", ours_pp),
    ]
    if pyhessian is not None:

        def power() -> tuple[int, C.Estimate]:
            counter = pyhessian_hvp_counter()
            samples = torch.tensor(pyhessian_for(problem).trace(), dtype=torch.float64)
            stderr = float(samples.std() / len(samples) ** 0.5)
            return counter.count, C.Estimate(float(samples.mean()), stderr, samples)

        methods.append(Method("pyhessian: trace() (tol=1e-3)", power))

        def power100() -> tuple[int, C.Estimate]:
            # tol=-inf: never stops early, 100 probes as ours (equal accuracy)
            counter = pyhessian_hvp_counter()
            trace = pyhessian_for(problem).trace(maxIter=100, tol=float("-inf"))
            samples = torch.tensor(trace, dtype=torch.float64)
            stderr = float(samples.std() / len(samples) ** 0.5)
            return counter.count, C.Estimate(float(samples.mean()), stderr, samples)

        methods.append(Method("pyhessian: trace(maxIter=100), 100 probes", power100))
    if curvlinops is not None:

        def hutch() -> tuple[int, C.Estimate]:
            value = float(curvlinops.hutchinson_trace(curvlinops_for(problem), 100))
            return 100, C.Estimate(value, float("nan"), torch.empty(0))

        methods.append(Method("curvlinops: hutchinson_trace(100)", hutch))
    done = compare(methods, repeats)
    base = done[0].seconds
    rows = []
    for m in done:
        est = m.result
        err = abs(est.value - exact_trace) / abs(exact_trace) if exact_trace else "-"
        rows.append(
            [
                m.label,
                m.matvecs,
                m.seconds,
                m.seconds / base,
                f"{est.value:.4g}",
                "-" if np.isnan(est.stderr) else f"{est.stderr:.2g}",
                err,
            ]
        )
    exact = f", exact tr(H) = {exact_trace:.4g}" if exact_trace is not None else ""
    table(
        f"trace, {problem.name} (P={problem.size}){exact}",
        ["method", "matvecs", "time [s]", "x ours", "estimate", "stderr", "rel err"],
        rows,
    )


def wasserstein1(grid: Tensor, density: Tensor, evals: Tensor) -> float:
    """W1 between a density on a grid and the exact spectral distribution, / spectral range."""
    grid, density = grid.double().cpu(), density.double().cpu().clamp_min(0)
    cdf = torch.cumulative_trapezoid(density, grid)
    cdf = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf]) / cdf[-1]
    exact_cdf = torch.searchsorted(evals.contiguous(), grid, right=True).double() / len(evals)
    return float(torch.trapezoid((cdf - exact_cdf).abs(), grid) / (evals[-1] - evals[0]))


def grid_moments(grid: Tensor, density: Tensor) -> tuple[float, float]:
    grid, density = grid.double().cpu(), density.double().cpu()
    mass = torch.trapezoid(density, grid)
    return (
        float(torch.trapezoid(grid * density, grid) / mass),
        float(torch.trapezoid(grid**2 * density, grid) / mass),
    )


def bench_density(problem: Problem, evals: Tensor, repeats: int) -> None:
    probes, iters = 10, 80
    m1, m2 = float(evals.mean()), float((evals**2).mean())

    def ours() -> tuple[int, tuple]:
        sd = C.spectral_density(problem.operator(), num_probes=probes, num_iters=iters, seed=0)
        grid = sd.grid(1024)
        density = sd.density(grid, sigma=float(grid[-1] - grid[0]) / 400)
        return sd.num_matvecs, (sd.moment(1).value, sd.moment(2).value, grid, density)

    methods = [Method(f"ours: spectral_density({probes} probes x {iters})", ours)]
    if pyhessian is not None:

        def slq() -> tuple[int, tuple]:
            counter = pyhessian_hvp_counter()
            nodes, weights = pyhessian_for(problem).density(iter=iters, n_v=probes)
            sd = C.SpectralDensity(
                torch.tensor(nodes, dtype=torch.float64),
                torch.tensor(weights, dtype=torch.float64),
                problem.size,
                0,
            )
            grid = sd.grid(1024)
            density = sd.density(grid, sigma=float(grid[-1] - grid[0]) / 400)
            return counter.count, (sd.moment(1).value, sd.moment(2).value, grid, density)

        methods.append(Method(f"pyhessian: density(iter={iters}, n_v={probes})", slq))
    if curvlinops is not None:

        def papyan() -> tuple[int, tuple]:
            op = curvlinops_for(problem)
            before = op._matmat.count
            grid, density = curvlinops.lanczos_approximate_spectrum(
                op, ncv=iters, num_repeats=probes, num_points=1024
            )
            return op._matmat.count - before, (*grid_moments(grid, density), grid, density)

        methods.append(
            Method(f"curvlinops: lanczos_approximate_spectrum({probes} x {iters})", papyan)
        )
    done = compare(methods, repeats)
    base = done[0].seconds
    rows = []
    for m in done:
        g1, g2, grid, density = m.result
        rows.append(
            [
                m.label,
                m.matvecs,
                m.seconds,
                m.seconds / base,
                abs(g1 - m1) / abs(m1),
                abs(g2 - m2) / m2,
                wasserstein1(grid, density, evals),
            ]
        )
    table(
        f"spectral density, {problem.name} (P={problem.size}): moment errors vs tr(H)/P and "
        "tr(H^2)/P, W1 distance to the exact spectrum / its range",
        ["method", "matvecs", "time [s]", "x ours", "err m1", "err m2", "W1"],
        rows,
    )


def bench_hvp_cost(problem: Problem, repeats: int) -> None:
    model, x, y = problem.model, problem.x, problem.y
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(problem.size, generator=gen).to(x.device)
    block = torch.randn(problem.size, 8, generator=gen).to(x.device)
    params = list(model.parameters())

    def gradient() -> tuple[int, None]:
        model.zero_grad(set_to_none=True)
        cross_entropy(model(x), y).backward()
        return 0, None

    cached, uncached = problem.operator(cache=True), problem.operator(cache=False)
    methods = [
        Method("gradient (loss.backward())", gradient),
        Method("ours: HVP, cached graph (default for one batch)", lambda: (1, cached @ v)),
        Method("ours: HVP, uncached (jvp of grad)", lambda: (1, uncached @ v)),
        Method("ours: 8 HVPs as one vmapped block, cached", lambda: (8, cached @ block)),
        Method("ours: 8 HVPs as one vmapped block, uncached", lambda: (8, uncached @ block)),
    ]
    if curvlinops is not None:
        methods.append(
            Method("curvlinops: HVP (jvp of jacrev)", lambda: (1, curvlinops_for(problem) @ v))
        )
        methods.append(
            Method("curvlinops: 8 HVPs as one block", lambda: (8, curvlinops_for(problem) @ block))
        )
    if pyhessian is not None:
        chunks = v.split([p.numel() for p in params])
        vs = [t.view_as(p) for t, p in zip(chunks, params, strict=True)]
        hvp = pyhessian_hvp_counter().fn
        stored: dict[str, Any] = {}

        def pyhessian_hvp() -> tuple[int, Any]:
            if "hess" not in stored:  # built in the warm-up call, not timed
                stored["hess"] = pyhessian_for(problem)
            hess = stored["hess"]
            return 1, hvp(hess.gradsH, hess.params, vs)

        methods.append(Method("pyhessian: HVP (graph stored by hessian())", pyhessian_hvp))
    done = compare(methods, repeats, warmup=True)
    model.zero_grad(set_to_none=True)
    grad_time = done[0].seconds
    rows = [
        [m.label, m.seconds / max(m.matvecs, 1) * 1e3, m.seconds / max(m.matvecs, 1) / grad_time]
        for m in done
    ]
    table(
        f"cost of one HVP, {problem.name} (P={problem.size}, n={len(x)}); block rows per HVP",
        ["method", "time [ms]", "x gradient"],
        rows,
    )


# ------------------------------------------------------------------------------- main


PARTS = ("top10", "trace", "density", "hvp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or process CPU time (CPU device only: GPU work is not counted)",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}, choose from {PARTS}")
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu measures the CPU only: use it with --device cpu")
        global CLOCK
        CLOCK = time.process_time
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock"
    )
    print("; ".join(f"{name}: {status}" for name, status in PEER_STATUS.items()))
    start = time.perf_counter()
    small = make_problem("small MLP 10-32-32-4, n=512", 10, 32, 4, 512, args.device)
    large = make_problem("large MLP 20-150-150-10, n=2000", 20, 150, 10, 2000, args.device)
    evals = exact_spectrum(small)
    if "top10" in parts:
        bench_top10(small, evals.flip(0)[:10], args.repeats)
    if "trace" in parts:
        bench_trace(small, float(evals.sum()), args.repeats)
    if "density" in parts:
        bench_density(small, evals, args.repeats)
    if "hvp" in parts:
        bench_hvp_cost(small, 5 * args.repeats)
    if "top10" in parts:
        bench_top10(large, reference_top10(large), args.repeats)
    if "trace" in parts:
        bench_trace(large, None, args.repeats)
    if "hvp" in parts:
        bench_hvp_cost(large, 5 * args.repeats)
    print("\npeer functions that failed on this torch:")
    for line in FAILURES or ["(none)"]:
        print("  " + line)
    print("\nnotes:")
    for line in NOTES:
        print("  " + line)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
