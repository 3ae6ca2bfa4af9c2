"""Faults: a grounding replica's actor is killed during a load of 100 requests. Serve replaces it, the
ingress retries the calls that were in flight, at least 99 requests succeed and none outlives its timeout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import ray
from ray import serve

pytestmark = pytest.mark.ray

REQUESTS = 100
TIMEOUT_S = 90.0  # the client's bound; the server's own request timeout is 60 s


def grounding_replicas(app: str) -> list[str]:
    """Names of the live GroundingDecoder replica actors of `app` (Serve names them app#deployment#id)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return [name for name in names if f"{app}#GroundingDecoder#" in name]


async def load_and_kill(served: Any, ct_path: str) -> tuple[list[tuple[int, float]], str]:
    decoding = {"max_new_tokens": served.tokens}
    async with httpx.AsyncClient(base_url=served.url, headers=served.headers, timeout=TIMEOUT_S) as client:

        async def send(i: int) -> tuple[int, float]:
            start = time.perf_counter()
            if i % 2:
                body = {"image": {"uri": ct_path}, "text": f"target {i}", "decoding": decoding}
                path = "/v1/ground"
            else:
                body = {"image": {"uri": ct_path}, "question": f"Q{i}?", "decoding": decoding}
                path = "/v1/vqa"
            try:
                status = (await client.post(path, json=body)).status_code
            except httpx.HTTPError:
                status = 0
            return status, time.perf_counter() - start

        tasks = [asyncio.create_task(send(i)) for i in range(REQUESTS)]
        while sum(task.done() for task in tasks) < 10:  # in the thick of it
            await asyncio.sleep(0.02)
        (victim,) = grounding_replicas(served.config.app_name)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        return await asyncio.gather(*tasks), victim


def test_killing_a_grounding_replica_mid_load(served: Any, ct_path: str) -> None:
    outcomes, victim = asyncio.run(load_and_kill(served, ct_path))
    statuses = [status for status, _ in outcomes]
    slowest = max(seconds for _, seconds in outcomes)
    print(f"\nkilled {victim}: {statuses.count(200)} of {REQUESTS} succeeded, slowest {slowest:.1f} s")
    assert sum(status == 200 for status in statuses) >= REQUESTS - 1, statuses
    assert slowest < TIMEOUT_S

    deadline = time.monotonic() + 60  # Serve brings the deployment back to one running replica
    while time.monotonic() < deadline:
        replicas = grounding_replicas(served.config.app_name)
        deployment = serve.status().applications[served.config.app_name].deployments["GroundingDecoder"]
        if replicas and victim not in replicas and deployment.replica_states.get("RUNNING") == 1:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replacement for {victim}: {replicas}")
    body = {"image": {"uri": ct_path}, "text": "after", "decoding": {"max_new_tokens": served.tokens}}
    response = httpx.post(f"{served.url}/v1/ground", json=body, headers=served.headers, timeout=TIMEOUT_S)
    assert response.status_code == 200 and len(response.json()["masks"]) == 1
