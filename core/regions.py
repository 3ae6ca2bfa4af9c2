"""Region prompts: a point, box, polygon, scribble or mask a user marks, each turned into a mask on the image.

Coordinates are continuous pixel coordinates, x to the right and y down: pixel (row i, column j) covers
[j, j+1) x [i, i+1) and its centre is (j + 0.5, i + 0.5). A shape contains a pixel iff it contains the
pixel's centre, so an integer box (x0, y0, x1, y1) is exactly rows y0..y1-1 and columns x0..x1-1.
A coordinate may lie on the image border (0 <= x <= W, 0 <= y <= H), never beyond it.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from collections.abc import Iterable
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from medplib.core.errors import InvalidInputError, RegionError, validation_message
from medplib.core.masks import as_binary, encode_png, read_mask

XY = tuple[float, float]


def _check_grid(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"image size must be positive, got {width}x{height} (WxH)")


def _require_inside(points: np.ndarray, height: int, width: int, what: str) -> None:
    x, y = points[:, 0], points[:, 1]
    outside = (x < 0) | (x > width) | (y < 0) | (y > height)
    if outside.any():
        px, py = points[int(np.argmax(outside))]
        raise RegionError(
            f"{what}: point ({px:g}, {py:g}) lies outside the {width}x{height} (WxH) image "
            f"(x must be within 0..{width}, y within 0..{height})"
        )


def _require_nonempty(mask: np.ndarray, what: str) -> np.ndarray:
    if not mask.any():
        raise RegionError(f"{what} covers no pixel centre (empty region)")
    return mask


def _centre_span(lo: np.ndarray | float, hi: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Index range [start, stop) of the pixels whose centre c satisfies lo <= c < hi (half-open)."""
    return np.ceil(np.asarray(lo) - 0.5).astype(np.int64), np.ceil(np.asarray(hi) - 0.5).astype(np.int64)


