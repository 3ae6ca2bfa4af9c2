"""Where the real medical images and masks that ship inside registry packages lie (see ../shared/DATA.md).

Nothing here downloads: each function finds a file inside an installed package (the `data` extra) and
raises `InvalidInputError` naming the missing package when it is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from medplib.core.errors import InvalidInputError

# Real DICOM files from pydicom (MIT) and pydicom-data (MIT), by what they show.
DICOM_FILES: dict[str, str] = {
    "ct_chest": "CT_small.dcm",
    "mr_head": "MR_small.dcm",
    "mr_abdomen_lesion": "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "cr_chest": "RG1_UNCI.dcm",
    "cr_tibia": "RG3_UNCI.dcm",
    "mr_shoulder": "MR2_UNCI.dcm",
    "us": "US1_UNCI.dcm",
    "mr_multiframe": "emri_small.dcm",
}

# stardist (BSD-3) ships a fluorescence microscopy image and its nuclei; it is installed without its
# dependencies (TensorFlow), so its files are found, never imported.
STARDIST_FILES: dict[str, str] = {"nuclei_image": "img2d.tif", "nuclei_labels": "mask2d.tif"}

# scikit-image (BSD-3) images that ship in its wheel (the others are downloads): a fundus photograph
# (CC0, Häggström 2014) and an immunohistochemistry stain of colonic glands.
SKIMAGE_FILES: dict[str, str] = {"retina": "retina.jpg", "ihc": "ihc.png"}

MNI152_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "grey_matter": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "white_matter": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _package_dir(package: str, extra_hint: str) -> Path:
    # find_spec locates a package without importing it (stardist's import would need TensorFlow).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InvalidInputError(f"package {package!r} is not installed; install {extra_hint}")
    return Path(spec.origin).parent


def dicom_file(name: str) -> Path:
    """Path of a real DICOM test file, by key of DICOM_FILES or by its file name."""
    file_name = DICOM_FILES.get(name, name)
    _package_dir("pydicom", "medplib[data]")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(file_name, download=False)
    if path is None:
        raise InvalidInputError(
            f"DICOM test file {file_name!r} not found; install medplib[data] (pydicom-data)"
        )
    return Path(path)


def mni152_file(name: str) -> Path:
    """Path of a MNI152 2009a volume shipped with nilearn: 't1', 'grey_matter' or 'white_matter'."""
    return _shipped_file("nilearn", "datasets/data", MNI152_FILES, name, "medplib[data]")


def _shipped_file(package: str, folder: str, files: dict[str, str], name: str, extra_hint: str) -> Path:
    if name not in files:
        raise InvalidInputError(f"unknown {package} file {name!r}; choose from {sorted(files)}")
    path = _package_dir(package, extra_hint) / folder / files[name]
    if not path.is_file():
        raise InvalidInputError(f"{path} is missing from the installed {package}")
    return path


def stardist_file(name: str) -> Path:
    """Path of stardist's 2-D nuclei image ('nuclei_image', 512x512 uint16) or its instance labels
    ('nuclei_labels', 125 nuclei)."""
    return _shipped_file("stardist", "data/images", STARDIST_FILES, name, "stardist (pip install --no-deps)")


def skimage_file(name: str) -> Path:
    """Path of a scikit-image sample image that ships in its wheel: 'retina' or 'ihc'."""
    return _shipped_file("skimage", "data", SKIMAGE_FILES, name, "medplib[data] (scikit-image)")
