"""The `/v1` API's service backed by a `MedPLIB` in this process: what `medplib ui` serves.

The same routes and schemas as the Ray Serve ingress (`http_api.create_api`), without Ray: images
come as base64 and stay in memory (the model's embedding cache keeps their features); the body becomes
the same `Query` as in the ingress (a request with `history` is a follow-up), answered by the model.
One request runs at a time, on the model's worker thread (`backends.model_guard`), a streamed one step
by step.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from medplib.agents.backends import model_guard
from medplib.agents.serve.schemas import (
    DeploymentInfo,
    ExpertsResponse,
    GroundRequest,
    HealthResponse,
    HostedExpert,
    ImageInput,
    VQARequest,
    decode_base64,
)
from medplib.core import plugins
from medplib.core.errors import InvalidInputError
from medplib.core.expert_spec import Resources
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

if TYPE_CHECKING:
    from medplib.core.assistant import MedPLIB

T = TypeVar("T")
DEPLOYMENT = "in-process"
_DONE = object()


def image_bytes(spec: ImageInput) -> bytes:
    """The uploaded file; this server reads no paths or URIs (a page uploads what it shows)."""
    if spec.base64 is None:
        raise InvalidInputError("image.uri: this server reads no paths or URIs; send the file as base64")
    return decode_base64(spec.base64, "image.base64")


class InProcessService:
    """`http_api.ApiService` over `model` (load it with `ServeLimits.inference`: the same limits as
    `medplib serve`'s)."""

    def __init__(self, model: MedPLIB) -> None:
        self.model = model
        self._guard = model_guard(model)
        self._turn = asyncio.Lock()  # one request at a time, a stream included, in arrival order

    async def answer(self, request: VQARequest | GroundRequest) -> AnswerResult | GroundingResult:
        async with self._turn:
            return await self._in_worker(functools.partial(self._invoke, stream=False), request)

    async def answer_stream(
        self, request: VQARequest | GroundRequest
    ) -> AsyncGenerator[TextDelta | AnswerResult | GroundingResult, None]:
        async with self._turn:
            events = await self._in_worker(functools.partial(self._invoke, stream=True), request)
            while (item := await self._in_worker(next, events, _DONE)) is not _DONE:
                yield item

    def _invoke(self, request: VQARequest | GroundRequest, *, stream: bool) -> Any:
        """The model's answer to the request's `Query` (a question with history is a chat's next turn):
        its result, or (`stream`) an iterator of its pieces and then the result."""
        image = {"image": image_bytes(request.image), "image_options": request.image.load_options()}
        query, decoding = request.query().model_copy(update=image), request.decoding.model_dump()
        if stream:
            return self.model.query_stream(query, **decoding)
        return self.model.answer_batch([query], **decoding)[0]

    async def _in_worker(self, call: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._guard.lock:
                return call(*args)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._guard.executor, functools.partial(locked))

    async def health(self) -> HealthResponse:
        return HealthResponse(status="ok", model=self.model.name, deployments={DEPLOYMENT: "HEALTHY"})

    def experts(self) -> ExpertsResponse:
        installed = plugins.get_experts()
        held = [info for info in self.model.experts() if info.trained and info.name in installed]
        device = self.model.device
        resources = Resources(num_gpus=1.0 if device.type == "cuda" else 0.0, num_cpus=1.0)
        info = DeploymentInfo(
            replicas=1, autoscaling_config=None, resources=resources, max_ongoing_requests=1
        )
        return ExpertsResponse(
            experts=[
                HostedExpert(spec=installed[i.name], deployments=[DEPLOYMENT], output_schema=i.output_schema)
                for i in held
            ],
            deployments={DEPLOYMENT: info},
        )
