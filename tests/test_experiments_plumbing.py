"""gradcourse.experiments.seeded_run / seeded_runs: one cached run per (configuration, seed)."""

import pytest

from gradcourse.cache import Cache
from gradcourse.experiments import seeded_run, seeded_runs


def test_seeded_run_computes_once_per_configuration_and_seed(tmp_path):
    calls = []

    def train_run(cfg, seed, *, device=None):
        calls.append((cfg["a"], seed, device))
        return {"value": cfg["a"] * 10 + seed}

    cache = Cache(tmp_path)
    assert seeded_run("toy-run", train_run, {"a": 1}, 2, cache=cache, device="cpu") == {"value": 12}
    assert seeded_run("toy-run", train_run, {"a": 1}, 2, cache=cache)["value"] == 12
    assert calls == [(1, 2, "cpu")]
    assert seeded_run("toy-run", train_run, {"a": 1}, 3, cache=cache)["value"] == 13
    assert cache.path("toy-run", {"a": 1, "seed": 3}).exists()  # the key modules have always used
    assert seeded_run("toy-run", train_run, {"a": 1}, 2)["value"] == 12  # no cache: computed
    assert len(calls) == 3


def test_seeded_runs_keeps_the_jobs_order_and_passes_cache_and_device():
    seen = []

    def run_one(cfg, seed, *, cache=None, device=None):
        seen.append((cache, device))
        return {"v": cfg["a"] + seed}

    jobs = {"x": ({"a": 1}, 0), "y": ({"a": 5}, 1)}
    out = seeded_runs(run_one, jobs, cache="C", device="D", progress=False)
    assert list(out) == ["x", "y"] and out["y"] == {"v": 6}
    assert seen == [("C", "D"), ("C", "D")]


def test_with_defaults_merges_and_refuses_unknown_keys():
    from gradcourse.experiments import with_defaults

    defaults = {"a": 1, "b": 2}
    assert with_defaults(defaults, {"b": 3}) == {"a": 1, "b": 3}
    assert defaults == {"a": 1, "b": 2}  # not modified
    with pytest.raises(
        ValueError, match=r"unknown configuration keys \['c'\]; known: \['a', 'b'\]"
    ):
        with_defaults(defaults, {"c": 0})
