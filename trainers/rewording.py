"""Rewording augmentation: a grounding request or a presence question asked in another training wording.

Both kinds name a structure ("Please segment the grey matter in this image." / "Does this image show
grey matter?"), and the answer's first token, words or `<SEG>`, is decided by the rest of the sentence.
With ten training wordings per kind, the tiny model learnt to decide on whole sentence frames: on
held-out wordings it answered "Could you provide a segmentation mask for the grey matter?" in words
and "Would you say this image contains white matter?" with a mask (benchmarks/results/pipeline.md,
session 13). The extra wordings below put the same openings ("Can you", "Do you", "Please", "I want")
in front of both kinds, so that only the verb ("segment", "mask", "outline" against "show",
"contain", "see") tells them apart.

The extra wordings are for training only; the test split is unchanged. None uses a word that only the
held-out test wordings use ("highlight", "provide", "could", "would", "say", ...), which a test checks.

Which samples a step rewords, and how, is a function of the seed, the step and the sample, so a
resumed run rewords what the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from medplib.core.model import Request, Turn
from medplib.trainers.collate import Example
from medplib.trainers.data.templates import STRUCTURES, Structure

# fmt: off
EXTRA_WORDINGS: dict[str, tuple[str, ...]] = {
    "segment": (
        "Can you mark {segmented} in this picture?",
        "Do you mind segmenting {segmented}?",
        "Please outline {segmented} in this scan.",
        "I want a mask of {segmented}.",
        "Can I see a segmentation of {segmented}?",
        "Mask {segmented} in this image, please.",
        "Show {segmented} as a segmentation mask.",
        "Will you segment {segmented} for me?",
        "Make a mask of {segmented} in this slice.",
        "Can you draw the outline of {segmented}?",
        "Do a segmentation of {segmented}.",
        "Please give the mask of {segmented}.",
    ),
    "presence": (
        "Can you see {asked} in this picture?",
        "Do you see {asked} here?",
        "Please tell me whether this image shows {asked}.",
        "I wonder if {asked} is visible here.",
        "Can I see {asked} in this scan?",
        "Is {asked} shown in this image, please?",
        "Does this picture show {asked}?",
        "Will this image contain {asked}?",
        "Is {asked} part of this slice?",
        "Can you tell me if this image contains {asked}?",
        "Do you find {asked} in this image?",
        "Please tell me if {asked} appears here.",
    ),
}
# fmt: on
_STREAM = 0x726577  # keeps these draws apart from the data order's and the mirror's
_BY_NAME: dict[str, Structure] = {structure.name: structure for structure in STRUCTURES.values()}


def rewordable(example: Example) -> bool:
    return example.kind in EXTRA_WORDINGS and example.structure in _BY_NAME


def reworded(example: Example, number: int) -> Example:
    """The example asked in extra wording `number` of its kind (its image, regions and answer kept)."""
    if not rewordable(example):
        raise ValueError(f"{example.id}: only {', '.join(EXTRA_WORDINGS)} samples about a known structure")
    structure = _BY_NAME[example.structure or ""]
    wording = EXTRA_WORDINGS[example.kind or ""][number]
    question = wording.format(segmented=structure.segmented, asked=structure.asked)
    request = example.request
    turns = [*request.turns[:-1], Turn([question], request.turns[-1].assistant)]
    return replace(
        example,
        id=f"{example.id}/reworded-{number}",
        request=Request(
            request.pixels,
            turns,
            request.regions,
            request.require_seg,
            request.require_token,
            request.require_at_start,
        ),
    )


def step_wordings(
    examples: Sequence[Example], chosen: Sequence[int], rate: float, seed: int, step: int
) -> dict[int, int]:
    """Sample index -> extra wording number, for the samples step `step` rewords: each rewordable
    sample of its global batch with probability `rate`, drawn from (seed, step) in the batch's order."""
    if rate <= 0:
        return {}
    rng = np.random.default_rng([seed, step, _STREAM])
    drawn = {}
    for index in chosen:
        draw, pick = rng.random(), rng.random()  # two draws per sample, rewordable or not: stable order
        example = examples[index]
        if rewordable(example) and draw < rate:
            drawn[index] = int(pick * len(EXTRA_WORDINGS[example.kind or ""]))
    return drawn


def as_worded(example: Example, number: int | None) -> Example:
    """The example as a step trains on it: in extra wording `number`, or as it is (None)."""
    return example if number is None else reworded(example, number)
