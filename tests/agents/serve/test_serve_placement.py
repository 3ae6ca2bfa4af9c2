"""Placement on fake GPUs: the GPU-cluster example, scaled to the test cluster (2 fake GPUs), deployed
beside the CPU app; every replica reports what Ray gave it, which must be what the config says."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from medplib.agents.serve.app import build_app, check_resources
from medplib.agents.serve.config import ServeConfig

pytestmark = pytest.mark.ray

APP = "placed"


def placed_config(examples: Any, model: Path) -> ServeConfig:
    """gpu-cluster.yaml with a tiny checkpoint holding the example's modality expert (its head hosted
    apart, on a quarter of a GPU as its spec asks), one trunk and fractions of a CPU (two cores)."""
    return ServeConfig.from_yaml(examples / "gpu-cluster.yaml").with_overrides(
        app_name=APP,
        model=str(model),
        api_key="placed-key",
        load={"dtype": "float32", "cache_bytes": 64 << 20},
        limits={"allowed_uri_prefixes": None},
        deployments={
            "ingress": {"num_replicas": 1, "resources": {"num_cpus": 0.1}},
            "trunk": {
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                "resources": {"num_gpus": 1, "num_cpus": 0.1, "memory_gb": None},
                "torch_threads": 1,
            },
            "grounding": {"resources": {"num_cpus": 0.1}, "torch_threads": 1},
        },
        plugin_experts={"modality": {"resources": {"num_gpus": 0.25, "num_cpus": 0.1}}},
    )


def replicas_of(deployment: str, expected: int) -> dict[str, dict[str, Any]]:
    """Each replica's own report, asked through the deployment's handle until all have answered."""
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < expected and time.monotonic() < deadline:
        report = handle.describe.remote().result(timeout_s=30)
        seen[report["replica"]] = report
    assert len(seen) == expected, seen
    return seen


def test_each_deployment_lands_where_its_config_says(
    served: Any, example_plugin: Any, modality_checkpoint: Path
) -> None:
    """`example_plugin`: the replicas find the example's expert as a user's would, installed."""
    import ray

    config = placed_config(Path(__file__).parents[3] / "examples" / "serve", modality_checkpoint)
    check_resources(config, ray.cluster_resources())
    serve.run(build_app(config), name=APP, route_prefix="/placed")  # beside the CPU app, on its port
    try:
        (ingress,) = replicas_of("Ingress", 1).values()
        (trunk,) = replicas_of("Trunk", 1).values()
        grounding = list(replicas_of("GroundingDecoder", 2).values())
        (expert,) = replicas_of("Expert-modality", 1).values()
        base = served.url  # the CPU app's root: one HTTP proxy serves both apps
        health = httpx.get(f"{base}/placed/v1/health", timeout=30)  # open, under the prefix
        refused = httpx.get(f"{base}/placed/v1/experts", timeout=30)
        catalog = httpx.get(f"{base}/placed/v1/experts", headers={"X-API-Key": "placed-key"}, timeout=30)
    finally:
        serve.delete(APP)
    assert health.status_code == 200 and refused.status_code == 401
    assert catalog.json()["deployments"]["Expert-modality"]["resources"]["num_gpus"] == 0.25

    assert ingress["resources"] == {"CPU": 0.1} and ingress["gpu_ids"] == []
    assert trunk["resources"] == {"CPU": 0.1, "GPU": 1.0} and len(trunk["gpu_ids"]) == 1
    for replica in grounding:  # gpu-cluster.yaml: two SAM replicas on a quarter of a GPU each
        assert replica["resources"] == {"CPU": 0.1, "GPU": 0.25} and len(replica["gpu_ids"]) == 1
    assert expert["resources"] == {"CPU": 0.1, "GPU": 0.25}
    assert trunk["device"] == "cpu"  # the fake GPUs have no CUDA behind them: "auto" falls back
    assert len({r["pid"] for r in [ingress, trunk, *grounding, expert]}) == 5
