from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import gradcourse as gc
from gradcourse.profile import resolve_profile_name


@pytest.mark.parametrize("name", ["ci", "cpu", "gpu", "CI", " gpu "])
def test_explicit_profile_names(name):
    assert gc.profile(name).name == name.strip().lower()


def test_env_var_is_read(monkeypatch):
    monkeypatch.setenv("GRADCOURSE_PROFILE", "cpu")
    assert gc.profile().name == "cpu"
    monkeypatch.setenv("GRADCOURSE_PROFILE", "ci")
    assert gc.profile().name == "ci"


@pytest.mark.parametrize("raw", [None, "", "auto"])
def test_auto_follows_cuda(monkeypatch, raw):
    monkeypatch.delenv("GRADCOURSE_PROFILE", raising=False)
    for has_cuda, expected in [(True, "gpu"), (False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda h=has_cuda: h)
        assert resolve_profile_name(raw) == expected


def test_unknown_profile_lists_the_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"ci, cpu, gpu or auto"):
        gc.profile("laptop")
    monkeypatch.setenv("GRADCOURSE_PROFILE", "fast")
    with pytest.raises(ValueError, match=r"GRADCOURSE_PROFILE='fast'"):
        gc.profile()


def test_ci_profile_runs_on_cpu_and_device_override():
    assert gc.profile("ci").device == torch.device("cpu")
    assert gc.profile("cpu", device="cpu").device == torch.device("cpu")


def test_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert gc.get_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gc.get_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert gc.get_device().type == "cpu"


def test_pick_returns_this_profiles_value_and_needs_all_three():
    assert gc.profile("ci").pick(ci=1, cpu=2, gpu=3) == 1
    assert gc.profile("gpu").pick(ci=1, cpu=2, gpu=3) == 3
    with pytest.raises(ValueError, match="missing: gpu"):
        gc.profile("ci").pick(ci=1, cpu=2)


def test_seed_everything_makes_all_generators_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()  # noqa: NPY002

    gen = gc.seed_everything(3)
    first, g1 = draw(), torch.rand(2, generator=gen)
    gen = gc.seed_everything(3)
    assert draw() == first
    assert torch.equal(torch.rand(2, generator=gen), g1)
    gc.seed_everything(4)
    assert draw() != first
    with pytest.raises(ValueError, match="seed"):
        gc.seed_everything(-1)


def test_threads_variable_overrides_every_profile(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("GRADCOURSE_THREADS", raising=False)
        gc.profile("ci")
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("GRADCOURSE_THREADS", "2")
        gc.profile("ci")
        assert torch.get_num_threads() == 2
        assert gc.set_cpu_threads(1) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("GRADCOURSE_THREADS", "two")
        with pytest.raises(ValueError, match="GRADCOURSE_THREADS"):
            gc.profile("ci")
        monkeypatch.delenv("GRADCOURSE_THREADS")
        with pytest.raises(ValueError, match="n must be"):
            gc.set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
