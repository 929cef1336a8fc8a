"""The neural-tangents rows of benchmarks/ntk.py, run in a subprocess of it.

    python benchmarks/ntk_neural_tangents.py IN.npz OUT.npz

Not meant to be run by hand: ``benchmarks/ntk.py`` writes the MLPs' weights and inputs to
IN.npz, starts this script with its own PYTHONPATH (``--jax-path``: jax, jaxlib and
neural-tangents pin numpy < 2 and pull in tensorflow, so they live in a directory of their own
and never on the torch side's path), and reads the kernels and times back from OUT.npz. This
file imports neither torch nor gradcourse.

For each MLP it builds the same network in ``neural_tangents.stax`` (``Dense`` in the NTK
parameterisation, sigma_w W a / sqrt(n_in) + beta b, the same as ``gradcourse.models.NTKLinear``;
ReLU between the layers), copies the torch weights in (stax stores W as (n_in, n_out), the
transpose of torch's), and times ``jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(),
vmap_axes=0, implementation=...))`` on the full (N, N, O, O) kernel, float32, for
neural-tangents' default implementation and for its structured derivatives. The first call
compiles (its time is reported apart); each timed call ends with ``block_until_ready``. If jax
or neural-tangents cannot be imported, OUT.npz says why and ntk.py prints the rows as skipped.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main(path_in: str, path_out: str) -> None:
    import numpy as np

    data = np.load(path_in)
    meta = json.loads(str(data["meta"]))
    report: dict = {"skipped": None, "versions": "", "rows": []}
    arrays: dict[str, np.ndarray] = {}
    try:
        import jax
        import jaxlib
        import neural_tangents as nt
        from neural_tangents import stax
        from neural_tangents._src.empirical import DEFAULT_NTK_IMPLEMENTATION
    except Exception as err:  # reported by ntk.py, never fatal
        report["skipped"] = f"{type(err).__name__}: {err}"
        np.savez(path_out, report=np.array(json.dumps(report)))
        return

    report["versions"] = (
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
        f"neural-tangents {nt.__version__}, numpy {np.__version__} (subprocess), "
        f"jax devices {[d.platform for d in jax.devices()]}, "
        f"XLA_FLAGS={__import__('os').environ.get('XLA_FLAGS', '')!r}"
    )
    now = time.process_time if meta["clock"] == "cpu" else time.perf_counter
    default = nt.NtkImplementation(DEFAULT_NTK_IMPLEMENTATION)
    implementations = {
        f"nt {default.name.lower()} (default)": default,
        "nt structured_derivatives": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
    }
    for case in meta["cases"]:
        key, dims = case["key"], case["dims"]
        layers, params = [], []
        for i, n_out in enumerate(dims[1:]):
            layers.append(
                stax.Dense(
                    n_out,
                    W_std=case["weight_scale"],
                    b_std=case["bias_scale"],
                    parameterization="ntk",
                )
            )
            w = jax.numpy.asarray(data[f"{key}/W{i}"].T)  # torch (out, in) -> stax (in, out)
            b = jax.numpy.asarray(data[f"{key}/b{i}"][None, :])
            params.append((w, b))
            if i < len(dims) - 2:
                layers.append(stax.Relu())
                params.append(())
        _, apply_fn, _ = stax.serial(*layers)
        x = jax.numpy.asarray(data[f"{key}/x"])
        for label, impl in implementations.items():
            row = {"key": key, "label": label, "error": None}
            try:
                fn = jax.jit(
                    nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0, implementation=impl)
                )
                start = now()
                kernel = fn(x, None, params).block_until_ready()  # compiles
                row["compile"] = now() - start
                times = []
                for _ in range(meta["repeats"]):
                    start = now()
                    kernel = fn(x, None, params).block_until_ready()
                    times.append(now() - start)
                row["time"] = statistics.median(times)
                arrays[f"{key}/{label}"] = np.asarray(kernel)
            except Exception as err:  # one failing implementation must not hide the others
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            report["rows"].append(row)
    np.savez(path_out, report=np.array(json.dumps(report)), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
