"""The model's deployments: the trunk, the grounding decoder and plugin experts, each its own replicas.

- `Trunk`: CLIP, the projector, the LLM with its routed experts and the region encoder. It answers a
  batch of queries through `MedPLIB.generate_batch`, the assistant's own code path stopped before
  SAM, and returns each result without masks plus the hidden states of its `<SEG>`s (a few KB); or
  one query streamed, token by token (`MedPLIB.generate_stream`).
- `GroundingDecoder`: the `<SEG>` head and SAM (image encoder, mask decoder). It turns those hidden
  states into masks with `CachedGenerator.decode_masks`, SAM's image embeddings in its own cache.
- `ExpertHead`: a plugin expert's trained head, on the resources its spec asks. The trunk leaves the
  heads of the experts hosted this way un-run and returns their trigger tokens' hidden states (as it
  does `<SEG>`'s for the grounding decoder); the ingress sends those here and puts the head's outputs
  into the result's `outputs[expert]`. A head is small, but a deployment of its own gives it its own
  replicas, device share and batching, and a trunk replica never waits on a plugin's code.

Every replica loads its own copy of the model from the checkpoint (a preset, a folder, a URI), so
replicas are independent and Serve can replace one that dies. Each keeps an image-embedding cache
keyed by the content hash of the pixels: the tensors stay where they are computed and used (a
7B prefix's keys and values are hundreds of MB; only pixels and `<SEG>` states travel).

torch is imported in the replicas only: the ingress imports this module for its message types.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from medplib.agents.serve.config import ServeConfig
from medplib.core.errors import CheckpointError, MedplibError
from medplib.core.expert_spec import ExpertSpec
from medplib.core.masks import SegmentationResult
from medplib.core.queries import Query
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

if TYPE_CHECKING:
    from torch import nn


_END = object()
# The parts of the composed model the grounding decoder runs; a replica drops the rest after loading.
GROUNDING_MODULES = ("seg_head", "sam")


@dataclass(frozen=True)
class TrunkOutput:
    result: AnswerResult | GroundingResult  # no masks yet; "sam" cache use and SAM timings unset
    seg_hidden_states: np.ndarray  # (n_seg, hidden) float32: one row per <SEG> in result.text
    # Experts hosted apart (`Expert-NAME`): the hidden states (n, hidden) float32 that predicted their
    # trigger tokens, in answer order; their outputs are not in `result.outputs` yet.
    head_states: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class GroundingItem:
    pixels: np.ndarray  # the canonical RGB image the masks lie on
    seg_hidden_states: np.ndarray  # (n_seg, hidden), n_seg >= 1
    label: str | None  # each mask's label: the grounding text, None for an answer's masks


@dataclass(frozen=True)
class GroundingOutput:
    masks: list[SegmentationResult]
    sam_cache: str  # "hit" or "miss"
    milliseconds: dict[str, float]  # "encode_sam" and "masks", for the whole batch


def completed(
    result: AnswerResult | GroundingResult,
    grounded: GroundingOutput | None,
    head_outputs: dict[str, list[dict[str, Any]]],
    milliseconds: float,
) -> AnswerResult | GroundingResult:
    """The trunk's result with what the deployments apart computed for it, as the assistant in one
    process would have it: the grounding decoder's masks (in `masks`, and in `outputs` under
    `pixel_grounding`), the hosted heads' outputs (`outputs[expert]`, and their `expert_heads` ms)."""
    outputs = {**result.outputs, **head_outputs}
    timings = dict(result.timings_ms)
    update: dict[str, Any] = {}
    if head_outputs:
        timings["expert_heads"] = milliseconds
    if grounded is not None:
        outputs["pixel_grounding"] = [mask.model_dump(mode="json") for mask in grounded.masks]
        timings |= grounded.milliseconds
        update = {
            "masks": grounded.masks,
            "cache": result.cache.model_copy(update={"sam": grounded.sam_cache}),
        }
    return result.model_copy(update={**update, "outputs": outputs, "timings_ms": timings})


