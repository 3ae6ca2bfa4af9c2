"""What the client sends: each call of the HTTP API as its method, path, response model and JSON body,
built once here for `MedPLIBClient`'s sync and async methods alike."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from medplib.agents.serve.schemas import (
    ExpertsResponse,
    GroundVolumeResponse,
    HealthResponse,
    ImageInput,
    VolumeInput,
)
from medplib.core.errors import InvalidInputError, validation_message
from medplib.core.image import DEFAULT_LIMITS
from medplib.core.io.sources import read_source
from medplib.core.queries import Decoding
from medplib.core.results import AnswerResult, GroundingResult


@dataclass(frozen=True)
class Call:
    """One request to the API and how its response is read: `model` parses a success (or a status in
    `accept`); `retry=False` sends it once."""

    method: str
    path: str
    model: type[BaseModel]
    body: Any = None
    retry: bool = True
    accept: tuple[int, ...] = ()


EXPERTS = Call("GET", "/v1/experts", ExpertsResponse)
# A server with a deployment down answers 503 with its health: read, not retried.
HEALTH = Call("GET", "/v1/health", HealthResponse, retry=False, accept=(503,))


def image_input(image: ImageInput | bytes | str | os.PathLike[str], **options: Any) -> ImageInput:
    """What a request carries for `image`; `options` are `load_image`'s (frame, window, ...)."""
    if isinstance(image, ImageInput):
        return image.model_copy(update=options) if options else image
    if isinstance(image, os.PathLike):
        image = read_source(image, max_bytes=DEFAULT_LIMITS.max_bytes)
    if isinstance(image, bytes | bytearray | memoryview):
        fields: dict[str, Any] = {"base64": base64.b64encode(bytes(image)).decode("ascii")}
    elif isinstance(image, str):
        fields = {"uri": image}
    else:
        raise InvalidInputError(
            f"an image is bytes, a Path, a path/URI string or an ImageInput, not {image!r}"
        )
    try:
        return ImageInput(**fields, **options)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid image: {validation_message(exc)}") from None


# task -> its route, the body's field for the text, and the result it answers with
ROUTES = {"answer": ("/v1/vqa", "question", AnswerResult), "ground": ("/v1/ground", "text", GroundingResult)}


def image_call(
    task: str,
    image: Any,
    text: str,
    regions: Sequence[Any],
    image_options: Mapping[str, Any] | None,
    decoding: Mapping[str, Any],
    *,
    capability: str | None = None,
    stream: bool = False,
) -> Call:
    """`/v1/vqa` (task "answer") or `/v1/ground` ("ground"). The server validates everything but the
    image, so a client and server never disagree; a field left None is left out (a server older than
    the field still answers)."""
    path, text_field, model = ROUTES[task]
    fields = {text_field: text, "capability": capability, "stream": stream or None}
    body = {
        "image": image_input(image, **(image_options or {})).model_dump(mode="json", exclude_none=True),
        "regions": [r.model_dump(mode="json") if isinstance(r, BaseModel) else dict(r) for r in regions],
        "decoding": dict(decoding),
        **{key: value for key, value in fields.items() if value is not None},
    }
    return Call("POST", path, model, body)


def volume_call(volume: Any, text: str, options: Mapping[str, Any]) -> Call:
    """`/v1/ground_volume`: a file is uploaded; a folder (a DICOM series) or a string is named for the
    server to read; `options` are `GroundVolumeRequest`'s fields and decoding's."""
    from medplib.core.io.dicom_series import is_folder

    if isinstance(volume, VolumeInput):
        spec = volume
    elif isinstance(volume, os.PathLike) and not is_folder(volume):
        spec = VolumeInput(
            base64=base64.b64encode(read_source(volume, max_bytes=DEFAULT_LIMITS.max_bytes)).decode()
        )
    elif isinstance(volume, bytes | bytearray | memoryview):
        spec = VolumeInput(base64=base64.b64encode(bytes(volume)).decode("ascii"))
    else:
        spec = VolumeInput(uri=os.fspath(volume))
    decoding = {key: value for key, value in options.items() if key in Decoding.model_fields}
    fields = {key: value for key, value in options.items() if key not in decoding}
    body = {"volume": spec.model_dump(exclude_none=True), "text": text, "decoding": decoding, **fields}
    return Call("POST", "/v1/ground_volume", GroundVolumeResponse, body)
