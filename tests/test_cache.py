from __future__ import annotations

import math
import os
import shutil

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
    for bad in ("", "../up", ".hidden", "a/b", "a\\b"):
        with pytest.raises(ValueError, match="name must be a plain, non-empty file stem"):
            Cache(tmp_path).clear(bad)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_entries_get_ordinary_permissions(tmp_path, umask):
    """mkstemp makes a private (0600) file; an entry gets 0666 & ~umask like any new file."""
    old = os.umask(umask)
    try:
        path = Cache(tmp_path).save("exp", {"a": 1}, {"v": np.arange(3)})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_clear_removes_only_that_names_entries(tmp_path):
    cache = Cache(tmp_path)
    for name in ("x", "x-y", "xy", "x-0123456789abcdef"):
        cache.save(name, {"a": 1}, {"v": 1})
        cache.save(name, {"a": 2}, {"v": 2})
    # a concurrent writer's temporary file (save_results' naming) and files that are no entries
    stem = cache.path("x", {"a": 3}).stem
    pending = tmp_path / f".{stem}.npz.k2j4h1.tmp"
    pending.write_bytes(b"in flight")
    (tmp_path / "x-notes.npz").write_bytes(b"")
    (tmp_path / "x-0123456789ABCDEF.npz").write_bytes(b"")
    assert cache.clear("x") == 2
    assert cache.load("x", {"a": 1}) is None
    for name in ("x-y", "xy", "x-0123456789abcdef"):
        assert cache.load(name, {"a": 1}) == {"v": 1}
    assert cache.clear("x-y") == 2 and cache.load("xy", {"a": 2}) == {"v": 2}
    assert cache.clear() == 4
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([pending.name, "x-notes.npz", "x-0123456789ABCDEF.npz"])
    assert Cache(tmp_path / "missing").clear("x") == 0


def test_result_keys_with_the_separator_are_refused(tmp_path):
    """'/' joins nested keys in the npz, so {'a/b': ..} and {'a': {'b': ..}} would collide."""
    for bad in ({"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}}, {"x": [{"c/": 1}]}):
        with pytest.raises(ValueError, match=r"result key .* contains '/'"):
            save_results(tmp_path / "r.npz", bad)
    with pytest.raises(ValueError, match=r"result keys at /d .*same string"):
        save_results(tmp_path / "r.npz", {"d": {1: torch.zeros(1), "1": torch.ones(1)}})
    assert not any(tmp_path.iterdir())


def test_default_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCOURSE_DATA", str(tmp_path))
    assert Cache().root == tmp_path / "cache"


@pytest.fixture
def fresh_warnings(monkeypatch):
    import gradcourse.cache

    monkeypatch.setattr(gradcourse.cache, "_WARNED_UNWRITABLE", set())


def test_a_failed_save_keeps_the_result_and_warns_once(tmp_path, monkeypatch, fresh_warnings):
    import warnings

    import gradcourse.cache

    def disk_full(fh, **arrays):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gradcourse.cache.np, "savez", disk_full)
    cache, calls = Cache(tmp_path), []
    compute = lambda: calls.append(1) or {"v": np.arange(3)}  # noqa: E731
    with pytest.warns(RuntimeWarning, match="No space left on device.*kept in memory"):
        first = cache.get_or_compute("exp", {"a": 1}, compute)
    assert np.array_equal(first["v"], np.arange(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure in this folder is silent
        second = cache.get_or_compute("exp", {"a": 2}, compute)
    assert np.array_equal(second["v"], np.arange(3)) and len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no half-written entry, no temporary file left


def test_a_cache_folder_that_is_a_file_or_removed(tmp_path, fresh_warnings):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the folder should be")
    with pytest.warns(RuntimeWarning, match="could not store results in the cache"):
        result = Cache(blocked).get_or_compute("exp", {}, lambda: {"v": 1})
    assert result == {"v": 1}
    # the folder deleted mid-run (as the README suggests, to start afresh): recreated
    cache = Cache(tmp_path / "gone")
    cache.get_or_compute("exp", {"a": 1}, lambda: {"v": 1})
    shutil.rmtree(tmp_path / "gone")
    assert cache.get_or_compute("exp", {"a": 2}, lambda: {"v": 2}) == {"v": 2}
    assert cache.load("exp", {"a": 2}) == {"v": 2}
