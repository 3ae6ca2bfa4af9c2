"""Volumes on their files' own grids: DICOM series folders, oblique NIfTI, multi-frame DICOM, and the
exact way back from the RAS+ grid that slicing uses to the file's voxel order."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import data as pydicom_data

from medplib.core.errors import ImageTooLargeError, InvalidInputError, UnsupportedFormatError
from medplib.core.image import ImageLimits
from medplib.core.io import dicom_series as series_module
from medplib.core.io import load_volume, volume_plane
from medplib.core.io.registry_data import dicom_file
from medplib.core.io.volume import canonical_grid, place_plane, to_file_grid


def rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    about_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    about_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return about_z @ about_x


# Oblique (rotated 20 and 12 degrees) affines whose voxel axes run RAS, LPS and, as a sagittal
# acquisition does, PIR: nibabel reorients each differently.
OBLIQUE = {
    "RAS": rotation(0.21, 0.35) @ np.diag([0.9, 1.1, 2.0]),
    "LPS": rotation(0.21, 0.35) @ np.diag([-0.9, -1.1, 2.0]),
    "PIR": rotation(0.21, 0.35) @ np.array([[0, 0, -1.5], [-0.8, 0, 0], [0, -0.7, 0]]),
}


def oblique_nifti(tmp_path: Path, name: str, data: np.ndarray) -> tuple[Path, np.ndarray]:
    affine = np.eye(4)
    affine[:3, :3] = OBLIQUE[name]
    affine[:3, 3] = (-20.0, 14.0, -8.0)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path, affine


@pytest.mark.parametrize("orientation", sorted(OBLIQUE))
def test_oblique_nifti_maps_back_to_its_own_grid_exactly(tmp_path: Path, orientation: str) -> None:
    data = np.random.default_rng(1).integers(0, 255, size=(9, 11, 7), dtype=np.uint8)
    path, affine = oblique_nifti(tmp_path, orientation, data)
    volume = load_volume(path)
    np.testing.assert_allclose(volume.file_affine, affine, atol=1e-5)
    back, back_affine = to_file_grid(volume, volume.data)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    # Every voxel keeps its world position: the canonical affine places it where the file's did.
    i, j, k = 3, 8, 5
    world = affine @ [i, j, k, 1]
    canonical_index = np.rint(np.linalg.solve(volume.affine, world)).astype(int)[:3]
    assert volume.data[tuple(canonical_index)] == data[i, j, k]
    assert canonical_grid(data, affine)[0].shape == volume.shape


def test_place_plane_inverts_volume_plane() -> None:
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    from medplib.core.io import MedicalVolume, VolumeMeta

    volume = MedicalVolume(
        data, np.eye(4), (1.0, 1.0, 1.0), VolumeMeta(source="<a>", format="array", original_dtype="int64")
    )
    for axis, count in (("sagittal", 4), ("coronal", 5), ("axial", 6)):
        rebuilt = np.zeros_like(data)
        for index in range(count):
            place_plane(rebuilt, volume_plane(volume, axis=axis, index=index), axis=axis, index=index)
        np.testing.assert_array_equal(rebuilt, data)


def test_multi_frame_dicom_file_grid_is_its_frames() -> None:
    path = dicom_file("emri_small.dcm")
    volume = load_volume(path)
    back, _ = to_file_grid(volume, volume.data)
    import pydicom

    frames = pydicom.dcmread(path).pixel_array  # (frames, rows, columns)
    np.testing.assert_array_equal(back, frames.transpose(2, 1, 0))


# ---- DICOM series ---------------------------------------------------------------------------------------


@pytest.fixture
def ball_planes(make_sphere) -> np.ndarray:
    """(slice, row, column) HU: a 400 HU ball in -100 HU, off-centre so every flip shows."""
    ball = make_sphere((7, 20, 16), (3, 8, 9), 3.2)
    return np.where(ball, 400, -100).astype(np.int16)


@pytest.mark.parametrize(
    "orientation", [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (0.94, 0.34, 0, -0.34, 0.94, 0)]
)
def test_series_in_shuffled_files_is_sorted_along_the_normal(
    tmp_path: Path, dicom_series_writer, ball_planes: np.ndarray, orientation: tuple[float, ...]
) -> None:
    paths = dicom_series_writer(tmp_path / "series", ball_planes, orientation=orientation, step=2.5)
    volume = load_volume(tmp_path / "series")
    assert volume.meta.slice_files == tuple(str(p) for p in paths)  # slice order, not name order
    assert sorted(volume.meta.slice_files) != list(volume.meta.slice_files)
    back, affine = to_file_grid(volume, volume.data)
    np.testing.assert_array_equal(back.transpose(2, 1, 0), ball_planes)  # HU, rescale applied
    import pydicom

    for k in (0, 4, 6):  # voxel (0, 0, k) sits at slice k's ImagePositionPatient (LPS -> RAS)
        position = np.array([float(v) for v in pydicom.dcmread(paths[k]).ImagePositionPatient])
        np.testing.assert_allclose((affine @ [0, 0, k, 1])[:3], position * [-1, -1, 1], atol=1e-3)
    assert sorted(volume.zooms) == pytest.approx(sorted((0.7, 0.8, 2.5)), abs=1e-6)
    assert volume.meta.series_uid and volume.meta.modality == "CT"


def test_folder_mixing_series_names_them(tmp_path: Path, dicom_series_writer, ball_planes) -> None:
    dicom_series_writer(tmp_path, ball_planes, series_uid="1.2.3.4", prefix="a")
    dicom_series_writer(tmp_path, ball_planes[:3], series_uid="1.2.3.5", prefix="b")
    (tmp_path / "README.txt").write_text("not a slice")
    with pytest.raises(
        InvalidInputError, match=r"mixes 2 DICOM series.*1\.2\.3\.4.*7 files.*1\.2\.3\.5.*3 files"
    ):
        load_volume(tmp_path)
    picked = load_volume(tmp_path, series_uid="1.2.3.5")
    assert len(picked.meta.slice_files) == 3
    with pytest.raises(InvalidInputError, match=r"no series 9\.9"):
        load_volume(tmp_path, series_uid="9.9")


def test_missing_duplicate_and_uneven_slices_are_named(
    tmp_path: Path, dicom_series_writer, ball_planes
) -> None:
    paths = dicom_series_writer(tmp_path / "gap", ball_planes)
    paths[3].unlink()
    with pytest.raises(InvalidInputError, match=rf"1 slice\(s\) missing between {paths[2]}.*and {paths[4]}"):
        load_volume(tmp_path / "gap")

    paths = dicom_series_writer(tmp_path / "dup", ball_planes)
    shutil.copy(paths[2], tmp_path / "dup" / "copy.dcm")
    with pytest.raises(InvalidInputError, match="duplicate slices at"):
        load_volume(tmp_path / "dup")

    import pydicom

    paths = dicom_series_writer(tmp_path / "uneven", ball_planes, step=2.0)
    ds = pydicom.dcmread(paths[5])
    ds.ImagePositionPatient = [
        ds.ImagePositionPatient[0],
        ds.ImagePositionPatient[1],
        float(ds.ImagePositionPatient[2]) + 0.7,
    ]
    ds.save_as(paths[5])
    with pytest.raises(InvalidInputError, match=r"inconsistent slice spacing: steps from 1\.300 to 2\.700"):
        load_volume(tmp_path / "uneven")


def test_series_grid_mismatches_are_named(tmp_path: Path, dicom_series_writer, ball_planes) -> None:
    import pydicom

    paths = dicom_series_writer(tmp_path / "tilt", ball_planes)
    ds = pydicom.dcmread(paths[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.99, 0.141]
    ds.save_as(paths[1])
    with pytest.raises(InvalidInputError, match=f"differ in ImageOrientationPatient.*{paths[1].name}"):
        load_volume(tmp_path / "tilt")
    paths = dicom_series_writer(tmp_path / "nopos", ball_planes)
    ds = pydicom.dcmread(paths[0])
    del ds.ImagePositionPatient
    ds.save_as(paths[0])
    with pytest.raises(InvalidInputError, match="no valid ImagePositionPatient"):
        load_volume(tmp_path / "nopos")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="holds no DICOM images"):
        load_volume(tmp_path / "empty")


def test_over_limit_series_is_refused_before_decoding(
    tmp_path: Path, dicom_series_writer, ball_planes, monkeypatch: pytest.MonkeyPatch
) -> None:
    dicom_series_writer(tmp_path, ball_planes)
    decoded: list[str] = []
    real_decode = series_module._decode
    monkeypatch.setattr(
        series_module, "_decode", lambda ds, **kw: decoded.append(kw["source"]) or real_decode(ds, **kw)
    )
    voxels = 7 * 20 * 16
    with pytest.raises(ImageTooLargeError, match=rf"7 slices of 16x20 pixels \({voxels} voxels\) are over"):
        load_volume(tmp_path, limits=ImageLimits(max_voxels=voxels - 1))
    assert decoded == []
    assert load_volume(tmp_path, limits=ImageLimits(max_voxels=voxels)).shape
    assert len(decoded) == 7
    with pytest.raises(ImageTooLargeError):
        load_volume(tmp_path, limits=ImageLimits(max_bytes=4000))


def test_a_multi_frame_file_in_a_folder_is_pointed_at(tmp_path: Path) -> None:
    shutil.copy(dicom_file("emri_small.dcm"), tmp_path / "mf.dcm")
    with pytest.raises(UnsupportedFormatError, match="one multi-frame DICOM"):
        load_volume(tmp_path)


# ---- real series that ship with pydicom (dicomdirtests: CT, MR) -------------------------------------------

DICOMDIR_TESTS = Path(pydicom_data.__file__).parent / "test_files" / "dicomdirtests"


def test_a_real_ct_series_is_stacked_along_its_normal() -> None:
    import pydicom

    folder = DICOMDIR_TESTS / "98892001" / "CT5N"
    volume = load_volume(folder)
    assert volume.shape == (16, 16, 5) and volume.meta.modality == "CT"
    positions = [
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        for f in volume.meta.slice_files
    ]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert volume.zooms == pytest.approx((0.488281, 0.488281, 2.5), abs=1e-5)


def test_a_real_folder_mixing_series_names_each() -> None:
    with pytest.raises(InvalidInputError, match=r"mixes 3 DICOM series.*MR FAST LOCALIZER, 1 files"):
        load_volume(DICOMDIR_TESTS / "98892003" / "MR2")
