"""Where the tools' answers come from: the seam between the LangChain tools and a model.

A backend answers questions and grounds text about one image, sync and async, and raises a
`MedplibError` (message naming what is wrong) for anything the caller got wrong. `InProcessBackend`
wraps a loaded `MedPLIB`; a client of the Ray Serve application implements the same protocol, and the
tools cannot tell the two apart.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from medplib.agents.image_store import StoredImage
from medplib.core import plugins
from medplib.core.expert_spec import ExpertSpec
from medplib.core.regions import RegionPrompt
from medplib.core.results import AnswerResult, GroundingResult
from medplib.core.volume_results import VolumeGroundingResult

if TYPE_CHECKING:
    from medplib.core.assistant import MedPLIB

T = TypeVar("T")


@runtime_checkable
class Backend(Protocol):
    """What the tools need from a model. `decoding` takes `medplib.core.queries.Decoding`'s fields;
    `answer` may also take `capability=` (an expert's capability, for its tool), and a backend may
    say which experts its model holds (`expert_specs()`), so the toolkit offers their tools only."""

    def answer(
        self, image: StoredImage, question: str, regions: Sequence[RegionPrompt] = (), **decoding: Any
    ) -> AnswerResult: ...

    def ground(self, image: StoredImage, text: str, **decoding: Any) -> GroundingResult: ...

    async def aanswer(
        self, image: StoredImage, question: str, regions: Sequence[RegionPrompt] = (), **decoding: Any
    ) -> AnswerResult: ...

    async def aground(self, image: StoredImage, text: str, **decoding: Any) -> GroundingResult: ...


@dataclass(frozen=True)
class ModelGuard:
    lock: threading.Lock
    executor: ThreadPoolExecutor


# One guard per model, not per backend: each agent run may build its own toolkit (and so its own
# backend, for its own image store) around the one model a process loads.
_guards: weakref.WeakKeyDictionary[Any, ModelGuard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def model_guard(model: Any) -> ModelGuard:
    """The one lock (sync callers) and one-thread executor (async callers) that every user of `model`
    in this process shares."""
    with _guards_lock:
        guard = _guards.get(model)
        if guard is None:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medplib-backend")
            guard = _guards[model] = ModelGuard(threading.Lock(), executor)
        return guard


class InProcessBackend:
    """A `MedPLIB` in this process; async calls run on a worker thread so the event loop stays free.

    `MedPLIB` promises no thread safety (generation shares the model, its KV prefix cache and the
    embedding cache), so one call per model runs at a time: a lock serialises the sync callers
    (LangGraph runs parallel tool calls on threads), and a one-thread executor queues the async ones
    without tying up threads of the event loop's default pool while they wait.
    """

    def __init__(self, model: MedPLIB) -> None:
        self.model = model
        self._guard = model_guard(model)

    def answer(
        self,
        image: StoredImage,
        question: str,
        regions: Sequence[RegionPrompt] = (),
        *,
        capability: str | None = None,
        **decoding: Any,
    ) -> AnswerResult:
        asked = {"capability": capability} if capability is not None else {}
        with self._guard.lock:
            return self.model.answer(
                image.data, question, regions, image_options=image.options, **asked, **decoding
            )

    def expert_specs(self) -> list[tuple[ExpertSpec, dict[str, Any] | None]]:
        """The experts the model holds, each with the JSON schema of its head's output."""
        installed = plugins.get_experts()
        held = [info for info in self.model.experts() if info.trained and info.name in installed]
        return [(installed[info.name], info.output_schema) for info in held]

    def ground(self, image: StoredImage, text: str, **decoding: Any) -> GroundingResult:
        with self._guard.lock:
            return self.model.ground(image.data, text, image_options=image.options, **decoding)

    def ground_volume(
        self, image: StoredImage, text: str, options: Mapping[str, Any] | None = None, **decoding: Any
    ) -> VolumeGroundingResult:
        """`medical_volume_grounding`'s call: `options` are `MedPLIB.ground_volume`'s (axis, slices, ...)."""
        window = {"window": image.options["window"]} if image.options.get("window") is not None else {}
        with self._guard.lock:
            return self.model.ground_volume(image.data, text, **window, **(options or {}), **decoding)

    async def aanswer(
        self,
        image: StoredImage,
        question: str,
        regions: Sequence[RegionPrompt] = (),
        *,
        capability: str | None = None,
        **decoding: Any,
    ) -> AnswerResult:
        return await self._in_worker(self.answer, image, question, regions, capability=capability, **decoding)

    async def aground_volume(
        self, image: StoredImage, text: str, options: Mapping[str, Any] | None = None, **decoding: Any
    ) -> VolumeGroundingResult:
        return await self._in_worker(self.ground_volume, image, text, options, **decoding)

    async def aground(self, image: StoredImage, text: str, **decoding: Any) -> GroundingResult:
        return await self._in_worker(self.ground, image, text, **decoding)

    async def _in_worker(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._guard.executor, functools.partial(call, *args, **kwargs))

    def __repr__(self) -> str:
        return f"InProcessBackend({self.model.name!r})"
