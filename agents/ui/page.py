"""The web page's routes, added to an API app (`medplib ui`'s and the Serve ingress's):

    GET  /            the page (static HTML, CSS, JS from this package: no build step, no CDN)
    GET  /ui/<file>   its files
    POST /v1/render   an uploaded file as the model sees it: PNG pixels plus what the page's controls
                      need (frames, slices per plane, window); DICOM and NIfTI are decoded here

The page and its files need no API key (they hold no data); `/v1/render` does, like every `/v1` route.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medplib.agents.schemas import ImageInput
from medplib.agents.serve_config import ServeLimits
from medplib.agents.ui.service import image_bytes
from medplib.core.errors import MedplibError
from medplib.core.image import MedicalImage
from medplib.core.io import load_image
from medplib.core.io.intensity import WINDOW_PRESETS
from medplib.core.io.volume import AXES

STATIC = Path(__file__).parent / "static"
# The page talks only to the server that sent it: the browser refuses anything else.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageInput


class RenderResponse(BaseModel):
    png: str = Field(description="the image as the model sees it: a data:image/png;base64 URL")
    width: int
    height: int
    format: str
    modality: str | None
    description: str | None
    num_frames: int = Field(description="frames of a multi-frame DICOM (1 otherwise)")
    frame: int | None
    axis: str | None = Field(description="plane of a volume slice; None for a 2-D image")
    slice_index: int | None
    num_slices: dict[str, int] = Field(description="slices per plane of a volume; empty for a 2-D image")
    window: tuple[float, float] | None
    window_presets: list[str]


def add_page(app: FastAPI, limits: ServeLimits) -> None:
    """Serve the page at `/` and the render route on `app`."""
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(
            STATIC / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY}
        )

    @app.post("/v1/render", response_model=RenderResponse)
    async def render(body: RenderRequest) -> Any:
        """The image as the model sees it (window, frame, slice and plane applied) as PNG."""
        return await asyncio.to_thread(rendered, body.image, limits)


def rendered(spec: ImageInput, limits: ServeLimits) -> RenderResponse:
    try:
        image = load_image(image_bytes(spec), **spec.load_options(), limits=limits.image())
    except MedplibError as exc:
        raise type(exc)(f"image: {exc}") from None
    return render_response(image)


def render_response(image: MedicalImage) -> RenderResponse:
    meta = image.meta
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.pixels)).save(buffer, format="PNG", compress_level=1)
    shape = meta.volume_shape
    return RenderResponse(
        png="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
        width=meta.width,
        height=meta.height,
        format=meta.format,
        modality=meta.modality,
        description=meta.description,
        num_frames=meta.num_frames,
        frame=meta.frame,
        axis=meta.axis,
        slice_index=meta.slice_index,
        num_slices={axis: int(shape[number]) for number, axis in enumerate(AXES)} if shape else {},
        window=meta.window,
        window_presets=["minmax", *WINDOW_PRESETS],
    )
