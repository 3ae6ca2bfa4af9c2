"""What a caller asks the assistant: queries, chat messages, decoding settings and the size limits.

Plain pydantic, no torch: the HTTP layer and the LangChain tools validate requests with these before
any model is near. A question marks where each region goes with `{region}` (as the MeCoVQA question
templates do); the k-th `{region}` is the k-th region prompt. Text is only ever text: a `<SEG>` or
`<region>` typed by a user is those characters, never a control token.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medplib.core.errors import CapacityError, InvalidInputError, validation_message
from medplib.core.regions import RegionPrompt

REGION_PLACEHOLDER = "{region}"
MAX_TEMPERATURE = 100.0  # far past any useful value (answers are noise above ~2); keeps logits finite


class InferenceLimits(BaseModel):
    """The largest request the assistant takes; anything larger is a `CapacityError`, never a slow crawl."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int = Field(default=512, ge=1)
    max_regions: int = Field(default=8, ge=0, description="region prompts per request")
    max_batch: int = Field(default=32, ge=1, description="requests per batched call")
    max_text_chars: int = Field(default=4000, ge=1, description="characters per question or message")
    max_turns: int = Field(default=16, ge=1, description="user turns per conversation")

    def check(self, query: Query, decoding: Decoding) -> None:
        """The one size check of a request, run where it enters (`MedPLIB`'s methods, the Serve
        ingress before it reads the image, the volume route): everything that needs no image or
        tokenizer. Empty text or a malformed history is an `InvalidInputError`, anything over a limit
        a `CapacityError`. (The prompt's length in tokens is checked where the prompt is tokenised.)"""
        self.check_text(query.text, "question" if query.task == "answer" else "grounding text")
        users, answers = query.history[0::2], query.history[1::2]
        if any(m.role != "user" for m in users) or any(m.role != "assistant" for m in answers):
            raise InvalidInputError(CHAT_ORDER)
        if len(users) != len(answers):
            raise InvalidInputError("the history ends with a user message: it needs the assistant's answer")
        if len(users) + 1 > self.max_turns:
            raise CapacityError(f"{len(users) + 1} user turns, over the limit of {self.max_turns}")
        if any(m.regions for m in answers):
            raise InvalidInputError("only user messages can mark regions")
        for message in users:
            self.check_text(message.content, "message")
        num_regions = len(query.regions) + sum(len(m.regions) for m in users)
        if num_regions > self.max_regions:
            raise CapacityError(f"{num_regions} regions in one request, over the limit of {self.max_regions}")
        if decoding.max_new_tokens > self.max_new_tokens:
            raise CapacityError(
                f"max_new_tokens {decoding.max_new_tokens} is over the limit of {self.max_new_tokens}"
            )

    def check_text(self, text: str, what: str) -> None:
        if not text.strip():
            raise InvalidInputError(f"the {what} is empty")
        if len(text) > self.max_text_chars:
            raise CapacityError(
                f"the {what} has {len(text)} characters, over the limit of {self.max_text_chars}"
            )

    def check_batch(self, size: int) -> None:
        if size == 0:
            raise InvalidInputError("no queries to answer")
        if size > self.max_batch:
            raise CapacityError(f"{size} queries in one batch, over the limit of {self.max_batch}")


DEFAULT_INFERENCE_LIMITS = InferenceLimits()
CHAT_ORDER = "chat messages must alternate user, assistant, …, ending with a user message"


class Decoding(BaseModel):
    """How answers are decoded: greedy at temperature 0 (the default), sampled above it."""

    # Every number finite and in a range torch takes: an overflowing seed or an infinite temperature
    # would otherwise fail deep in sampling, as a crash instead of an error naming the field.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_new_tokens: int = Field(default=64, ge=1, description="answer length cap, in tokens")
    temperature: float = Field(
        default=0.0, ge=0.0, le=MAX_TEMPERATURE, description="0 is greedy; above 0 samples"
    )
    top_k: int = Field(
        default=0, ge=0, le=2**31 - 1, description="sample among the k likeliest tokens; 0 is all"
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="seed of the sampler, for repeatable samples"
    )

    @classmethod
    def from_options(cls, **options: Any) -> Decoding:
        """Validate keyword options (as `answer(..., max_new_tokens=32)` passes them), one error line."""
        try:
            return cls(**options)
        except ValidationError as exc:
            raise InvalidInputError(f"invalid decoding options: {validation_message(exc)}") from None


class Query(BaseModel):
    """One request: a question (`answer`) or a phrase to segment (`ground`) about an image, with the
    regions it marks. The one request type: the Python API, the CLI, the Serve ingress (whose `image`
    is first the HTTP body's image spec, then the decoded image) and the tools all build one; it is
    checked once by `InferenceLimits.check` and becomes the model's `Request` once (`core/prompts.py`)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    image: Any = Field(description="MedicalImage, path, fsspec URI, bytes, RGB numpy array or PIL image")
    text: str = Field(description="the question (answer), or what to segment (ground)")
    task: Literal["answer", "ground"] = "answer"
    regions: list[RegionPrompt] = Field(default_factory=list)
    image_options: dict[str, Any] = Field(
        default_factory=dict, description="load_image options: frame, slice_index, axis, window, ..."
    )
    history: list[ChatMessage] = Field(
        default_factory=list,
        description="earlier turns about this image (user, assistant, ...) in the prompt before `text`",
    )
    capability: str | None = Field(
        None,
        description="an expert capability to use (e.g. modality_classification): the answer is steered to "
        "its expert's trigger token, forced where the model does not say it (`forced`)",
    )


class ChatMessage(BaseModel):
    """One message of a conversation about one image.

    A user message may mark regions (`{region}` in its content, or appended). In an assistant message,
    `<SEG>` stands where that answer made a mask, as the assistant writes its answers, so a previous
    `ChatResult.messages` goes back in unchanged.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["user", "assistant"]
    content: str
    regions: list[RegionPrompt] = Field(default_factory=list)


def parse_model(cls: type[BaseModel], value: Any, what: str) -> Any:
    """`value` as a `cls` (an instance passes through); a validation problem is one InvalidInputError."""
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {what}: {validation_message(exc)}") from None
