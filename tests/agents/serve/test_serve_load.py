"""Load: 200 concurrent requests of mixed kinds all complete, each with its own answer, and the
replicas' memory stays flat over a second round (the caches fill in the first and are bounded)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import psutil
import pytest

pytestmark = pytest.mark.ray

REQUESTS = 200
REQUEST_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 150.0


def replica_rss(app: str) -> dict[str, int]:
    """Resident memory of each Serve replica process of `app`, by its process title. Ray retitles a
    replica while one of its methods runs (`ServeReplica:APP:Ingress.check_health`): the deployment is
    the part before the dot."""
    title = f"ServeReplica:{app}:"
    rss = {}
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        command = " ".join(process.info["cmdline"] or ())
        if title in command:
            deployment = command.split(title, 1)[1].split()[0].split(".")[0]
            rss[deployment] = process.info["memory_info"].rss
    return rss


def bodies(ct_path: str, mr_base64: str, tokens: int) -> list[tuple[str, dict[str, Any], str]]:
    """(path, body, the field that must come back unchanged) for each request: VQA, region VQA and
    grounding on two images, each request told apart by its own text."""
    decoding = {"max_new_tokens": tokens}
    images = [{"uri": ct_path}, {"base64": mr_base64}]
    made = []
    for i in range(REQUESTS):
        image = images[i % 2]
        if i % 3 == 0:
            made.append(
                ("/v1/vqa", {"image": image, "question": f"Question {i}?", "decoding": decoding}, "question")
            )
        elif i % 3 == 1:
            regions = [{"kind": "box", "box": [2, 2, 30 + i % 20, 40]}]
            body = {
                "image": image,
                "question": f"What is in {{region}} ({i})?",
                "regions": regions,
                "decoding": decoding,
            }
            made.append(("/v1/vqa", body, "question"))
        else:
            made.append(
                ("/v1/ground", {"image": image, "text": f"structure {i}", "decoding": decoding}, "query")
            )
    return made


async def one_round(
    served: Any, requests: list[tuple[str, dict[str, Any], str]]
) -> tuple[list[float], float]:
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(
        base_url=served.url, headers=served.headers, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:

        async def send(path: str, body: dict[str, Any], echo: str) -> float:
            start = time.perf_counter()
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            result = response.json()
            sent = body["question"] if echo == "question" else body["text"]
            assert result[echo] == sent  # its own answer, not another request's
            assert (len(result["masks"]) >= 1) == (path == "/v1/ground" or "<SEG>" in result["text"])
            return time.perf_counter() - start

        start = time.perf_counter()
        latencies = await asyncio.wait_for(
            asyncio.gather(*(send(*request) for request in requests)), ROUND_TIMEOUT_S
        )
        return latencies, time.perf_counter() - start


def test_200_concurrent_mixed_requests_twice_with_flat_memory(
    served: Any, ct_path: str, mr_base64: str
) -> None:
    requests = bodies(ct_path, mr_base64, served.tokens)
    first, first_s = asyncio.run(one_round(served, requests))
    after_first = replica_rss(served.config.app_name)
    second, second_s = asyncio.run(one_round(served, requests))
    after_second = replica_rss(served.config.app_name)

    assert len(first) == len(second) == REQUESTS and max(first + second) < REQUEST_TIMEOUT_S
    assert set(after_first) >= {"Ingress", "Trunk", "GroundingDecoder"}
    grown = {name: (after_second[name] - after_first[name]) / 2**20 for name in after_first}
    total = sum(after_first.values()) / 2**20
    print(f"\nrounds: {first_s:.1f} s, {second_s:.1f} s; replica RSS {total:.0f} MiB, growth MiB {grown}")
    assert sum(grown.values()) < max(0.05 * total, 64), grown
