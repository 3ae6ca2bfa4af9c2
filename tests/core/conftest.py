"""Volumes with a known geometry, written by the tests: DICOM series (pydicom) and oblique NIfTI files."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest


def write_dicom_series(
    folder: Path,
    planes: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    step: float = 2.5,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-40.0, -30.0, 10.0),
    series_uid: str | None = None,
    shuffle_seed: int | None = 0,
    prefix: str = "slice",
) -> list[Path]:
    """`planes` (slice, row, column) as one CT file per slice, slice k at origin + k * step * normal,
    written in shuffled order under shuffled names; returns the paths in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, frame_of_reference = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    series_uid = series_uid or generate_uid()
    row_dir, column_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, column_dir)
    normal /= np.linalg.norm(normal)
    order = list(range(len(planes)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    paths: dict[int, Path] = {}
    for written, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Volume", "T1", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, 3, "CT"
        ds.SeriesDescription = f"{prefix} series"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array(origin) + k * step * normal]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{step:g}"
        ds.Rows, ds.Columns = planes.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = (planes[k].astype(np.int16) + 1024).astype("<i2").tobytes()
        path = folder / f"{prefix}-{written:03d}-{random.Random(k).randrange(10**6):06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[k] = path
    return [paths[k] for k in range(len(planes))]


def sphere(shape: tuple[int, int, int], centre: Sequence[float], radius: float) -> np.ndarray:
    """A boolean ball on a voxel grid (centre and radius in voxels)."""
    grid = np.indices(shape, dtype=np.float32)
    offsets = grid - np.array(centre, dtype=np.float32).reshape(3, 1, 1, 1)
    return (offsets**2).sum(axis=0) <= radius**2


@pytest.fixture(scope="session")
def dicom_series_writer() -> Callable[..., list[Path]]:
    return write_dicom_series


@pytest.fixture(scope="session")
def make_sphere() -> Callable[..., np.ndarray]:
    return sphere
