"""Shared test set-up: keep every test's files out of the repository's data/ and build/."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GRADCOURSE_DATA", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("GRADCOURSE_BUILD", str(tmp_path_factory.mktemp("build")))
