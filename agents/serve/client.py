"""A Python client of the medplib HTTP API (`medplib serve`), sync and async, on httpx.

    from medplib.agents.serve.client import MedPLIBClient
    client = MedPLIBClient("http://127.0.0.1:8000", api_key=None, timeout=120)
    client.vqa(Path("scan.dcm"), "What modality is this?", max_new_tokens=32)   # a local file: uploaded
    client.vqa("s3://bucket/scan.dcm", "What is in {region}?", [BoxPrompt(box=(10, 10, 60, 60))])
    client.vqa(png_bytes, "Which modality?", capability="modality_classification").outputs["modality"]
    client.ground(png_bytes, "the liver lesion")                                # GroundingResult, RLE masks
    for part in client.vqa_stream(png_bytes, "What is this?"): ...              # TextDelta..., AnswerResult
    async for part in client.avqa_stream(png_bytes, "What is this?"): ...       # the same, async
    await client.avqa(...); await client.aground(...)

An image is `bytes` or a `pathlib.Path` (read here and sent as base64), a `str` (a path or URI the
*server* reads, if its config allows), or an `ImageInput`. Results are the core models
(`AnswerResult`, `GroundingResult`); an error response raises the `MedplibError` subclass the server
raised (`RegionError`, `CapacityError`, ...) or a `ServeError` (401, 503, 504). Connection failures
and 503s are retried, `retries` attempts in all, with exponential backoff.

`agents/serve/http_backend.py` puts it behind the LangChain tools' `Backend` protocol
(`MedPLIBToolkit.from_url`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_before_delay,
)

from medplib.agents.serve.schemas import (
    ExpertsResponse,
    GroundVolumeResponse,
    HealthResponse,
    ImageInput,
    ServeError,
    VolumeInput,
    error_from_response,
)
from medplib.agents.serve.sse import EventReader, stream_item
from medplib.core.errors import InvalidInputError, validation_message
from medplib.core.image import DEFAULT_LIMITS
from medplib.core.io.sources import read_source
from medplib.core.queries import Decoding
from medplib.core.regions import RegionPrompt
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

M = TypeVar("M", bound=BaseModel)
RETRY_STATUSES = (502, 503)
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def _retryable(outcome: httpx.Response | Exception) -> bool:
    # Our own timeout is final: its time is spent.
    if isinstance(outcome, httpx.Response):
        return outcome.status_code in RETRY_STATUSES
    return isinstance(outcome, RETRY_ERRORS)


def image_input(image: ImageInput | bytes | str | os.PathLike[str], **options: Any) -> ImageInput:
    """What a request carries for `image`; `options` are `load_image`'s (frame, window, ...)."""
    if isinstance(image, ImageInput):
        return image.model_copy(update=options) if options else image
    if isinstance(image, os.PathLike):
        image = read_source(image, max_bytes=DEFAULT_LIMITS.max_bytes)
    if isinstance(image, bytes | bytearray | memoryview):
        fields: dict[str, Any] = {"base64": base64.b64encode(bytes(image)).decode("ascii")}
    elif isinstance(image, str):
        fields = {"uri": image}
    else:
        raise InvalidInputError(
            f"an image is bytes, a Path, a path/URI string or an ImageInput, not {image!r}"
        )
    try:
        return ImageInput(**fields, **options)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid image: {validation_message(exc)}") from None


class MedPLIBClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.MockTransport | None = None,
    ) -> None:
        """`transport` stands in for the network (tests: `httpx.MockTransport` serves sync and async)."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._sync = httpx.Client(
            base_url=self.url, headers=self._headers, timeout=timeout, transport=transport
        )
        # httpx's async pools belong to the event loop that opened them: one client per loop.
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    # ---- sync ------------------------------------------------------------------------------------------

    def vqa(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        question: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        capability: str | None = None,
        **decoding: Any,
    ) -> AnswerResult:
        """Answer `question` about `image` (region VQA when `regions` are given); `capability` (see
        `experts()`) asks an expert for it: its head's outputs are in the result's `outputs`."""
        body = _body(image, image_options, regions, decoding, question=question, capability=capability)
        return self._send("POST", "/v1/vqa", AnswerResult, body)

    def ground(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        text: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> GroundingResult:
        """Segment what `text` names; at least one mask."""
        body = _body(image, image_options, regions, decoding, text=text)
        return self._send("POST", "/v1/ground", GroundingResult, body)

    def ground_volume(
        self, volume: VolumeInput | bytes | str | os.PathLike[str], text: str, **options: Any
    ) -> GroundVolumeResponse:
        """Segment `text` through a volume; `options` are `GroundVolumeRequest`'s (axis, slices,
        mask_format, ...) and decoding's. A folder (a DICOM series) is named for the server to read."""
        return self._send(
            "POST", "/v1/ground_volume", GroundVolumeResponse, _volume_body(volume, text, options)
        )

    def vqa_stream(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        question: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        capability: str | None = None,
        **decoding: Any,
    ) -> Iterator[TextDelta | AnswerResult]:
        """`vqa` as the answer is generated: `TextDelta`s (joining to the answer), then the result."""
        body = _body(
            image, image_options, regions, decoding, question=question, capability=capability, stream=True
        )
        return self._stream("/v1/vqa", AnswerResult, body)

    def ground_stream(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        text: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> Iterator[TextDelta | GroundingResult]:
        """`ground` as the answer is generated: `TextDelta`s, then the result with its masks."""
        body = _body(image, image_options, regions, decoding, text=text, stream=True)
        return self._stream("/v1/ground", GroundingResult, body)

    def _stream(self, path: str, model: type[M], body: Any) -> Iterator[TextDelta | M]:
        """Server-sent events as they come; an error (before or during the stream) raises as `_send`'s
        do. A stream is not retried: its first bytes may already be used."""
        try:
            with self._sync.stream("POST", path, json=body) as response:
                if not response.is_success:
                    response.read()
                    self._result(response, model, ())
                reader = EventReader()
                for line in response.iter_lines():
                    if (item := stream_item(reader.feed(line), model)) is not None:
                        yield item
                        if not isinstance(item, TextDelta):
                            return
        except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
            self._result(exc, model, ())
        raise ServeError("the answer's stream ended without a result", kind="internal", status=502)

    def experts(self) -> ExpertsResponse:
        return self._send("GET", "/v1/experts", ExpertsResponse)

    def health(self) -> HealthResponse:
        """The server's health; a server with a deployment down answers `status="unavailable"`."""
        return self._send("GET", "/v1/health", HealthResponse, retry=False, accept=(503,))

    def _send(
        self,
        method: str,
        path: str,
        model: type[M],
        body: Any = None,
        *,
        retry: bool = True,
        accept: tuple[int, ...] = (),
    ) -> M:
        deadline = time.monotonic() + self.timeout

        def attempt() -> httpx.Response | Exception:
            try:
                return self._sync.request(method, path, json=body, timeout=_left(deadline))
            except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
                return exc

        return self._result(Retrying(**self._retry_policy(retry))(attempt), model, accept)

    # ---- async -----------------------------------------------------------------------------------------

    async def avqa(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        question: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        capability: str | None = None,
        **decoding: Any,
    ) -> AnswerResult:
        body = _body(image, image_options, regions, decoding, question=question, capability=capability)
        return await self._asend("POST", "/v1/vqa", AnswerResult, body)

    async def aground(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        text: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> GroundingResult:
        body = _body(image, image_options, regions, decoding, text=text)
        return await self._asend("POST", "/v1/ground", GroundingResult, body)

    async def aground_volume(
        self, volume: VolumeInput | bytes | str | os.PathLike[str], text: str, **options: Any
    ) -> GroundVolumeResponse:
        body = await asyncio.to_thread(_volume_body, volume, text, options)
        return await self._asend("POST", "/v1/ground_volume", GroundVolumeResponse, body)

    async def avqa_stream(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        question: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        capability: str | None = None,
        **decoding: Any,
    ) -> AsyncIterator[TextDelta | AnswerResult]:
        body = _body(
            image, image_options, regions, decoding, question=question, capability=capability, stream=True
        )
        async for item in self._astream("/v1/vqa", AnswerResult, body):
            yield item

    async def aground_stream(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        text: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> AsyncIterator[TextDelta | GroundingResult]:
        body = _body(image, image_options, regions, decoding, text=text, stream=True)
        async for item in self._astream("/v1/ground", GroundingResult, body):
            yield item

    async def _astream(self, path: str, model: type[M], body: Any) -> AsyncIterator[TextDelta | M]:
        try:
            async with self._async_client().stream("POST", path, json=body) as response:
                if not response.is_success:
                    await response.aread()
                    self._result(response, model, ())
                reader = EventReader()
                async for line in response.aiter_lines():
                    if (item := stream_item(reader.feed(line), model)) is not None:
                        yield item
                        if not isinstance(item, TextDelta):
                            return
        except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
            self._result(exc, model, ())
        raise ServeError("the answer's stream ended without a result", kind="internal", status=502)

    async def aexperts(self) -> ExpertsResponse:
        return await self._asend("GET", "/v1/experts", ExpertsResponse)

    async def ahealth(self) -> HealthResponse:
        return await self._asend("GET", "/v1/health", HealthResponse, retry=False, accept=(503,))

    async def _asend(
        self,
        method: str,
        path: str,
        model: type[M],
        body: Any = None,
        *,
        retry: bool = True,
        accept: tuple[int, ...] = (),
    ) -> M:
        client = self._async_client()
        deadline = time.monotonic() + self.timeout

        async def attempt() -> httpx.Response | Exception:
            try:
                return await client.request(method, path, json=body, timeout=_left(deadline))
            except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
                return exc

        return self._result(await AsyncRetrying(**self._retry_policy(retry))(attempt), model, accept)

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = httpx.AsyncClient(
                base_url=self.url, headers=self._headers, timeout=self.timeout, transport=self._transport
            )
        return client

    # ---- shared ----------------------------------------------------------------------------------------

    def _retry_policy(self, retry: bool) -> dict[str, Any]:
        """One retry policy for sync and async (tenacity): connection failures and 502/503 are sent
        again with exponential backoff (or a shorter Retry-After), `retries` attempts in all, never past
        the timeout. Each attempt returns its outcome (a response or the exception) instead of raising,
        so the last one is reported as any other."""

        def wait(state: RetryCallState) -> float:
            pause = self.backoff_s * 2 ** (state.attempt_number - 1)
            outcome = state.outcome.result() if state.outcome is not None else None
            if isinstance(outcome, httpx.Response) and outcome.headers.get("retry-after", "").isdigit():
                pause = min(pause, float(outcome.headers["retry-after"]))
            return pause

        return {
            "retry": retry_if_result(_retryable),
            "wait": wait,
            "stop": stop_after_attempt(self.retries if retry else 1) | stop_before_delay(self.timeout),
            "retry_error_callback": lambda state: state.outcome.result(),
        }

    def _result(self, outcome: httpx.Response | Exception, model: type[M], accept: tuple[int, ...]) -> M:
        if isinstance(outcome, httpx.TimeoutException) and not isinstance(outcome, RETRY_ERRORS):
            raise ServeError(
                f"no response within the client's timeout of {self.timeout:g} s", kind="timeout", status=504
            )
        if isinstance(outcome, Exception):
            raise ServeError(
                f"cannot reach the medplib server at {self.url}: {outcome}", kind="unavailable", status=503
            )
        if outcome.is_success or outcome.status_code in accept:
            return model.model_validate_json(outcome.content)
        try:
            body: Any = outcome.json()
        except ValueError:
            body = outcome.text
        raise error_from_response(outcome.status_code, body)

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        for client in list(self._async.values()):
            await client.aclose()
        self._async.clear()

    def __enter__(self) -> MedPLIBClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MedPLIBClient({self.url!r})"


def _body(
    image: Any,
    image_options: Mapping[str, Any] | None,
    regions: Sequence[Any],
    decoding: Mapping[str, Any],
    **text: Any,
) -> dict[str, Any]:
    """The JSON body; the server validates everything else, so a client and server never disagree.
    A field left None is left out (a server older than the field still answers)."""
    return {
        "image": image_input(image, **(image_options or {})).model_dump(mode="json", exclude_none=True),
        "regions": [r.model_dump(mode="json") if isinstance(r, BaseModel) else dict(r) for r in regions],
        "decoding": dict(decoding),
        **{key: value for key, value in text.items() if value is not None},
    }


def _volume_body(volume: Any, text: str, options: Mapping[str, Any]) -> dict[str, Any]:
    from medplib.core.io.dicom_series import is_folder

    if isinstance(volume, VolumeInput):
        spec = volume
    elif isinstance(volume, os.PathLike) and not is_folder(volume):
        spec = VolumeInput(
            base64=base64.b64encode(read_source(volume, max_bytes=DEFAULT_LIMITS.max_bytes)).decode()
        )
    elif isinstance(volume, bytes | bytearray | memoryview):
        spec = VolumeInput(base64=base64.b64encode(bytes(volume)).decode("ascii"))
    else:
        spec = VolumeInput(uri=os.fspath(volume))
    decoding = {key: value for key, value in options.items() if key in Decoding.model_fields}
    fields = {key: value for key, value in options.items() if key not in decoding}
    return {"volume": spec.model_dump(exclude_none=True), "text": text, "decoding": decoding, **fields}


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())