def replica_info(deployment: str, device: str) -> dict[str, Any]:
    """Where this replica runs and what Ray gave it: what the placement tests and operators check."""
    import ray

    runtime = ray.get_runtime_context()
    return {
        "deployment": deployment,
        "replica": serve.get_replica_context().replica_id.unique_id,
        "node_id": runtime.get_node_id(),
        "pid": os.getpid(),
        "resources": runtime.get_assigned_resources(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        "device": device,
    }


@dataclass(frozen=True, eq=False)  # compared by identity: items hold images
class _Waiting:
    key: Hashable
    items: list[Any]
    future: asyncio.Future[list[Any]]


class ReplicaBatcher:
    """Runs `work(key, items)` on a worker thread, one run at a time; the calls that arrive while a
    run is going are merged into the next run (those of the same key, up to `max_rows` items).

    The ingress gathers requests with `serve.batch`, but `serve.batch` closes a batch when its short
    wait ends even while every batch it may run is still busy, so under load it sends many small
    batches (measured at concurrency 16: 1.8 requests per trunk call). Merging here, in front of the
    model, makes batches grow for exactly as long as the model is busy; `max_rows` 1 turns it off.
    One run at a time also keeps the model and its caches, which are not thread-safe, to one thread.
    """

    def __init__(self, work: Callable[[Hashable, list[Any]], list[Any]], max_rows: int) -> None:
        self.work = work
        self.max_rows = max_rows
        self._waiting: list[_Waiting] = []
        self._runner: asyncio.Task[None] | None = None
        self._turn = asyncio.Lock()  # the model's: a run or a stream, never both

    async def stream(self, items: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """The items of the iterator `items()` makes, each made on a worker thread, in one turn of the
        model (no run starts until the stream ends): a streamed answer, step by step."""
        async with self._turn:
            iterator = await asyncio.to_thread(items)
            while (item := await asyncio.to_thread(next, iterator, _END)) is not _END:
                yield item

    async def submit(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(key, list(items), future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            key, chosen, rows = self._waiting[0].key, [], 0
            for waiting in self._waiting:
                if waiting.key == key and (not chosen or rows + len(waiting.items) <= self.max_rows):
                    chosen.append(waiting)
                    rows += len(waiting.items)
            self._waiting = [waiting for waiting in self._waiting if waiting not in chosen]
            try:
                async with self._turn:
                    results = await asyncio.to_thread(self.work, key, [i for w in chosen for i in w.items])
            except Exception as exc:  # a bug, not a bad request (the work reports those per item)
                for waiting in chosen:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            start = 0
            for waiting in chosen:
                if not waiting.future.done():  # its caller may have given up (timeout)
                    waiting.future.set_result(results[start : start + len(waiting.items)])
                start += len(waiting.items)


def set_torch_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


@serve.deployment
class Trunk:
    def __init__(self, config: ServeConfig) -> None:
        set_torch_threads(config.deployments.trunk.torch_threads)
        import medplib

        max_batch = config.deployments.trunk.batching.max_batch_size
        self.assistant = medplib.load(
            config.model, **config.load.model_dump(), limits=config.limits.inference(max_batch)
        )
        self.heads_apart = tuple(config.plugin_experts)  # run by their own deployments
        self.batcher = ReplicaBatcher(lambda key, queries: self._generate(queries, dict(key)), max_batch)

    async def generate(
        self, queries: Sequence[Query], decoding: dict[str, Any]
    ) -> list[TrunkOutput | MedplibError]:
        """Queries with the same decoding, run with the other calls waiting for this replica; a query
        the model refuses gets its error and the others their outputs (a batch that fails is rerun
        query by query, so one bad query fails only itself)."""
        return await self.batcher.submit(tuple(sorted(decoding.items())), queries)

    async def generate_stream(
        self, query: Query, decoding: dict[str, Any]
    ) -> AsyncIterator[TextDelta | TrunkOutput | MedplibError]:
        """One query, streamed (called with `stream=True`): `TextDelta`s as its tokens come, then its
        output; a query the model refuses yields its error instead."""

        def stream() -> Iterator[Any]:
            return self.assistant.generate_stream(query, heads_apart=self.heads_apart, **decoding)

        try:
            async for item in self.batcher.stream(stream):
                yield item if isinstance(item, TextDelta) else trunk_output(*item)
        except MedplibError as exc:
            yield exc

    def _generate(self, queries: list[Query], decoding: dict[str, Any]) -> list[TrunkOutput | MedplibError]:
        try:
            outputs = self.assistant.generate_batch(queries, heads_apart=self.heads_apart, **decoding)
        except MedplibError as exc:
            if len(queries) == 1:
                return [exc]
            return [output for query in queries for output in self._generate([query], decoding)]
        return [trunk_output(*output) for output in outputs]

    def describe(self) -> dict[str, Any]:
        return replica_info("Trunk", str(self.assistant.device))


def trunk_output(result: Any, seg_states: Any, head_states: dict[str, Any]) -> TrunkOutput:
    """What `generate_batch`/`generate_stream` give per query, as plain arrays that travel cheaply."""
    arrays = {name: states.float().cpu().numpy() for name, states in head_states.items()}
    return TrunkOutput(result, seg_states.float().cpu().numpy(), arrays)


@serve.deployment
class GroundingDecoder:
    def __init__(self, config: ServeConfig) -> None:
        set_torch_threads(config.deployments.grounding.torch_threads)
        import medplib
        from medplib.core.devices import resolve_device
        from medplib.core.inference import CachedGenerator
        from medplib.core.per_image_cache import PerImageCache

        # Grounding runs no LLM: its weights are dropped below, so they are not quantised first.
        options = config.load.model_dump(exclude={"device", "cache_bytes", "quantization"})
        # Loaded on the CPU and cut down to SAM and the <SEG> head before anything reaches the
        # replica's device: its GPU share then holds only what grounding runs.
        model = medplib.load(config.model, device="cpu", cache_bytes=0, **options).model
        keep_only(model, GROUNDING_MODULES)
        model.to(resolve_device(config.load.device))
        fingerprint = f"{config.model}|{model.dtype}|{model.device}|sam{model.config.sam_config.image_size}"
        self.generator = CachedGenerator(model, PerImageCache(config.load.cache_bytes), fingerprint)
        max_rows = config.deployments.grounding.batching.max_batch_size
        self.batcher = ReplicaBatcher(lambda _, items: self._decode(items), max_rows)

    async def decode(self, items: Sequence[GroundingItem]) -> list[GroundingOutput]:
        return await self.batcher.submit(None, items)

    def _decode(self, items: list[GroundingItem]) -> list[GroundingOutput]:
        import torch

        from medplib.core.answers import segmentations

        states = [torch.tensor(item.seg_hidden_states) for item in items]  # own copies: Ray's are read-only
        predictions, uses, ms = self.generator.decode_masks(states, [item.pixels for item in items])
        return [
            GroundingOutput(segmentations(prediction, item.label), use, ms)
            for item, prediction, use in zip(items, predictions, uses, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        return replica_info("GroundingDecoder", str(self.generator.model.device))


@serve.deployment
class ExpertHead:
    """A plugin expert's head (`ExpertSpec.head`) with its trained weights from the checkpoint.

    The replica loads the checkpoint as every replica does (the loader knows each form a model comes
    in, and puts the head's weights where its factory built it), keeps the head and drops the rest, as
    the grounding decoder does. It refuses to start when the checkpoint holds no trained head for the
    expert (a preset's random weights, or a model never trained with it): it would answer noise.
    """

    def __init__(self, spec: ExpertSpec, config: ServeConfig) -> None:
        set_torch_threads(config.plugin_experts[spec.name].torch_threads)
        import medplib
        from medplib.core.devices import resolve_device

        self.name = spec.name
        options = config.load.model_dump(exclude={"device", "cache_bytes", "quantization"})
        assistant = medplib.load(config.model, device="cpu", cache_bytes=0, **options)
        self.head = trained_head(assistant, spec.name, config.model)
        self.device = resolve_device(config.load.device)
        self.head.to(self.device).eval()
        max_rows = config.plugin_experts[spec.name].batching.max_batch_size
        self.batcher = ReplicaBatcher(lambda _, batch: self._run_many(batch), max_rows)

    async def run(self, hidden_states: np.ndarray) -> list[dict[str, Any]]:
        """The head on the hidden states (n, hidden) that predicted its trigger tokens: n outputs (JSON)."""
        (outputs,) = await self.batcher.submit(None, [hidden_states])
        return outputs

    def _run_many(self, batch: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """One head call for every request's states merged; each request gets its own rows back."""
        import torch

        from medplib.core.expert_heads import run_head

        states = torch.tensor(np.concatenate([np.asarray(s, np.float32) for s in batch]), device=self.device)
        outputs = run_head(self.head, states)
        ends = np.cumsum([len(s) for s in batch])
        return [outputs[end - len(s) : end] for s, end in zip(batch, ends, strict=True)]

    def describe(self) -> dict[str, Any]:
        return replica_info(f"Expert-{self.name}", str(self.device))


def trained_head(assistant: Any, name: str, source: str) -> nn.Module:
    """The head of expert `name` the loaded checkpoint holds; CheckpointError when it holds no trained one."""
    model = assistant.model
    held = list(getattr(model.config, "experts", ()))
    if assistant.untrained:
        raise CheckpointError(
            f"expert {name!r}: {source} is a preset with random weights, so its head has no trained weights "
            f"to serve; serve a checkpoint trained with it (medplib train --stage expert --expert {name})"
        )
    if name not in held or name not in model.expert_heads:
        raise CheckpointError(
            f"expert {name!r}: the checkpoint {source} holds no trained head for it (its experts: "
            f"{', '.join(held) or 'none'}); train it (medplib train --stage expert --expert {name}) and "
            "serve that checkpoint"
        )
    return model.expert_heads[name]


def keep_only(model: nn.Module, names: Sequence[str]) -> None:
    """Drop every top-level submodule of `model` not in `names`, freeing its weights."""
    for name, _ in list(model.named_children()):
        if name not in names:
            delattr(model, name)
