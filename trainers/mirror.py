"""Mirror augmentation: a brain slice flipped left to right, with "left" and "right" swapped in its text.

On an axial or coronal slice the patient's sides lie along the image's x axis, and the display
convention is fixed, so the mirrored slice is a slice of the mirrored patient: the region that was in
the left hemisphere is now in the right one, the left half of the image that held more grey matter is
now the right half. Flipping the pixels, the marked regions and the target masks and swapping the two
words gives a sample that is exactly as true as the original.

Why: "which hemisphere holds this region" depends only on where the region is. On the symmetric
MNI152 template its content says nothing about the side, yet with 92 such training questions the tiny
trunk answered 0.66 of them and 4 or 5 of 18 test questions on two seeds of three (worse than chance:
it had picked up a cue that held on the training slices only). A mirrored copy asks the same content
with the other answer, so only the place can explain it. Sagittal slices are left alone: there the
image's x axis runs from front to back.

Every sample of one image in a step is mirrored together (pair losses compare two requests about one
image), and the choice is a function of the seed and the step, so a resumed run mirrors what the
uninterrupted one did.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from medplib.core.model import Request, Turn
from medplib.core.model.conversation import Part
from medplib.trainers.collate import Example

MIRRORED_PLANES = ("axial", "coronal")
_SIDE = re.compile(r"\b([Ll]eft|[Rr]ight)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}
_STREAM = 0x6D6972  # keeps the mirror's draws apart from the data order's (both start from the seed)


def swap_sides(text: str) -> str:
    """'left' <-> 'right' as whole words, capitals kept."""
    return _SIDE.sub(lambda match: _SWAP[match[1]], text)


def _swap_parts(value: str | Sequence[Part] | None) -> str | list[Part] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return swap_sides(value)
    return [swap_sides(part) if isinstance(part, str) else part for part in value]


def mirrorable(example: Example) -> bool:
    return example.plane in MIRRORED_PLANES


def mirrored(example: Example) -> Example:
    """The example flipped left to right, its sides swapped; refused for a plane it does not hold for."""
    if not mirrorable(example):
        raise ValueError(f"{example.id}: only {' and '.join(MIRRORED_PLANES)} slices are mirrored")
    request = example.request
    flipped = Request(
        np.ascontiguousarray(request.pixels[:, ::-1]),
        [Turn(_swap_parts(turn.user), _swap_parts(turn.assistant)) for turn in request.turns],
        tuple(np.ascontiguousarray(region[:, ::-1]) for region in request.regions),
        request.require_seg,
        request.require_token,
        request.require_at_start,
    )
    return replace(
        example,
        id=f"{example.id}/mirrored",
        request=flipped,
        image=f"{example.image}#mirrored",  # pairs of one image stay pairs of the one mirrored image
        targets=tuple(np.ascontiguousarray(target[:, ::-1]) for target in example.targets),
        structure=swap_sides(example.structure) if example.structure else example.structure,
        reference=swap_sides(example.reference),
    )


def mirrored_images(
    examples: Sequence[Example], chosen: Sequence[int], rate: float, seed: int, step: int
) -> set[str]:
    """The images whose samples step `step` mirrors: each mirrorable image of its global batch with
    probability `rate`, drawn from (seed, step) in the batch's order."""
    if rate <= 0:
        return set()
    images = list(dict.fromkeys(examples[i].image for i in chosen if mirrorable(examples[i])))
    draws = np.random.default_rng([seed, step, _STREAM]).random(len(images))
    return {image for image, draw in zip(images, draws, strict=True) if draw < rate}


def as_drawn(example: Example, images: set[str]) -> Example:
    """The example as a step trains on it: mirrored when its image is among the step's `images`."""
    return mirrored(example) if example.image in images else example
