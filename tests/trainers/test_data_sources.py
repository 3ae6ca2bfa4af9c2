"""What the builder stands on: position splits, region marks, derived masks, resizing, registry files."""

from __future__ import annotations

import numpy as np
import pytest

from medplib.core.errors import InvalidInputError
from medplib.core.io.registry_data import dicom_file, skimage_file, stardist_file
from medplib.trainers.data.marks import mark_region
from medplib.trainers.data.sources.common import RegionLabel, fit_image, fit_mask, with_article
from medplib.trainers.data.sources.dicom import _lesion_mask, _plane
from medplib.trainers.data.splits import PositionSplit


def test_position_split_drops_a_margin_around_each_change_of_split() -> None:
    split = PositionSplit.repeating(length=30, block=10, pattern=("train", "test"), margin=2)
    assert split.bands == ((0, 10, "train"), (10, 20, "test"), (20, 30, "train"))
    got = [split.split_of(p) for p in range(30)]
    assert got[:8] == ["train"] * 8 and got[8:12] == [None] * 4  # 8, 9 | 10, 11 dropped
    assert got[12:18] == ["test"] * 6 and got[18:22] == [None] * 4
    assert split.split_of(-1) is None and split.split_of(30) is None  # outside the bands
    assert split.split_of(0, 8) == "train" and split.split_of(5, 15) is None  # intervals (tiles)


def test_position_split_refuses_bad_bands() -> None:
    with pytest.raises(InvalidInputError, match="contiguous"):
        PositionSplit(((0, 5, "train"), (6, 9, "test")), margin=1)
    with pytest.raises(InvalidInputError, match="bad band"):
        PositionSplit(((0, 5, "holdout"),), margin=1)


@pytest.mark.parametrize("mark", ["point", "box", "shape"])
def test_marks_lie_inside_their_label(mark: str) -> None:
    area = np.zeros((40, 40), bool)
    area[5:30, 10:20] = True
    region = mark_region(RegionLabel("tissue", area), mark, np.random.default_rng(0))
    assert region is not None and region.any() and not (region & ~area).any()


def test_marks_of_objects_cover_one_object() -> None:
    first, second = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    first[2:9, 3:10] = True
    second[15:25, 15:28] = True
    second[15, 15] = False  # not a rectangle: its box is larger than the object
    label = RegionLabel("nucleus", first | second, instances=(first, second))
    rng = np.random.default_rng(1)
    shape = mark_region(label, "shape", rng)
    assert any((shape == obj).all() for obj in (first, second))
    box = mark_region(label, "box", rng)
    assert (box == first).all() or ((box >= second).all() and box.sum() == 10 * 13)  # the bounding box


def test_no_mark_where_nothing_fits() -> None:
    thin = np.zeros((20, 20), bool)
    thin[10, :] = True  # one pixel wide: no disc or box of radius 2 fits
    label = RegionLabel("line", thin)
    assert mark_region(label, "point", np.random.default_rng(0)) is None
    assert mark_region(label, "box", np.random.default_rng(0)) is None


def test_lesion_is_the_filled_ring_of_the_overlay() -> None:
    import pydicom
    from scipy import ndimage

    path = dicom_file("mr_abdomen_lesion")
    lesion = _lesion_mask(path)
    ring = pydicom.dcmread(path).overlay_array(0x6000).astype(bool)
    assert ndimage.label(lesion)[1] == 1
    assert lesion.sum() > 3 * (ring & lesion).sum()  # filled, not just the ring
    assert np.nonzero(lesion)[1].max() < lesion.shape[1] / 2  # the 'F' marker on the right is left out
    assert (ring & ~lesion).sum() > 0  # ... and it is in the overlay


def test_plane_from_image_orientation() -> None:
    assert _plane([1, 0, 0, 0, 1, 0]) == "axial"
    assert _plane([1, 0, 0, 0, 0, -1]) == "coronal"
    assert _plane([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert _plane([0.569486, 0.822001, 0, 0, 0, -1]) is None  # the shoulder MR: oblique
    assert _plane(None) is None


def test_images_and_masks_shrink_onto_the_same_grid() -> None:
    pixels = np.zeros((512, 300, 3), np.uint8)
    mask = np.zeros((512, 300), bool)
    mask[:256] = True
    assert fit_image(pixels).shape == (256, 150, 3)
    small = fit_mask(mask)
    assert small.shape == (256, 150) and small[:128].all() and not small[128:].any()
    assert fit_image(pixels[:100, :100]).shape == (100, 100, 3)  # never enlarged


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [("MRI slice", "an MRI slice"), ("CT slice", "a CT slice"), ("X-ray", "an X-ray"), ("axial", "an axial"),
     ("chest X-ray", "a chest X-ray")],
)  # fmt: skip
def test_article(phrase: str, expected: str) -> None:
    assert with_article(phrase) == expected


def test_registry_files_of_stardist_and_skimage() -> None:
    assert stardist_file("nuclei_image").name == "img2d.tif"
    assert stardist_file("nuclei_labels").is_file()
    assert skimage_file("retina").name == "retina.jpg"
    with pytest.raises(InvalidInputError, match="choose from"):
        skimage_file("astronaut")
