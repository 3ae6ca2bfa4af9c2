"""The FastAPI app alone (no Ray, no model): the key, the body limit, and every error as JSON."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medplib.agents.serve.http_api import create_api
from medplib.agents.serve.schemas import (
    ERROR_KINDS,
    ExpertsResponse,
    GroundRequest,
    GroundVolumeRequest,
    HealthResponse,
    ServeError,
    VQARequest,
    error_from_response,
    error_kind,
)
from medplib.agents.serve.sse import parse_events
from medplib.core.errors import CapacityError, ImageTooLargeError, InvalidInputError, RegionError
from medplib.core.queries import ChatMessage, Query
from medplib.core.regions import PointPrompt
from medplib.core.results import AnswerResult, CacheHits, TextDelta

KEY = "s3cret"
LIMIT = 4096
GOOD = {"image": {"uri": "scan.dcm"}, "question": "What is this?"}


def answer(question: str) -> AnswerResult:
    return AnswerResult(
        model="fake",
        text="an answer",
        masks=[],
        image_size=(4, 4),
        image_source="scan.dcm",
        num_regions=0,
        prompt_tokens=1,
        new_tokens=1,
        cache=CacheHits(clip="miss", sam="unused", prefix="miss"),
        timings_ms={},
        question=question,
    )


class FakeService:
    def __init__(self) -> None:
        self.raises: Exception | None = None
        self.fail_first = False
        self.healthy = True

    async def answer(self, request: VQARequest | GroundRequest) -> Any:
        if self.raises is not None:
            raise self.raises
        return answer(request.question if isinstance(request, VQARequest) else request.text)

    async def answer_stream(self, request: VQARequest | GroundRequest) -> AsyncGenerator[Any, None]:
        """Two pieces, then the result; `raises` fails it after the first piece (`fail_first`: before)."""
        if self.fail_first and self.raises is not None:
            raise self.raises
        yield TextDelta(text="an ")
        if self.raises is not None:
            raise self.raises
        yield TextDelta(text="answer")
        yield await self.answer(request)

    async def health(self) -> HealthResponse:
        status = "ok" if self.healthy else "unavailable"
        return HealthResponse(status=status, model="fake", deployments={"Trunk": "HEALTHY"})

    def experts(self) -> ExpertsResponse:
        return ExpertsResponse(experts=[], deployments={})


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def client(service: FakeService) -> Iterator[TestClient]:
    with TestClient(
        create_api(service, max_body_bytes=LIMIT, api_key=KEY), raise_server_exceptions=False
    ) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


def error(response: Any, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == kind and set(body) == {"error", "message"}
    return body["message"]


def test_a_good_request_is_answered(client: TestClient) -> None:
    response = client.post("/v1/vqa", json=GOOD)
    assert response.status_code == 200 and response.json()["question"] == "What is this?"


def test_the_api_key_is_required_except_for_health_and_the_schema(client: TestClient) -> None:
    del client.headers["Authorization"]
    assert "API key" in error(client.post("/v1/vqa", json=GOOD), 401, "unauthorized")
    assert client.post("/v1/vqa", json=GOOD, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/vqa", json=GOOD, headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/v1/experts").status_code == 401
    assert client.get("/v1/health").status_code == 200
    assert "/v1/ground" in client.get("/openapi.json").json()["paths"]


def test_bodies_over_the_limit_are_refused_declared_or_streamed(client: TestClient) -> None:
    big = b'{"question": "' + b"x" * LIMIT + b'"}'
    assert "limit" in error(client.post("/v1/vqa", content=big), 413, "payload_too_large")
    chunks = iter([big[:1000], big[1000:]])  # no Content-Length: counted as it streams in
    streamed = client.post("/v1/vqa", content=chunks, headers={"Content-Type": "application/json"})
    error(streamed, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("body", "status", "kind", "names"),
    [
        (b"{not json", 400, "malformed_json", "JSON"),
        (b'{"image": {"uri": "x"}}', 422, "invalid_request", "question"),
        (
            b'{"image": {"uri": "x", "base64": "AA=="}, "question": "q"}',
            422,
            "invalid_request",
            "exactly one",
        ),
        (
            b'{"image": {"uri": "x"}, "question": "q", "regions": [{"kind": "blob"}]}',
            422,
            "invalid_request",
            "regions",
        ),
        (
            b'{"image": {"uri": "x"}, "question": "q", "decoding": {"max_new_tokens": 0}}',
            422,
            "invalid_request",
            "max_new_tokens",
        ),
    ],
)
def test_malformed_bodies_get_4xx_naming_the_problem(
    client: TestClient, body: bytes, status: int, kind: str, names: str
) -> None:
    response = client.post("/v1/vqa", content=body, headers={"Content-Type": "application/json"})
    assert names in error(response, status, kind)


@pytest.mark.parametrize(
    ("raised", "status", "kind"),
    [
        (RegionError("box off the image"), 400, "region"),
        (InvalidInputError("no such file: x"), 400, "invalid_input"),
        (ImageTooLargeError("too many pixels"), 413, "image_too_large"),
        (CapacityError("9 regions"), 413, "capacity"),
        (ServeError("busy", kind="timeout", status=504), 504, "timeout"),
        (RuntimeError("a bug"), 500, "internal"),
    ],
)
def test_errors_while_answering_map_to_their_status(
    client: TestClient, service: FakeService, raised: Exception, status: int, kind: str
) -> None:
    service.raises = raised
    error(client.post("/v1/vqa", json=GOOD), status, kind)
    service.raises = None
    assert client.post("/v1/vqa", json=GOOD).status_code == 200  # and the next request is served


def test_an_unexpected_error_is_logged_and_answered_with_a_generic_message(
    client: TestClient, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    service.raises = KeyError("/srv/models/secret-path")
    message = error(client.post("/v1/vqa", json=GOOD), 500, "internal")
    assert message == "internal error; see the server log"
    assert "secret-path" in caplog.text and "KeyError" in caplog.text


def test_unknown_paths_and_an_unhealthy_server(client: TestClient, service: FakeService) -> None:
    error(client.get("/v2/anything"), 404, "not_found")
    service.healthy = False
    response = client.get("/v1/health")
    assert response.status_code == 503 and response.json()["status"] == "unavailable"


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
def test_an_error_kind_round_trips_to_its_exception(kind: str) -> None:
    status, cls = ERROR_KINDS[kind]
    exc = error_from_response(status, {"error": kind, "message": "m"})
    assert isinstance(exc, cls) and str(exc) == "m"
    if kind not in ("malformed_json", "invalid_request", "payload_too_large"):  # HTTP-layer kinds
        assert error_kind(exc) == (kind, status)
    assert isinstance(error_from_response(502, "<html>bad gateway</html>"), ServeError)


def test_a_streamed_answer_is_server_sent_events(client: TestClient, service: FakeService) -> None:
    response = client.post("/v1/vqa", json={**GOOD, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = list(parse_events(response.text.splitlines()))
    assert [event for event, _ in events] == ["delta", "delta", "result"]
    assert AnswerResult.model_validate_json(events[-1][1]).text == "an answer"

    service.raises = RegionError("region 1 lies outside the image")
    service.fail_first = True  # refused before the first piece: an ordinary JSON error
    assert "outside" in error(client.post("/v1/vqa", json={**GOOD, "stream": True}), 400, "region")
    service.fail_first = False  # failed while streaming: the last event says why
    ground = {"image": GOOD["image"], "text": "the lungs", "stream": True}
    events = list(parse_events(client.post("/v1/ground", json=ground).text.splitlines()))
    assert [event for event, _ in events] == ["delta", "error"]
    assert error_from_response(200, json.loads(events[-1][1])).__class__ is RegionError
    service.raises = RuntimeError("a bug")
    events = list(parse_events(client.post("/v1/vqa", json={**GOOD, "stream": True}).text.splitlines()))
    assert events[-1][0] == "error" and json.loads(events[-1][1])["error"] == "internal"


def test_http_bodies_become_the_one_request_type() -> None:
    """What `/v1/vqa`, `/v1/ground` and `/v1/ground_volume` check and send on is the API's `Query`."""
    image = {"uri": "scan.png", "frame": 2}
    point = PointPrompt(points=[(1, 1)])
    user, assistant = ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b")
    vqa = VQARequest(image=image, question="q", regions=[point], history=[user, assistant], capability="c")
    assert vqa.query() == Query(
        image=vqa.image, text="q", regions=[point], history=[user, assistant], capability="c"
    )
    ground = GroundRequest(image=image, text="the liver").query()
    assert (ground.task, ground.text, ground.image.frame) == ("ground", "the liver", 2)
    volume = GroundVolumeRequest(volume={"uri": "ct.nii.gz"}, text="the lung").query()
    assert (volume.task, volume.text, volume.image.uri) == ("ground", "the lung", "ct.nii.gz")
