"""The HTTP client against a scripted transport: bodies, retries within a bound, errors as exceptions."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from medplib.agents.image_store import StoredImage
from medplib.agents.serve.client import MedPLIBClient
from medplib.agents.serve.client_calls import image_input
from medplib.agents.serve.http_backend import HTTPBackend
from medplib.agents.serve.schemas import ServeError
from medplib.core.errors import InvalidInputError, RegionError
from medplib.core.regions import BoxPrompt, MaskPrompt

ANSWER = {
    "model": "tiny",
    "text": "x",
    "masks": [],
    "image_size": [4, 4],
    "image_source": "<base64>",
    "num_regions": 0,
    "prompt_tokens": 1,
    "new_tokens": 1,
    "cache": {"clip": "miss", "sam": "unused", "prefix": "miss"},
    "timings_ms": {},
    "task": "answer",
    "question": "q",
}


def scripted(*replies: Any) -> tuple[Callable[..., MedPLIBClient], list[httpx.Request]]:
    """A client factory whose transport answers with `replies` in turn (an exception is raised)."""
    seen: list[httpx.Request] = []
    queue = list(replies)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = queue.pop(0)
        if isinstance(reply, Exception):
            raise reply
        status, body, *headers = reply
        return httpx.Response(status, json=body, headers=headers[0] if headers else None)

    def make(**options: Any) -> MedPLIBClient:
        options.setdefault("backoff_s", 0.01)
        return MedPLIBClient("http://medplib.test", transport=httpx.MockTransport(handle), **options)

    return make, seen


def test_a_request_carries_the_image_regions_decoding_and_key() -> None:
    make, seen = scripted((200, ANSWER))
    result = make(api_key="k").vqa(b"\x89PNG", "q", [BoxPrompt(box=(0, 0, 2, 2))], max_new_tokens=3)
    assert result.question == "q"
    body = json.loads(seen[0].content)
    assert body["image"]["base64"] == base64.b64encode(b"\x89PNG").decode()
    assert body["regions"] == [{"kind": "box", "box": [0.0, 0.0, 2.0, 2.0]}]
    assert body["decoding"] == {"max_new_tokens": 3} and seen[0].headers["authorization"] == "Bearer k"


def test_images_by_kind(tmp_path: Path) -> None:
    (tmp_path / "scan.png").write_bytes(b"png bytes")
    assert image_input(tmp_path / "scan.png").base64 == base64.b64encode(b"png bytes").decode()
    assert image_input("s3://bucket/scan.dcm", window="lung").uri == "s3://bucket/scan.dcm"
    with pytest.raises(InvalidInputError, match="invalid image"):
        image_input("x.dcm", colour="red")
    with pytest.raises(InvalidInputError, match="not 3"):
        image_input(3)  # type: ignore[arg-type]


def test_503_and_lost_connections_are_retried_then_answered() -> None:
    make, seen = scripted(
        (503, {"error": "unavailable", "message": "busy"}, {"Retry-After": "0"}),
        httpx.ConnectError("refused"),
        (200, ANSWER),
    )
    assert make(retries=3).vqa("s3://x.png", "q").question == "q" and len(seen) == 3


def test_retries_are_bounded() -> None:
    make, seen = scripted(*[httpx.ConnectError("refused")] * 5)
    with pytest.raises(ServeError, match="cannot reach") as raised:
        make(retries=3).vqa("s3://x.png", "q")
    assert raised.value.status == 503 and len(seen) == 3


def test_errors_come_back_as_the_servers_exceptions_without_retry() -> None:
    make, seen = scripted(
        (400, {"error": "region", "message": "region 1: box off the image"}),
        (504, {"error": "timeout", "message": "no answer within 60 s"}),
    )
    client = make()
    with pytest.raises(RegionError, match="region 1"):
        client.vqa("s3://x.png", "q")
    with pytest.raises(ServeError, match="no answer") as raised:
        client.ground("s3://x.png", "t")
    assert raised.value.kind == "timeout" and len(seen) == 2


def test_the_client_timeout_bounds_every_call() -> None:
    """A server that is slow to say 503: the client retries, gives each request only the time left,
    and ends at its timeout, not after `retries` slow attempts (10 x 0.4 s here)."""
    budgets: list[float] = []

    def slow_server(request: httpx.Request) -> httpx.Response:
        budget = request.extensions["timeout"]["read"]
        budgets.append(budget)
        if budget < 0.4:  # the server would answer too late: httpx gives up when the budget is spent
            time.sleep(budget)
            raise httpx.ReadTimeout("slow", request=request)
        time.sleep(0.4)
        return httpx.Response(503, json={"error": "unavailable", "message": "busy"})

    client = MedPLIBClient(
        "http://medplib.test",
        transport=httpx.MockTransport(slow_server),
        timeout=1.0,
        retries=10,
        backoff_s=0.01,
    )
    start = time.perf_counter()
    with pytest.raises(ServeError, match="timeout") as raised:
        client.vqa("s3://x.png", "q")
    elapsed = time.perf_counter() - start
    assert raised.value.status == 504 and 0.95 <= elapsed < 1.5
    assert len(budgets) == 3 and budgets == sorted(budgets, reverse=True) and budgets[0] <= 1.0
    assert budgets[-1] < 0.4  # the last request had only what was left of the second


async def test_the_async_twins() -> None:
    make, seen = scripted((503, {"error": "unavailable", "message": "busy"}), (200, ANSWER))
    client = make()
    assert (await client.avqa("s3://x.png", "q")).question == "q" and len(seen) == 2
    await client.aclose()


async def test_a_capability_travels_in_the_body_sync_and_async_and_is_left_out_without_one() -> None:
    outputs = {"modality": [{"modality": "CT", "probability": 0.9, "probabilities": {"CT": 0.9}}]}
    make, seen = scripted(*[(200, {**ANSWER, "outputs": outputs, "forced": True})] * 3 + [(200, ANSWER)])
    client = make()
    result = client.vqa(b"\x89PNG", "q", capability="modality_classification", max_new_tokens=3)
    assert result.outputs == outputs and result.forced
    assert (await client.avqa("s3://x.png", "q", capability="modality_classification")).outputs == outputs
    client.vqa(b"\x89PNG", "q", capability="grounding")
    client.vqa(b"\x89PNG", "q")
    bodies = [json.loads(request.content) for request in seen]
    assert [body.get("capability") for body in bodies] == [
        "modality_classification",
        "modality_classification",
        "grounding",
        None,
    ]
    assert "capability" not in bodies[3]  # a server older than the field still answers
    await client.aclose()


def test_the_backend_uploads_what_the_agent_names(tmp_path: Path) -> None:
    (tmp_path / "scan.png").write_bytes(b"scan")
    (tmp_path / "mask.png").write_bytes(b"mask")
    make, seen = scripted((200, ANSWER), (200, ANSWER))
    backend = HTTPBackend(make())
    stored = StoredImage(str(tmp_path / "scan.png"), {"window": "lung"})
    backend.answer(stored, "q", [MaskPrompt(source=str(tmp_path / "mask.png"))], max_new_tokens=2)
    body = json.loads(seen[0].content)
    assert body["image"] == {"base64": base64.b64encode(b"scan").decode(), "axis": "axial", "window": "lung"}
    assert body["regions"][0]["data_base64"] == base64.b64encode(b"mask").decode()
    HTTPBackend(make(), upload=False).answer(stored, "q")
    assert json.loads(seen[1].content)["image"]["uri"] == str(tmp_path / "scan.png")
