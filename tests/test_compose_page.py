"""Smart Compose in the chat page, in a real browser (Debian's Chromium, headless, through Playwright):
the whole app (`serve.app:create_app` under uvicorn on 127.0.0.1) with a compose model that knows its
sentences (tests/test_compose.py); type a prefix, see the ghost text after the caret, Tab accepts it;
Esc dismisses another one.

The screenshot goes to $FORGELINE_TEST_ARTIFACTS (default .forgeline/test-artifacts/) as compose-ghost.png.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_compose import memorising_model
from tests.test_ui import ARTIFACTS, CHROMIUM

pytestmark = pytest.mark.slow   # a browser and a server: end to end
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/install.sh does)")
    tmp = tmp_path_factory.mktemp("compose_page")
    model = memorising_model(tmp / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "OMP_NUM_THREADS": "1", "FORGELINE_COMPOSE_MODEL": str(model)}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serve.app:create_app", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10):
                break
        except OSError:
            time.sleep(0.2)
    yield url
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert "Traceback" not in (tmp / "server.log").read_text()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1000, "height": 800},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        context.set_default_timeout(30_000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def test_ghost_text_after_the_caret_tab_accepts_esc_rejects(server, page):
    page.goto(server, wait_until="networkidle")
    box = page.locator("#prompt")
    ghost = page.locator("#compose-ghost")
    box.press_sequentially("My dear Lizzy, I am very ", delay=30)
    page.wait_for_function("(document.getElementById('compose-ghost').dataset.suggestion || '') !== ''")
    suggestion = ghost.locator(".compose-suggestion").text_content()
    assert suggestion.startswith("glad to") and ghost.is_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compose-ghost.png"))
    box.press("Tab")
    assert box.input_value() == "My dear Lizzy, I am very " + suggestion
    assert not ghost.is_visible()
    assert page.evaluate("document.activeElement.id") == "prompt"   # Tab did not move the focus

    # a new sentence: its suggestion shows; Esc dismisses it and the text stays as typed
    box.fill("")
    box.press_sequentially("Pray write to me at ", delay=30)
    page.wait_for_function("(document.getElementById('compose-ghost').dataset.suggestion || '') !== ''")
    box.press("Escape")
    assert not ghost.is_visible() and box.input_value() == "Pray write to me at "
