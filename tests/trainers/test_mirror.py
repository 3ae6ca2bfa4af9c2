"""Mirror augmentation (`trainers/mirror.py`): a flipped slice with its sides swapped is as true as
the original, and which samples a step mirrors is a function of the seed and the step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medplib.trainers.collate import ExampleStore
from medplib.trainers.mirror import as_drawn, mirrorable, mirrored, mirrored_images, swap_sides
from medplib.trainers.stages import stage_spec


@pytest.fixture(scope="module")
def examples(built_dataset: Path):
    return ExampleStore.open(built_dataset, split="train").examples()


def test_sides_swap_as_whole_words_with_their_capitals() -> None:
    assert swap_sides("Left or right? The right half.") == "Right or left? The left half."
    assert swap_sides("upright, leftover") == "upright, leftover"


def test_a_mirrored_region_side_question_asks_the_mirrored_place_and_answers_the_other_side(examples) -> None:
    side = next(e for e in examples if e.kind == "region_side" and e.plane == "axial")
    flipped = mirrored(side)
    assert {side.reference, flipped.reference} == {"left", "right"}
    assert np.array_equal(flipped.request.pixels, side.request.pixels[:, ::-1])
    (region,), (flipped_region,) = side.request.regions, flipped.request.regions
    assert np.array_equal(flipped_region, region[:, ::-1])
    width = region.shape[1]
    column, flipped_column = (np.nonzero(mask)[1].mean() for mask in (region, flipped_region))
    assert flipped_column == pytest.approx(width - 1 - column)  # the centroid moved to the other side
    assert (column < width / 2) != (flipped_column < width / 2)
    assert flipped.image != side.image and flipped.id.endswith("/mirrored")


def test_a_mirrored_hemisphere_request_segments_the_flipped_mask_of_the_other_side(examples) -> None:
    left = next(e for e in examples if e.structure == "left hemisphere" and e.plane in ("axial", "coronal"))
    flipped = mirrored(left)
    assert flipped.structure == "right hemisphere"
    assert "right hemisphere" in flipped.request.turns[-1].user[0]
    assert np.array_equal(flipped.targets[0], left.targets[0][:, ::-1])


def test_only_axial_and_coronal_slices_are_mirrored(examples) -> None:
    sagittal = next(e for e in examples if e.plane == "sagittal")
    microscopy = next(e for e in examples if e.plane is None)
    assert not mirrorable(sagittal) and not mirrorable(microscopy)
    with pytest.raises(ValueError, match="axial and coronal"):
        mirrored(sagittal)


def test_a_step_mirrors_whole_images_by_its_seed_and_step(examples) -> None:
    chosen = list(range(len(examples)))
    images = {examples[i].image for i in chosen if mirrorable(examples[i])}
    assert mirrored_images(examples, chosen, 0.0, 0, 5) == set()
    assert mirrored_images(examples, chosen, 1.0, 0, 5) == images
    half = mirrored_images(examples, chosen, 0.5, 0, 5)
    assert half == mirrored_images(examples, chosen, 0.5, 0, 5)  # a resumed step mirrors the same
    assert half != mirrored_images(examples, chosen, 0.5, 0, 6)
    assert 0.3 < len(half) / len(images) < 0.7
    # Every sample of a mirrored image is mirrored, so pairs about one image stay one image's pairs.
    drawn = [as_drawn(examples[i], half) for i in chosen]
    assert all(
        (e.image.endswith("#mirrored")) == (o.image in half) for e, o in zip(drawn, examples, strict=True)
    )


def test_the_tiny_recipe_mirrors_the_stages_that_ask_about_regions() -> None:
    assert stage_spec("2").mirror == stage_spec("4").mirror == 0.5
    assert stage_spec("1").mirror == stage_spec("3").mirror == 0.0
