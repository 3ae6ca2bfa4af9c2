"""LangChain tools: `medical_vqa`, `medical_region_vqa` and `medical_grounding`.

Each is a `BaseTool` with a pydantic `args_schema` an LLM can fill (an image reference, the question or
the target, region prompts) and runs sync or async on a `Backend`. Images are named by an id from the
toolkit's `ImageStore` or by a path/URI; the store itself is no argument, so it never reaches the LLM.

Every call goes through the plugins' `medplib_before_tool_call` hook first (audit, policy: a plugin may
edit the arguments or refuse the call). A refusal, a bad argument and any `MedplibError` from the
backend become a `ToolException` whose message says what to fix; with `handle_tool_error` on (the
toolkit's default) the agent receives it as an error `ToolMessage` and can try again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Annotated, Any, ClassVar, Literal

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from medplib.agents.backends import Backend
from medplib.agents.image_store import ImageStore, StoredImage
from medplib.core import plugins
from medplib.core.errors import MedplibError, validation_message
from medplib.core.masks import encode_png, overlay
from medplib.core.queries import REGION_PLACEHOLDER
from medplib.core.regions import BoxPrompt, MaskPrompt, PointPrompt, PolygonPrompt, ScribblePrompt
from medplib.core.results import AnswerResult, GroundingResult

# ---- region prompts as an LLM fills them --------------------------------------------------------------
# The core prompts (medplib.core.regions) with what a tool schema needs on top: a described, required
# `kind`, and [x, y] lists instead of tuples (JSON Schema's prefixItems, which several providers reject).
# Validation and rasterising stay the core's. A mask is named by an image-store id or a URI, never
# inlined as base64.

XY = Annotated[list[float], Field(min_length=2, max_length=2)]
COORDINATES = "pixels of the original image, x to the right and y down from the top-left corner"


class PointRegion(PointPrompt):
    """Clicks on the image: a disc around each positive click (by default 2% of the image's shorter
    side wide, at least 2 pixels), minus the discs around negative clicks."""

    kind: Literal["point"] = Field(description="the region's kind: 'point'")
    points: list[XY] = Field(min_length=1, description=f"each click as [x, y], in {COORDINATES}")  # type: ignore[assignment]


class BoxRegion(BoxPrompt):
    """An axis-aligned box."""

    kind: Literal["box"] = Field(description="the region's kind: 'box'")
    box: list[float] = Field(  # type: ignore[assignment]
        min_length=4, max_length=4, description=f"[x0, y0, x1, y1] with x0 < x1 and y0 < y1, in {COORDINATES}"
    )


class PolygonRegion(PolygonPrompt):
    """A closed outline; the last vertex connects back to the first."""

    kind: Literal["polygon"] = Field(description="the region's kind: 'polygon'")
    points: list[XY] = Field(min_length=3, description=f"the vertices as [x, y], in {COORDINATES}")  # type: ignore[assignment]


class ScribbleRegion(ScribblePrompt):
    """A free-hand stroke of some width."""

    kind: Literal["scribble"] = Field(description="the region's kind: 'scribble'")
    points: list[XY] = Field(min_length=1, description=f"points along the stroke as [x, y], in {COORDINATES}")  # type: ignore[assignment]


class MaskRegion(BaseModel):
    """A binary mask image of the same size as the image, e.g. a mask `medical_grounding` returned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["mask"] = Field(description="the region's kind: 'mask'")
    mask: str = Field(
        min_length=1, description="a mask id from the image store (e.g. 'mask-1') or a path or URI"
    )

    def to_prompt(self, images: ImageStore) -> MaskPrompt:
        stored = images.resolve(self.mask)
        if isinstance(stored.data, str):
            return MaskPrompt(source=stored.data)
        return MaskPrompt(data_base64=base64.b64encode(stored.data).decode("ascii"))


def _region_kind(value: Any) -> Any:
    return value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)


# A callable discriminator: the JSON schema is a plain oneOf (no OpenAPI `discriminator` keyword with
# $refs that dangle once LangChain inlines them), and a wrong kind is one error, not one per shape.
Region = Annotated[
    Annotated[PointRegion, Tag("point")]
    | Annotated[BoxRegion, Tag("box")]
    | Annotated[PolygonRegion, Tag("polygon")]
    | Annotated[ScribbleRegion, Tag("scribble")]
    | Annotated[MaskRegion, Tag("mask")],
    Discriminator(
        _region_kind,
        custom_error_type="region_kind",
        custom_error_message="a region's kind must be one of: point, box, polygon, scribble, mask",
    ),
]

