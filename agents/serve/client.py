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
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_before_delay,
)

from medplib.agents.serve.client_calls import (
    EXPERTS,
    HEALTH,
    Call,
    image_call,
    volume_call,
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
from medplib.core.regions import RegionPrompt
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

RETRY_STATUSES = (502, 503)
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def _retryable(outcome: httpx.Response | Exception) -> bool:
    # Our own timeout is final: its time is spent.
    if isinstance(outcome, httpx.Response):
        return outcome.status_code in RETRY_STATUSES
    return isinstance(outcome, RETRY_ERRORS)


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
        return self._send(
            image_call("answer", image, question, regions, image_options, decoding, capability=capability)
        )

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
        return self._send(image_call("ground", image, text, regions, image_options, decoding))

    def ground_volume(
        self, volume: VolumeInput | bytes | str | os.PathLike[str], text: str, **options: Any
    ) -> GroundVolumeResponse:
        """Segment `text` through a volume; `options` are `GroundVolumeRequest`'s (axis, slices,
        mask_format, ...) and decoding's. A folder (a DICOM series) is named for the server to read."""
        return self._send(volume_call(volume, text, options))

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
        call = image_call(
            "answer", image, question, regions, image_options, decoding, capability=capability, stream=True
        )
        return self._stream(call)

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
        return self._stream(image_call("ground", image, text, regions, image_options, decoding, stream=True))

    def experts(self) -> ExpertsResponse:
        return self._send(EXPERTS)

    def health(self) -> HealthResponse:
        """The server's health; a server with a deployment down answers `status="unavailable"`."""
        return self._send(HEALTH)

    def _stream(self, call: Call) -> Iterator[Any]:
        """Server-sent events as they come; an error (before or during the stream) raises as `_send`'s
        do. A stream is not retried: its first bytes may already be used."""
        try:
            with self._sync.stream(call.method, call.path, json=call.body) as response:
                if not response.is_success:
                    response.read()
                    self._result(response, call)
                reader = EventReader()
                for line in response.iter_lines():
                    if (item := stream_item(reader.feed(line), call.model)) is not None:
                        yield item
                        if not isinstance(item, TextDelta):
                            return
        except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
            self._result(exc, call)
        raise _ended_without_result()

    def _send(self, call: Call) -> Any:
        deadline = time.monotonic() + self.timeout

        def attempt() -> httpx.Response | Exception:
            try:
                return self._sync.request(call.method, call.path, json=call.body, timeout=_left(deadline))
            except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
                return exc

        return self._result(Retrying(**self._retry_policy(call.retry))(attempt), call)

    # ---- async: the same calls ---------------------------------------------------------------------------

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
        call = image_call("answer", image, question, regions, image_options, decoding, capability=capability)
        return await self._asend(call)

    async def aground(
        self,
        image: ImageInput | bytes | str | os.PathLike[str],
        text: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> GroundingResult:
        return await self._asend(image_call("ground", image, text, regions, image_options, decoding))

    async def aground_volume(
        self, volume: VolumeInput | bytes | str | os.PathLike[str], text: str, **options: Any
    ) -> GroundVolumeResponse:
        return await self._asend(await asyncio.to_thread(volume_call, volume, text, options))

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
        call = image_call(
            "answer", image, question, regions, image_options, decoding, capability=capability, stream=True
        )
        async for item in self._astream(call):
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
        async for item in self._astream(
            image_call("ground", image, text, regions, image_options, decoding, stream=True)
        ):
            yield item

    async def aexperts(self) -> ExpertsResponse:
        return await self._asend(EXPERTS)

    async def ahealth(self) -> HealthResponse:
        return await self._asend(HEALTH)

    async def _astream(self, call: Call) -> AsyncIterator[Any]:
        try:
            async with self._async_client().stream(call.method, call.path, json=call.body) as response:
                if not response.is_success:
                    await response.aread()
                    self._result(response, call)
                reader = EventReader()
                async for line in response.aiter_lines():
                    if (item := stream_item(reader.feed(line), call.model)) is not None:
                        yield item
                        if not isinstance(item, TextDelta):
                            return
        except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
            self._result(exc, call)
        raise _ended_without_result()

    async def _asend(self, call: Call) -> Any:
        client = self._async_client()
        deadline = time.monotonic() + self.timeout

        async def attempt() -> httpx.Response | Exception:
            try:
                return await client.request(call.method, call.path, json=call.body, timeout=_left(deadline))
            except (*RETRY_ERRORS, httpx.TimeoutException) as exc:
                return exc

        return self._result(await AsyncRetrying(**self._retry_policy(call.retry))(attempt), call)

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

    def _result(self, outcome: httpx.Response | Exception, call: Call) -> Any:
        """The response parsed as `call.model`, or the error it is (the server's, a timeout, no server)."""
        if isinstance(outcome, httpx.TimeoutException) and not isinstance(outcome, RETRY_ERRORS):
            raise ServeError(
                f"no response within the client's timeout of {self.timeout:g} s", kind="timeout", status=504
            )
        if isinstance(outcome, Exception):
            raise ServeError(
                f"cannot reach the medplib server at {self.url}: {outcome}", kind="unavailable", status=503
            )
        if outcome.is_success or outcome.status_code in call.accept:
            return call.model.model_validate_json(outcome.content)
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


def _ended_without_result() -> ServeError:
    return ServeError("the answer's stream ended without a result", kind="internal", status=502)


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())
