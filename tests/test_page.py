"""The chat page of ``nlm serve`` in a real headless Chromium: it lists the model, streams a reply, shows its speed.

Needs the ``playwright`` Python package and Debian's ``chromium`` (Playwright's own browser download is not
used); without them the test skips, or fails under NLM_REQUIRE_BROWSER=1 (as in CI). With NLM_SCREENSHOT set
the screenshot goes to docs/chat-page.png for the README, otherwise to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Good morrow"
MAX_TOKENS = 40


@pytest.fixture
def chromium() -> str:
    """The chromium executable to drive; skips (fails under NLM_REQUIRE_BROWSER=1) when there is none."""
    def missing(reason: str):
        if os.environ.get("NLM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (NLM_REQUIRE_BROWSER=1)")
        pytest.skip(reason)

    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed")
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        missing("no chromium executable found")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_healthy(base: str, server: subprocess.Popen, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"nlm serve exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if get(base + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"nlm serve did not answer /health within {seconds} s:\n{log.read_text()[-3000:]}")


def test_chat_page_streams_a_reply(chromium, char_run, tmp_path):  # chromium first: no training when skipping
    from playwright.sync_api import sync_playwright

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "neurallm", "serve", str(char_run), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_healthy(base, server, log)
        status, body = get(base + "/v1/models")
        assert status == 200, body
        ids = [m["id"] for m in json.loads(body)["data"]]
        assert len(ids) == 1

        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium)
            try:
                page = b.new_page(viewport={"width": 1000, "height": 680})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(base + "/")
                assert page.title() == "neurallm chat"
                page.wait_for_function("document.querySelector('#model').options.length > 0", timeout=10_000)
                assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ids
                page.fill("#temperature", "0")
                page.fill("#max_tokens", str(MAX_TOKENS))
                page.fill("#prompt", PROMPT)
                page.click("#send")
                page.wait_for_function(
                    "document.querySelector('#status').textContent.includes('tokens/s')"
                    " && !document.querySelector('#send').disabled", timeout=20_000)
                assert page.text_content(".msg.user") == PROMPT
                streamed = page.text_content(".msg.assistant")
                status_line = page.text_content("#status")

                shot = (REPO / "docs" if os.environ.get("NLM_SCREENSHOT") else tmp_path) / "chat-page.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot))
                assert not errors, errors
            finally:
                b.close()

        assert streamed, "the assistant's reply is empty"
        assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · first token \d+ ms", status_line), status_line
        n_tokens = int(status_line.split()[0])
        assert 0 < n_tokens <= MAX_TOKENS
        assert shot.is_file() and shot.stat().st_size > 0

        # Greedy decoding: the same request, not streamed, gives the same text.
        whole = post(base + "/v1/chat/completions", {
            "model": ids[0], "messages": [{"role": "user", "content": PROMPT}], "stream": False,
            "temperature": 0, "top_p": 0.95, "top_k": 0, "max_tokens": MAX_TOKENS})
        assert whole["choices"][0]["message"]["content"] == streamed
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
