"""The real DICOM images of pydicom and pydicom-data: CT, MR, X-ray (CR) and ultrasound.

Modality comes from the Modality tag, the plane from ImageOrientationPatient when the slice is within
about 25 degrees of an axis (the shoulder MR is oblique: no plane is claimed), the body region from
BodyPartExamined or the study description, or, for CT_small.dcm, from what it shows (a thoracic
vertebra between the lungs). Each file is one image (the multi-frame MR: ten slices 1.2 mm apart),
so single images go to the training split only; the multi-frame MR's slices are split by position.

The abdomen MR's overlay plane 0x6000 rings a liver lesion; it also holds the letters 'Tra' and a
boxed 'F' orientation marker, all in the right half of the image. The lesion is the ring in the left
half, filled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from medplib.core.errors import InvalidInputError
from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
from medplib.trainers.data.sources.common import (
    SINGLE_IMAGE_WORDINGS,
    RegionFamily,
    RegionLabel,
    SourceImage,
    fit_image,
    fit_mask,
    with_article,
)
from medplib.trainers.data.splits import PositionSplit

MODALITY_NAMES = {"CT": "CT", "MR": "MRI", "CR": "X-ray", "DX": "X-ray", "US": "ultrasound"}
FRAME_SPLIT = PositionSplit(((0, 5, "train"), (5, 10, "test")), margin=1)  # the multi-frame MR


@dataclass(frozen=True)
class DicomEntry:
    file: str
    body_region: str | None
    subject: str  # the description's opening; the plane is prepended when known


DICOM_IMAGES = (
    DicomEntry("CT_small.dcm", "chest", "CT slice of the chest at a thoracic vertebra"),
    DicomEntry("MR_small.dcm", None, "MRI slice"),
    DicomEntry("MR-SIEMENS-DICOM-WithOverlays.dcm", "abdomen", "MRI slice of the abdomen"),
    DicomEntry("RG1_UNCI.dcm", "chest", "chest X-ray"),
    DicomEntry("RG3_UNCI.dcm", "lower leg", "X-ray of the lower leg"),
    DicomEntry("MR2_UNCI.dcm", "shoulder", "MRI slice of the shoulder"),
    DicomEntry("US1_UNCI.dcm", None, "colour Doppler ultrasound image"),
    DicomEntry("emri_small.dcm", "head", "MRI slice of the head"),
)


def dicom_images() -> Iterator[SourceImage]:
    import pydicom

    for entry in DICOM_IMAGES:
        path = dicom_file(entry.file)
        header = pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(header.get("NumberOfFrames") or 1)
        plane = _plane(header.get("ImageOrientationPatient"))
        stem = entry.file.removesuffix(".dcm").lower().replace("-", "_")
        lesion = _lesion_mask(path) if entry.file.startswith("MR-SIEMENS") else None
        for frame in range(frames):
            split = FRAME_SPLIT.split_of(frame) if frames > 1 else "train"
            if split is None:
                continue
            image = load_image(path, frame=frame if frames > 1 else None)
            modality = MODALITY_NAMES[str(image.meta.modality)]
            subject = f"{plane} {entry.subject}" if plane else entry.subject
            yield SourceImage(
                key=f"dicom_{stem}" + (f"_frame{frame:02d}" if frames > 1 else ""),
                pixels=fit_image(image.pixels),
                split=split,
                series=f"dicom/{stem}",
                position=(frame, frame + 1),
                modality=modality,
                subject=with_article(subject),
                plane=plane,
                body_region=entry.body_region,
                wordings=1 if frames > 1 else SINGLE_IMAGE_WORDINGS,
                **(_lesion_fields(fit_mask(lesion)) if lesion is not None else {}),
            )


def _plane(orientation: object) -> str | None:
    """'axial', 'coronal' or 'sagittal' when the slice normal is within ~25 degrees of an axis."""
    if orientation is None or len(orientation) != 6:  # type: ignore[arg-type]
        return None
    row, column = np.asarray(orientation, dtype=float).reshape(2, 3)
    normal = np.cross(row, column)
    axis = int(np.argmax(np.abs(normal)))
    return ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) > 0.9 else None


def _lesion_mask(path: object) -> np.ndarray:
    """The overlay's ring in the left half of the image, filled: the marked liver lesion."""
    import pydicom
    from scipy import ndimage

    overlay = pydicom.dcmread(path).overlay_array(0x6000).astype(bool)
    labels, count = ndimage.label(overlay, structure=np.ones((3, 3)))
    half = overlay.shape[1] / 2
    rings = [i for i in range(1, count + 1) if np.nonzero(labels == i)[1].max() < half]
    if len(rings) != 1:
        raise InvalidInputError(f"{path}: expected one overlay ring in the left half, found {len(rings)}")
    return ndimage.binary_fill_holes(labels == rings[0])


def _lesion_fields(lesion: np.ndarray) -> dict:
    label = RegionLabel("liver lesion", lesion, count=3, instances=(lesion,))
    return {
        "structures": {"liver_lesion": lesion},
        "presence": ("liver_lesion",),
        "grounded": ("liver_lesion",),
        "listed": ("liver_lesion",),
        "regions": (RegionFamily("region_name", (label,)),),
    }
