"""What tracking the sharpness costs, as a fraction of training, for notebook 02's edge-of-stability
runs (the ``eos`` configuration of its ``ci`` and ``cpu`` profiles, MNIST-1D, full-batch GD).

    python benchmarks/stability_tracking.py [--profiles ci cpu] [--repeats 3] [--threads 1]
                                            [--accuracy]

In one process, for each learning rate of the profile: training alone (no callback), then the
same run with each tracker; the fraction is tracker time / time of training alone, summed over
the learning rates, median over ``--repeats``. Trackers:

- ``before``: the tracker as it was: a ``torch.func`` :class:`~gradcourse.curvature.HessianOperator`
  built at every call, warm-started Lanczos (tol 1e-3) every ``every`` steps;
- ``operator``: :class:`gradcourse.stability.SharpnessTracker`, whose operator is built by
  double backward on the live module, still every ``every`` steps;
- ``after``: the same, on :func:`gradcourse.experiments.stability.sharpness_run`'s schedule
  (every ``every_early`` steps, every ``every`` steps in the last quarter that the notebook
  averages).

``--accuracy`` also compares every tracked value with a cold Lanczos (k=4, tol 1e-6) at the same
step, and the last-quarter mean (the notebook's statistic) with that of the reference measured
every ``every`` steps. A breakdown of one call's parts (operator set-up, one product, one
Lanczos iteration without its product, one training step) comes first. Ratios are what to read;
absolute times depend on the machine and on whatever else it is doing.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from gradcourse import models, stability, train
from gradcourse.curvature import CurvatureOperator, HessianOperator, LiveHessianOperator, lanczos
from gradcourse.experiments import stability as sx

# notebook 02's eos configurations (cell "Setup")
PROFILES = {
    "ci": dict(n=128, widths=(32, 32), steps=300, every=25, every_early=75, lrs=[0.2, 0.4]),
    "cpu": dict(n=256, widths=(64, 64), steps=1500, every=25, every_early=75, lrs=[0.1, 0.2, 0.4]),
}


class Before:
    """The tracker before this benchmark: a torch.func HessianOperator at every call."""

    def __init__(self, x, y):
        self.x, self.y, self.v, self.total_time, self.total_matvecs = x, y, None, 0.0, 0

    def __call__(self, step, model):
        start = time.perf_counter()
        op = HessianOperator(model, "mse", (self.x, self.y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = lanczos(op, k=1, tol=1e-3, max_matvecs=200, seed=0, v0=self.v)
        self.v = res.eigenvectors[:, 0].detach()
        self.total_time += time.perf_counter() - start
        self.total_matvecs += res.num_matvecs
        return {"sharpness": float(res.eigenvalues[0])}


def run(cfg, x, y, lr, callback):
    model = models.MLP(x.shape[1], list(cfg["widths"]), 10, activation="tanh", seed=0)
    return train.train(
        model, x, y, lr=lr, steps=cfg["steps"], callback=callback, every=cfg["every"],
        seed=0, progress=False, raise_on_divergence=False,
    )  # fmt: skip


def trackers(cfg, x, y):
    tail = sx.TAIL_START * cfg["steps"]

    def schedule(step):
        return step >= tail or step % cfg["every_early"] == 0

    return {
        "before": lambda: Before(x, y),
        "operator": lambda: stability.SharpnessTracker(x, y),
        "after": lambda: stability.SharpnessTracker(x, y, measure_at=schedule),
    }


def median_ms(fn, repeats=50):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class _Diagonal(CurvatureOperator):
    """A free product with a spread spectrum: Lanczos runs all its iterations."""

    def __init__(self, size):
        self.d = torch.linspace(0, 1, size) ** 4
        super().__init__(size, self.d.dtype, self.d.device)

    def _matvec(self, v):
        return self.d * v


def breakdown(cfg, x, y):
    model = models.MLP(x.shape[1], list(cfg["widths"]), 10, activation="tanh", seed=0)
    train.train(model, x, y, lr=0.1, steps=100, progress=False)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    step = median_ms(lambda: train.train(model, x, y, lr=1e-12, steps=20, progress=False)) / 20
    # built after the training above: an optimizer step invalidates the live operator's graph
    func, live = (
        HessianOperator(model, "mse", (x, y)),
        LiveHessianOperator(model, "mse", x, y),
    )
    func.matvec(v)
    parts = {
        "training step": step,
        "set-up + 1 product, torch.func HessianOperator": median_ms(
            lambda: HessianOperator(model, "mse", (x, y)).matvec(v)
        ),
        "set-up + 1 product, live double backward": median_ms(
            lambda: LiveHessianOperator(model, "mse", x, y).matvec(v)
        ),
        "1 product, torch.func (graph cached)": median_ms(lambda: func.matvec(v)),
        "1 product, live double backward": median_ms(lambda: live.matvec(v)),
        "1 Lanczos iteration without its product": median_ms(
            lambda: lanczos(_Diagonal(len(v)), k=1, tol=1e-30, max_matvecs=20), repeats=10
        )
        / 20,
    }
    for name, ms in parts.items():
        print(f"    {name:48s} {ms:7.3f} ms  ({ms / step:5.2f} training steps)")


def reference(cfg, x, y, lr):
    """Step -> lambda_max from a cold Lanczos (k=4, tol 1e-6) every ``every`` steps."""
    ref = {}

    def cold(step, model):
        op = HessianOperator(model, "mse", (x, y))
        ref[step] = float(lanczos(op, k=4, tol=1e-6, seed=1).eigenvalues[0])

    run(cfg, x, y, lr, cold)
    return ref


def accuracy(cfg, ref, tracked_steps, tracked):
    """(max relative error, number of values off by > 1e-3, error of the last-quarter mean)."""
    exact = np.array([ref[s] for s in tracked_steps])
    err = np.abs(tracked - exact) / exact
    steps = np.array(sorted(ref))
    tail_from = sx.TAIL_START * cfg["steps"]
    ref_tail = np.mean([ref[s] for s in steps[steps >= tail_from]])
    mine_tail = tracked[tracked_steps >= tail_from].mean()
    return err.max(), int((err > 1e-3).sum()), abs(mine_tail / ref_tail - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["ci", "cpu"], choices=list(PROFILES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--accuracy", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # unconverged Lanczos runs are expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.profiles:
        cfg = PROFILES[name]
        (x, y), _ = sx.load_classification("mnist1d", cfg["n"])
        print(f"\n{name}: n={cfg['n']}, widths={cfg['widths']}, {cfg['steps']} steps, "
              f"every {cfg['every']} (early: {cfg['every_early']}), lrs {cfg['lrs']}")  # fmt: skip
        breakdown(cfg, x, y)
        makers = trackers(cfg, x, y)
        fractions = {k: [] for k in makers}
        counts = {k: [0, 0] for k in makers}
        values = {k: {} for k in makers}
        for rep in range(args.repeats):
            plain = sum(run(cfg, x, y, lr, None).wall_time for lr in cfg["lrs"])
            for key, make in makers.items():
                spent = 0.0
                for lr in cfg["lrs"]:
                    tracker = make()
                    rec = run(cfg, x, y, lr, tracker).record_arrays()
                    spent += tracker.total_time
                    if rep == 0:
                        counts[key][0] += len(rec["step"])
                        counts[key][1] += tracker.total_matvecs
                        values[key][lr] = (rec["step"], rec["sharpness"])
                fractions[key].append(spent / plain)
        print(f"    training alone: {plain:.2f} s (last repeat)")
        print("    tracker    fraction of training (median, all)        measurements  products")
        for key in makers:
            fr = fractions[key]
            print(f"    {key:9s}  {statistics.median(fr):6.3f}  {np.round(fr, 3)!s:30s}"
                  f"  {counts[key][0]:8d}  {counts[key][1]:8d}")  # fmt: skip
        if args.accuracy:
            print("    accuracy against cold Lanczos (k=4, tol 1e-6) at the same steps:")
            refs = {lr: reference(cfg, x, y, lr) for lr in cfg["lrs"]}
            for key in makers:
                worst = [accuracy(cfg, refs[lr], *values[key][lr]) for lr in cfg["lrs"]]
                print(f"    {key:9s}  max rel. error {max(w[0] for w in worst):.1e}, "
                      f"{sum(w[1] for w in worst)} values off by > 1e-3, "
                      f"last-quarter mean off by {max(w[2] for w in worst):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
