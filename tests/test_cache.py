from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from gradcourse.cache import Cache, config_key, load_results, save_results


def test_key_ignores_key_order_and_sees_every_value():
    a = config_key("exp", {"lr": 0.1, "width": 32, "seeds": (0, 1)})
    assert a == config_key("exp", {"seeds": [0, 1], "width": 32, "lr": 0.1})
    assert a != config_key("exp", {"lr": 0.1000001, "width": 32, "seeds": (0, 1)})
    assert a != config_key("other", {"lr": 0.1, "width": 32, "seeds": (0, 1)})
    assert config_key("e", {"dtype": torch.float64}) != config_key("e", {"dtype": torch.float32})
    with pytest.raises(TypeError, match=r"config\.f"):
        config_key("e", {"f": object()})


def test_round_trip_keeps_types(tmp_path):
    results = {
        "eigs": torch.arange(5, dtype=torch.float64),
        "mask": np.array([True, False]),
        "loss": [1.0, 0.5, math.inf],
        "pair": (1, "two"),
        "nested": {"n": 3, "ok": True, "none": None, "x": np.float32(1.5)},
    }
    path = tmp_path / "r.npz"
    save_results(path, results)
    back = load_results(path)
    assert torch.equal(back["eigs"], results["eigs"]) and back["eigs"].dtype == torch.float64
    assert np.array_equal(back["mask"], results["mask"])
    assert back["loss"] == [1.0, 0.5, math.inf]
    assert back["pair"] == (1, "two")
    assert back["nested"] == {"n": 3, "ok": True, "none": None, "x": 1.5}


def test_get_or_compute_computes_once(tmp_path):
    cache, calls = Cache(tmp_path), []

    def compute():
        calls.append(1)
        return {"value": torch.ones(3)}

    first = cache.get_or_compute("exp", {"a": 1}, compute)
    second = cache.get_or_compute("exp", {"a": 1}, compute)
    assert len(calls) == 1 and torch.equal(first["value"], second["value"])
    cache.get_or_compute("exp", {"a": 2}, compute)
    cache.get_or_compute("exp", {"a": 1}, compute, refresh=True)
    assert len(calls) == 3
    assert cache.clear("exp") == 2 and cache.clear() == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_recomputed_with_a_warning(tmp_path, damage):
    cache = Cache(tmp_path)
    path = cache.save("exp", {"a": 1}, {"v": np.arange(100)})
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"not a zip", "empty": b""}[damage]
    )
    with pytest.warns(RuntimeWarning, match="unreadable"):
        result = cache.get_or_compute("exp", {"a": 1}, lambda: {"v": np.arange(3)})
    assert np.array_equal(result["v"], np.arange(3))
    assert np.array_equal(cache.load("exp", {"a": 1})["v"], np.arange(3))  # repaired on disk


def test_failed_write_or_compute_leaves_previous_entry(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    cache.save("exp", {"a": 1}, {"v": 1})

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("exp", {"a": 1}, boom, refresh=True)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.save("exp", {"a": 1}, {"v": 2})
    monkeypatch.undo()
    assert cache.load("exp", {"a": 1}) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == [cache.path("exp", {"a": 1}).name]


def test_loading_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(
        path, __meta__=np.array('{"array": "/x"}'), **{"/x": np.array([object()], dtype=object)}
    )
    with pytest.raises(ValueError, match="pickle"):
        load_results(path)
    with pytest.raises(TypeError, match="object array"):
        save_results(tmp_path / "o.npz", {"x": np.array([object()], dtype=object)})


def test_disabled_cache_never_hits(tmp_path):
    cache, calls = Cache(tmp_path, enabled=False), []
    for _ in range(2):
        cache.get_or_compute("exp", {}, lambda: calls.append(1) or {"v": 1})
    assert len(calls) == 2 and not any(tmp_path.iterdir())


def test_bad_names(tmp_path):
    with pytest.raises(ValueError, match="name"):
        Cache(tmp_path).path("../up", {})


def test_default_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCOURSE_DATA", str(tmp_path))
    assert Cache().root == tmp_path / "cache"
