"""The web page's routes, added to an API app (`medplib ui`'s and the Serve ingress's):

    GET  /            the page (static HTML, CSS, JS from this package: no build step, no CDN)
    GET  /ui/<file>   its files
    POST /v1/render   an uploaded file as the model sees it: PNG pixels plus what the page's controls
                      need (frames, slices per plane, window); DICOM and NIfTI are decoded here
    POST /v1/render/mask-nifti   a mask on a NIfTI volume's slice, as a .nii.gz on the volume's grid

The page and its files need no API key (they hold no data); `/v1/render` does, like every `/v1` route.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medplib.agents.serve.config import ServeLimits
from medplib.agents.serve.schemas import ImageInput
from medplib.agents.serve.ui.service import image_bytes
from medplib.core.errors import InvalidInputError, MedplibError
from medplib.core.image import MedicalImage
from medplib.core.io import load_image, load_volume
from medplib.core.io.intensity import WINDOW_PRESETS
from medplib.core.io.volume import AXES, plane_into_volume
from medplib.core.masks import Mask

STATIC = Path(__file__).parent / "static"
# The page talks only to the server that sent it: the browser refuses anything else.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageInput


class MaskVolumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageInput = Field(description="the NIfTI file, with the axis and slice the mask lies on")
    mask: Mask


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

    @app.post("/v1/render/mask-nifti", response_class=Response)
    async def mask_nifti(body: MaskVolumeRequest) -> Response:
        """The mask of a volume's slice as a NIfTI volume (gzip) on the volume's (RAS+) grid."""
        data = await asyncio.to_thread(mask_volume_nifti, body, limits)
        return Response(
            data,
            media_type="application/gzip",
            headers={"Content-Disposition": 'attachment; filename="mask.nii.gz"'},
        )


def rendered(spec: ImageInput, limits: ServeLimits) -> RenderResponse:
    try:
        image = load_image(image_bytes(spec), **spec.load_options(), limits=limits.image())
    except MedplibError as exc:
        raise type(exc)(f"image: {exc}") from None
    return render_response(image)


def mask_volume_nifti(body: MaskVolumeRequest, limits: ServeLimits) -> bytes:
    import nibabel as nib

    spec = body.image
    volume = load_volume(image_bytes(spec), volume_index=spec.volume_index, limits=limits.image())
    if volume.meta.format != "nifti":
        raise InvalidInputError("image: a mask goes back onto a NIfTI volume only; download it as PNG")
    plane = body.mask.to_array().astype(np.uint8)
    placed = plane_into_volume(volume, plane, axis=spec.axis, index=spec.slice_index)
    nifti = nib.Nifti1Image(placed, volume.affine)
    nifti.header.set_xyzt_units("mm")
    return gzip.compress(nifti.to_bytes(), compresslevel=6)


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
