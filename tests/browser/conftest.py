"""Browser-test fixtures: a JupyterLab server on a free loopback port, and headless Chromium.

The server serves a temporary copy of notebooks/ with no token, runs its kernels with
GRADCOURSE_PROFILE=ci, exposes the JupyterLab application object to the page (so tests can run
commands and read the notebook model instead of scraping pixels), and has the news and
update notifications switched off. Playwright never downloads a browser: it drives the system
Chromium (``$GRADCOURSE_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome``
on PATH).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def chromium_path() -> str:
    candidates = [os.environ.get("GRADCOURSE_CHROMIUM", "")]
    candidates += [shutil.which(n) or "" for n in ("chromium", "chromium-browser", "google-chrome")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "no Chromium found: install it (Debian/Ubuntu: `sudo apt-get install chromium`; "
        "`make test-browser` does this when run as root) or set GRADCOURSE_CHROMIUM=/path/to/chrome"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings_dir: Path) -> None:
    """JupyterLab user settings: no news / update toasts that would cover the notebook."""
    target = settings_dir / "@jupyterlab" / "apputils-extension"
    target.mkdir(parents=True)
    (target / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )


@pytest.fixture(scope="session")
def lab_url(tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(Path(__file__).parent / "fixtures", root / "_fixtures")
    _write_settings(base / "settings")
    port = _free_port()
    env = dict(os.environ)
    env.update(
        GRADCOURSE_PROFILE="ci",
        GRADCOURSE_BUILD=str(base / "build"),
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTER_DATA_DIR=str(base / "jupyter-data"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    env.setdefault("GRADCOURSE_DATA", str(ROOT / "data"))
    cmd = [
        sys.executable, "-m", "jupyter", "lab",
        "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
        "--IdentityProvider.token=", "--ServerApp.password=",
        f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={base / 'settings'}",
        "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--allow-root",
        "--ServerApp.disable_check_xsrf=True",  # loopback, no token: lets the fixture stop kernels
    ]  # fmt: skip
    log = open(base / "server.log", "w")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.close()
                pytest.fail(f"JupyterLab did not start; log:\n{(base / 'server.log').read_text()}")
            time.sleep(0.5)
    yield url
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


def _shutdown_kernels(url: str) -> None:
    """Stop every kernel the server runs, so one notebook's leftover work never slows the next."""
    with urllib.request.urlopen(f"{url}/api/kernels", timeout=10) as response:
        kernels = json.load(response)
    for kernel in kernels:
        request = urllib.request.Request(f"{url}/api/kernels/{kernel['id']}", method="DELETE")
        urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture
def page(browser, lab_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    yield page
    context.close()
    _shutdown_kernels(lab_url)
