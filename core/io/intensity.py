"""Stored values to display pixels: windows, presets, and the one linear mapping every format shares.

A window is the range of stored values (after any DICOM rescale, so HU for CT) that is spread over
0..255; values outside it saturate. Presets are the radiological (center, width) pairs in HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medplib.core.errors import InvalidInputError

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (50.0, 400.0),
}

# None: the file's own window if it has one, else the data's min..max; "minmax"; a preset name;
# or an explicit (center, width).
Window = str | tuple[float, float] | None


@dataclass(frozen=True)
class Rendered:
    """Display pixels and how they were made, for `ImageMeta`."""

    pixels: np.ndarray  # (H, W, 3) uint8
    window: tuple[float, float] | None  # (low, high) spread over 0..255; None if uint8 passed through
    value_range: tuple[float, float]  # finite min and max of the stored values


def value_range(values: np.ndarray) -> tuple[float, float]:
    """Finite min and max; NaN and inf are ignored, and an array with no finite value gives (0, 0)."""
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    return float(values.min()), float(values.max())


def window_bounds(
    window: Window, *, data_range: tuple[float, float], file_window: tuple[float, float] | None = None
) -> tuple[float, float]:
    """(low, high) for a window request; `file_window` is a (low, high) the file itself suggests."""
    if window is None:
        return file_window if file_window is not None else data_range
    if isinstance(window, str):
        name = window.strip().lower()
        if name == "minmax":
            return data_range
        if name not in WINDOW_PRESETS:
            valid = ", ".join(["minmax", *WINDOW_PRESETS])
            raise InvalidInputError(f"unknown window preset {window!r}; valid presets: {valid}")
        center, width = WINDOW_PRESETS[name]
    elif isinstance(window, tuple | list) and len(window) == 2:
        try:
            center, width = float(window[0]), float(window[1])
        except (TypeError, ValueError):
            raise InvalidInputError(f"window must be (center, width) numbers, got {window!r}") from None
        if not (np.isfinite(center) and np.isfinite(width) and width > 0):
            raise InvalidInputError(
                f"window (center, width) needs a finite center and width > 0, got {window}"
            )
    else:
        raise InvalidInputError(
            f"window must be None, 'minmax', a preset name or a (center, width) pair, got {window!r}"
        )
    return center - width / 2, center + width / 2


def apply_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 as uint8; outside saturates, NaN and inf become 0."""
    # float32 is exact enough for 8/16-bit data and halves memory; wider integers keep float64.
    work = values.astype(np.result_type(values.dtype, np.float32))
    if high > low:
        work -= low
        work *= 255.0  # then divide: 255 / width is inexact and would round window midpoints down
        work /= high - low
    else:  # a constant image has no contrast to stretch: at or below the level is black
        work = np.where(work > low, 255.0, 0.0).astype(work.dtype)
    if values.dtype.kind == "f":
        work[~np.isfinite(values)] = 0
    np.clip(work, 0, 255, out=work)
    work += 0.5  # round half up (np.rint rounds half to even, so 126.5 and 127.5 would differ)
    return np.floor(work, out=work).astype(np.uint8)


def render(
    values: np.ndarray,
    *,
    window: Window = None,
    file_window: tuple[float, float] | None = None,
    invert: bool = False,
) -> Rendered:
    """Stored values of shape (H, W) or (H, W, C), C in 1..4, to canonical RGB uint8 pixels.

    uint8 data passes through unchanged unless a window is asked for; anything else is windowed.
    A second or fourth channel is alpha and is dropped. `invert` (DICOM MONOCHROME1) flips the
    display after windowing, so that dense tissue is bright whatever the file's convention.
    """
    values = _colour_channels(values)
    data_range = value_range(values)
    if values.dtype == np.bool_:
        values = values.astype(np.uint8) * np.uint8(255)
    if window is None and values.dtype == np.uint8:
        grey_or_rgb, used = values, None
    else:
        used = window_bounds(window, data_range=data_range, file_window=file_window)
        grey_or_rgb = apply_window(values, *used)
    if invert:
        grey_or_rgb = 255 - grey_or_rgb
    if grey_or_rgb.ndim == 2:
        grey_or_rgb = np.repeat(grey_or_rgb[:, :, None], 3, axis=2)
    return Rendered(np.ascontiguousarray(grey_or_rgb), used, data_range)


def _colour_channels(values: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3) colour, from any of the layouts images come in."""
    kind = values.dtype.kind
    if kind not in "biuf":
        raise InvalidInputError(f"image values must be numeric or bool, got dtype {values.dtype}")
    if values.ndim == 2:
        return values
    if values.ndim == 3 and values.shape[2] in (1, 2):  # grey, grey + alpha
        return values[:, :, 0]
    if values.ndim == 3 and values.shape[2] in (3, 4):  # RGB, RGBA
        return values[:, :, :3]
    raise InvalidInputError(
        f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {values.shape}"
    )
