"""The studio launched as `python app.py` on tiny random checkpoints (1:4 and 1:8), once per
test session, for the API and browser tests; Chromium for Playwright from Debian's package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.load import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
# A few hundred tokens of the tiny tokenizers' corpus: many windows and chunks at window 16, chunk 32.
DOCUMENT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Alpha beta gamma delta. The vault code is 5521. The grass is green and the sky is blue. "
) * 6


class Server:
    """`python app.py ...` in a subprocess; its output collected by a thread."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LCLM_STUDIO_HOME": str(home), "LCLM_STUDIO_CHUNK_TOKENS": "32",
               "LCLM_STUDIO_DEVICE": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        self.process = subprocess.Popen([sys.executable, "app.py", "--port", str(free_port()), *args], cwd=ROOT,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("LCLM Studio at "):
                self.url = line.split(" at ", 1)[1].strip()
                self.ready.set()
        self.ready.set()  # exited

    def wait(self) -> str:
        if not self.ready.wait(START_TIMEOUT_S) or self.url is None:
            self.stop()
            pytest.fail("the studio did not start:\n" + "\n".join(self.lines[-40:]))
        return self.url

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="session")
def studio_server(tiny_checkpoint_factory, tmp_path_factory):
    """The studio on two tiny checkpoints; `server.temp_root` holds its private upload directory."""
    checkpoints = [tiny_checkpoint_factory(ratio=4), tiny_checkpoint_factory(ratio=8)]
    temp_root = tmp_path_factory.mktemp("gradio-temp")
    server = Server([a for c in checkpoints for a in ("--checkpoint", str(c))], tmp_path_factory.mktemp("studio-home"),
                    env={"GRADIO_TEMP_DIR": str(temp_root), "LCLM_STUDIO_AUTH": ""})
    server.temp_root = temp_root
    server.wait()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def studio_url(studio_server) -> str:
    return studio_server.url


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory):
    """`python app.py` with no checkpoint: the embedded default (converted once, in a fresh home)."""
    server = Server([], tmp_path_factory.mktemp("embedded-home"),
                    env={"LCLM_STUDIO_CHUNK_TOKENS": "256"})  # the studio's own chunks, as a user sees them
    server.wait()
    yield server
    server.stop()


@pytest.fixture
def client(studio_url, tmp_path):
    """A gradio_client session of its own (its own document id and run history)."""
    from gradio_client import Client

    return Client(studio_url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright's launch arguments: Debian's chromium (`playwright install` cannot
    download a browser here). Playwright gives each launch a fresh temporary --user-data-dir."""
    executable = chromium_path()
    if executable is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):  # CI installs it (make install): a missing browser is a failure there
            pytest.fail(message)
        pytest.skip(message)
    return {**browser_type_launch_args, "executable_path": executable, "headless": True,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run"]}


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")
