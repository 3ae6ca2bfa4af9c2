"""`medplib ui --model tiny` started as a real process on a free port, and a real headless chromium.

The browser is Debian's chromium driven by Playwright (`playwright install` cannot download here):
`make test` installs it when it is missing, and a missing browser fails these tests, never skips them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = Path(os.environ.get("MEDPLIB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAX_BODY_MB = 4  # small, so that an oversized upload is cheap to make


@dataclass(frozen=True)
class UiServer:
    url: str
    api_key: str | None
    max_body_mb: int = MAX_BODY_MB


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(api_key: str | None, log: Path) -> tuple[subprocess.Popen[bytes], UiServer]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEDPLIB_API_KEY", None)
    if api_key:
        env["MEDPLIB_API_KEY"] = api_key
    command = [sys.executable, "-m", "medplib.cli", "ui", "--model", "tiny", "--device", "cpu"]
    command += ["--port", str(port), "--max-body-mb", str(MAX_BODY_MB)]
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    return process, UiServer(f"http://127.0.0.1:{port}", api_key)


def wait_until_up(process: subprocess.Popen[bytes], server: UiServer, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{server.url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"medplib ui did not start:\n{log.read_text()}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def ui_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, UiServer]]:
    """Two servers, one without an API key and one with, started side by side (each loads its model)."""
    folder = tmp_path_factory.mktemp("ui-servers")
    launched = {
        name: (launch(key, folder / f"{name}.log"), folder / f"{name}.log")
        for name, key in (("open", None), ("keyed", "s3cret-key"))
    }
    try:
        for (process, server), log in launched.values():
            wait_until_up(process, server, log)
        yield {name: server for name, ((_, server), _) in launched.items()}
    finally:
        for (process, _), _ in launched.values():
            process.terminate()
        for (process, _), _ in launched.values():
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def ui_server(ui_servers: dict[str, UiServer]) -> UiServer:
    return ui_servers["open"]


@pytest.fixture(scope="session")
def keyed_ui_server(ui_servers: dict[str, UiServer]) -> UiServer:
    return ui_servers["keyed"]


# Per module, not per session: Playwright's sync API runs an event loop on this thread while it is
# open, which would stop any later asyncio test of the session from starting its own.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"no browser at {CHROMIUM}: run `make test` (it installs chromium) or apt-get install chromium"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()
