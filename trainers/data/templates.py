"""Question wordings, several per kind of question, and the names of the structures they ask about.

Each kind has templates for every split and a few held out for the test split only, so a test set
measures both the wordings a model was trained on and new ones. A sample records the template it
used as '<kind>/<number>'; numbers from `len(kind.train)` on are the held-out ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from medplib.core.errors import InvalidInputError
from medplib.trainers.data.mecovqa import Part

AnswerType = Literal["closed", "open"]


@dataclass(frozen=True)
class QuestionKind:
    name: str
    part: Part
    answer_type: AnswerType | None  # None for grounding: the answer is a mask
    train: tuple[str, ...]
    test_only: tuple[str, ...]

    @property
    def templates(self) -> tuple[str, ...]:
        return self.train + self.test_only

    def choose(self, split: str, rng: np.random.Generator, count: int = 1) -> list[int]:
        """`count` distinct template numbers for a sample of `split`.

        Test samples draw from all templates, held-out and seen alike; other splits from `train` only.
        """
        pool = len(self.templates) if split == "test" else len(self.train)
        if count > pool:
            raise InvalidInputError(f"{self.name}: {count} wordings asked for, {pool} available")
        return sorted(int(i) for i in rng.choice(pool, size=count, replace=False))


def _kind(name: str, part: Part, answer_type: AnswerType | None, *templates: str) -> QuestionKind:
    """The last two templates are the held-out ones."""
    return QuestionKind(name, part, answer_type, templates[:-2], templates[-2:])


KINDS: dict[str, QuestionKind] = {
    kind.name: kind
    for kind in (
        _kind(
            "modality", "C", "closed",
            "What imaging modality was used for this image?",
            "Which modality is shown here?",
            "What kind of image is this?",
            "Name the imaging technique of this image.",
            "By which imaging method was this picture acquired?",
            "Identify the imaging modality of this picture.",
        ),
        _kind(
            "plane", "C", "closed",
            "In which plane is this slice?",
            "What is the imaging plane?",
            "Is this an axial, coronal or sagittal image?",
            "Which anatomical plane does this image show?",
            "Along which plane was this section cut?",
            "Name the plane of this view.",
        ),
        _kind(
            "body_region", "C", "closed",
            "Which part of the body is shown?",
            "What body region does this image show?",
            "Which organ or region is imaged here?",
            "What anatomy is in this image?",
            "Which region of the body was imaged?",
            "Where in the body was this image taken?",
        ),
        _kind(
            "presence", "C", "closed",
            "Does this image show {structure}?",
            "Can {structure} be seen in this image?",
            "Do you see {structure} in this image?",
            "Does the image contain {structure}?",
            "Would you say this image contains {structure}?",
            "Can {structure} be identified in this picture?",
        ),
        _kind(
            "larger", "C", "closed",
            "Which half of the image holds a {larger} area of {structure}, the {a} or the {b}?",
            "Is the area of {structure} {larger} in the {a} or in the {b} of the image?",
            "Where does {structure} cover a {larger} area: in the {a} or the {b}?",
            "Does the {a} or the {b} of the image show a {larger} area of {structure}?",
            "Comparing the {a} and the {b} of the image, which has a {larger} area of {structure}?",
            "In which half, the {a} or the {b}, is the area of {structure} {larger}?",
        ),
        _kind(
            "hemisphere", "C", "closed",
            "Which hemisphere does this sagittal slice cut through?",
            "Is this slice in the left or the right hemisphere?",
            "Which side of the brain is shown?",
            "Left or right hemisphere: which one is this slice from?",
            "Which cerebral hemisphere is this section taken from?",
            "On which side of the brain does this slice lie?",
        ),
        _kind(
            "describe", "C", "open",
            "Describe this image.",
            "What does this image show?",
            "Give a short description of the image.",
            "What can you see in this picture?",
            "Briefly summarise the content of this image.",
            "Provide a one-sentence description of this image.",
        ),
        _kind(
            "structures", "C", "open",
            "Which structures can you see in this image?",
            "What structures are shown here?",
            "Name the structures visible in this image.",
            "Which structures appear in this image?",
            "Can you list the structures present in this picture?",
            "What structures would you point out in this image?",
        ),
        _kind(
            "region_name", "R", "open",
            "What is in {region}?",
            "What does {region} show?",
            "Which structure is marked by {region}?",
            "Name what lies in {region}.",
            "Identify the structure inside {region}.",
            "What can be found within {region}?",
        ),
        _kind(
            "region_side", "R", "closed",
            "Which hemisphere contains {region}?",
            "Is {region} in the left or the right hemisphere?",
            "On which side of the brain is {region}?",
            "Does {region} lie in the left or right hemisphere?",
            "Which half of the brain does {region} belong to?",
            "Tell me the hemisphere of {region}.",
        ),
        _kind(
            "segment", "G", None,
            "Please segment {structure} in this image.",
            "Can you segment {structure} in this image?",
            "Show me {structure} with a segmentation mask.",
            "Outline {structure} in this image.",
            "Could you provide a segmentation mask for {structure}?",
            "Highlight {structure} in this image.",
        ),
    )
}  # fmt: skip

# One answer wording: what a grounding answer says matters less than that it holds <SEG>.
GROUNDING_ANSWER = "Sure, it is {seg}."


@dataclass(frozen=True)
class Structure:
    name: str  # the sample's `structure` and the answer that names it
    asked: str  # how a question names it: 'Does this image show {asked}?'
    segmented: str  # how a grounding request names it: 'Please segment {segmented} in this image.'


STRUCTURES: dict[str, Structure] = {
    "brain": Structure("brain", "the brain", "the brain"),
    "grey_matter": Structure("grey matter", "grey matter", "the grey matter"),
    "white_matter": Structure("white matter", "white matter", "the white matter"),
    "left_hemisphere": Structure("left hemisphere", "the left hemisphere", "the left hemisphere"),
    "right_hemisphere": Structure("right hemisphere", "the right hemisphere", "the right hemisphere"),
    "nuclei": Structure("cell nuclei", "cell nuclei", "the cell nuclei"),
    "liver_lesion": Structure("liver lesion", "a liver lesion", "the liver lesion"),
}


def fill(kind: str, number: int, **fields: str) -> str:
    """Template `number` of `kind` with its fields filled in."""
    return KINDS[kind].templates[number].format(**fields)
