"""DICOM images and multi-frame stacks with pydicom 3.

Order of work, each step for a reason: parse the header; refuse objects without pixels; check the
declared size against the limits (before a byte is decoded); make sure a decoder for the transfer
syntax is installed (so the user learns which syntax, not a plugin traceback); decode only the
frame asked for; apply the modality LUT (rescale slope/intercept, so CT is in HU); hand colour
(RGB, YBR converted by pydicom, PALETTE COLOR expanded) and grey to the shared windowing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from medplib.core.errors import ImageTooLargeError, InvalidInputError, MedplibError, UnsupportedFormatError
from medplib.core.image import ImageLimits, ImageMeta, MedicalImage
from medplib.core.io.intensity import Window, render
from medplib.core.io.raster import check_pixels
from medplib.core.io.volume import MedicalVolume, VolumeMeta, check_index

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class _Decoded(NamedTuple):
    values: np.ndarray  # grey in modality units (HU for CT), or colour (..., 3)
    stored_dtype: str  # dtype of the values as stored, before any rescale or palette
    file_window: tuple[float, float] | None  # (low, high) the file suggests for display


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def load_dicom_image(
    data: bytes, *, source: str, frame: int | None, window: Window, limits: ImageLimits, force: bool = False
) -> MedicalImage:
    """One frame (default 0) of a DICOM file as a canonical image.

    `force` reads a file without the 128-byte preamble and 'DICM' (what some tools write).
    """
    ds, num_frames = _open(data, source=source, force=force, limits=limits)
    index = check_index("frame", 0 if frame is None else frame, num_frames, source=source)
    decoded = _decode(ds, source=source, index=index)
    values = decoded.values
    shown = render(values, window=window, file_window=decoded.file_window, invert=_inverted(ds))
    spacing, thickness = _spacing(ds)
    return MedicalImage(
        pixels=shown.pixels,
        meta=ImageMeta(
            source=source,
            format="dicom",
            width=values.shape[1],
            height=values.shape[0],
            spacing=spacing,
            slice_thickness=thickness,
            original_dtype=decoded.stored_dtype,
            value_range=shown.value_range,
            window=shown.window,
            frame=index,
            num_frames=num_frames,
            **_descriptions(ds),
        ),
    )


def load_dicom_volume(data: bytes, *, source: str, limits: ImageLimits, force: bool = False) -> MedicalVolume:
    """All frames of a grey DICOM as a volume whose axial planes display as the frames do.

    Frame f is stored so that `volume_plane(v, axis="axial", index=f)` returns it unrotated: x runs
    along the columns, y up the rows, z over the frames. The affine is the voxel size only; frames
    are not placed in patient coordinates (per-frame positions are not read).
    """
    ds, num_frames = _open(data, source=source, force=force, limits=limits)
    if int(ds.get("SamplesPerPixel") or 1) > 1 or _photometric(ds) == "PALETTE COLOR":
        raise UnsupportedFormatError(f"{source}: a volume needs grey frames; this DICOM has colour frames")
    decoded = _decode(ds, source=source, index=None)
    frames = decoded.values.reshape(num_frames, *decoded.values.shape[-2:])
    if frames.dtype == np.float64:
        frames = frames.astype(np.float32)  # rescaled CT/MR values fit float32; halves the memory
    spacing, thickness = _spacing(ds)
    row_mm, column_mm = spacing or (1.0, 1.0)
    step = _float(ds.get("SpacingBetweenSlices")) or thickness or 1.0
    zooms = (column_mm, row_mm, step)
    affine = np.diag([*zooms, 1.0])
    return MedicalVolume(
        # (frames, rows, cols) -> (cols, rows reversed, frames): the inverse of volume_plane's rot90.
        data=np.rot90(frames.transpose(1, 2, 0), k=-1),
        affine=affine,
        zooms=zooms,
        # The file's order is (cols, rows, frames): rows run the other way.
        file_affine=affine @ _flip_rows(rows=frames.shape[1]),
        meta=VolumeMeta(
            source=source,
            format="dicom",
            original_dtype=decoded.stored_dtype,
            file_window=decoded.file_window,
            invert=_inverted(ds),
            **_descriptions(ds),
        ),
    )


def _flip_rows(*, rows: int) -> np.ndarray:
    """The voxel map (i, j, k) -> (i, rows - 1 - j, k)."""
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = rows - 1
    return flip


def _open(data: bytes, *, source: str, force: bool, limits: ImageLimits) -> tuple[Any, int]:
    """The parsed dataset and its frame count, after every check that needs no decoding."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except Exception as exc:  # pydicom raises many types (EOFError, struct.error, ...) on broken files
        raise InvalidInputError(f"{source}: truncated or corrupt DICOM file ({exc})") from None
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise UnsupportedFormatError(
            f"{source}: DICOM object has no pixel data (a report, structure set or other non-image"
            " object, or a file cut short before its pixels)"
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        num_frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"{source}: DICOM image without a valid Rows/Columns/NumberOfFrames ({exc})"
        ) from None
    check_pixels(rows, columns, source=source, limits=limits)
    if num_frames < 1:
        raise InvalidInputError(f"{source}: DICOM NumberOfFrames is {num_frames}")
    if num_frames * rows * columns > limits.max_voxels:
        raise ImageTooLargeError(
            f"{source}: {num_frames} frames of {columns}x{rows} pixels is over the limit of"
            f" {limits.max_voxels} voxels"
        )
    if "TransferSyntaxUID" not in ds.file_meta:
        # A file without meta information (read with force): pydicom knows how it was encoded.
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else explicit
    return ds, num_frames


