"""What the assistant returns: the answer text, one mask per `<SEG>`, and how the answer was made.

Every result is JSON (`model_dump_json`) and validates back (`AnswerResult.model_validate_json`).
Masks are COCO RLE at the image's original size, each with SAM's predicted IoU as its score. Timings
are wall milliseconds per stage; a batched call's stages run once for the whole batch, so its results
share them (`load` aside, which is per image).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medplib.core.masks import SegmentationResult
from medplib.core.queries import ChatMessage

CacheUse = Literal["hit", "miss", "unused"]

# The stages a timing can name, in pipeline order.
STAGES = ("load", "encode_clip", "encode_sam", "prefill", "decode", "masks", "total")


class CacheHits(BaseModel):
    """Per cached item: served from the cache, computed (and stored), or not needed by this request."""

    model_config = ConfigDict(frozen=True)

    clip: CacheUse = Field(description="CLIP features: needed for a new image or for regions")
    sam: CacheUse = Field(description="SAM image embedding: needed only when the answer has a <SEG>")
    prefix: CacheUse = Field(description="the LLM's keys and values of the template up to the image")


class InferenceResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str = Field(description="preset name or checkpoint the answer came from")
    text: str = Field(description="the answer; <SEG> stands where a mask was made")
    masks: list[SegmentationResult] = Field(description="one per <SEG>, in order")
    seg_forced: bool = Field(
        default=False,
        description="grounding only: the model would have ended without <SEG>, so one was forced",
    )
    outputs: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict,
        description="per expert, its head's outputs, one per trigger token the answer holds, in order "
        "(pixel_grounding: the masks, as in `masks`)",
    )
    forced: bool = Field(
        default=False,
        description="a trigger token (grounding's <SEG>, or the capability asked for) was forced: the "
        "model would have ended without it",
    )
    image_size: tuple[int, int] = Field(description="(height, width) of the image the masks lie on")
    image_source: str = Field(description="where the image came from")
    num_regions: int = Field(description="region prompts the question marked")
    prompt_tokens: int
    new_tokens: int = Field(description="tokens generated, the closing </s> included")
    cache: CacheHits
    timings_ms: dict[str, float] = Field(description=f"wall milliseconds per stage: {', '.join(STAGES)}")


class AnswerResult(InferenceResult):
    task: Literal["answer"] = "answer"
    question: str


class GroundingResult(InferenceResult):
    task: Literal["ground"] = "ground"
    query: str = Field(description="what was asked to be segmented")


class ChatResult(InferenceResult):
    task: Literal["chat"] = "chat"
    messages: list[ChatMessage] = Field(description="the conversation, this answer last")


class ExpertInfo(BaseModel):
    """One expert a model can call (`MedPLIB.experts()`, the API's `/v1/experts`)."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    capabilities: list[str]
    tokens: list[str] = Field(description="its trigger tokens; an answer holding one runs its head")
    output_schema: dict[str, Any] | None = Field(description="JSON schema of one head output; None: no head")
    trained: bool = Field(description="the loaded checkpoint holds this expert (its head, tokens, adapter)")


class TextDelta(BaseModel):
    """A piece of an answer as it is generated (`MedPLIB.answer_stream`, the API's `"stream": true`);
    the pieces of one answer join to its result's `text`."""

    model_config = ConfigDict(frozen=True)

    text: str