# ---- arguments ----------------------------------------------------------------------------------------

IMAGE_DESCRIPTION = "the image: an id from the image store (e.g. 'img-1') or a path or URI"


class ToolInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description=IMAGE_DESCRIPTION)


class VQAInput(ToolInput):
    """A question about a whole medical image."""

    question: str = Field(min_length=1, description="the question, in plain language")


class RegionVQAInput(ToolInput):
    """A question about one or more regions marked on a medical image."""

    question: str = Field(
        min_length=1,
        description=f"the question; write {REGION_PLACEHOLDER} where each region belongs, in order "
        f"(e.g. 'What is in {REGION_PLACEHOLDER}?'); without any, the regions are appended",
    )
    regions: list[Region] = Field(min_length=1, description="the regions the question is about, in order")


class GroundingInput(ToolInput):
    """What to segment in a medical image."""

    target: str = Field(
        min_length=1, description="what to segment, as a short noun phrase (e.g. 'the liver lesion')"
    )
    overlay: bool = Field(
        default=False,
        description="also draw the masks over the image for the user; its image id is returned",
    )


class GroundingArtifact(BaseModel):
    """The artifact of `medical_grounding` (the application's, not the LLM's): the full result."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    result: GroundingResult = Field(description="the model's result; its masks are COCO RLE")
    mask_ids: list[str] = Field(description="each mask's id in the image store, in order")
    overlay_id: str | None = Field(default=None, description="the overlay's id in the image store")
    overlay_png: bytes | None = Field(default=None, description="the overlay, when asked for, as PNG")


# ---- the tools ----------------------------------------------------------------------------------------


def describe_invalid_arguments(exc: ValidationError) -> str:
    return f"invalid arguments: {validation_message(exc)}"


@contextlib.contextmanager
def _as_tool_exception(prefix: str = "") -> Iterator[None]:
    """Errors the caller can fix become a ToolException; anything else is a bug and propagates."""
    try:
        yield
    except MedplibError as exc:
        raise ToolException(f"{prefix}{exc}") from exc


class MedPLIBTool(BaseTool):
    """Shared by the three tools: the hook, image and region resolution, errors, sync and async runs.

    A subclass names its `backend_method` (`answer` or `ground`; the async one is `a` + that), says
    how its arguments become that method's positional arguments, and turns the result into output.
    """

    backend: Backend = Field(exclude=True)
    images: ImageStore = Field(default_factory=ImageStore, exclude=True)
    decoding: dict[str, Any] = Field(
        default_factory=dict, description="decoding options of every call: max_new_tokens, temperature, ..."
    )
    handle_tool_error: bool | str | Callable[[ToolException], Any] | None = True
    handle_validation_error: bool | str | Callable[[ValidationError], str] | None = describe_invalid_arguments

    backend_method: ClassVar[Literal["answer", "ground"]]

    def _run(self, **arguments: Any) -> Any:
        args, image, call_args = self._prepare(arguments)
        with _as_tool_exception():
            result = getattr(self.backend, self.backend_method)(*call_args, **self._backend_kwargs())
            return self._output(args, image, result)

    async def _arun(self, **arguments: Any) -> Any:
        args, image, call_args = self._prepare(arguments)
        with _as_tool_exception():
            method = getattr(self.backend, f"a{self.backend_method}")
            result = await method(*call_args, **self._backend_kwargs())
            # Output may decode the image again (overlays): keep that off the event loop too.
            return await asyncio.to_thread(self._output, args, image, result)

    def _prepare(self, arguments: dict[str, Any]) -> tuple[Any, StoredImage, tuple[Any, ...]]:
        """Let the plugins see the call, then resolve what the backend needs."""
        schema: type[ToolInput] = self.args_schema  # type: ignore[assignment]
        plain = schema.model_validate(arguments).model_dump(mode="json")
        with _as_tool_exception(f"{self.name} was refused: "):
            plugins.before_tool_call(self.name, plain)
        try:  # a plugin may have edited the arguments: they must still be valid
            args = schema.model_validate(plain)
        except ValidationError as exc:
            raise ToolException(f"a plugin left invalid arguments: {validation_message(exc)}") from None
        with _as_tool_exception():
            image = self.images.resolve(args.image)
            return args, image, self._backend_args(args, image)

    def _backend_kwargs(self) -> dict[str, Any]:
        """The backend method's keyword arguments: the decoding options (and what a subclass adds)."""
        return dict(self.decoding)

    @abstractmethod
    def _backend_args(self, args: Any, image: StoredImage) -> tuple[Any, ...]: ...

    @abstractmethod
    def _output(self, args: Any, image: StoredImage, result: Any) -> Any: ...


