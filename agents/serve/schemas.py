"""The HTTP API's request and response bodies, and how errors travel over it.

Requests reuse the core schemas: regions are `RegionPrompt`s, decoding is `Decoding`; the image is
named by `uri` (a path or fsspec URI the server reads) or carried as `base64`, with `load_image`'s
options beside it. Responses are the core result models (`AnswerResult`, `GroundingResult`; masks as
COCO RLE). An error is `{"error": kind, "message": ...}`; `ERROR_KINDS` ties each kind to its status
and to the `MedplibError` class the client raises again, so a caller of the API sees the same
exception as a caller of `medplib.load(...)`.

Neither Ray nor FastAPI is imported here: the client needs only pydantic and httpx.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medplib.core.errors import (
    CapacityError,
    CheckpointError,
    ImageTooLargeError,
    InvalidInputError,
    MedplibError,
    PluginError,
    RegionError,
    UnsupportedFormatError,
)
from medplib.core.expert_spec import IDENTIFIER, ExpertSpec, Resources
from medplib.core.masks import Mask
from medplib.core.queries import REGION_PLACEHOLDER, ChatMessage, Decoding, Query
from medplib.core.regions import RegionPrompt
from medplib.core.volume_results import VolumeGroundingResult


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _FileInput(_Body):
    uri: str | None = Field(
        None, min_length=1, description="path or fsspec URI the server reads (if its config allows it)"
    )
    base64: str | None = Field(
        None, min_length=1, description="the file itself (PNG, JPEG, TIFF, DICOM, NIfTI), base64-encoded"
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> _FileInput:
        if (self.uri is None) == (self.base64 is None):
            raise ValueError("give the file as exactly one of 'uri' and 'base64'")
        return self


class ImageInput(_FileInput):
    """The image: exactly one of `uri` and `base64`, and how to read it (`load_image`'s options)."""

    frame: int | None = Field(None, description="frame of a multi-frame DICOM")
    slice_index: int | None = Field(None, description="slice of a volume (default: the middle one)")
    axis: Literal["axial", "coronal", "sagittal"] = Field("axial", description="plane of a volume slice")
    volume_index: int | None = Field(None, description="volume of a 4-D NIfTI")
    window: str | tuple[float, float] | None = Field(
        None, description="a preset (lung, brain, bone, ...), [center, width], or none: the file's own"
    )

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments of `load_image`."""
        return self.model_dump(exclude={"uri", "base64"})


class InferenceRequest(_Body):
    image: ImageInput
    regions: list[RegionPrompt] = Field(
        default_factory=list, description="points, boxes, polygons, scribbles or masks, in image pixels"
    )
    decoding: Decoding = Field(default_factory=Decoding, description="max_new_tokens, temperature, ...")
    stream: bool = Field(
        False,
        description="answer as server-sent events: 'delta' events ({text}) as the answer is generated, "
        "then one 'result' event (the whole result, masks included), or one 'error' event",
    )


class VQARequest(InferenceRequest):
    """A question about an image, or about regions marked on it."""

    question: str = Field(
        min_length=1,
        description=f"the question; the k-th {REGION_PLACEHOLDER} marks where the k-th region goes "
        "(without any, the regions are appended)",
    )
    history: list[ChatMessage] = Field(
        default_factory=list,
        description="earlier turns about this image (user, assistant, ...), as `MedPLIB.chat` takes them; "
        "the question is the next user message",
    )
    capability: str | None = Field(
        None,
        pattern=IDENTIFIER,
        description="an expert's capability to use (see GET /v1/experts), e.g. modality_classification: "
        "the answer is steered to that expert's token (forced where the model does not say it: `forced`) "
        "and its head's outputs are in `outputs[expert]`",
    )

    def query(self) -> Query:
        """The request as the one request type, its image still this body's `ImageInput`."""
        return Query(
            image=self.image,
            text=self.question,
            regions=self.regions,
            history=self.history,
            capability=self.capability,
        )


class GroundRequest(InferenceRequest):
    """What to segment; the answer always holds at least one mask."""

    text: str = Field(min_length=1, description="what to segment, e.g. 'the liver lesion'")

    def query(self) -> Query:
        """The request as the one request type, its image still this body's `ImageInput`."""
        return Query(image=self.image, text=self.text, task="ground", regions=self.regions)


class VolumeInput(_FileInput):
    """The volume: `uri` names a NIfTI or DICOM file or a folder holding a DICOM series; `base64`
    carries a NIfTI or multi-frame DICOM file."""

    volume_index: int | None = Field(None, description="volume of a 4-D NIfTI")
    series_uid: str | None = Field(None, description="SeriesInstanceUID, for a folder holding several")


class GroundVolumeRequest(_Body):
    """What to segment through a volume, slice by slice; the mask comes back on the input's grid."""

    volume: VolumeInput
    text: str = Field(min_length=1, description="what to segment, e.g. 'the liver'")
    axis: Literal["axial", "coronal", "sagittal"] = Field("axial", description="the planes grounded")
    slices: str | None = Field(None, description="START:STOP slice indices along the axis (default: all)")
    window: str | tuple[float, float] | None = Field(None, description="as for an image")
    min_score: float | None = Field(None, description="leave slices whose predicted IoU is below it empty")
    skip_forced: bool = Field(False, description="leave slices empty where the model gave no <SEG>")
    largest_component: bool = Field(False, description="keep the largest 3-D connected part")
    mask_format: Literal["nifti", "rle", "none"] = Field(
        "nifti", description="the mask as a gzipped NIfTI in base64, as COCO RLE per slice, or not at all"
    )
    decoding: Decoding = Field(default_factory=Decoding, description="max_new_tokens, temperature, ...")

    def query(self) -> Query:
        """The request for every slice, its image still this body's `VolumeInput` (each slice's image
        replaces it)."""
        return Query(image=self.volume, text=self.text, task="ground")


class SliceMask(_Body):
    index: int = Field(description="slice index along the axis")
    mask: Mask = Field(description="the slice's mask on its image (as `/v1/ground` would return it)")


class GroundVolumeResponse(_Body):
    result: VolumeGroundingResult = Field(description="the summary: volume in mL, extent, per-slice scores")
    mask_nifti_base64: str | None = Field(None, description="mask_format 'nifti': the mask file, gzipped")
    slice_masks: list[SliceMask] | None = Field(None, description="mask_format 'rle': one per slice")

    def result_with_mask(self) -> VolumeGroundingResult:
        """The result with its mask (bool, on the input grid) decoded from `mask_nifti_base64`."""
        if self.mask_nifti_base64 is None:
            return self.result
        import base64 as b64
        import gzip

        import nibabel as nib
        import numpy as np

        data = gzip.decompress(b64.b64decode(self.mask_nifti_base64))
        mask = np.asarray(nib.Nifti1Image.from_bytes(data).dataobj) > 0
        return self.result.model_copy(update={"mask": mask})


class ErrorResponse(_Body):
    error: str = Field(description="what kind of problem: invalid_input, region, capacity, timeout, ...")
    message: str = Field(description="what is wrong, and what to change")


class DeploymentInfo(_Body):
    replicas: int | None = Field(description="fixed replica count; None when autoscaling")
    autoscaling_config: dict[str, Any] | None
    resources: Resources = Field(description="per replica")
    max_ongoing_requests: int


class HostedExpert(_Body):
    spec: ExpertSpec
    deployments: list[str] = Field(description="the deployments that run this expert")
    output_schema: dict[str, Any] | None = Field(
        None, description="JSON schema of one output of its head (an entry of a result's `outputs[name]`)"
    )


class ExpertsResponse(_Body):
    experts: list[HostedExpert]
    deployments: dict[str, DeploymentInfo]

    def capabilities(self) -> dict[str, str]:
        """Capability -> the expert that has it."""
        return {capability: e.spec.name for e in self.experts for capability in e.spec.capabilities}

    def check_capability(self, capability: str | None) -> None:
        """InvalidInputError naming an unknown capability and the available ones (None passes)."""
        available = self.capabilities()
        if capability is not None and capability not in available:
            raise InvalidInputError(
                f"unknown capability {capability!r}; this server has: {', '.join(sorted(available))}"
            )


class HealthResponse(_Body):
    status: Literal["ok", "unavailable"]
    model: str
    deployments: dict[str, str] = Field(description="Ray Serve's status of each deployment")


class ServeError(MedplibError):
    """A request the server could not serve for its own reasons: unauthorised, overloaded, timed out."""

    def __init__(self, message: str, *, kind: str = "internal", status: int = 500) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


# kind -> (HTTP status, the error class a client raises). Most specific classes first: the first
# entry whose class an exception is an instance of names its kind.
ERROR_KINDS: dict[str, tuple[int, type[MedplibError]]] = {
    "image_too_large": (413, ImageTooLargeError),
    "unsupported_format": (400, UnsupportedFormatError),
    "region": (400, RegionError),
    "invalid_input": (400, InvalidInputError),
    "capacity": (413, CapacityError),
    "checkpoint": (500, CheckpointError),
    "plugin": (500, PluginError),
    # Raised by the HTTP layer itself.
    "malformed_json": (400, InvalidInputError),
    "invalid_request": (422, InvalidInputError),
    "payload_too_large": (413, CapacityError),
    "unauthorized": (401, ServeError),
    "not_found": (404, ServeError),
    "unavailable": (503, ServeError),
    "timeout": (504, ServeError),
    "internal": (500, ServeError),
}


def error_kind(exc: MedplibError) -> tuple[str, int]:
    """The kind and HTTP status of an error raised while serving a request."""
    if isinstance(exc, ServeError):
        return exc.kind, exc.status
    for kind, (status, cls) in ERROR_KINDS.items():
        if isinstance(exc, cls) and cls is not ServeError:
            return kind, status
    return "internal", 500


def error_from_response(status: int, body: Any) -> MedplibError:
    """The exception an error response stands for (a body that is no `ErrorResponse` included)."""
    if isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str):
        kind, message = body["error"], body["message"]
    else:
        kind, message = "internal", f"HTTP {status}: {str(body)[:500]}"
    cls = ERROR_KINDS.get(kind, (status, ServeError))[1]
    if cls is ServeError:
        return ServeError(message, kind=kind, status=status)
    return cls(message)


def decode_base64(text: str, what: str) -> bytes:
    """Standard base64, whitespace and a `data:...;base64,` prefix allowed."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"{what} is not valid base64 ({exc})") from None
