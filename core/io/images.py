"""`load_image` and `load_volume`: any supported input to the canonical image or a volume.

The format is told by content (magic bytes), never by the file name; the one exception is a
DICOM file written without its 128-byte preamble, which has no magic and is tried only when the
name ends in .dcm.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medplib.core.errors import InvalidInputError, UnsupportedFormatError
from medplib.core.image import DEFAULT_LIMITS, ImageLimits, ImageMeta, MedicalImage
from medplib.core.io.dicom import is_dicom, load_dicom_image, load_dicom_volume
from medplib.core.io.dicom_series import is_folder, load_dicom_series
from medplib.core.io.intensity import Window, render
from medplib.core.io.nifti import load_nifti_volume, read_nifti_header
from medplib.core.io.raster import check_pixels, decode_raster, pil_to_array, sniff_raster
from medplib.core.io.sources import describe_source, read_source
from medplib.core.io.volume import MedicalVolume, check_index, slice_volume

SUPPORTED = "PNG, JPEG, TIFF, DICOM (.dcm) and NIfTI-1/2 (.nii, .nii.gz)"


def load_image(
    source: Any,
    *,
    frame: int | None = None,
    slice_index: int | None = None,
    axis: str | int = "axial",
    volume_index: int | None = None,
    window: Window = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> MedicalImage:
    """Load one 2-D image from a path, fsspec URI, bytes, numpy array, PIL image or MedicalImage.

    `frame` picks a frame of a multi-frame DICOM; `axis`, `slice_index` (default: the middle) and
    `volume_index` (4-D only) pick a plane of a NIfTI volume, displayed as `slice_volume` documents.
    `window` is None (the file's own window, else min..max), 'minmax', a preset name from
    `WINDOW_PRESETS` or (center, width); uint8 data is left as stored unless a window is given.
    A MedicalImage is returned unchanged; `axis` matters only for volumes.
    """
    if isinstance(source, MedicalImage):
        return source
    if isinstance(source, np.ndarray) or _is_pil(source):
        _reject_unused("an array", frame=frame, slice_index=slice_index, volume_index=volume_index)
        array = source if isinstance(source, np.ndarray) else pil_to_array(source)
        return _flat_image(array, source="<array>", fmt="array", window=window, limits=limits)
    name = _source_name(source)
    data = read_source(source, max_bytes=limits.max_bytes)
    kind = sniff_format(data, name=name)
    if kind == "nifti":
        _reject_unused("a NIfTI volume", frame=frame)
        volume = load_nifti_volume(data, source=name, volume_index=volume_index, limits=limits)
        return slice_volume(volume, axis=axis, index=slice_index, window=window)
    if kind == "dicom":
        _reject_unused("a DICOM image", slice_index=slice_index, volume_index=volume_index)
        return load_dicom_image(
            data, source=name, frame=frame, window=window, limits=limits, force=not is_dicom(data)
        )
    _reject_unused(f"a {kind.upper()} image", slice_index=slice_index, volume_index=volume_index)
    if frame is not None:
        check_index("frame", frame, 1, source=name)
    array = decode_raster(data, source=name, limits=limits)
    return _flat_image(array, source=name, fmt=kind, window=window, limits=limits)


def load_volume(
    source: Any,
    *,
    volume_index: int | None = None,
    series_uid: str | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> MedicalVolume:
    """Load a 3-D volume: a NIfTI file (volume `volume_index` of a 4-D one), a DICOM's frames, or a
    folder holding a DICOM series (the series `series_uid` of it, if it holds several).
    A MedicalVolume is returned unchanged."""
    if isinstance(source, MedicalVolume):
        return source
    if is_folder(source):
        _reject_unused("a DICOM series", volume_index=volume_index)
        return load_dicom_series(source, limits=limits, series_uid=series_uid)
    name = _source_name(source)
    if series_uid is not None:
        raise InvalidInputError(f"series_uid applies to a folder of DICOM files, not to the file {name}")
    data = read_source(source, max_bytes=limits.max_bytes)
    kind = sniff_format(data, name=name)
    if kind == "nifti":
        return load_nifti_volume(data, source=name, volume_index=volume_index, limits=limits)
    if kind == "dicom":
        _reject_unused("a DICOM volume", volume_index=volume_index)
        return load_dicom_volume(data, source=name, limits=limits, force=not is_dicom(data))
    raise UnsupportedFormatError(
        f"{name}: a {kind.upper()} file is a 2-D image, not a volume (use load_image)"
    )


def sniff_format(data: bytes, *, name: str) -> str:
    """'png', 'jpeg', 'tiff', 'dicom' or 'nifti', from the content of `data`."""
    if not data:
        raise InvalidInputError(f"{name}: the file is empty")
    if is_dicom(data):  # first: a DICOM preamble may itself start like a TIFF (dual-format files)
        return "dicom"
    raster = sniff_raster(data)
    if raster is not None:
        return raster
    if read_nifti_header(data, source=name) is not None:
        return "nifti"
    if name.lower().endswith(".dcm"):  # maybe a DICOM without preamble; pydicom will be forced
        return "dicom"
    raise UnsupportedFormatError(f"{name}: not a recognised image format; supported: {SUPPORTED}")


def _flat_image(
    array: np.ndarray, *, source: str, fmt: str, window: Window, limits: ImageLimits
) -> MedicalImage:
    """A 2-D array (grey or colour) with no metadata of its own to the canonical image."""
    if array.ndim in (2, 3):  # any other layout is refused by render
        check_pixels(array.shape[0], array.shape[1], source=source, limits=limits)
    shown = render(array, window=window)
    return MedicalImage(
        pixels=shown.pixels,
        meta=ImageMeta(
            source=source,
            format=fmt,
            width=array.shape[1],
            height=array.shape[0],
            original_dtype=array.dtype.name,
            value_range=shown.value_range,
            window=shown.window,
        ),
    )


def _reject_unused(what: str, **options: int | None) -> None:
    """Refuse an index that does not apply to this input, rather than silently ignoring it."""
    for option, value in options.items():
        if value is not None:
            raise InvalidInputError(f"{option}={value!r} does not apply to {what}")


def _source_name(source: Any) -> str:
    if not isinstance(source, str | bytes | bytearray | memoryview | os.PathLike):
        raise InvalidInputError(
            "expected a path, URI, bytes, numpy array, PIL image or MedicalImage,"
            f" got {type(source).__name__}"
        )
    return describe_source(source)


def _is_pil(source: Any) -> bool:
    from PIL import Image

    return isinstance(source, Image.Image)
