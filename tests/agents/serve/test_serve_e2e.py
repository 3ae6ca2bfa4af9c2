"""End to end over HTTP on loopback with the tiny preset: VQA, region VQA, grounding, the client, a tool.

The replicas load the tiny preset with the same seed as `medplib.load("tiny")` here, so a greedy
answer over HTTP must equal the in-process one: text and masks, to the bit.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import medplib
from medplib.agents.toolkit import MedPLIBToolkit
from medplib.core.assistant import MedPLIB
from medplib.core.io import load_image
from medplib.core.masks import Mask, encode_png
from medplib.core.results import AnswerResult, GroundingResult

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local() -> Iterator[MedPLIB]:
    """The in-process model the server must agree with (one thread, as the replicas run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield medplib.load("tiny", device="cpu")
    torch.set_num_threads(threads)


def post(served: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{served.url}{path}", json=body, headers=served.headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_vqa_region_vqa_and_grounding_equal_the_in_process_model(
    served: Any, local: MedPLIB, ct_path: str, mr_base64: str
) -> None:
    decoding = {"max_new_tokens": served.tokens}
    answered = AnswerResult.model_validate(
        post(
            served, "/v1/vqa", {"image": {"uri": ct_path}, "question": "What is this?", "decoding": decoding}
        )
    )
    expected = local.answer(ct_path, "What is this?", max_new_tokens=served.tokens)
    assert answered.text == expected.text and answered.image_source == ct_path
    assert answered.masks == [] and set(answered.timings_ms) >= {"load", "prefill", "decode", "total"}

    mr = load_image(base64.b64decode(mr_base64))
    inline = np.zeros(mr.size, dtype=bool)
    inline[40:60, 5:20] = True
    regions = [
        {"kind": "box", "box": [4, 4, 30, 30]},
        {"kind": "point", "points": [[40, 20]], "labels": [1]},
        {"kind": "mask", "data_base64": base64.b64encode(encode_png(inline)).decode()},
    ]
    body = {
        "image": {"base64": mr_base64},
        "question": "Compare {region}, {region} and {region}.",
        "regions": regions,
        "decoding": decoding,
    }
    region_answer = AnswerResult.model_validate(post(served, "/v1/vqa", body))
    assert region_answer.num_regions == 3 and region_answer.image_size == (64, 64)
    assert (
        region_answer.text == local.answer(mr, body["question"], regions, max_new_tokens=served.tokens).text
    )

    body = {"image": {"uri": ct_path}, "text": "the lungs", "decoding": decoding}
    grounded = GroundingResult.model_validate(post(served, "/v1/ground", body))
    expected_ground = local.ground(ct_path, "the lungs", max_new_tokens=served.tokens)
    assert grounded.text == expected_ground.text and grounded.seg_forced == expected_ground.seg_forced
    assert [m.mask for m in grounded.masks] == [m.mask for m in expected_ground.masks]
    (segment,) = grounded.masks
    assert segment.label == "the lungs" and Mask.model_validate(segment.mask).to_array().shape == (128, 128)


def test_the_client_sync_and_async(served: Any, ct_path: str, mr_base64: str) -> None:
    client = served.client()
    assert client.health().status == "ok"
    experts = client.experts()
    assert {e.spec.name for e in experts.experts} >= {"vision_language", "pixel_grounding"}
    assert set(experts.deployments) == {"Ingress", "Trunk", "GroundingDecoder"}
    answer = client.vqa(base64.b64decode(mr_base64), "What is this?", max_new_tokens=served.tokens)
    grounded = client.ground(ct_path, "the lungs", max_new_tokens=served.tokens)
    assert answer.image_size == (64, 64) and len(grounded.masks) >= 1

    import asyncio

    async def both() -> list[Any]:
        return await asyncio.gather(
            client.avqa(ct_path, "Which organ?", max_new_tokens=served.tokens),
            client.aground(ct_path, "the heart", max_new_tokens=served.tokens),
        )

    vqa, ground = asyncio.run(both())
    assert vqa.question == "Which organ?" and ground.query == "the heart"


def test_a_tool_call_goes_through_the_serve_app(served: Any, ct_path: str) -> None:
    toolkit = MedPLIBToolkit.from_url(
        served.url, api_key=served.api_key, decoding={"max_new_tokens": served.tokens}
    )
    scan = toolkit.images.put(ct_path)
    tools = {tool.name: tool for tool in toolkit.get_tools()}
    call = {
        "name": "medical_grounding",
        "args": {"image": scan, "target": "the lungs"},
        "id": "1",
        "type": "tool_call",
    }
    message = tools["medical_grounding"].invoke(call)
    assert "Segmented 'the lungs'" in message.content and "mask-1" in message.content
    assert repr(toolkit.backend).startswith("HTTPBackend(")
    assert message.artifact.result.image_size == (128, 128) and message.artifact.mask_ids == ["mask-1"]
    follow_up = {
        "image": scan,
        "question": "What is in {region}?",
        "regions": [{"kind": "mask", "mask": "mask-1"}],
    }
    assert tools["medical_region_vqa"].invoke(follow_up)


def test_the_schema_health_experts_and_the_key(served: Any) -> None:
    schema = httpx.get(f"{served.url}/openapi.json", timeout=30).json()
    assert {"/v1/vqa", "/v1/ground", "/v1/experts", "/v1/health"} <= set(schema["paths"])
    assert "RegionPrompt" in str(schema) or "BoxPrompt" in str(schema)
    health = httpx.get(f"{served.url}/v1/health", timeout=30)
    assert health.status_code == 200 and health.json()["deployments"]["Trunk"] == "HEALTHY"
    refused = httpx.get(f"{served.url}/v1/experts", timeout=30)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"


def test_answers_stream_token_by_token_and_the_page_is_served(served: Any, ct_path: str) -> None:
    client = served.client()
    regions = [{"kind": "box", "box": [20, 30, 80, 90]}]
    *deltas, streamed = client.vqa_stream(ct_path, "What is in {region}?", regions, max_new_tokens=12)
    plain = client.vqa(ct_path, "What is in {region}?", regions, max_new_tokens=12)
    assert len(deltas) >= 2 and "".join(d.text for d in deltas) == streamed.text == plain.text
    *_, grounded = client.ground_stream(ct_path, "the lungs", max_new_tokens=12)
    assert isinstance(grounded, GroundingResult) and len(grounded.masks) >= 1
    page = httpx.get(f"{served.url}/", timeout=30)
    assert page.status_code == 200 and "/ui/app.js" in page.text
