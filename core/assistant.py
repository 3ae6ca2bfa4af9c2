"""The assistant: `medplib.load(...)` (in `loading/`) gives a `MedPLIB` that answers, grounds and chats.

    import medplib
    model = medplib.load("tiny")                     # a preset, a save_pretrained folder or fsspec URI
    model.answer("scan.dcm", "What modality is this?")
    model.answer(image, "What is in {region}?", regions=[BoxPrompt(box=(40, 60, 120, 140))])
    model.ground(image, "the liver lesion")           # always returns at least one mask
    model.chat(image, [{"role": "user", "content": "Which organ is this?"}])
    model.answer_batch([Query(image=a, text="..."), Query(image=b, text="the liver", task="ground")])

The `tiny` and `small` presets have random weights (seeded, so runs repeat): their answers are
meaningless until trained; they exist to run and measure the pipeline. `medplib-7b` has the paper's
dimensions but no weights ship with medplib: load a checkpoint for it.

Every method builds `Query`s (the one request type), checks each once (`InferenceLimits.check`),
turns it into the model's `Request` (`core/prompts.py`: regions, grounding wording) and runs the batch.
Every `<SEG>` in an answer gives a mask. Grounding asks for a mask, so one is always produced: if the
model would end its answer without `<SEG>` (an untrained model will), a `<SEG>` is put where it ended
and the result says `seg_forced`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from typing import Any

import torch

from medplib.core.answers import inference_result
from medplib.core.errors import CheckpointError, InvalidInputError
from medplib.core.expert_heads import expert_infos
from medplib.core.image import MedicalImage
from medplib.core.inference import BatchGeneration, CachedGenerator, Generated
from medplib.core.io import load_image
from medplib.core.model import MedPLIBForCausalLM
from medplib.core.model.generation import run_to_end
from medplib.core.per_image_cache import CacheStats, PerImageCache
from medplib.core.prompts import GROUNDING_ANSWER_MODES, auto_grounding_answer, model_request
from medplib.core.queries import (
    CHAT_ORDER,
    DEFAULT_INFERENCE_LIMITS,
    ChatMessage,
    Decoding,
    InferenceLimits,
    Query,
    parse_model,
)
from medplib.core.regions import RegionPrompt
from medplib.core.results import (
    AnswerResult,
    ChatResult,
    ExpertInfo,
    GroundingResult,
    TextDelta,
)
from medplib.core.streaming import stream_text
from medplib.core.volume_results import VolumeAnswerResult, VolumeGroundingResult


class MedPLIB:
    """A loaded model with its image cache; `answer`, `ground`, `chat` and `answer_batch`."""

    def __init__(
        self,
        model: MedPLIBForCausalLM,
        *,
        name: str,
        untrained: bool = False,
        cache: PerImageCache | None = None,
        limits: InferenceLimits = DEFAULT_INFERENCE_LIMITS,
        quantization: str | None = None,
    ) -> None:
        if model.tokenizer is None:
            raise CheckpointError(f"{name}: the model has no tokenizer")
        self.model = model.eval()
        self.name = name
        self.untrained = untrained
        self.quantization = quantization  # of the LLM's linear layers; None: full precision
        self.limits = limits
        self.cache = cache if cache is not None else PerImageCache()
        config = model.config
        # This instance and its preprocessing: entries of other models in a shared cache never match.
        fingerprint = (
            f"{name}#{uuid.uuid4().hex[:12]}|{model.dtype}|{model.device}"
            f"|clip{config.vision_config.image_size}@{config.vision_feature_layer}"
            f"|sam{config.sam_config.image_size}"
        )
        self._generator = CachedGenerator(model, self.cache, fingerprint)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def clear_cache(self) -> None:
        """Forget every cached image (needed after changing the model's weights in place)."""
        self.cache.clear()

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    # ---- public API -----------------------------------------------------------------------------------

    def answer(
        self,
        image: Any,
        question: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        capability: str | None = None,
        **decoding: Any,
    ) -> AnswerResult:
        """Answer `question` about `image`; `decoding` takes `Decoding`'s fields (max_new_tokens, ...).

        `capability` (e.g. "modality_classification", see `experts()`) steers the answer to that
        expert's trigger token, forced where the model would end without it (`forced`); its head's
        outputs are in `outputs[expert]`."""
        query = one_query("answer", image, question, regions, image_options, capability)
        return self.answer_batch([query], **decoding)[0]

    def experts(self) -> list[ExpertInfo]:
        """The installed experts, each with its capabilities, trigger tokens, output schema and whether
        this model holds it (`trained`)."""
        return expert_infos(self.model)

    def ground(
        self,
        image: Any,
        text: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        answer: str = "auto",
        **decoding: Any,
    ) -> GroundingResult:
        """Segment what `text` names ("the liver lesion"); at least one mask, see `seg_forced`.

        `answer="template"` skips decoding: the trained answer ("Sure, it is <SEG>.") is prefilled
        with the question and the `<SEG>` state taken from that one pass; the same mask as
        "generate" wherever the model would answer with the template (docs/performance.md).
        "auto" (the default): "template" for a checkpoint trained by medplib, "generate" for an
        untrained preset and a converted MedPLIB checkpoint (its answers are worded otherwise).
        """
        query = one_query("ground", image, text, regions, image_options)
        return self.answer_batch([query], grounding_answer=answer, **decoding)[0]

    def answer_batch(
        self,
        queries: Sequence[Query | Mapping[str, Any]],
        *,
        grounding_answer: str = "auto",
        **decoding: Any,
    ) -> list[AnswerResult | GroundingResult]:
        """Several questions and grounding requests as one batch; greedy results equal single calls.
        `grounding_answer`: as `ground`'s `answer`, for the batch's grounding requests."""
        batch = self._batch(queries, decoding, predict_masks=True, grounding_answer=grounding_answer)
        return [result for result, *_ in batch]

    def generate_batch(
        self,
        queries: Sequence[Query | Mapping[str, Any]],
        *,
        heads_apart: Collection[str] = (),
        **decoding: Any,
    ) -> list[tuple[AnswerResult | GroundingResult, torch.Tensor, dict[str, torch.Tensor]]]:
        """`answer_batch` without SAM, for a grounding decoder deployed apart (`medplib.agents`): each
        result has no masks yet and comes with its `<SEG>` hidden states (n, hidden), which
        `CachedGenerator.decode_masks` and `segmentations` turn into its masks; the heads of the
        experts `heads_apart` are not run either: their trigger tokens' hidden states come third
        (expert -> (n, hidden)), for `expert_heads.run_head` elsewhere."""
        return self._batch(queries, decoding, predict_masks=False, heads_apart=heads_apart)

    def _batch(
        self,
        queries: Sequence[Query | Mapping[str, Any]],
        decoding: Mapping[str, Any],
        *,
        predict_masks: bool,
        grounding_answer: str = "auto",
        heads_apart: Collection[str] = (),
    ) -> list[tuple[AnswerResult | GroundingResult, torch.Tensor, dict[str, torch.Tensor]]]:
        steps = self._batch_steps(
            queries,
            decoding,
            predict_masks=predict_masks,
            grounding_answer=grounding_answer,
            heads_apart=heads_apart,
        )
        return run_to_end(steps)

    def _batch_steps(
        self,
        queries: Sequence[Query | Mapping[str, Any]],
        decoding: Mapping[str, Any],
        *,
        predict_masks: bool,
        grounding_answer: str = "auto",
        heads_apart: Collection[str] = (),
    ) -> Generator[
        torch.Tensor, None, list[tuple[AnswerResult | GroundingResult, torch.Tensor, dict[str, torch.Tensor]]]
    ]:
        """The batch, yielding each decoding step's tokens (B,); returns every result, with its `<SEG>`
        hidden states and those of the trigger tokens of the experts `heads_apart`."""
        start = time.perf_counter()
        settings = Decoding.from_options(**decoding)
        if grounding_answer not in GROUNDING_ANSWER_MODES:
            raise InvalidInputError(
                f"unknown grounding answer {grounding_answer!r}; use one of {list(GROUNDING_ANSWER_MODES)}"
            )
        if grounding_answer == "auto":
            grounding_answer = auto_grounding_answer(self.untrained, self.model.config.compat)
        parsed = [parse_model(Query, query, "query") for query in queries]
        self.limits.check_batch(len(parsed))
        for query in parsed:
            self.limits.check(query, settings)
        loaded = [self._load(query) for query in parsed]
        requests = [
            model_request(query, image, self.model, prefill_grounding=grounding_answer == "template")
            for query, (image, _) in zip(parsed, loaded, strict=True)
        ]
        # Rows whose answer is prefilled run apart from those that decode theirs.
        rows: list[tuple[Generated, BatchGeneration]] = [None] * len(requests)  # type: ignore[list-item]
        for answered in (False, True):
            group = [i for i, request in enumerate(requests) if request.answered == answered]
            if group:
                rows_asked = [requests[i] for i in group]
                batch = yield from self._generator.run_steps(
                    rows_asked, settings, predict_masks=predict_masks, heads_apart=heads_apart
                )
                for i, row in zip(group, batch.rows, strict=True):
                    rows[i] = (row, batch)
        results: list[tuple[AnswerResult | GroundingResult, torch.Tensor, dict[str, torch.Tensor]]] = []
        for query, request, (image, load_ms), (row, batch) in zip(
            parsed, requests, loaded, rows, strict=True
        ):
            made = (self.name, request, image, load_ms, row, batch, start)
            if query.task == "ground":
                result = inference_result(GroundingResult, *made, label=query.text, query=query.text)
            else:
                result = inference_result(AnswerResult, *made, question=query.text)
            results.append((result, row.seg_hidden_states, row.head_states))
        return results

    def ground_volume(self, volume: Any, text: str, **options: Any) -> VolumeGroundingResult:
        """Segment what `text` names through a volume (NIfTI, DICOM series folder or multi-frame
        DICOM, or a `MedicalVolume`), slice by slice in batches: a 3-D mask on the input's own grid
        with its volume in mL. Options and decoding: `core.volume_grounding.ground_volume`."""
        from medplib.core.volume_grounding import ground_volume

        return ground_volume(self, volume, text, **options)

    def answer_volume(self, volume: Any, question: str, **options: Any) -> VolumeAnswerResult:
        """Ask `question` about every slice of a slab (`slices=`), answers grouped by what they say."""
        from medplib.core.volume_grounding import answer_volume

        return answer_volume(self, volume, question, **options)

    def chat(
        self,
        image: Any,
        messages: str | Sequence[ChatMessage | Mapping[str, Any]],
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> ChatResult:
        """Answer the last user message of a conversation about `image`, earlier turns in the prompt.

        Follow-ups pass `result.messages` plus the new user message; the image's cached features and
        prompt prefix make them cost only the conversation's own words.
        """
        return run_to_end(self._chat_steps(image, messages, image_options, decoding))

    def _chat_steps(
        self,
        image: Any,
        messages: str | Sequence[ChatMessage | Mapping[str, Any]],
        image_options: Mapping[str, Any] | None,
        decoding: Mapping[str, Any],
    ) -> Generator[torch.Tensor, None, ChatResult]:
        """A chat is one query: the last user message, the earlier turns as its history."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        parsed = [parse_model(ChatMessage, message, "chat message") for message in messages]
        alternating = all(m.role == ("assistant" if i % 2 else "user") for i, m in enumerate(parsed))
        if not parsed or not alternating:
            raise InvalidInputError(CHAT_ORDER)
        if parsed[-1].role != "user":
            raise InvalidInputError("the conversation ends with an assistant message: add a user message")
        last = parsed[-1]
        query = Query(
            image=image,
            text=last.content,
            regions=last.regions,
            image_options=dict(image_options or {}),
            history=parsed[:-1],
        )
        results = yield from self._batch_steps([query], decoding, predict_masks=True)
        answered = results[0][0]
        reply = ChatMessage(role="assistant", content=answered.text)
        fields = answered.model_dump(exclude={"task", "question"})
        return ChatResult(**fields, messages=[*parsed, reply])

    # ---- streaming -----------------------------------------------------------------------------------

    def answer_stream(
        self,
        image: Any,
        question: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        capability: str | None = None,
        **decoding: Any,
    ) -> Iterator[TextDelta | AnswerResult]:
        """`answer` as it is generated: `TextDelta`s whose texts join to the answer, then the result.

        for part in model.answer_stream(image, "What modality is this?"):
            print(part.text if isinstance(part, TextDelta) else f"\n{part.timings_ms}", end="")
        """
        query = one_query("answer", image, question, regions, image_options, capability)
        return self.query_stream(query, **decoding)

    def ground_stream(
        self,
        image: Any,
        text: str,
        regions: Sequence[RegionPrompt | Mapping[str, Any]] = (),
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> Iterator[TextDelta | GroundingResult]:
        """`ground` as it is generated: `TextDelta`s, then the result with its masks."""
        return self.query_stream(one_query("ground", image, text, regions, image_options), **decoding)

    def chat_stream(
        self,
        image: Any,
        messages: str | Sequence[ChatMessage | Mapping[str, Any]],
        *,
        image_options: Mapping[str, Any] | None = None,
        **decoding: Any,
    ) -> Iterator[TextDelta | ChatResult]:
        """`chat` as it is generated: `TextDelta`s, then the `ChatResult`."""
        steps = self._chat_steps(image, messages, image_options, decoding)
        return stream_text(steps, self.model.tokenizer, lambda done: done)

    def generate_stream(
        self, query: Query | Mapping[str, Any], *, heads_apart: Collection[str] = (), **decoding: Any
    ) -> Iterator[TextDelta | tuple[AnswerResult | GroundingResult, torch.Tensor, dict[str, torch.Tensor]]]:
        """`generate_batch` of one query, streamed: `TextDelta`s, then (result without masks, `<SEG>`
        hidden states, hidden states of the experts `heads_apart`), for a deployment that streams while
        its grounding decoder and expert heads run apart."""
        steps = self._batch_steps([query], decoding, predict_masks=False, heads_apart=heads_apart)
        return stream_text(steps, self.model.tokenizer, lambda done: done[0], lambda pair: pair[0].text)

    def query_stream(
        self, query: Query | Mapping[str, Any], **decoding: Any
    ) -> Iterator[TextDelta | AnswerResult | GroundingResult]:
        """`answer_batch` of one query, streamed: `TextDelta`s, then its result with its masks."""
        steps = self._batch_steps([query], decoding, predict_masks=True)
        return stream_text(steps, self.model.tokenizer, lambda done: done[0][0])

    # ---- requests -------------------------------------------------------------------------------------

    def _load(self, query: Query) -> tuple[MedicalImage, float]:
        """The query's image, decoded, and the milliseconds it took."""
        start = time.perf_counter()
        try:
            loaded = load_image(query.image, **query.image_options)
        except TypeError as exc:  # an unknown option name
            raise InvalidInputError(f"invalid image options {sorted(query.image_options)}: {exc}") from None
        return loaded, 1000 * (time.perf_counter() - start)


def one_query(
    task: str,
    image: Any,
    text: str,
    regions: Sequence[Any],
    image_options: Mapping[str, Any] | None,
    capability: str | None = None,
) -> dict[str, Any]:
    """The `Query` fields of one `answer`/`ground` call (and their streams), validated with the batch."""
    query = {"image": image, "text": text, "task": task, "regions": list(regions)}
    return query | {"image_options": dict(image_options or {}), "capability": capability}
