"""The canonical image: what every input format becomes before the model sees it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medplib.core.errors import InvalidInputError


class ImageLimits(BaseModel):
    """Size limits applied before decoding, so a hostile file cannot exhaust memory."""

    model_config = ConfigDict(frozen=True)

    max_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="largest encoded input")
    max_pixels: int = Field(default=64_000_000, gt=0, description="largest decoded image, H*W per frame")
    max_voxels: int = Field(default=512 * 512 * 1024, gt=0, description="largest decoded volume")


DEFAULT_LIMITS = ImageLimits()


class ImageMeta(BaseModel):
    """What a user wants to know about an image besides its pixels."""

    source: str = Field(description="where the image came from: a path, a URI, '<bytes>' or '<array>'")
    format: str = Field(description="decoded format: png, jpeg, tiff, dicom, nifti, array")
    width: int
    height: int
    modality: str | None = Field(default=None, description="DICOM modality (CT, MR, CR, US, ...) if known")
    body_part: str | None = None
    description: str | None = Field(default=None, description="study or series description, if any")
    spacing: tuple[float, float] | None = Field(default=None, description="pixel spacing (row, column) in mm")
    slice_thickness: float | None = None
    original_dtype: str = Field(description="dtype of the stored pixel values before scaling")
    value_range: tuple[float, float] = Field(description="min and max of the stored values (after rescale)")
    window: tuple[float, float] | None = Field(
        default=None, description="(low, high) of the values mapped to 0..255"
    )
    frame: int | None = Field(default=None, description="frame index of a multi-frame DICOM")
    num_frames: int = 1
    slice_index: int | None = Field(default=None, description="slice index into a volume")
    axis: str | None = Field(default=None, description="volume plane of the slice: sagittal, coronal, axial")
    volume_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MedicalImage:
    """An image in canonical form: RGB uint8 pixels of shape (H, W, 3) plus metadata."""

    pixels: np.ndarray
    meta: ImageMeta

    def __post_init__(self) -> None:
        p = self.pixels
        if p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] != 3:
            raise InvalidInputError(f"canonical pixels must be uint8 (H, W, 3), got {p.dtype} {p.shape}")

    @property
    def nbytes(self) -> int:
        """Bytes of the pixels, what a cache of decoded images is bounded by."""
        return self.pixels.nbytes

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), the grid every region prompt and mask lives on."""
        return self.pixels.shape[0], self.pixels.shape[1]
