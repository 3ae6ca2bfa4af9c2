"""The HTTP API as a FastAPI app: routes, the API key, the body limit and errors as JSON.

    POST /v1/vqa      VQARequest    -> AnswerResult      (a question; regions make it region VQA;
                                                          `capability` asks a plugin expert's head)
    POST /v1/ground   GroundRequest -> GroundingResult   (masks as COCO RLE)
    POST /v1/ground_volume  GroundVolumeRequest -> GroundVolumeResponse  (NIfTI or per-slice RLE)
    GET  /v1/experts                -> ExpertsResponse   (the model's experts, their output schemas
                                                          and the deployments hosting them)
    GET  /v1/health                 -> HealthResponse    (503 while a deployment has no running replica)
    "stream": true on /v1/vqa and /v1/ground: server-sent events instead (see `agents/serve/sse.py`)
    GET  /openapi.json, /docs                            (the schema, and a page to try it)

The app does no inference itself: `create_api` wires the routes to an `ApiService` (the Ray Serve
ingress in `agents/serve/ingress.py`). Checks that need no model run here, before the body is parsed where
they can: the API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`; health and the schema stay
open), then the body size (Content-Length, and the streamed bytes, capped). Every error is
`{"error": kind, "message": ...}` with the status `schemas.ERROR_KINDS` gives the kind.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medplib import __version__
from medplib.agents.serve.schemas import (
    ErrorResponse,
    ExpertsResponse,
    GroundRequest,
    GroundVolumeRequest,
    GroundVolumeResponse,
    HealthResponse,
    VQARequest,
    error_kind,
)
from medplib.agents.serve.sse import MEDIA_TYPE, encode_event
from medplib.core.errors import MedplibError
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

logger = logging.getLogger("medplib.serve")

OPEN_PATHS = ("/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/")
OPEN_PREFIXES = ("/ui/",)  # the web page's files; everything it asks of the API is under /v1
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "malformed JSON, an unreadable image, a region off the image, ...",
        401: "a missing or wrong API key",
        413: "a body, image or request over the server's limits",
        422: "a body that does not fit the schema",
        503: "no replica could serve the request; retry later",
        504: "no answer within the request timeout",
    }.items()
}


class ApiService(Protocol):
    async def answer(self, request: VQARequest | GroundRequest) -> AnswerResult | GroundingResult: ...

    def answer_stream(
        self, request: VQARequest | GroundRequest
    ) -> AsyncGenerator[TextDelta | AnswerResult | GroundingResult, None]: ...

    async def health(self) -> HealthResponse: ...

    def experts(self) -> ExpertsResponse: ...

    async def ground_volume(self, request: GroundVolumeRequest) -> GroundVolumeResponse: ...


def create_api(service: ApiService, *, max_body_bytes: int, api_key: str | None) -> FastAPI:
    app = FastAPI(
        title="medplib",
        version=__version__,
        summary="Pixel-level biomedical VQA, region VQA and grounding",
        description=__doc__,
    )
    app.add_middleware(RequestGate, max_body_bytes=max_body_bytes, api_key=api_key)

    @app.post("/v1/vqa", response_model=AnswerResult, responses=ERROR_RESPONSES)
    async def vqa(body: VQARequest) -> Any:
        """Answer a question about an image, or about the regions marked on it."""
        if body.stream:
            return await streamed(service.answer_stream(body))
        return await service.answer(body)

    @app.post("/v1/ground", response_model=GroundingResult, responses=ERROR_RESPONSES)
    async def ground(body: GroundRequest) -> Any:
        """Segment what `text` names; at least one mask, `seg_forced` says if the model needed a push."""
        if body.stream:
            return await streamed(service.answer_stream(body))
        return await service.answer(body)

    @app.post("/v1/ground_volume", response_model=GroundVolumeResponse, responses=ERROR_RESPONSES)
    async def ground_volume(body: GroundVolumeRequest) -> Any:
        """Segment what `text` names through a volume (NIfTI, DICOM series): a 3-D mask on its grid."""
        return await service.ground_volume(body)

    @app.get("/v1/experts", response_model=ExpertsResponse, responses={401: ERROR_RESPONSES[401]})
    async def experts() -> Any:
        """The experts this server hosts, and each deployment's replicas and resources."""
        return service.experts()

    @app.get("/v1/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(response: Response) -> Any:
        """Whether every deployment has a running replica (503 when not)."""
        report = await service.health()
        if report.status != "ok":
            response.status_code = 503
        return report

    app.add_exception_handler(MedplibError, _medplib_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


async def streamed(events: AsyncGenerator[Any, None]) -> StreamingResponse:
    """The events as server-sent events. The first is awaited before the response starts, so a
    request refused up front (a region off the image, ...) is an ordinary 4xx JSON error."""
    first = await anext(events)

    async def body() -> AsyncIterator[bytes]:
        item = first
        try:
            while True:
                kind = "delta" if isinstance(item, TextDelta) else "result"
                yield encode_event(kind, item.model_dump_json())
                item = await anext(events)
        except StopAsyncIteration:
            return
        except Exception as exc:  # the status line is sent: the error travels as the last event
            if isinstance(exc, MedplibError):
                kind, _ = error_kind(exc)
                message = str(exc)
            else:
                logger.exception("unexpected error while streaming an answer", exc_info=exc)
                kind, message = "internal", f"internal error ({type(exc).__name__}); see the server log"
            yield encode_event("error", ErrorResponse(error=kind, message=message).model_dump_json())
        finally:  # also when the client went away: the service's stream lets go of the model now
            await events.aclose()

    return StreamingResponse(body(), media_type=MEDIA_TYPE, headers={"Cache-Control": "no-cache"})


def error_response(kind: str, message: str, status: int, **headers: str) -> JSONResponse:
    body = ErrorResponse(error=kind, message=message).model_dump()
    return JSONResponse(body, status_code=status, headers=headers or None)


async def _medplib_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MedplibError)
    kind, status = error_kind(exc)
    if status >= 500:
        logger.warning("request failed: %s: %s", kind, exc)
    return error_response(kind, str(exc), status)


async def _invalid_request(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = errors[0].get("ctx", {}).get("error", "JSON decode error")
        return error_response("malformed_json", f"the body is not valid JSON: {detail}", 400)
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return error_response("invalid_request", "; ".join(parts), 422)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 413:
        return error_response("payload_too_large", str(exc.detail), 413)
    kind = {404: "not_found", 401: "unauthorized"}.get(exc.status_code, "invalid_request")
    return error_response(kind, str(exc.detail), exc.status_code, **(exc.headers or {}))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error while serving a request", exc_info=exc)
    # The client learns only that it is not its fault: exception names and messages stay in the log.
    return error_response("internal", "internal error; see the server log", 500)


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413, detail="the request body is over the server's limit")


class RequestGate:
    """Checks a request before its body is read: the API key on protected paths (401), a declared
    Content-Length over the limit (413); then counts the body as it streams in and stops at the limit
    (413, through the app's handler: FastAPI passes an HTTPException raised while reading on)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path, root = scope["path"], scope.get("root_path", "")
        path = path[len(root) :] if root and path.startswith(root) else path  # mounted under a prefix
        is_open = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        if self.api_key is not None and not is_open and not self._authorized(headers):
            message = "this server needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            response = error_response("unauthorized", message, 401, **{"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            message = (
                f"the request body is {declared} bytes, over the server's limit of {self.max_body_bytes}"
            )
            await error_response("payload_too_large", message, 413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge
            return message

        await self.app(scope, counted, send)

    def _authorized(self, headers: Headers) -> bool:
        assert self.api_key is not None
        bearer = headers.get("authorization", "")
        offered = bearer[7:] if bearer[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return hmac.compare_digest(offered.strip().encode(), self.api_key)
