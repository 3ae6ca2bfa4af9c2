"""The HTTP ingress deployment: validates, caches decoded images, batches, routes, retries, times out.

A request's way through the application:

1. `http_api` checks the API key and the body size, and parses the body into a `VQARequest` or
   `GroundRequest` (core schemas inside).
2. The image is read (base64, or a path/URI the config allows) and decoded once: decoded images are
   cached by the content hash of the encoded bytes and the read options, so an image sent again
   skips its DICOM or NIfTI decoding. Region prompts are checked against the image here, and mask
   files read here, so that the model deployments never touch the filesystem and a bad request
   never reaches (or fails) a batch.
3. Concurrent requests are gathered (`serve.batch`) into one call of the trunk, grouped by decoding
   options (the trunk merges the calls that wait while it runs: `ReplicaBatcher`); answers that hold
   `<SEG>` go on, batched the same way, to the grounding decoder with the image and the `<SEG>`
   hidden states; answers that hold a plugin expert's trigger token go on to its `Expert-NAME`
   deployment (when the config hosts it apart) with that token's hidden states, and the head's
   outputs join the result's `outputs`. Each deployment keeps its own embedding cache (see
   `deployments.py`). A `capability` the served model's experts lack is refused here (400).
4. A call whose replica died is retried (`retries.attempts` in all, with backoff) while Serve
   replaces the replica; the whole request has `limits.request_timeout_s` to finish, else 504.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from medplib.agents.serve.config import Batching, ServeConfig
from medplib.agents.serve.deployments import (
    GroundingItem,
    GroundingOutput,
    TrunkOutput,
    completed,
    replica_info,
)
from medplib.agents.serve.http_api import create_api
from medplib.agents.serve.schemas import (
    ExpertsResponse,
    GroundRequest,
    GroundVolumeRequest,
    GroundVolumeResponse,
    HealthResponse,
    ImageInput,
    ServeError,
    VQARequest,
    decode_base64,
)
from medplib.agents.serve.volume_service import ground_volume_request
from medplib.core.errors import MedplibError
from medplib.core.image import MedicalImage
from medplib.core.io import load_image
from medplib.core.io.paths import AllowedRoots
from medplib.core.io.sources import read_source
from medplib.core.per_image_cache import CacheKey, PerImageCache
from medplib.core.queries import Decoding, Query
from medplib.core.regions import MaskPrompt, RegionPrompt
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

logger = logging.getLogger("medplib.serve")
T = TypeVar("T")
R = TypeVar("R")

# What a dead or vanished replica looks like to a caller; the call is safe to send again.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)


@dataclass(frozen=True)
class TrunkItem:
    query: Query
    decoding: Decoding


def batched(
    handler: Callable[[list[T]], Awaitable[list[R]]], settings: Batching
) -> Callable[[T], Awaitable[R]]:
    """`handler` over a list, called per item: concurrent items are gathered into one call."""
    return serve.batch(
        max_batch_size=settings.max_batch_size,
        batch_wait_timeout_s=settings.batch_wait_timeout_s,
        max_concurrent_batches=settings.max_concurrent_batches,
    )(handler)


class IngressService:
    """What the ingress does, apart from Serve: the deployment below adds the HTTP app around it."""

    def __init__(
        self,
        trunk: DeploymentHandle,
        grounding: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
        config: ServeConfig,
        catalog: ExpertsResponse,
    ) -> None:
        self.trunk = trunk
        self.grounding = grounding
        self.expert_heads = experts  # Expert-NAME deployments, by expert name
        self.config = config
        self.catalog = catalog
        self.limits = config.limits
        self.request_limits = config.limits.inference(config.deployments.trunk.batching.max_batch_size)
        self.images = PerImageCache(config.limits.decoded_cache_bytes)
        self.readable = AllowedRoots(config.limits.allowed_uri_prefixes)
        self._generate = batched(self._generate_many, config.deployments.trunk.batching)
        self._decode = batched(self._decode_many, config.deployments.grounding.batching)

    # ---- the API ---------------------------------------------------------------------------------------

    async def answer(self, request: VQARequest | GroundRequest) -> AnswerResult | GroundingResult:
        timeout = self.limits.request_timeout_s
        try:
            return await asyncio.wait_for(self._answer(request), timeout)
        except TimeoutError:
            raise ServeError(
                f"no answer within the request timeout of {timeout:g} s: the server is overloaded or a "
                "deployment is being replaced; retry later",
                kind="timeout",
                status=504,
            ) from None

    async def answer_stream(
        self, request: VQARequest | GroundRequest
    ) -> AsyncGenerator[TextDelta | AnswerResult | GroundingResult, None]:
        """The answer token by token, then the whole result. A stream is not batched: it holds one
        trunk replica's turn while it runs, and is not retried once it has started."""
        start = time.perf_counter()
        query, load_ms = await self._query(request)
        trunk = self.trunk.options(stream=True)
        output: TrunkOutput | None = None
        try:
            async for item in trunk.generate_stream.remote(query, request.decoding.model_dump()):
                if isinstance(item, BaseException):  # the trunk refused this query
                    raise item
                if isinstance(item, TextDelta):
                    yield item
                else:
                    output = item
        except REPLICA_GONE as exc:
            raise ServeError(
                f"the trunk replica went away during the stream ({type(exc).__name__}); retry",
                kind="unavailable",
                status=503,
            ) from None
        assert output is not None, "the trunk's stream ended without its output"
        yield await self._finish(query, output, load_ms, start)

    async def health(self) -> HealthResponse:
        try:
            app_name = serve.get_replica_context().app_name
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 10)
            deployments = status.applications[app_name].deployments
        except (TimeoutError, KeyError) as exc:
            logger.warning("health: Serve's status is unavailable (%r)", exc)
            return HealthResponse(status="unavailable", model=self.config.model, deployments={})
        states = {name: d.status.value for name, d in deployments.items()}
        running = all(d.replica_states.get("RUNNING", 0) > 0 for d in deployments.values())
        return HealthResponse(
            status="ok" if running else "unavailable", model=self.config.model, deployments=states
        )

    def experts(self) -> ExpertsResponse:
        return self.catalog

    # ---- one request -----------------------------------------------------------------------------------

    async def _answer(self, request: VQARequest | GroundRequest) -> AnswerResult | GroundingResult:
        start = time.perf_counter()
        query, load_ms = await self._query(request)
        output = await self._generate(TrunkItem(query, request.decoding))
        return await self._finish(query, output, load_ms, start)

    async def _query(self, request: VQARequest | GroundRequest) -> tuple[Query, float]:
        """The request checked and its image loaded: the query for the trunk, and the load's ms."""
        query = request.query()  # its image still the body's spec: sizes are checked before it is read
        self.catalog.check_capability(query.capability)
        self.request_limits.check(query, request.decoding)
        image, load_ms = await self._load(request.image)
        regions = await asyncio.to_thread(self._checked_regions, query.regions, image)
        return query.model_copy(update={"image": image, "regions": regions}), load_ms

    async def infer(self, query: Query, decoding: Decoding) -> AnswerResult | GroundingResult:
        """One checked query through the trunk, and the grounding decoder if its answer holds <SEG>."""
        return await self._with_masks(query, await self._generate(TrunkItem(query, decoding)))

    async def _finish(
        self, query: Query, output: TrunkOutput | BaseException, load_ms: float, start: float
    ) -> AnswerResult | GroundingResult:
        """The trunk's output with its masks and the request's timings (load and total included)."""
        result = await self._with_masks(query, output)
        timings = {**result.timings_ms, "load": load_ms, "total": 1000 * (time.perf_counter() - start)}
        return result.model_copy(update={"timings_ms": {k: round(v, 2) for k, v in timings.items()}})

    async def _with_masks(
        self, query: Query, output: TrunkOutput | BaseException
    ) -> AnswerResult | GroundingResult:
        """The trunk's result, with a mask from the grounding decoder for each <SEG> of its answer and
        the outputs of the heads hosted apart for their trigger tokens (those calls run concurrently)."""
        if isinstance(output, BaseException):  # the trunk refused this query alone
            raise output
        start = time.perf_counter()
        names = list(output.head_states)
        calls: list[Awaitable[Any]] = [self._run_head(name, output.head_states[name]) for name in names]
        if len(output.seg_hidden_states):
            label = query.text if query.task == "ground" else None
            calls.append(self._decode(GroundingItem(query.image.pixels, output.seg_hidden_states, label)))
        done = await asyncio.gather(*calls)
        grounded = done[len(names)] if len(done) > len(names) else None
        heads = dict(zip(names, done[: len(names)], strict=True))
        return completed(output.result, grounded, heads, 1000 * (time.perf_counter() - start))

    async def ground_volume(self, request: GroundVolumeRequest) -> GroundVolumeResponse:
        """A volume grounded slice by slice through `infer`: see `agents/serve/volume_service.py`."""
        return await ground_volume_request(
            request,
            infer=self.infer,
            allowed=self.readable.check,
            limits=self.limits,
            model=self.config.model,
            batch_size=self.config.deployments.trunk.batching.max_batch_size,
        )

    async def _load(self, spec: ImageInput) -> tuple[MedicalImage, float]:
        """The decoded image and the milliseconds it took (about 0 when the cache had it)."""
        start = time.perf_counter()
        if spec.base64 is not None:
            data, name = await asyncio.to_thread(decode_base64, spec.base64, "image.base64"), "<base64>"
        else:
            name = self.readable.check(spec.uri or "", "image.uri")
            data = await asyncio.to_thread(read_source, name, max_bytes=self.limits.max_image_bytes)
        options = spec.load_options()
        key = CacheKey("decoded", hashlib.blake2b(data, digest_size=16).hexdigest(), json.dumps(options))
        image = self.images.get(key)
        if image is None:
            try:
                image = await asyncio.to_thread(load_image, data, **options, limits=self.limits.image())
            except MedplibError as exc:
                raise type(exc)(f"image: {exc}") from None
            self.images.put(key, image)
        image = dataclasses.replace(image, meta=image.meta.model_copy(update={"source": name}))
        return image, 1000 * (time.perf_counter() - start)

    def _checked_regions(self, regions: Sequence[RegionPrompt], image: MedicalImage) -> list[RegionPrompt]:
        """Each region rasterised once on the image (off the image or empty: an error naming it);
        a mask named by path or URI is read here and sent on inline."""
        height, width = image.size
        checked: list[RegionPrompt] = []
        for index, prompt in enumerate(regions, start=1):
            try:
                if isinstance(prompt, MaskPrompt) and prompt.source is not None:
                    source = self.readable.check(prompt.source, f"regions[{index}].source")
                    prompt = MaskPrompt.from_array(MaskPrompt(source=source).to_mask(height, width))
                else:
                    prompt.to_mask(height, width)
            except MedplibError as exc:
                raise type(exc)(f"region {index}: {exc}") from None
            checked.append(prompt)
        return checked

    # ---- batches, routed to the model deployments ------------------------------------------------------

    async def _generate_many(self, items: list[TrunkItem]) -> list[TrunkOutput | MedplibError]:
        """One trunk call per decoding setting among the gathered requests (decoding is per batch)."""
        groups: dict[Decoding, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.decoding, []).append(index)
        outputs: list[Any] = [None] * len(items)

        async def run(decoding: Decoding, indices: list[int]) -> None:
            queries = [items[i].query for i in indices]
            answers = await self._call("trunk", self.trunk.generate, queries, decoding.model_dump())
            for index, answer in zip(indices, answers, strict=True):
                outputs[index] = answer

        await asyncio.gather(*(run(decoding, indices) for decoding, indices in groups.items()))
        return outputs

    async def _decode_many(self, items: list[GroundingItem]) -> list[GroundingOutput]:
        return await self._call("grounding decoder", self.grounding.decode, items)

    async def _run_head(self, name: str, hidden_states: Any) -> list[dict[str, Any]]:
        """Expert `name`'s head on its trigger tokens' hidden states (its replica merges concurrent calls)."""
        return await self._call(f"Expert-{name} deployment", self.expert_heads[name].run, hidden_states)

    async def _call(self, name: str, method: DeploymentHandle, *args: Any) -> Any:
        """`method.remote(*args)`, sent again while its replica dies under it, `attempts` times in all."""
        retries = self.config.retries
        for attempt in range(retries.attempts):
            try:
                return await method.remote(*args)
            except REPLICA_GONE as exc:
                failure = exc
                logger.warning(
                    "%s replica gone (attempt %d of %d): %s", name, attempt + 1, retries.attempts, exc
                )
                await asyncio.sleep(retries.backoff_s * 2**attempt)
            except BackPressureError:
                raise ServeError(
                    f"the {name} is at capacity; retry later", kind="unavailable", status=503
                ) from None
        raise ServeError(
            f"the {name} failed {retries.attempts} times as its replicas went away "
            f"({type(failure).__name__}); retry later",
            kind="unavailable",
            status=503,
        )


@serve.deployment
@serve.ingress()
class Ingress(IngressService):
    def __serve_build_asgi_app__(self) -> Any:
        """The FastAPI app, built in the replica: its limits and key come from this replica's config."""
        from medplib.agents.serve.ui.page import add_page

        app = create_api(
            self, max_body_bytes=self.limits.max_body_bytes, api_key=self.config.resolved_api_key()
        )
        add_page(app, self.limits)
        return app

    def describe(self) -> dict[str, Any]:
        """Where this replica runs (a handle method, not a route)."""
        return replica_info("Ingress", "cpu")