def _answer_text(result: AnswerResult) -> str:
    return result.text.strip() or "(the model gave an empty answer)"


class MedicalVQATool(MedPLIBTool):
    name: str = "medical_vqa"
    description: str = (
        "Answer a question about a medical image (CT, MRI, X-ray, ultrasound, microscopy, ...): its "
        "modality, anatomy, findings. Returns the answer as text."
    )
    args_schema: type[BaseModel] = VQAInput
    backend_method: ClassVar[Literal["answer", "ground"]] = "answer"

    def _backend_args(self, args: VQAInput, image: StoredImage) -> tuple[Any, ...]:
        return image, args.question

    def _output(self, args: VQAInput, image: StoredImage, result: AnswerResult) -> str:
        return _answer_text(result)


class MedicalRegionVQATool(MedPLIBTool):
    name: str = "medical_region_vqa"
    description: str = (
        "Answer a question about regions marked on a medical image: points, boxes, polygons, "
        "scribbles or masks (a mask id from medical_grounding works), in pixel coordinates of the "
        "image. Returns the answer as text."
    )
    args_schema: type[BaseModel] = RegionVQAInput
    backend_method: ClassVar[Literal["answer", "ground"]] = "answer"

    def _backend_args(self, args: RegionVQAInput, image: StoredImage) -> tuple[Any, ...]:
        regions = [r.to_prompt(self.images) if isinstance(r, MaskRegion) else r for r in args.regions]
        return image, args.question, regions

    def _output(self, args: RegionVQAInput, image: StoredImage, result: AnswerResult) -> str:
        return _answer_text(result)


class MedicalGroundingTool(MedPLIBTool):
    name: str = "medical_grounding"
    description: str = (
        "Find and segment something in a medical image (an organ, a lesion, a structure). Returns "
        "where it is (share of the image, location, bounding box, confidence) and a mask id for each "
        "mask, usable as a mask region in medical_region_vqa."
    )
    args_schema: type[BaseModel] = GroundingInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    backend_method: ClassVar[Literal["answer", "ground"]] = "ground"

    def _backend_args(self, args: GroundingInput, image: StoredImage) -> tuple[Any, ...]:
        return image, args.target

    def _output(
        self, args: GroundingInput, image: StoredImage, result: GroundingResult
    ) -> tuple[str, GroundingArtifact]:
        mask_ids = [self.images.put(seg.mask.to_png_bytes(), prefix="mask") for seg in result.masks]
        overlay_id = overlay_png = None
        if args.overlay:
            overlay_png = render_overlay(image, result)
            overlay_id = self.images.put(overlay_png)
        artifact = GroundingArtifact(
            result=result, mask_ids=mask_ids, overlay_id=overlay_id, overlay_png=overlay_png
        )
        return describe_grounding(args.image, artifact), artifact


def render_overlay(image: StoredImage, result: GroundingResult) -> bytes:
    """The result's masks drawn over its image, as PNG."""
    from medplib.core.io import load_image

    pixels = load_image(image.data, **image.options).pixels
    return encode_png(overlay(pixels, [seg.mask for seg in result.masks]))


def describe_grounding(image_ref: str, artifact: GroundingArtifact) -> str:
    """What an LLM needs to reason about a grounding result, in a few lines of text."""
    result = artifact.result
    height, width = result.image_size
    lines = [f"Segmented {result.query!r} in {image_ref} ({width}x{height} pixels, width x height):"]
    for mask_id, seg in zip(artifact.mask_ids, result.masks, strict=True):
        if seg.bbox is None:
            lines.append(f"- {mask_id}: empty, nothing was found")
            continue
        # SAM's predicted IoU, which an untrained decoder can put a little outside [0, 1].
        confidence = "unknown" if seg.score is None else f"{min(max(seg.score, 0.0), 1.0):.2f}"
        lines.append(
            f"- {mask_id}, {seg.summary}; {seg.area} pixels; box [x0, y0, x1, y1] = {list(seg.bbox)}; "
            f"confidence {confidence}"
        )
    if result.seg_forced:
        lines.append(
            "Caution: the model did not point at the target on its own (the mask was forced), so the "
            "mask may not show it."
        )
    if artifact.overlay_id is not None:
        lines.append(f"The masks drawn over the image: {artifact.overlay_id}.")
    return "\n".join(lines)


BUILTIN_TOOLS: tuple[type[MedPLIBTool], ...] = (MedicalVQATool, MedicalRegionVQATool, MedicalGroundingTool)
