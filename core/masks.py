"""Binary masks on the image grid: COCO run-length encoding, PNG I/O, colour overlays, results.

A `Mask` is what the model returns and what JSON carries: COCO's compressed RLE, so a mask from medplib
drops straight into pycocotools and back, and a blob costs a few hundred bytes instead of H*W.
"""

from __future__ import annotations

import functools
import io
import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from medplib.core.errors import InvalidInputError
from medplib.core.image import DEFAULT_LIMITS, ImageLimits
from medplib.core.io.raster import decode_raster
from medplib.core.io.sources import Source, describe_source, is_uri, read_source

if TYPE_CHECKING:
    from medplib.core.io.intensity import Window
    from medplib.core.io.volume import MedicalVolume
    from medplib.core.volume_results import VolumeGroundingResult

Color = tuple[int, int, int]

# Ten well-separated, saturated colours; overlays cycle through them.
PALETTE: tuple[Color, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


def as_binary(array: np.ndarray, what: str = "mask") -> np.ndarray:
    """A 2-D bool array from a bool or integer array (non-zero is foreground).

    Floats are refused: a probability map must be thresholded by the caller, not silently at 0.
    """
    array = np.asarray(array)
    if array.ndim != 2 or 0 in array.shape:
        raise InvalidInputError(f"{what} must be a non-empty 2-D array (H, W), got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{what} must be bool or integer, got {array.dtype}; threshold it first")
    return array != 0


def _runs(mask: np.ndarray) -> list[int]:
    """COCO run lengths: column-major, alternating, starting with a (possibly empty) run of zeros."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    return [0, *runs] if flat[0] else runs


def _encode_counts(runs: Sequence[int]) -> str:
    """pycocotools' rleToString: 5-bit groups, continuation bit 0x20, delta to the run two back, +48.

    Vectorised over the runs (a noisy mask has thousands): each value takes the fewest 5-bit groups
    that hold it as a signed number, low group first; all but its last group carry 0x20."""
    values = np.asarray(runs, dtype=np.int64)
    if values.size == 0:
        return ""
    deltas = values.copy()
    deltas[3:] -= values[1:-2]  # from the fourth run on, the difference to the run two before
    groups = np.ones(len(deltas), dtype=np.int64)
    while True:  # widen each value until it fits: -2^(5n-1) <= x < 2^(5n-1)
        limit = np.int64(1) << (5 * groups - 1)
        short = (deltas < -limit) | (deltas >= limit)
        if not short.any():
            break
        groups += short
    width = int(groups.max())
    shifts = 5 * np.arange(width, dtype=np.int64)
    codes = (deltas[:, None] >> shifts) & 0x1F
    index = np.arange(width)
    codes |= np.where(index < groups[:, None] - 1, 0x20, 0)
    return (codes[index < groups[:, None]] + 48).astype(np.uint8).tobytes().decode("ascii")


# Groups of 5 bits one run may take: 40 bits, far beyond any image's pixels, and small enough that
# adding up a string's worth of runs cannot leave int64.
_MAX_GROUPS = 8


def _decode_counts(counts: str) -> list[int]:
    """pycocotools' rleFrString, vectorised (a noisy mask has thousands of runs, which a loop over the
    characters decoded in tens of milliseconds), with checks: a hostile string raises ValueError
    instead of garbage."""
    return _decoded_runs(counts).tolist()


@functools.lru_cache(maxsize=16)
def _decoded_runs(counts: str) -> np.ndarray:
    """The run lengths of compressed counts as a read-only int64 array (`_decode_counts`); the last
    few are kept, as a result's area, box and summary each read its mask's runs."""
    if not counts:
        return np.zeros(0, dtype=np.int64)
    codes = np.frombuffer(counts.encode("utf-32-le"), dtype=np.uint32).astype(np.int64) - 48
    outside = (codes < 0) | (codes >= 64)
    if outside.any():
        char = counts[int(np.argmax(outside))]
        raise ValueError(f"RLE counts contain {char!r}, outside the COCO alphabet '0'..'o'")
    last = (codes & 0x20) == 0  # a value's last 5-bit group has no continuation bit
    if not last[-1]:
        raise ValueError("RLE counts are truncated: the last group has its continuation bit set")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    groups = ends - starts + 1
    if groups.max() > _MAX_GROUPS:
        raise ValueError(f"RLE counts hold a run of {int(groups.max())} 5-bit groups, more than any image")
    shift = 5 * (np.arange(len(codes)) - np.repeat(starts, groups))  # low group first
    values = np.add.reduceat((codes & 0x1F) << shift, starts)
    negative = (codes[ends] & 0x10) != 0  # the last group's top bit is the sign
    values[negative] |= np.int64(-1) << (5 * groups[negative])
    if len(values) * int(np.abs(values).max()) >= 1 << 62:  # sums of them could leave int64
        raise ValueError(f"RLE counts of {len(values)} runs up to {int(np.abs(values).max())} are too large")
    # From the fourth run on, each is stored as its difference to the run two before it.
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    below = np.flatnonzero(runs < 0)
    if below.size:
        position = int(below[0])
        raise ValueError(f"RLE counts decode to a negative run ({runs[position]}) at position {position}")
    runs.flags.writeable = False
    return runs


class Mask(BaseModel):
    """A binary mask as COCO RLE: `{"size": [h, w], "counts": "<compressed string>"}`.

    Uncompressed counts (a list of run lengths) are accepted on input and stored compressed.
    """

    model_config = ConfigDict(frozen=True)

    size: tuple[int, int] = Field(description="(height, width) of the image grid")
    counts: str = Field(description="COCO compressed RLE of the column-major run lengths")

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) <= 0:
            raise ValueError(f"mask size must be positive (height, width), got {list(size)}")
        # A few bytes of JSON could otherwise ask to_array() for gigabytes.
        if size[0] * size[1] > DEFAULT_LIMITS.max_pixels:
            raise ValueError(
                f"mask size {list(size)} is over the limit of {DEFAULT_LIMITS.max_pixels} pixels"
            )
        return size

    @field_validator("counts", mode="before")
    @classmethod
    def _compress(cls, counts: object) -> object:
        if isinstance(counts, list | tuple):
            if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
                raise ValueError("uncompressed RLE counts must be a list of integers")
            runs = [int(c) for c in counts]
            if any(c < 0 for c in runs):
                raise ValueError("uncompressed RLE counts must not be negative")
            return _encode_counts(runs)
        return counts

    @model_validator(mode="after")
    def _counts_cover_grid(self) -> Mask:
        total, (h, w) = int(_decoded_runs(self.counts).sum()), self.size
        if total != h * w:
            raise ValueError(f"RLE counts cover {total} pixels, but size {h}x{w} (HxW) has {h * w}")
        return self

    @classmethod
    def from_array(cls, array: np.ndarray) -> Mask:
        mask = as_binary(array)
        # Counts from our own encoder are valid by construction; skip re-decoding them.
        return cls.model_construct(size=mask.shape, counts=_encode_counts(_runs(mask)))

    @classmethod
    def from_png(cls, source: Source, *, limits: ImageLimits = DEFAULT_LIMITS) -> Mask:
        return cls.from_array(read_mask(source, limits=limits))

    def to_array(self) -> np.ndarray:
        runs = _decoded_runs(self.counts)
        values = np.arange(len(runs)) % 2 == 1
        return np.repeat(values, runs).reshape(self.size, order="F")

    def to_png_bytes(self) -> bytes:
        return encode_png(self.to_array())

    @property
    def area(self) -> int:
        """Foreground pixel count, read off the runs without decoding the mask."""
        return int(_decoded_runs(self.counts)[1::2].sum())

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) with exclusive ends, or None for an empty mask."""
        mask = self.to_array()
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        if cols.size == 0:
            return None
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def read_mask(source: Source, *, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """A bool (H, W) mask from a mask image: any non-zero colour channel is foreground.

    An alpha channel is ignored, so a mask saved with an opaque background still reads as drawn.
    """
    name = describe_source(source)
    array = decode_raster(read_source(source, max_bytes=limits.max_bytes), source=name, limits=limits)
    if array.ndim == 3:
        colour = array[..., :-1] if array.shape[2] in (2, 4) else array
        return (colour != 0).any(axis=2)
    return array != 0


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a bool mask (1-bit), a uint8 grey image or a uint8 RGB/RGBA image."""
    from PIL import Image

    array = np.asarray(array)
    grey = array.ndim == 2 and array.dtype in (bool, np.uint8)
    colour = array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8
    if not (grey or colour):
        raise InvalidInputError(
            f"PNG output takes bool or uint8 (H, W), or uint8 (H, W, 3|4); got {array.dtype} {array.shape}"
        )
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_png(array: np.ndarray, path_or_uri: str | os.PathLike[str]) -> None:
    """Write `array` as a PNG to a path or any fsspec URI (`memory://`, `s3://`, ...)."""
    import fsspec  # deferred: fsspec pulls in a lot at import time

    data = encode_png(array)
    name = os.fspath(path_or_uri)
    try:
        with fsspec.open(name if is_uri(name) else os.path.expanduser(name), "wb") as handle:
            handle.write(data)
    except (ValueError, ImportError, OSError) as exc:
        raise InvalidInputError(f"cannot write {name}: {exc}") from None


def _edge(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour in the background (outside the image counts as background)."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def overlay(
    image_rgb: np.ndarray,
    masks: Sequence[np.ndarray | Mask],
    colors: Sequence[Color] | None = None,
    alpha: float = 0.45,
    contour: bool = True,
) -> np.ndarray:
    """`image_rgb` with each mask blended in its own colour and, optionally, outlined 1 px wide.

    Colours cycle through `colors` (default: `PALETTE`); later masks are drawn over earlier ones.
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"overlay needs a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"overlay alpha must be within [0, 1], got {alpha}")
    palette = list(colors) if colors is not None else list(PALETTE)
    if not palette:
        raise InvalidInputError("overlay needs at least one colour")
    out = image.astype(np.float32)
    for i, item in enumerate(masks):
        mask = item.to_array() if isinstance(item, Mask) else as_binary(item, f"mask {i}")
        if mask.shape != image.shape[:2]:
            h, w = image.shape[:2]
            raise InvalidInputError(
                f"mask {i} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {w}x{h}"
            )
        color = np.asarray(palette[i % len(palette)], dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * color
        if contour:
            out[_edge(mask)] = color
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _describe_location(mask: np.ndarray) -> str:
    """Where the mask's centroid lies in a 3x3 grid, in image (viewer's) terms, not patient terms."""
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    vertical = ("upper", "middle", "lower")[min(int(3 * (rows.mean() + 0.5) / h), 2)]
    horizontal = ("left", "centre", "right")[min(int(3 * (cols.mean() + 0.5) / w), 2)]
    return "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"


class SegmentationResult(BaseModel):
    """One grounded mask with what a reader needs at a glance: its area, box and a one-line summary."""

    model_config = ConfigDict(frozen=True)

    mask: Mask
    label: str | None = Field(default=None, description="what the mask shows, e.g. 'liver lesion'")
    score: float | None = Field(default=None, description="model confidence, if the model gives one")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def area(self) -> int:
        return self.mask.area

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        return self.mask.bbox

    @computed_field  # type: ignore[prop-decorator]
    @property
    def summary(self) -> str:
        """E.g. 'liver lesion: 1.3% of the image, upper left'."""
        mask = self.mask.to_array()
        if not mask.any():
            text = "empty mask"
        else:
            percent = 100.0 * self.mask.area / mask.size
            share = "<0.1%" if percent < 0.05 else f"{percent:.1f}%"
            text = f"{share} of the image, {_describe_location(mask)}"
        return f"{self.label}: {text}" if self.label else text


def orthogonal_views(
    volume: MedicalVolume, result: VolumeGroundingResult, *, window: Window = None, height: int = 256
) -> np.ndarray:
    """Sagittal, coronal and axial planes through the mask's centre (the volume's, if empty), the mask
    blended in, side by side as one RGB image; each plane resized to its true aspect in mm."""
    from PIL import Image

    from medplib.core.io.volume import AXES, MedicalVolume, slice_volume, volume_plane
    from medplib.core.io.volume_writers import canonical_mask

    mask = canonical_mask(result, volume)
    found = np.argwhere(mask)
    centre = found.mean(axis=0).round().astype(int) if len(found) else np.array(volume.shape) // 2
    window = window if window is not None else result.options.get("window")
    masks = MedicalVolume(mask, volume.affine, volume.zooms, volume.meta)  # sliced as the image is
    panels = []
    for number, axis in enumerate(AXES):
        index = int(centre[number])
        image = slice_volume(volume, axis=axis, index=index, window=window)
        drawn = overlay(image.pixels, [volume_plane(masks, axis=axis, index=index)])
        row_mm, column_mm = image.meta.spacing or (1.0, 1.0)
        rows, columns = drawn.shape[:2]
        width = max(1, round(height * (columns * column_mm) / (rows * row_mm)))
        panels.append(np.asarray(Image.fromarray(drawn).resize((width, height), Image.Resampling.BILINEAR)))
    gap = np.zeros((height, 4, 3), dtype=np.uint8)
    return np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
