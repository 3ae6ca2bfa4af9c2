"""Slices of the MNI152 2009a T1 template (nilearn) in three planes, with what can honestly be derived.

- brain: T1 > 0. The template is skull-stripped, so this is simply its non-zero voxels (nilearn's
  own brain mask thresholds the same volume); it is used to cut the hemispheres, never asked for.
- grey and white matter: the template's probability maps (uint8, p = value / 255) with p > 0.5; the
  two never overlap at that threshold.
- left and right hemisphere: brain voxels with world x < 0 and x > 0 (RAS: left is negative x; the
  midline plane x = 0 belongs to neither).

The template is symmetric: a sagittal slice and its mirror image across the midline are the same
image, so nothing on a sagittal slice tells which hemisphere it lies in. Sagittal slices are asked
no question whose answer is a side (which hemisphere, is a hemisphere present, which hemisphere a
marked region is in); axial and coronal slices show both halves and are asked about sides.

Splits: positions along each plane's axis are cut into 12 mm blocks, 4 of every 6 training, 1
validation, 1 test, with 2 mm dropped either side of a change of split. Sagittal slices are placed
by their distance from the midline: the template is symmetric, so a slice and its mirror image
would otherwise fall in different splits.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from medplib.core.io import MedicalVolume, load_volume, slice_volume, volume_plane
from medplib.core.io.registry_data import mni152_file
from medplib.core.io.volume import AXES
from medplib.trainers.data.sources.common import RegionFamily, RegionLabel, SourceImage
from medplib.trainers.data.splits import PositionSplit
from medplib.trainers.data.templates import STRUCTURES

SPLIT = PositionSplit.repeating(
    length=240, block=12, pattern=("train", "train", "val", "train", "train", "test"), margin=2
)
MIN_BRAIN = 400  # pixels: slices that only graze the brain show too little to ask about


def mni152_images(step: int) -> Iterator[SourceImage]:
    """Every `step`-th slice of each plane that shows enough brain and does not fall in a split gap."""
    t1 = load_volume(mni152_file("t1"))
    grey = load_volume(mni152_file("grey_matter"))
    white = load_volume(mni152_file("white_matter"))
    world_x = _world_x(t1)
    for axis in AXES:
        count = t1.shape[AXES.index(axis)]
        for index in range(step // 2, count, step):
            x = volume_plane(world_x, axis=axis, index=index)
            position = round(abs(float(x.mean()))) if axis == "sagittal" else index
            split = SPLIT.split_of(position)
            brain = volume_plane(t1, axis=axis, index=index) > 0
            if split is None or brain.sum() < MIN_BRAIN:
                continue
            masks = {
                "grey_matter": volume_plane(grey, axis=axis, index=index) > 127,  # p = v/255 > 0.5
                "white_matter": volume_plane(white, axis=axis, index=index) > 127,
                "left_hemisphere": brain & (x < 0),
                "right_hemisphere": brain & (x > 0),
            }
            yield _slice_image(
                slice_volume(t1, axis=axis, index=index).pixels, axis, index, position, split, masks
            )


def _slice_image(
    pixels: np.ndarray, axis: str, index: int, position: int, split: str, masks: dict[str, np.ndarray]
) -> SourceImage:
    areas = {name: int(mask.sum()) for name, mask in masks.items()}
    sagittal = axis == "sagittal"
    sides = ("left_hemisphere", "right_hemisphere")
    tissue = ("grey_matter", "white_matter")
    region_labels = [RegionLabel(STRUCTURES[name].name, masks[name]) for name in tissue if areas[name]]
    side_labels = [
        RegionLabel(name.split("_")[0], masks[name]) for name in sides if areas[name] and not sagittal
    ]
    return SourceImage(
        key=f"mni152_{axis}_{index:03d}",
        pixels=pixels,
        split=split,
        series=f"mni152/{axis}",
        position=(position, position + 1),
        modality="MRI",
        subject=f"a T1-weighted {axis} MRI slice of the brain",
        plane=axis,
        body_region="brain",
        structures=masks,
        presence=tissue,
        # A sagittal slice lies in one hemisphere: segmenting it would be segmenting the whole brain.
        grounded=(*tissue, *(() if sagittal else sides)),
        listed=tissue,
        compared=tissue,
        regions=(
            RegionFamily("region_name", tuple(region_labels)),
            RegionFamily("region_side", tuple(side_labels)),
        ),
    )


def _world_x(volume: MedicalVolume) -> MedicalVolume:
    """A volume on `volume`'s grid holding each voxel's world x (mm), sliced as the image is."""
    i, j, k = np.indices(volume.shape, dtype=np.float32, sparse=True)
    a = volume.affine
    x = (a[0, 0] * i + a[0, 1] * j + a[0, 2] * k + a[0, 3]).astype(np.float32)
    return MedicalVolume(
        data=np.broadcast_to(x, volume.shape), affine=volume.affine, zooms=volume.zooms, meta=volume.meta
    )