def _decode(ds: Any, *, source: str, index: int | None) -> _Decoded:
    """Frame `index`, or all frames if None, ready for windowing."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:  # a syntax pydicom has no decoder class for at all
            available = False
        if not available:
            raise UnsupportedFormatError(
                f"{source}: cannot decode DICOM pixel data in transfer syntax '{syntax.name}' ({syntax}):"
                " no decoder for it is installed (pylibjpeg-libjpeg, pylibjpeg-openjpeg or python-gdcm"
                " add JPEG-LS, JPEG 2000 and lossless JPEG)"
            )
    try:
        ds.pixel_array_options(index=index)  # decode just the frame asked for
        values = ds.pixel_array
    except MedplibError:
        raise
    except Exception as exc:  # short pixel data, a codec failing on broken or exotic data, ...
        cls = UnsupportedFormatError if syntax.is_compressed else InvalidInputError
        reason = " ".join(str(exc).split())  # plugin reports come as indented multi-line text
        raise cls(f"{source}: cannot decode DICOM pixel data ({syntax.name}): {reason}") from None
    stored_dtype = values.dtype.name
    if _photometric(ds) == "PALETTE COLOR":
        colours = apply_color_lut(values, ds)
        # 16-bit palette entries span the full 16-bit range, whatever the image's values are.
        return _Decoded(colours, stored_dtype, (0.0, 65535.0) if colours.dtype == np.uint16 else None)
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        return _Decoded(values, stored_dtype, None)
    return _Decoded(apply_modality_lut(values, ds), stored_dtype, _file_window(ds))


def _file_window(ds: Any) -> tuple[float, float] | None:
    """The first WindowCenter/WindowWidth pair as (low, high), if the file has a usable one."""
    center, width = _float(ds.get("WindowCenter")), _float(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center - width / 2, center + width / 2


def _photometric(ds: Any) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def _inverted(ds: Any) -> bool:
    return _photometric(ds) == "MONOCHROME1"


def _spacing(ds: Any) -> tuple[tuple[float, float] | None, float | None]:
    """((row, column) spacing in mm, slice thickness in mm); zero spacings count as unknown."""
    spacing = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        pair = [_float(v) for v in value] if value is not None and len(value) == 2 else []
        if len(pair) == 2 and all(v is not None and v > 0 for v in pair):
            spacing = (pair[0], pair[1])
            break
    thickness = _float(ds.get("SliceThickness"))
    return spacing, thickness if thickness and thickness > 0 else None  # type: ignore[return-value]


def _descriptions(ds: Any) -> dict[str, str | None]:
    texts = [_text(ds.get(k)) for k in ("StudyDescription", "SeriesDescription")]
    return {
        "modality": _text(ds.get("Modality")),
        "body_part": _text(ds.get("BodyPartExamined")),
        "description": " / ".join(t for t in texts if t) or None,
    }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value[0] if _is_multi(value) else value).strip()
    return text or None


def _float(value: Any) -> float | None:
    """A DICOM number (the first of a multi-valued one), or None if absent or malformed."""
    if value is None:
        return None
    try:
        number = float(value[0] if _is_multi(value) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _is_multi(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)
