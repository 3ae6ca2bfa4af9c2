"""Zoom-out augmentation (`trainers/zoom.py`): a hemisphere request's slice and target shrunk about the
centre by one factor per image and step, drawn from the seed and the step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medplib.trainers.collate import ExampleStore
from medplib.trainers.stages import TINY_ZOOM, stage_spec
from medplib.trainers.zoom import as_zoomed, zoom_factors, zoomable, zoomed


@pytest.fixture(scope="module")
def examples(built_dataset: Path):
    return ExampleStore.open(built_dataset, split="train").examples()


def test_a_zoomed_request_shrinks_its_slice_and_target_about_the_centre(examples) -> None:
    left = next(e for e in examples if e.structure == "left hemisphere" and e.plane == "axial")
    small = zoomed(left, 0.5)
    assert small.request.pixels.shape == left.request.pixels.shape
    assert small.targets[0].shape == left.targets[0].shape
    assert small.targets[0].sum() / left.targets[0].sum() == pytest.approx(0.25, rel=0.1)
    rows, columns = np.nonzero(small.targets[0])
    height, width = left.targets[0].shape
    assert (rows.min(), columns.min()) >= (height // 4 - 1, width // 4 - 1)  # the border is empty
    # The left hemisphere stays on its side of the image's centre.
    side = np.nonzero(left.targets[0])[1].mean() < width / 2
    assert (columns.mean() < width / 2) == side
    assert small.request.turns == left.request.turns and small.image != left.image
    assert as_zoomed(left, None) is left


def test_only_hemisphere_requests_on_brain_slices_are_zoomed(examples) -> None:
    grey = next(e for e in examples if e.structure == "grey matter")
    question = next(e for e in examples if e.kind == "presence")
    assert not zoomable(grey) and not zoomable(question)
    assert as_zoomed(grey, 0.5) is grey  # a zoomed image's other requests stay as they are
    with pytest.raises(ValueError, match="hemisphere"):
        zoomed(grey, 0.5)
    right = next(e for e in examples if e.structure == "right hemisphere")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        zoomed(right, 1.5)


def test_a_step_zooms_whole_images_by_its_seed_and_step(examples) -> None:
    chosen = list(range(len(examples)))
    images = {examples[i].image for i in chosen if zoomable(examples[i])}
    assert zoom_factors(examples, chosen, 0.0, 0, 5) == {}
    assert set(zoom_factors(examples, chosen, 1.0, 0, 5)) == images
    half = zoom_factors(examples, chosen, 0.5, 0, 5)
    assert half == zoom_factors(examples, chosen, 0.5, 0, 5)  # a resumed step zooms the same
    assert half != zoom_factors(examples, chosen, 0.5, 0, 6)
    assert 0.3 < len(half) / len(images) < 0.7 and all(0.5 <= f < 1 for f in half.values())


def test_the_tiny_recipe_zooms_stage_iii_alone() -> None:
    assert stage_spec("3").zoom == TINY_ZOOM == 0.5
    assert all(stage_spec(stage).zoom == 0.0 for stage in ("1", "2", "4", "joint"))
