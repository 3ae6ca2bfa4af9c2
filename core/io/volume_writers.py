"""Masks of a volume back to files a viewer opens: NIfTI on the input's grid, or a DICOM SEG.

A NIfTI mask is written on the input file's own voxel grid with its affine (sform and qform), so
3D Slicer, ITK-SNAP or nibabel lay it over the scan without resampling. A DICOM SEG (highdicom,
`pip install medplib[volumes]`) references the source series: the study, the frame of reference,
and for each frame the SOP instance of the slice it lies on.
"""

from __future__ import annotations

import gzip
import io
import os
from typing import Any

import numpy as np

from medplib.core.errors import InvalidInputError, UnsupportedFormatError
from medplib.core.io.volume import MedicalVolume, canonical_grid
from medplib.core.volume_results import VolumeGroundingResult

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_SUFFIXES = (".dcm",)


def mask_nifti_bytes(result: VolumeGroundingResult, *, compress: bool = True) -> bytes:
    """The mask as a uint8 NIfTI-1 file (1 inside) on the input grid, gzipped unless asked not to."""
    import nibabel as nib

    mask = _mask(result)
    image = nib.Nifti1Image(mask.astype(np.uint8), np.array(result.affine))
    image.set_qform(np.array(result.affine), code=2)  # both forms, for viewers that read only one
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = f"medplib: {result.query}"[:79].encode("ascii", "replace")
    image.header["cal_min"], image.header["cal_max"] = 0, 1
    data = image.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def dicom_seg(result: VolumeGroundingResult, volume: MedicalVolume) -> Any:
    """The mask as a binary DICOM Segmentation referencing `volume`'s source series (a folder of
    single-frame DICOM files, as `load_volume` reads it), one frame per slice with any mask."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise UnsupportedFormatError(
            "writing a DICOM SEG needs highdicom: pip install 'medplib[volumes]'"
        ) from None
    import pydicom

    from medplib import __version__

    mask_format(".dcm", volume)
    files = volume.meta.slice_files
    mask = _mask(result)
    if mask.shape[2] != len(files):
        raise InvalidInputError(f"the mask has {mask.shape[2]} slices, the series {len(files)} files")
    from medplib.core.io.sources import read_source

    sources = [
        pydicom.dcmread(io.BytesIO(read_source(name, max_bytes=1 << 30)), stop_before_pixels=True)
        for name in files
    ]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medplib", family=codes.DCM.ArtificialIntelligence, version=__version__
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=result.query[:64],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            # The file grid is (column, row, slice): frame k is slice k's (row, column) plane.
            pixel_array=np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medplib",
            manufacturer_model_name=result.model[:64],
            software_versions=__version__,
            device_serial_number="0",
            series_description=f"medplib: {result.query}"[:64],
            omit_empty_frames=bool(mask.any()),  # a SEG needs at least one frame
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's reasons for refusing a source
        raise InvalidInputError(f"{volume.meta.source}: cannot make a DICOM SEG ({exc})") from None


def mask_format(name: str, volume: MedicalVolume) -> str:
    """'nifti' or 'seg' for a mask file name, checked against the input before any work is done."""
    lower = name.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if not lower.endswith(SEG_SUFFIXES):
        raise InvalidInputError(f"{name}: write the mask as .nii.gz, .nii or .dcm (DICOM SEG)")
    if not volume.meta.slice_files or volume.meta.format != "dicom":
        raise InvalidInputError(
            f"{name}: a DICOM SEG references a DICOM series, and {volume.meta.source} is not one"
            " (a folder of DICOM slices): write the mask as .nii.gz"
        )
    return "seg"


def save_mask(path: str | os.PathLike[str], result: VolumeGroundingResult, volume: MedicalVolume) -> str:
    """Write the mask as NIfTI (.nii, .nii.gz) or DICOM SEG (.dcm), by the name; a path or fsspec URI."""
    import fsspec

    name = os.fspath(path)
    if mask_format(name, volume) == "nifti":
        data = mask_nifti_bytes(result, compress=name.lower().endswith(".gz"))
    else:
        buffer = io.BytesIO()
        dicom_seg(result, volume).save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    with fsspec.open(name, "wb") as handle:
        handle.write(data)
    return name


def canonical_mask(result: VolumeGroundingResult, volume: MedicalVolume) -> np.ndarray:
    """The result's mask (input grid) back on `volume`'s RAS+ grid, where its planes are cut."""
    mask = _mask(result)
    return mask if volume.file_affine is None else canonical_grid(mask, volume.file_affine)[0]


def _mask(result: VolumeGroundingResult) -> np.ndarray:
    if result.mask is None:
        raise InvalidInputError("this result carries no mask (it was read back from its JSON summary)")
    return result.mask
