"""A DICOM series given as a folder of single-frame files, stacked into one volume in patient space.

Order of work, each step for a reason: read every file's header without its pixels; keep the image
objects (other files, a DICOMDIR or a report, are not slices); refuse a folder that mixes series,
naming each; check that the slices share one grid (size, spacing, orientation) and lie on one line
along the slice normal, sorted by ImagePositionPatient projected on it; refuse duplicate positions,
gaps (missing slices) and uneven spacing, naming the files; check the voxel count against the limits;
only then decode the pixels, each slice with its own rescale (CT in HU).

The file grid is (column, row, slice in position order), its affine built from the patient geometry
(LPS in DICOM, turned to RAS+ as NIfTI's); the volume is then reoriented to closest canonical RAS+
exactly as a NIfTI file is, so both kinds slice alike and masks map back to the files exactly.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from medplib.core.errors import ImageTooLargeError, InvalidInputError, UnsupportedFormatError
from medplib.core.image import ImageLimits
from medplib.core.io.dicom import _decode, _descriptions, _file_window, _float, _inverted, _open, is_dicom
from medplib.core.io.sources import is_uri, read_source
from medplib.core.io.volume import MedicalVolume, VolumeMeta, canonical_grid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOLERANCE_MM = 0.01  # positions closer than this along the normal are the same slice
SPACING_TOLERANCE = 0.01  # relative: steps may differ from the median step by 1% (rounding in headers)


@dataclass(frozen=True)
class _Slice:
    name: str
    data: bytes
    header: Any  # pydicom Dataset read without its pixels


def is_folder(source: Any) -> bool:
    """Whether `source` names a directory (local, or on an fsspec filesystem)."""
    if not isinstance(source, str | os.PathLike):
        return False
    name = os.fspath(source)
    if not is_uri(name):
        return os.path.isdir(os.path.expanduser(name))
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(name)
        return bool(fs.isdir(root))
    except (ValueError, ImportError, OSError):
        return False


def load_dicom_series(
    folder: str | os.PathLike[str], *, limits: ImageLimits, series_uid: str | None = None
) -> MedicalVolume:
    """The one series of single-frame DICOM images in `folder` (or the series `series_uid` of it)."""
    source = os.fspath(folder)
    slices = _pick_series(_read_headers(source, limits), source, series_uid)
    first = slices[0].header
    if len(slices) == 1 and int(first.get("NumberOfFrames") or 1) > 1:
        raise UnsupportedFormatError(
            f"{source}: holds one multi-frame DICOM ({slices[0].name}); load that file as the volume"
        )
    _check_same_grid(slices, source)
    slices, step = _sorted_along_normal(slices, source)
    rows, columns = int(first.Rows), int(first.Columns)
    voxels = rows * columns * len(slices)
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(
            f"{source}: {len(slices)} slices of {columns}x{rows} pixels ({voxels} voxels) are over the"
            f" limit of {limits.max_voxels} voxels"
        )
    planes, stored_dtype = [], ""
    for item in slices:
        ds, _ = _open(item.data, source=item.name, force=False, limits=limits)
        decoded = _decode(ds, source=item.name, index=None)
        planes.append(np.asarray(decoded.values, dtype=np.float32))
        stored_dtype = decoded.stored_dtype
    # (slice, row, column) -> (column, row, slice): the file grid the affine describes.
    file_data = np.stack(planes).transpose(2, 1, 0)
    if all(np.array_equal(p, np.round(p)) for p in planes) and _fits_int16(planes):
        file_data = file_data.astype(np.int16)  # CT in HU and most MR fit; halves the memory of float32
    file_affine = LPS_TO_RAS @ _lps_affine(slices, step)
    data, affine = canonical_grid(file_data, file_affine)
    zoom_x, zoom_y, zoom_z = (float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return MedicalVolume(
        data=data,
        affine=affine,
        zooms=(zoom_x, zoom_y, zoom_z),
        file_affine=file_affine,
        meta=VolumeMeta(
            source=source,
            format="dicom",
            original_dtype=stored_dtype,
            file_window=_file_window(first),
            invert=_inverted(first),
            series_uid=str(first.SeriesInstanceUID),
            slice_files=tuple(item.name for item in slices),
            **_descriptions(first),
        ),
    )


def _read_headers(source: str, limits: ImageLimits) -> list[_Slice]:
    """Every DICOM image object in the folder (not its subfolders), pixels not yet decoded."""
    import fsspec
    import pydicom

    fs, root = fsspec.core.url_to_fs(source if is_uri(source) else os.path.expanduser(source))
    names = sorted(entry["name"] for entry in fs.ls(root, detail=True) if entry["type"] == "file")
    found, budget = [], limits.max_bytes
    for path in names:
        name = fs.unstrip_protocol(path) if is_uri(source) else path
        data = read_source(name, max_bytes=budget)  # the folder as a whole is held to the byte limit
        budget -= len(data)
        if not is_dicom(data):
            continue  # a README, a thumbnail: not part of the series
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on broken files
            raise InvalidInputError(f"{name}: truncated or corrupt DICOM file ({exc})") from None
        if "Rows" in header and "SeriesInstanceUID" in header:  # an image, not a DICOMDIR or report
            found.append(_Slice(name, data, header))
    if not found:
        raise InvalidInputError(f"{source}: the folder holds no DICOM images")
    return found


def _pick_series(slices: list[_Slice], source: str, series_uid: str | None) -> list[_Slice]:
    series: dict[str, list[_Slice]] = {}
    for item in slices:
        series.setdefault(str(item.header.SeriesInstanceUID), []).append(item)
    if series_uid is not None:
        if series_uid not in series:
            raise InvalidInputError(f"{source}: no series {series_uid}; it holds {_listing(series)}")
        return series[series_uid]
    if len(series) > 1:
        raise InvalidInputError(
            f"{source}: the folder mixes {len(series)} DICOM series ({_listing(series)}); give one"
            " series' folder, or pick one by its SeriesInstanceUID"
        )
    return slices


def _listing(series: dict[str, list[_Slice]]) -> str:
    parts = []
    for uid, items in series.items():
        header = items[0].header
        described = " ".join(str(v) for v in (header.get("Modality"), header.get("SeriesDescription")) if v)
        number = header.get("SeriesNumber")
        label = f"#{number} " if number is not None else ""
        parts.append(f"series {label}{uid} ({described + ', ' if described else ''}{len(items)} files)")
    return "; ".join(parts)


def _check_same_grid(slices: list[_Slice], source: str) -> None:
    """Every slice of the size, pixel spacing and orientation of the first; geometry present."""
    first = slices[0]
    for item in slices:
        header = item.header
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
            if len(header.get(keyword) or ()) != (3 if keyword == "ImagePositionPatient" else 6):
                raise InvalidInputError(
                    f"{item.name}: no valid {keyword}: the slices of {source} cannot be placed in space"
                )
        if int(header.get("NumberOfFrames") or 1) > 1:
            raise UnsupportedFormatError(
                f"{item.name}: a multi-frame DICOM inside a series folder; load the file itself"
            )
        if (header.Rows, header.Columns) != (first.header.Rows, first.header.Columns):
            raise InvalidInputError(
                f"{source}: slices differ in size: {first.name} is {first.header.Columns}x"
                f"{first.header.Rows}, {item.name} is {header.Columns}x{header.Rows}"
            )
        if not np.allclose(_spacing(header, item.name), _spacing(first.header, first.name), atol=1e-3):
            raise InvalidInputError(f"{source}: slices differ in pixel spacing: {first.name} and {item.name}")
        if not np.allclose(_orientation(header), _orientation(first.header), atol=1e-4):
            raise InvalidInputError(
                f"{source}: slices differ in ImageOrientationPatient: {first.name} and {item.name}"
            )


def _sorted_along_normal(slices: list[_Slice], source: str) -> tuple[list[_Slice], float]:
    """The slices in position order along the normal, and the step between them (mm)."""
    normal = _normal(slices[0].header)
    positions = np.array([_position(item.header) for item in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices, along, positions = [slices[i] for i in order], along[order], positions[order]
    if len(slices) == 1:
        thickness = _float(slices[0].header.get("SliceThickness"))
        return slices, thickness if thickness and thickness > 0 else 1.0
    steps = np.diff(along)
    for k in np.flatnonzero(steps < POSITION_TOLERANCE_MM):
        raise InvalidInputError(
            f"{source}: duplicate slices at {along[k]:.3f} mm along the normal: {slices[k].name} and"
            f" {slices[k + 1].name}"
        )
    # Positions must lie on one line along the normal: a tilted gantry shears the volume.
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(offsets).max() > 0.05 * steps.min() + POSITION_TOLERANCE_MM:
        raise UnsupportedFormatError(
            f"{source}: the slices do not lie along their normal (a tilted gantry or sheared series);"
            " resample it to an orthogonal grid first"
        )
    step = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - step) > max(SPACING_TOLERANCE * step, POSITION_TOLERANCE_MM))
    for k in uneven:
        ratio = steps[k] / step
        gap = f"between {slices[k].name} ({along[k]:.2f} mm) and {slices[k + 1].name} ({along[k + 1]:.2f} mm)"
        if round(ratio) >= 2 and abs(ratio - round(ratio)) < SPACING_TOLERANCE * round(ratio):
            raise InvalidInputError(
                f"{source}: {round(ratio) - 1} slice(s) missing {gap}: the step is {steps[k]:.3f} mm,"
                f" the series' is {step:.3f} mm"
            )
    if len(uneven):
        raise InvalidInputError(
            f"{source}: inconsistent slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm"
            f" (median {step:.3f} mm), first at {slices[uneven[0]].name}"
        )
    return slices, step


def _lps_affine(slices: list[_Slice], step: float) -> np.ndarray:
    """Voxel (column, row, slice) -> patient LPS mm."""
    header = slices[0].header
    orientation = _orientation(header)
    row_mm, column_mm = _spacing(header, slices[0].name)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * column_mm  # along a row: the column index grows
    affine[:3, 1] = orientation[3:] * row_mm  # down a column: the row index grows
    affine[:3, 2] = _normal(header) * step
    affine[:3, 3] = _position(header)
    return affine


def _spacing(header: Any, name: str) -> tuple[float, float]:
    value = header.get("PixelSpacing")
    pair = [_float(v) for v in value] if value is not None and len(value) == 2 else []
    if len(pair) != 2 or not all(v is not None and v > 0 for v in pair):
        raise InvalidInputError(f"{name}: no valid PixelSpacing: the series has no voxel size")
    return pair[0], pair[1]  # type: ignore[return-value]


def _orientation(header: Any) -> np.ndarray:
    """The row and column direction cosines, each made unit length (headers round them)."""
    row, column = np.array([float(v) for v in header.ImageOrientationPatient]).reshape(2, 3)
    return np.concatenate([row / np.linalg.norm(row), column / np.linalg.norm(column)])


def _normal(header: Any) -> np.ndarray:
    orientation = _orientation(header)
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _position(header: Any) -> np.ndarray:
    return np.array([float(v) for v in header.ImagePositionPatient])


def _fits_int16(planes: list[np.ndarray]) -> bool:
    return min(float(p.min()) for p in planes) >= -32768 and max(float(p.max()) for p in planes) <= 32767
