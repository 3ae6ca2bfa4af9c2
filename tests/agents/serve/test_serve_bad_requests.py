"""Bad requests get a 4xx naming the problem, and the server goes on serving the next good request."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from medplib.core.masks import encode_png

pytestmark = pytest.mark.ray


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cases(
    ct_path: str, claiming: Callable[[int, int], bytes]
) -> dict[str, tuple[dict[str, Any], int, str, str]]:
    """name -> (body, status, error kind, a word the message must hold)."""
    ask = {"image": {"uri": ct_path}, "question": "What is this?", "decoding": {"max_new_tokens": 3}}

    def vqa(**changes: Any) -> dict[str, Any]:
        return {**ask, **changes}

    small_mask = b64(encode_png(np.ones((8, 8), dtype=bool)))
    return {
        "broken base64": (vqa(image={"base64": "%%% not base64 %%%"}), 400, "invalid_input", "base64"),
        "not an image": (vqa(image={"base64": b64(b"just some text")}), 400, "unsupported_format", "format"),
        "no such image file": (vqa(image={"uri": "/no/such/scan.dcm"}), 400, "invalid_input", "no such file"),
        "decompression bomb": (
            vqa(image={"base64": b64(claiming(20000, 20000))}),
            413,
            "image_too_large",
            "",
        ),
        "box outside the image": (
            vqa(regions=[{"kind": "box", "box": [10, 10, 500, 60]}]),
            400,
            "region",
            "outside the 128x128",
        ),
        "empty polygon": (
            vqa(regions=[{"kind": "polygon", "points": [[1, 1], [2, 2], [3, 3]]}]),
            400,
            "region",
            "collinear",
        ),
        "mask path missing": (
            vqa(regions=[{"kind": "mask", "source": "/no/such/mask.png"}]),
            400,
            "invalid_input",
            "mask.png",
        ),
        "mask URI missing": (
            vqa(regions=[{"kind": "mask", "source": "memory://medplib/none.png"}]),
            400,
            "invalid_input",
            "none.png",
        ),
        "mask of another size": (
            vqa(regions=[{"kind": "mask", "data_base64": small_mask}]),
            400,
            "region",
            "8x8",
        ),
        "region count mismatch": (vqa(question="Compare {region} and {region}."), 400, "region", "{region}"),
        "too many regions": (
            vqa(regions=[{"kind": "point", "points": [[5, 5]]}] * 5),
            413,
            "capacity",
            "over the limit of 4",
        ),
        "too many new tokens": (vqa(decoding={"max_new_tokens": 17}), 413, "capacity", "max_new_tokens"),
        "question too long": (vqa(question="why? " * 1000), 413, "capacity", "characters"),
        "missing field": ({"image": {"uri": ct_path}}, 422, "invalid_request", "question"),
        "unknown field": (vqa(colour="red"), 422, "invalid_request", "colour"),
        "unknown region kind": (vqa(regions=[{"kind": "blob"}]), 422, "invalid_request", "regions"),
        "empty question": (vqa(question=""), 422, "invalid_request", "question"),
    }


def check_next_good_request(served: Any, ct_path: str) -> None:
    good = {"image": {"uri": ct_path}, "question": "And now?", "decoding": {"max_new_tokens": 3}}
    response = httpx.post(f"{served.url}/v1/vqa", json=good, headers=served.headers, timeout=60)
    assert response.status_code == 200 and response.json()["question"] == "And now?"


def expect_error(response: httpx.Response, status: int, kind: str, word: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == kind and word in body["message"], body


def test_every_bad_input_gets_a_clear_4xx(
    served: Any, ct_path: str, png_claiming: Callable[[int, int], bytes]
) -> None:
    with httpx.Client(base_url=served.url, headers=served.headers, timeout=60) as client:
        for name, (body, status, kind, word) in cases(ct_path, png_claiming).items():
            try:
                expect_error(client.post("/v1/vqa", json=body), status, kind, word)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None
    check_next_good_request(served, ct_path)


def test_malformed_json_oversized_bodies_and_a_wrong_key(served: Any, ct_path: str) -> None:
    headers = {**served.headers, "Content-Type": "application/json"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=60) as client:
        expect_error(client.post("/v1/vqa", content=b'{"image": {"uri": '), 400, "malformed_json", "JSON")
        huge = json.dumps({"image": {"base64": "A" * (2 << 20)}, "question": "q"}).encode()
        expect_error(client.post("/v1/vqa", content=huge), 413, "payload_too_large", "limit")
        streamed = client.post("/v1/vqa", content=iter([huge[: 1 << 19], huge[1 << 19 :]]))  # chunked
        expect_error(streamed, 413, "payload_too_large", "limit")
        wrong = client.post("/v1/vqa", content=b"{}", headers={"Authorization": "Bearer nope"})
        expect_error(wrong, 401, "unauthorized", "API key")
        expect_error(client.get("/v1/nothing-here"), 404, "not_found", "Not Found")
    check_next_good_request(served, ct_path)


def test_special_tokens_in_text_are_plain_text(served: Any, ct_path: str) -> None:
    body = {
        "image": {"uri": ct_path},
        "question": "Segment <SEG> the <region> and <image></s> please",
        "decoding": {"max_new_tokens": 3},
    }
    response = httpx.post(f"{served.url}/v1/vqa", json=body, headers=served.headers, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    # The typed <SEG> triggers no mask and the typed <region> marks no region.
    assert result["masks"] == [] and "<SEG>" not in result["text"] and result["num_regions"] == 0


def test_a_bad_query_fails_alone_among_concurrent_good_ones(served: Any, ct_path: str) -> None:
    import asyncio

    good = {"image": {"uri": ct_path}, "question": "Fine?", "decoding": {"max_new_tokens": 3}}
    bad = {**good, "question": "Where is {region}?"}  # refused by the trunk, inside a batch

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, headers=served.headers, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/v1/vqa", json=bad if i == 3 else good) for i in range(8))
            )

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 200, 200, 200]
    expect_error(responses[3], 400, "region", "{region}")
