"""3-D volumes in RAS+ voxel order, and the one way a plane is cut out of them for display.

Geometry, in one place so that an image and its mask always slice alike: `data[x, y, z]` runs
left→Right, posterior→Anterior, inferior→Superior (nibabel's closest canonical orientation). A
plane is `np.rot90` of the 2-D slice, which puts anterior (axial) or superior (coronal, sagittal)
at the top. Columns then run left→right in patient space, so the patient's left is on the image's
left (neurological convention; radiology viewers mirror this); sagittal planes have anterior on
the right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from medplib.core.errors import InvalidInputError
from medplib.core.image import ImageMeta, MedicalImage
from medplib.core.io.intensity import Window, render

AXES = ("sagittal", "coronal", "axial")  # the voxel axis each plane is perpendicular to: x, y, z


class VolumeMeta(BaseModel):
    """What is known about a volume besides its voxels."""

    model_config = ConfigDict(frozen=True)

    source: str
    format: str
    original_dtype: str
    file_window: tuple[float, float] | None = None  # (low, high) the file suggests for display
    invert: bool = False  # DICOM MONOCHROME1: high values are displayed dark
    modality: str | None = None
    body_part: str | None = None
    description: str | None = None
    volume_index: int | None = None  # which volume of a 4-D series this is
    num_volumes: int = 1
    series_uid: str | None = None  # DICOM SeriesInstanceUID of a series read from a folder
    slice_files: tuple[str, ...] = ()  # a DICOM series' files, in slice order (the file grid's k)


@dataclass(frozen=True)
class MedicalVolume:
    """A 3-D array, its voxel→world affine (mm), voxel sizes and metadata.

    NIfTI volumes and DICOM series are in RAS+ voxel order; a DICOM frame stack is laid out so its
    axial planes are the frames as displayed (see `load_dicom_volume`), without patient coordinates.
    `file_affine` is the voxel->world affine of the file's own voxel order, which differs from
    `affine` by axis flips and permutations only (`to_file_grid` maps an array back); None when the
    volume was made in memory and its grid is its own.
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]
    meta: VolumeMeta
    file_affine: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 3 or self.affine.shape != (4, 4):
            raise InvalidInputError(
                f"a volume needs a 3-D array and a 4x4 affine, got {self.data.shape} and {self.affine.shape}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        x, y, z = self.data.shape
        return x, y, z


def check_index(what: str, index: int, count: int, *, source: str) -> int:
    """`index` if 0 <= index < count, else an error naming the valid range."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise InvalidInputError(f"{what} must be an integer, got {index!r}")
    if not 0 <= index < count:
        raise InvalidInputError(
            f"{what} {index} is out of range: {source} has {count} (valid: 0..{count - 1})"
        )
    return int(index)


def axis_number(axis: str | int) -> int:
    """0, 1 or 2 for 'sagittal', 'coronal', 'axial' (or the numbers themselves)."""
    if isinstance(axis, str) and axis.strip().lower() in AXES:
        return AXES.index(axis.strip().lower())
    if isinstance(axis, int | np.integer) and not isinstance(axis, bool) and 0 <= axis <= 2:
        return int(axis)
    raise InvalidInputError(f"axis must be one of {', '.join(AXES)} or 0, 1, 2; got {axis!r}")


def volume_plane(volume: MedicalVolume, *, axis: str | int = "axial", index: int | None = None) -> np.ndarray:
    """The stored values of one plane, oriented for display (see the module docstring).

    Use this for label or mask volumes: it never windows, so labels stay labels, and the geometry
    is exactly that of `slice_volume` on the image volume.
    """
    number, index = _plane_position(volume, axis, index)
    # Basic indexing, then one copy of the plane: np.take would first copy the whole volume to C
    # order (nibabel's arrays are Fortran-ordered), about 200 times slower.
    return np.ascontiguousarray(np.rot90(volume.data[(slice(None),) * number + (index,)]))


def slice_volume(
    volume: MedicalVolume, *, axis: str | int = "axial", index: int | None = None, window: Window = None
) -> MedicalImage:
    """One plane of `volume` as a canonical image; `index` defaults to the middle slice."""
    number, index = _plane_position(volume, axis, index)
    plane = volume_plane(volume, axis=number, index=index)
    shown = render(plane, window=window, file_window=volume.meta.file_window, invert=volume.meta.invert)
    # rot90 turns the slice's second in-plane voxel axis into rows and its first into columns.
    row_axis, column_axis = {0: (2, 1), 1: (2, 0), 2: (1, 0)}[number]
    meta = volume.meta
    return MedicalImage(
        pixels=shown.pixels,
        meta=ImageMeta(
            source=meta.source,
            format=meta.format,
            width=plane.shape[1],
            height=plane.shape[0],
            modality=meta.modality,
            body_part=meta.body_part,
            description=meta.description,
            spacing=(volume.zooms[row_axis], volume.zooms[column_axis]),
            slice_thickness=volume.zooms[number],
            original_dtype=meta.original_dtype,
            value_range=shown.value_range,
            window=shown.window,
            frame=meta.volume_index,  # a 4-D series' volumes are its frames (fMRI time points)
            num_frames=meta.num_volumes,
            slice_index=index,
            axis=AXES[number],
            volume_shape=volume.shape,
        ),
    )


def place_plane(target: np.ndarray, plane: np.ndarray, *, axis: str | int, index: int) -> None:
    """Write a plane shaped as `volume_plane` returns it (e.g. a mask predicted on `slice_volume`'s
    image) into slice `index` of the 3-D array `target`: the exact inverse of `volume_plane`."""
    number = axis_number(axis)
    target[(slice(None),) * number + (index,)] = np.rot90(plane, k=-1)


def to_file_grid(volume: MedicalVolume, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`array`, laid out on `volume`'s grid, in the voxel order of the file the volume was read
    from, with that file's affine: exact (flips and axis permutations, never a resampling)."""
    if array.shape != volume.shape:
        raise InvalidInputError(f"an array of shape {array.shape} is not on a volume of shape {volume.shape}")
    if volume.file_affine is None:
        return array, volume.affine
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    canonical = np.array([[0, 1], [1, 1], [2, 1]])
    back = ornt_transform(canonical, io_orientation(volume.file_affine))
    return apply_orientation(array, back), volume.file_affine


def canonical_grid(data: np.ndarray, file_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) in closest canonical RAS+ voxel order, as nibabel's `as_closest_canonical`."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    orientation = io_orientation(file_affine)
    return apply_orientation(data, orientation), file_affine @ inv_ornt_aff(orientation, data.shape)


def _plane_position(volume: MedicalVolume, axis: str | int, index: int | None) -> tuple[int, int]:
    """(axis number, slice index), the index defaulting to the middle slice and checked."""
    number = axis_number(axis)
    count = volume.data.shape[number]
    index = count // 2 if index is None else index
    return number, check_index(f"{AXES[number]} slice", index, count, source=volume.meta.source)


def plane_into_volume(
    volume: MedicalVolume, plane: np.ndarray, *, axis: str | int = "axial", index: int | None = None
) -> np.ndarray:
    """A zero array on `volume`'s grid holding `plane` (as `volume_plane` shows it) at its slice: how a
    mask drawn on a displayed slice goes back onto the volume."""
    number, index = _plane_position(volume, axis, index)
    shown = volume_plane(volume, axis=number, index=index).shape
    if plane.shape != shown:
        raise InvalidInputError(
            f"a {AXES[number]} plane of this volume is {shown[1]}x{shown[0]} (WxH), not "
            f"{plane.shape[1]}x{plane.shape[0]}"
        )
    placed = np.zeros(volume.shape, dtype=plane.dtype)
    placed[(slice(None),) * number + (index,)] = np.rot90(plane, k=-1)
    return placed