def _window(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Index range, clipped to the image, of pixels whose centre may lie in the closed [lo, hi]."""
    start, stop = _centre_span(lo, hi + 1)
    return int(np.clip(start, 0, size)), int(np.clip(stop, 0, size))


def _near(
    segments: Iterable[tuple[np.ndarray, np.ndarray]], reach: float, height: int, width: int
) -> np.ndarray:
    """Pixels whose centre lies within `reach` of any segment (a, b); a segment (p, p) gives a disc.

    Each segment is measured only inside its own bounding box, so long thin strokes stay cheap.
    """
    mask = np.zeros((height, width), dtype=bool)
    for a, b in segments:
        c0, c1 = _window(min(a[0], b[0]) - reach, max(a[0], b[0]) + reach, width)
        r0, r1 = _window(min(a[1], b[1]) - reach, max(a[1], b[1]) + reach, height)
        if c0 >= c1 or r0 >= r1:
            continue
        px = np.arange(c0, c1)[None, :] + 0.5 - a[0]
        py = np.arange(r0, r1)[:, None] + 0.5 - a[1]
        d = b - a
        length2 = float(d @ d)
        t = np.clip((px * d[0] + py * d[1]) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        mask[r0:r1, c0:c1] |= (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 <= reach * reach
    return mask


class _Prompt(BaseModel):
    """Each prompt has `to_mask(height, width)`: a bool (H, W) mask; RegionError if it misses or is empty."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class PointPrompt(_Prompt):
    """Clicks: discs around positive points, minus discs around negative points.

    The default radius is max(2, 2% of the image's shorter side): about what a click means on a screen-sized
    image (10 px on 512 px), and never so small that a point on a thumbnail covers only a pixel or two.
    """

    kind: Literal["point"] = "point"
    points: list[XY] = Field(min_length=1, description="(x, y) of each click")
    labels: list[Literal[0, 1]] = Field(default_factory=list, description="1 positive, 0 negative; default 1")
    radius: float | None = Field(default=None, gt=0, description="disc radius in pixels; default: see above")

    @model_validator(mode="before")
    @classmethod
    def _default_labels(cls, data: object) -> object:
        points = data.get("points") if isinstance(data, dict) else None
        if isinstance(points, list | tuple) and data.get("labels") is None:
            data = {**data, "labels": [1] * len(points)}
        return data

    @model_validator(mode="after")
    def _check_labels(self) -> PointPrompt:
        if len(self.labels) != len(self.points):
            raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels; give one per point")
        if 1 not in self.labels:
            raise ValueError("point prompt has only negative points (empty region); add a positive point")
        return self

    def to_mask(self, height: int, width: int) -> np.ndarray:
        _check_grid(height, width)
        points = np.asarray(self.points, dtype=np.float64)
        _require_inside(points, height, width, "point prompt")
        radius = self.radius if self.radius is not None else max(2.0, 0.02 * min(height, width))
        labels = np.asarray(self.labels)
        positive = _near(((p, p) for p in points[labels == 1]), radius, height, width)
        negative = _near(((p, p) for p in points[labels == 0]), radius, height, width)
        return _require_nonempty(positive & ~negative, f"point prompt (radius {radius:g})")


class BoxPrompt(_Prompt):
    """An axis-aligned box (x0, y0, x1, y1): the pixels whose centre lies in [x0, x1) x [y0, y1)."""

    kind: Literal["box"] = "box"
    box: tuple[float, float, float, float] = Field(description="(x0, y0, x1, y1), x0 < x1 and y0 < y1")

    @model_validator(mode="after")
    def _check_order(self) -> BoxPrompt:
        x0, y0, x1, y1 = self.box
        if not x0 < x1:
            raise ValueError(f"box needs x0 < x1, got x0={x0:g}, x1={x1:g} (order is x0, y0, x1, y1)")
        if not y0 < y1:
            raise ValueError(f"box needs y0 < y1, got y0={y0:g}, y1={y1:g} (order is x0, y0, x1, y1)")
        return self

    def to_mask(self, height: int, width: int) -> np.ndarray:
        _check_grid(height, width)
        x0, y0, x1, y1 = self.box
        what = f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        _require_inside(np.array([[x0, y0], [x1, y1]]), height, width, what)
        (c0, r0), (c1, r1) = _centre_span(np.array([x0, y0]), np.array([x1, y1]))
        mask = np.zeros((height, width), dtype=bool)
        mask[r0:r1, c0:c1] = True
        return _require_nonempty(mask, what)


class PolygonPrompt(_Prompt):
    """A closed polygon filled by the even-odd rule (a self-crossing outline leaves holes, as in SVG)."""

    kind: Literal["polygon"] = "polygon"
    points: list[XY] = Field(min_length=3, description="(x, y) vertices; the last connects back to the first")

    def to_mask(self, height: int, width: int) -> np.ndarray:
        _check_grid(height, width)
        vertices = np.asarray(self.points, dtype=np.float64)
        _require_inside(vertices, height, width, "polygon")
        # Collinear vertices, not a zero signed area: a bow-tie's lobes cancel yet cover pixels.
        if np.linalg.matrix_rank(vertices - vertices[0]) < 2:
            raise RegionError("empty polygon: its vertices are collinear (zero area)")
        x0, y0 = vertices[:, 0], vertices[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        # Scanlines through pixel centres, one (edge, row) pair per crossing. Half-open [ymin, ymax) per
        # edge counts a shared vertex once and skips horizontal edges (so no division by zero below).
        starts, stops = _centre_span(np.minimum(y0, y1), np.maximum(y0, y1))
        spans = stops - starts
        edge = np.repeat(np.arange(len(vertices)), spans)
        row = starts[edge] + np.arange(edge.size) - np.repeat(np.cumsum(spans) - spans, spans)
        xc = x0[edge] + (row + 0.5 - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        col = _centre_span(xc, xc)[0]  # first pixel whose centre is at or right of the crossing
        # Each crossing flips the parity of every pixel from it rightwards (even-odd rule); only the
        # polygon's rows are materialised.
        top = int(starts.min())
        rows = int(stops.max()) - top
        where, count = np.unique((row - top) * (width + 1) + col, return_counts=True)
        flips = np.zeros((rows, width + 1), dtype=np.uint8)
        flips.flat[where] = count % 2
        mask = np.zeros((height, width), dtype=bool)
        mask[top : top + rows] = np.bitwise_xor.accumulate(flips, axis=1)[:, :width] == 1
        return _require_nonempty(mask, "empty polygon: it")


class ScribblePrompt(_Prompt):
    """A free-hand stroke: the pixels whose centre lies within width/2 of the polyline through `points`."""

    kind: Literal["scribble"] = "scribble"
    points: list[XY] = Field(min_length=1, description="(x, y) along the stroke; one point draws a dot")
    width: float = Field(gt=0, description="stroke width in pixels")

    def to_mask(self, height: int, width: int) -> np.ndarray:
        _check_grid(height, width)
        points = np.asarray(self.points, dtype=np.float64)
        _require_inside(points, height, width, "scribble")
        segments = itertools.pairwise(points) if len(points) > 1 else [(points[0], points[0])]
        mask = _near(segments, self.width / 2, height, width)
        return _require_nonempty(mask, f"scribble (width {self.width:g})")


class MaskPrompt(_Prompt):
    """A binary mask image, by path/URI (`source`) or inline as base64 PNG (`data_base64`).

    Any non-zero colour channel is foreground, alpha is ignored; the mask must have the image's size.
    """

    kind: Literal["mask"] = "mask"
    source: str | None = Field(default=None, description="path or fsspec URI of a PNG, JPEG or TIFF mask")
    data_base64: str | None = Field(default=None, description="the mask image itself, base64-encoded")

    @model_validator(mode="after")
    def _exactly_one(self) -> MaskPrompt:
        if (self.source is None) == (self.data_base64 is None):
            raise ValueError("mask prompt needs exactly one of 'source' (path or URI) and 'data_base64'")
        return self

    @classmethod
    def from_array(cls, mask: np.ndarray) -> MaskPrompt:
        """Carry `mask` inline, as a 1-bit PNG, so the prompt survives JSON."""
        png = encode_png(as_binary(mask, "mask prompt"))
        return cls(data_base64=base64.b64encode(png).decode("ascii"))

    def to_mask(self, height: int, width: int) -> np.ndarray:
        _check_grid(height, width)
        if self.data_base64 is not None:
            try:
                mask = read_mask(base64.b64decode(self.data_base64, validate=True))
            except binascii.Error as exc:
                raise RegionError(f"mask prompt: data_base64 is not valid base64 ({exc})") from None
            what = "mask prompt (inline)"
        else:
            mask = read_mask(self.source)
            what = f"mask prompt {self.source}"
        if mask.shape != (height, width):
            raise RegionError(
                f"{what} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {width}x{height}"
            )
        return _require_nonempty(mask, what)


RegionPrompt = Annotated[
    PointPrompt | BoxPrompt | PolygonPrompt | ScribblePrompt | MaskPrompt, Field(discriminator="kind")
]
_REGION_ADAPTER: TypeAdapter[RegionPrompt] = TypeAdapter(RegionPrompt)


def parse_region(data: dict | str | bytes) -> RegionPrompt:
    """A region prompt from a dict or JSON text; any problem is one RegionError line naming it."""
    try:
        if isinstance(data, str | bytes):
            return _REGION_ADAPTER.validate_json(data)
        return _REGION_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise RegionError(f"invalid region prompt: {validation_message(exc)}") from None


def regions_to_masks(prompts: Iterable[RegionPrompt], height: int, width: int) -> list[np.ndarray]:
    """One bool (height, width) mask per prompt, in order."""
    return [prompt.to_mask(height, width) for prompt in prompts]


def _parse_numbers(text: str, what: str, counts: tuple[int, ...], expected: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(math.isfinite(v) for v in values):
        raise InvalidInputError(f"bad {what} {text!r}: expected {expected}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' (LABEL 1 positive, 0 negative) -> (x, y, label), for the CLI's --point."""
    values = _parse_numbers(text, "point", (2, 3), "X,Y or X,Y,LABEL (numbers; LABEL 1 or 0)")
    label = values[2] if len(values) == 3 else 1.0
    if label not in (0.0, 1.0):
        raise InvalidInputError(f"bad point {text!r}: LABEL must be 1 (positive) or 0 (negative)")
    return values[0], values[1], int(label)


def parse_box(text: str) -> BoxPrompt:
    """'X0,Y0,X1,Y1' -> BoxPrompt, for the CLI's --box."""
    x0, y0, x1, y1 = _parse_numbers(text, "box", (4,), "X0,Y0,X1,Y1 (four numbers)")
    try:
        return BoxPrompt(box=(x0, y0, x1, y1))
    except ValidationError as exc:
        raise RegionError(f"bad box {text!r}: {validation_message(exc)}") from None
