"""`medplib serve`: bad invocations exit 2 before Ray starts; `--address --detach` joins a running
cluster (here the tests' own), deploys beside what runs there and returns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from medplib.cli import app


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--detach"], "--detach needs --address"),
        (["--config", "no/such/serve.yaml"], "cannot read the serve config"),
        (["--model", "no/such/checkpoint"], "neither a preset"),
        (["--port", "70000"], "http.port"),
    ],
)
def test_bad_invocations_exit_2_with_one_line(arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["serve", *arguments])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.ray
def test_serve_joins_a_cluster_and_detaches(served: Any, tmp_path: Path) -> None:
    import ray
    from ray import serve

    config = tmp_path / "cli.yaml"
    config.write_text(
        "app_name: cli\n"
        "http: {route_prefix: /cli}\n"
        "deployments:\n"
        "  trunk: {torch_threads: 1, resources: {num_cpus: 0.1}}\n"
        "  grounding: {torch_threads: 1, resources: {num_cpus: 0.1}}\n"
        "  ingress: {resources: {num_cpus: 0.1}}\n"
    )
    command = [
        str(Path(sys.executable).parent / "medplib"),
        "serve",
        "--model",
        "tiny",
        "--config",
        str(config),
    ]
    address = ray.get_runtime_context().gcs_address
    result = subprocess.run(
        [*command, "--address", address, "--detach"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "medplib serving tiny at" in result.stdout
    try:
        health = httpx.get(f"{served.url}/cli/v1/health", timeout=30)  # the running Serve's port
        assert health.status_code == 200 and health.json()["model"] == "tiny"
    finally:
        serve.delete("cli")
