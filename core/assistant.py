"""The assistant: `medplib.load(...)` (in `loading.py`) gives a `MedPLIB` that answers, grounds and chats.

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

Regions: a question marks the k-th region with the k-th `{region}`; a question without any gets them
appended ("… in region 1 <region>, in region 2 <region>"). Every `<SEG>` in an answer gives a mask.
Grounding asks for a mask, so one is always produced: if the model would end its answer without
`<SEG>` (an untrained model will), a `<SEG>` is put where it ended and the result says `seg_forced`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medplib.core.errors import CapacityError, CheckpointError, InvalidInputError, RegionError
from medplib.core.expert_heads import capability_token, expert_infos
from medplib.core.image import MedicalImage
from medplib.core.inference import BatchGeneration, CachedGenerator, Conversation, Generated
from medplib.core.io import load_image
from medplib.core.masks import Mask, SegmentationResult
from medplib.core.model import (
    ControlToken,
    MaskPrediction,
    MedPLIBForCausalLM,
    Turn,
)
from medplib.core.model.conversation import ExpertToken
from medplib.core.model.generation import run_to_end
from medplib.core.per_image_cache import CacheStats, PerImageCache
from medplib.core.queries import (
    DEFAULT_INFERENCE_LIMITS,
    REGION_PLACEHOLDER,
    ChatMessage,
    Decoding,
    InferenceLimits,
    Query,
    parse_model,
)
from medplib.core.regions import RegionPrompt
from medplib.core.results import (
    AnswerResult,
    CacheHits,
    ChatResult,
    ExpertInfo,
    GroundingResult,
    InferenceResult,
    TextDelta,
)
from medplib.core.streaming import stream_text
from medplib.core.volume_results import VolumeAnswerResult, VolumeGroundingResult

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The grounding wording of the MeCoVQA question templates (trainers/data/templates.py), which the
# presets are trained on.
GROUNDING_QUESTION = "Please segment {text} in this image."
SEG_TEXT = ControlToken.SEG.value
ALTERNATE = "chat messages must alternate user, assistant, …, ending with a user message"

# The answer the presets are trained to give a grounding request (trainers/data/templates.py), and
# how `ground` gets its <SEG> state: by decoding the model's own answer, or by prefilling this one;
# "auto": prefilled for a model trained on medplib's templates (docs/performance.md), else decoded.
GROUNDING_ANSWER = "Sure, it is {seg}."
GROUNDING_ANSWER_MODES = ("auto", "generate", "template")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' (CUDA when there is one), 'cpu', 'cuda' or 'cuda:N'."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} asked for, but this machine has no usable CUDA device")
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"unsupported device {device!r}; use 'auto', 'cpu' or 'cuda'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise InvalidInputError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class _PreparedQuery:
    conversation: Conversation
    image: MedicalImage
    load_ms: float
    num_regions: int


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
        query = {"image": image, "text": question, "task": "answer", "regions": list(regions)}
        query |= {"image_options": dict(image_options or {}), "capability": capability}
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
        query = {"image": image, "text": text, "task": "ground", "regions": list(regions)}
        query["image_options"] = dict(image_options or {})
        return self.answer_batch([query], grounding_answer=answer, **decoding)[0]

    def _single(
        self,
        task: str,
        image: Any,
        text: str,
        regions: Sequence[Any],
        image_options: Mapping[str, Any] | None,
        decoding: Mapping[str, Any],
    ) -> Any:
        query = {"image": image, "text": text, "task": task, "regions": list(regions)}
        return self.answer_batch([{**query, "image_options": dict(image_options or {})}], **decoding)[0]

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
        settings = self._decoding(decoding)
        if grounding_answer not in GROUNDING_ANSWER_MODES:
            raise InvalidInputError(
                f"unknown grounding answer {grounding_answer!r}; use one of {list(GROUNDING_ANSWER_MODES)}"
            )
        if grounding_answer == "auto":
            grounding_answer = auto_grounding_answer(self.untrained, self.model.config.compat)
        template = GROUNDING_ANSWER.format(seg=SEG_TEXT)
        parsed = [parse_model(Query, query, "query") for query in queries]
        self._check_batch(len(parsed))
        prepared = []
        for query in parsed:
            text = self._text(query.text, "question" if query.task == "answer" else "grounding text")
            question = self._grounding_question(text) if query.task == "ground" else text
            earlier, answers = self._history(query.history)
            prefilled = grounding_answer == "template" and query.task == "ground"
            token, at_start = capability_token(self.model, query.capability) or (None, False)
            prepared.append(
                self._prepare(
                    query.image,
                    query.image_options,
                    [*earlier, (question, query.regions)],
                    [*answers, template] if prefilled else answers,
                    require_seg=query.task == "ground" or token == self.model.config.seg_token_id,
                    require_token=(token, at_start) if token is not None else None,
                )
            )
        # Rows whose answer is prefilled run apart from those that decode theirs.
        rows: list[tuple[Generated, BatchGeneration]] = [None] * len(prepared)  # type: ignore[list-item]
        for answered in (False, True):
            group = [i for i, p in enumerate(prepared) if p.conversation.answered == answered]
            if group:
                conversations = [prepared[i].conversation for i in group]
                batch = yield from self._generator.run_steps(
                    conversations, settings, predict_masks=predict_masks, heads_apart=heads_apart
                )
                for i, row in zip(group, batch.rows, strict=True):
                    rows[i] = (row, batch)
        results: list[tuple[AnswerResult | GroundingResult, torch.Tensor, dict[str, torch.Tensor]]] = []
        for query, item, (row, batch) in zip(parsed, prepared, rows, strict=True):
            if query.task == "ground":
                result = self._result(
                    GroundingResult, item, row, batch, start, label=query.text, query=query.text
                )
            else:
                result = self._result(AnswerResult, item, row, batch, start, question=query.text)
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

    def _grounding_question(self, text: str) -> str:
        """medplib's grounding wording; under `compat: medplib` a whole sentence is MedPLIB's question as
        typed (its grounding answers follow MedPLIB's own question wording), a phrase gets the wording."""
        if self.model.config.compat == "medplib" and text.rstrip().endswith((".", "?")):
            return text
        return GROUNDING_QUESTION.format(text=text)

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
            raise InvalidInputError(ALTERNATE)
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
        return self._stream_single("answer", image, question, regions, image_options, decoding, capability)

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
        return self._stream_single("ground", image, text, regions, image_options, decoding)

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

    def _stream_single(
        self,
        task: str,
        image: Any,
        text: str,
        regions: Sequence[Any],
        image_options: Mapping[str, Any] | None,
        decoding: Mapping[str, Any],
        capability: str | None = None,
    ) -> Iterator[Any]:
        query = {"image": image, "text": text, "task": task, "regions": list(regions)}
        query |= {"image_options": dict(image_options or {}), "capability": capability}
        steps = self._batch_steps([query], decoding, predict_masks=True)
        return stream_text(steps, self.model.tokenizer, lambda done: done[0][0])

    # ---- requests -------------------------------------------------------------------------------------

    def _decoding(self, options: Mapping[str, Any]) -> Decoding:
        settings = Decoding.from_options(**options)
        if settings.max_new_tokens > self.limits.max_new_tokens:
            raise CapacityError(
                f"max_new_tokens {settings.max_new_tokens} is over the limit of {self.limits.max_new_tokens}"
            )
        return settings

    def _check_batch(self, size: int) -> None:
        if size == 0:
            raise InvalidInputError("no queries to answer")
        if size > self.limits.max_batch:
            raise CapacityError(f"{size} queries in one batch, over the limit of {self.limits.max_batch}")

    def _history(self, history: Sequence[ChatMessage]) -> tuple[list[tuple[str, Any]], list[str]]:
        """Earlier turns as (question, regions) per user message and the assistant's answers."""
        users, answers = history[0::2], history[1::2]
        if any(m.role != "user" for m in users) or any(m.role != "assistant" for m in answers):
            raise InvalidInputError(
                "chat messages must alternate user, assistant, …, ending with a user message"
            )
        if len(users) != len(answers):
            raise InvalidInputError("the history ends with a user message: it needs the assistant's answer")
        if len(users) + 1 > self.limits.max_turns:
            raise CapacityError(f"{len(users) + 1} user turns, over the limit of {self.limits.max_turns}")
        if any(m.regions for m in answers):
            raise InvalidInputError("only user messages can mark regions")
        return [(self._text(m.content, "message"), m.regions) for m in users], [m.content for m in answers]

    def _text(self, text: str, what: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"the {what} is empty")
        if len(text) > self.limits.max_text_chars:
            raise CapacityError(
                f"the {what} has {len(text)} characters, over the limit of {self.limits.max_text_chars}"
            )
        return text.strip()

    def _prepare(
        self,
        image: Any,
        image_options: Mapping[str, Any],
        questions: Sequence[tuple[str, Sequence[RegionPrompt]]],
        answers: Sequence[str],
        *,
        require_seg: bool,
        require_token: tuple[int, bool] | None = None,
    ) -> _PreparedQuery:
        """Load the image, turn every region prompt into a mask on its grid and lay out the turns."""
        num_regions = sum(len(regions) for _, regions in questions)
        if num_regions > self.limits.max_regions:
            raise CapacityError(
                f"{num_regions} regions in one request, over the limit of {self.limits.max_regions}"
            )
        start = time.perf_counter()
        try:
            loaded = load_image(image, **image_options)
        except TypeError as exc:  # an unknown option name
            raise InvalidInputError(f"invalid image options {sorted(image_options)}: {exc}") from None
        load_ms = 1000 * (time.perf_counter() - start)
        height, width = loaded.size
        masks: list[np.ndarray] = []
        turns = []
        for index, (question, regions) in enumerate(questions):
            masks += [prompt.to_mask(height, width) for prompt in regions]
            expert_tokens = list(self.model.config.expert_token_ids)
            answer = answer_parts(answers[index], expert_tokens) if index < len(answers) else None
            turns.append(Turn(question_parts(question, len(regions)), answer))
        answered = len(answers) == len(questions)  # the last turn's answer is given: prefilled, not decoded
        token, at_start = require_token or (None, False)
        conversation = Conversation(
            loaded.pixels, turns, masks, require_seg, token, at_start, answered=answered
        )
        return _PreparedQuery(conversation, loaded, load_ms, num_regions)

    # ---- results --------------------------------------------------------------------------------------

    def _result(
        self,
        cls: type[InferenceResult],
        item: _PreparedQuery,
        row: Generated,
        batch: BatchGeneration,
        start: float,
        *,
        label: str | None = None,
        **fields: Any,
    ) -> Any:
        masks = segmentations(row.masks, label)
        timings = {"load": item.load_ms, **batch.milliseconds, "total": 1000 * (time.perf_counter() - start)}
        outputs = dict(row.outputs)
        if masks:  # the grounding head's outputs are its masks, decoded on the image
            outputs["pixel_grounding"] = [mask.model_dump(mode="json") for mask in masks]
        return cls(
            model=self.name,
            text=row.text,
            masks=masks,
            seg_forced=row.seg_forced and item.conversation.require_seg,
            outputs=outputs,
            forced=row.seg_forced,
            image_size=item.image.size,
            image_source=item.image.meta.source,
            num_regions=item.num_regions,
            prompt_tokens=row.prompt_tokens,
            new_tokens=row.new_tokens,
            cache=CacheHits(**row.cache),
            timings_ms={stage: round(ms, 2) for stage, ms in timings.items()},
            **fields,
        )


def auto_grounding_answer(untrained: bool, compat: str | None) -> str:
    """`answer="auto"`: the template is prefilled for a model trained on medplib's templates (a
    trained stage IV model answers every grounding test request with it, so the masks are the same,
    docs/performance.md); an untrained preset and a converted MedPLIB checkpoint decode their own."""
    return "generate" if untrained or compat == "medplib" else "template"


def segmentations(prediction: MaskPrediction, label: str | None) -> list[SegmentationResult]:
    """Predicted masks as results: COCO RLE, each scored by SAM's predicted IoU. Built without
    validation: pydantic would re-decode the RLE its own encoder just wrote (a third of a cached
    grounding call for a noisy mask)."""
    return [
        SegmentationResult.model_construct(
            mask=Mask.from_array(mask), label=label, score=round(float(score), 4)
        )
        for mask, score in zip(prediction.masks.cpu().numpy(), prediction.scores.float().cpu(), strict=True)
    ]


def question_parts(text: str, num_regions: int) -> list[str | ControlToken]:
    """A question's parts: a region where each `{region}` stands, or appended when none is marked."""
    pieces = text.split(REGION_PLACEHOLDER)
    marked = len(pieces) - 1
    if marked == 0 and num_regions:
        appended: list[str | ControlToken] = [text]
        for k in range(num_regions):
            appended += [f"{',' if k else ''} in region {k + 1}", ControlToken.REGION]
        return appended
    if marked != num_regions:
        raise RegionError(
            f"the question marks {marked} region(s) with {REGION_PLACEHOLDER} but {num_regions} region "
            "prompt(s) were given"
        )
    parts: list[str | ControlToken] = [pieces[0]]
    for piece in pieces[1:]:
        parts += [ControlToken.REGION, piece]
    return [part for part in parts if part != ""]


def answer_parts(text: str, expert_tokens: Sequence[str] = ()) -> list[str | ControlToken | ExpertToken]:
    """An earlier answer's parts: `<SEG>` where the assistant made a mask, an expert's token (e.g.
    `<MOD>`, of `expert_tokens`) where its head ran, text elsewhere; as the assistant wrote them."""
    tokens = [SEG_TEXT, *(token for token in expert_tokens if token != SEG_TEXT)]
    parts: list[str | ControlToken | ExpertToken] = []
    for piece in re.split(f"({'|'.join(re.escape(token) for token in tokens)})", text):
        if piece == SEG_TEXT:
            parts.append(ControlToken.SEG)
        elif piece in tokens:
            parts.append(ExpertToken(piece))
        elif piece:
            parts.append(piece)
    return parts
