"""Volume samples: a volume, what to segment in it, and the true 3-D mask, for `medplib eval` on volumes.

The embedded dataset holds the MNI152 template's test-split slabs: along the axial and coronal axes,
each run of consecutive slices that the 2-D dataset puts in the test split (12 mm blocks, 2 mm gaps)
is cut out as its own NIfTI volume (the template's affine, moved to the slab's first slice) with one
mask per structure (grey and white matter, each hemisphere), derived exactly as the 2-D masks are.
Sagittal slabs are left out: a sagittal slab lies in one hemisphere of a symmetric template.

Layout, apart from the 2-D samples so `data check` and the split files are untouched:
`volumes/{split}.json` lists `VolumeSample`s; `volumes/*.nii.gz` are the volumes and masks.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medplib.core.errors import InvalidInputError
from medplib.core.io.volume import AXES, MedicalVolume

VOLUMES_FOLDER = "volumes"
STRUCTURES_3D = ("grey_matter", "white_matter", "left_hemisphere", "right_hemisphere")


class VolumeSample(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    volume: str = Field(description="path of the volume, relative to the dataset root")
    mask: str = Field(description="path of the true mask (NIfTI on the volume's grid), relative to the root")
    structure: str = Field(description="the structure's key, e.g. grey_matter")
    text: str = Field(description="what grounding is asked for, e.g. 'the grey matter'")
    axis: str = Field(description="the planes the 2-D dataset slices this slab along")


def volume_samples(root: Path, split: str) -> list[VolumeSample]:
    """The volume samples of `split` (none when the dataset has no volumes)."""
    path = root / VOLUMES_FOLDER / f"{split}.json"
    if not path.is_file():
        return []
    try:
        samples = [VolumeSample.model_validate(item) for item in json.loads(path.read_text(encoding="utf-8"))]
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{path}: not a list of volume samples ({exc})") from None
    for sample in samples:
        for relative in (sample.volume, sample.mask):
            resolved = (root / relative).resolve()
            if root.resolve() not in resolved.parents or not resolved.is_file():
                raise InvalidInputError(f"{path}: {sample.id}: {relative} is not a file inside the dataset")
    return samples


def write_mni152_test_volumes(root: Path) -> int:
    """Write the MNI152 test slabs and their masks under `root`; the number of samples written."""
    from medplib.core.io import load_volume
    from medplib.core.io.registry_data import mni152_file
    from medplib.trainers.data.sources.mni152 import SPLIT
    from medplib.trainers.data.templates import STRUCTURES

    t1 = load_volume(mni152_file("t1"))
    masks = _structure_masks(
        t1, load_volume(mni152_file("grey_matter")), load_volume(mni152_file("white_matter"))
    )
    folder = root / VOLUMES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for axis in ("axial", "coronal"):
        number = AXES.index(axis)
        for start, stop in _runs([SPLIT.split_of(i) == "test" for i in range(t1.shape[number])]):
            take = [slice(None)] * 3
            take[number] = slice(start, stop)
            affine = t1.affine.copy()
            affine[:3, 3] += affine[:3, number] * start  # the slab's voxel 0 is the template's `start`
            name = f"mni152_{axis}_{start:03d}-{stop - 1:03d}"
            _save(folder / f"{name}.nii.gz", np.asarray(t1.data[tuple(take)]), affine)
            for structure in STRUCTURES_3D:
                mask = masks[structure][tuple(take)].astype(np.uint8)
                if not mask.any():
                    continue
                _save(folder / f"{name}_{structure}.nii.gz", mask, affine)
                samples.append(
                    VolumeSample(
                        id=f"{name}_{structure}",
                        volume=f"{VOLUMES_FOLDER}/{name}.nii.gz",
                        mask=f"{VOLUMES_FOLDER}/{name}_{structure}.nii.gz",
                        structure=structure,
                        text=STRUCTURES[structure].segmented,
                        axis=axis,
                    )
                )
    text = json.dumps([s.model_dump() for s in samples], indent=1, sort_keys=True) + "\n"
    (folder / "test.json").write_text(text, encoding="utf-8")
    return len(samples)


def _structure_masks(t1: MedicalVolume, grey: MedicalVolume, white: MedicalVolume) -> dict[str, np.ndarray]:
    """The 3-D counterparts of the 2-D dataset's masks (see `sources/mni152.py`)."""
    brain = t1.data > 0
    i = np.arange(t1.shape[0])
    world_x = (t1.affine[0, 0] * i + t1.affine[0, 3])[:, None, None]  # the template is axis-aligned
    return {
        "grey_matter": grey.data > 127,
        "white_matter": white.data > 127,
        "left_hemisphere": brain & (world_x < 0),
        "right_hemisphere": brain & (world_x > 0),
    }


def _runs(flags: list[bool]) -> Iterator[tuple[int, int]]:
    """[start, stop) of each run of True."""
    start = None
    for index, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            yield start, index
            start = None


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_qform(affine, code=2)
    # Fixed gzip settings (no timestamp), so that a build is byte-identical.

    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
