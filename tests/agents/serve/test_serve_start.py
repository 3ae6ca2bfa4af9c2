"""Deploying waits for Serve's HTTP proxy past Serve's own fixed 60 s wait (`app.start_serve`).

Serve's wait is shortened to 10 ms in a fresh Ray (a subprocess, apart from the package's cluster), so
`serve.start` gives up as it does on a loaded machine; `start_serve` must still return with the proxy
answering on its port (503 until an application's routes reach it).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.agents.serve.conftest import free_port

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import httpx, ray
    from ray import serve
    from ray.serve._private import api
    from medplib.agents.serve.app import proxy_url, start_serve
    from medplib.agents.serve.config import Http

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    api.HTTP_PROXY_TIMEOUT = 0.01  # Serve's own wait for its proxy, shortened: it times out
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    http = Http(port=int(sys.argv[1]), startup_timeout_s=120)
    start_serve(http, request_timeout_s=30)
    print("proxy answers:", httpx.get(proxy_url(http) + "/-/healthz", timeout=10).status_code)
    serve.shutdown()
    ray.shutdown()
    """
)


def test_a_proxy_slower_than_serves_own_wait_is_waited_for() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(free_port())], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Serve's HTTP proxy is slow to start (HTTP proxies not available after 0.01s.)" in run.stdout
    assert "proxy answers: 503" in run.stdout or "proxy answers: 200" in run.stdout
