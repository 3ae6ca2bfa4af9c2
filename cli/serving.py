"""`medplib serve` (Ray Serve, a cluster) and `medplib ui` (the web page, the model in this process)."""

from __future__ import annotations

from pathlib import Path

import typer

from medplib.cli.common import app, user_errors


@app.command()
@user_errors
def serve(
    model: str | None = typer.Option(None, "--model", help="preset or checkpoint (default: the config's)"),
    config: Path | None = typer.Option(
        None, "--config", help="serve YAML, e.g. examples/serve/cpu.yaml or examples/serve/gpu-cluster.yaml"
    ),
    host: str | None = typer.Option(None, "--host", help="address to bind (default 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", help="HTTP port (default 8000)"),
    address: str | None = typer.Option(
        None, "--address", help="join this Ray cluster (auto, HOST:6379, ray://...); default: start one here"
    ),
    detach: bool = typer.Option(False, "--detach", help="with --address: deploy, then return"),
) -> None:
    """Serve VQA, region VQA and grounding over HTTP with Ray Serve, until Ctrl-C."""
    from medplib.agents.serve.config import ServeConfig

    if detach and address is None:
        from medplib.core.errors import InvalidInputError

        raise InvalidInputError("--detach needs --address: a Ray cluster started here ends with this command")
    settings = ServeConfig.from_yaml(config) if config is not None else ServeConfig()
    http = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    settings = settings.with_overrides(**({"model": model} if model else {}), http=http)
    import signal
    import threading

    import ray
    from ray import serve as ray_serve

    from medplib.agents.serve.app import deploy

    url = deploy(settings, address=address, ray_init={"include_dashboard": False} if address is None else {})
    key = "yes" if settings.resolved_api_key() else "none"
    typer.echo(f"medplib serving {settings.model} at {url} (API key: {key}; docs at {url}/docs)")
    if detach:
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):  # a timed wait, so Ctrl-C is seen at once
            pass
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("shutting down", err=True)
        if address is None:  # the cluster is ours: take Serve down with it
            ray_serve.shutdown()
        else:
            ray_serve.delete(settings.app_name)
        ray.shutdown()


@app.command()
@user_errors
def ui(
    model: str = typer.Option("tiny", "--model", help="preset or checkpoint folder / URI"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind"),
    port: int = typer.Option(7860, "--port", help="HTTP port"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    max_body_mb: int = typer.Option(32, "--max-body-mb", help="largest request (an upload is sent in it)"),
) -> None:
    """Serve the web page and the /v1 API with the model in this process (no Ray), until Ctrl-C.
    Set MEDPLIB_API_KEY to make the API ask for a key."""
    from medplib.agents.serve.ui.server import serve_ui

    serve_ui(model, host=host, port=port, device=device, max_body_bytes=max_body_mb << 20)
