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
HELD_OUT_SHARE = 1 / 3  # of test questions, asked in a wording no other split uses


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

        Other splits draw from `train` only. Test samples draw a held-out wording with probability
        `HELD_OUT_SHARE` whatever the number of seen ones, so a third of the test measures new wordings.
        """
        pool = len(self.templates) if split == "test" else len(self.train)
        if count > pool:
            raise InvalidInputError(f"{self.name}: {count} wordings asked for, {pool} available")
        weights = None
        if split == "test":
            seen, held = len(self.train), len(self.test_only)
            weights = [(1 - HELD_OUT_SHARE) / seen] * seen + [HELD_OUT_SHARE / held] * held
        return sorted(int(i) for i in rng.choice(pool, size=count, replace=False, p=weights))


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
            "Which imaging modality is this?",
            "What modality is this scan?",
            "Tell me the modality of this image.",
            "What type of imaging produced this image?",
            "How was this image acquired?",
            "What is the modality?",
            "By which imaging method was this picture acquired?",
            "Identify the imaging modality of this picture.",
        ),
        _kind(
            "plane", "C", "closed",
            "In which plane is this slice?",
            "What is the imaging plane?",
            "Is this an axial, coronal or sagittal image?",
            "Which anatomical plane does this image show?",
            "Which plane is this image in?",
            "What plane is shown?",
            "Tell me the plane of this slice.",
            "In what plane was this image taken?",
            "What is the orientation of this slice?",
            "Which view is this: axial, coronal or sagittal?",
            "Along which plane was this section cut?",
            "Name the plane of this view.",
        ),
        _kind(
            "body_region", "C", "closed",
            "Which part of the body is shown?",
            "What body region does this image show?",
            "Which organ or region is imaged here?",
            "What anatomy is in this image?",
            "What body part is this?",
            "Which body part is imaged?",
            "Tell me the body region of this image.",
            "What part of the body does this image show?",
            "Which region is shown in this scan?",
            "What is the body region?",
            "Which region of the body was imaged?",
            "Where in the body was this image taken?",
        ),
        _kind(
            "presence", "C", "closed",
            "Does this image show {structure}?",
            "Can {structure} be seen in this image?",
            "Do you see {structure} in this image?",
            "Does the image contain {structure}?",
            "Is {structure} visible in this image?",
            "Is there {structure} in this image?",
            "Is {structure} present here?",
            "Does this scan include {structure}?",
            "Are there signs of {structure} in this picture?",
            "Can you find {structure} here?",
            "Would you say this image contains {structure}?",
            "Can {structure} be identified in this picture?",
        ),
        _kind(
            "larger", "C", "closed",
            "Which half of the image holds a {larger} area of {structure}, the {a} or the {b}?",
            "Is the area of {structure} {larger} in the {a} or in the {b} of the image?",
            "Where does {structure} cover a {larger} area: in the {a} or the {b}?",
            "Does the {a} or the {b} of the image show a {larger} area of {structure}?",
            "Which has a {larger} area of {structure}: the {a} or the {b}?",
            "Is there a {larger} area of {structure} in the {a} or the {b}?",
            "Tell me whether the {a} or the {b} holds a {larger} area of {structure}.",
            "Of the {a} and the {b}, which shows a {larger} area of {structure}?",
            "Where is the area of {structure} {larger}, the {a} or the {b} of the image?",
            "Which contains a {larger} area of {structure}, the {a} or the {b}?",
            "Comparing the {a} and the {b} of the image, which has a {larger} area of {structure}?",
            "In which half, the {a} or the {b}, is the area of {structure} {larger}?",
        ),
        _kind(
            "describe", "C", "open",
            "Describe this image.",
            "What does this image show?",
            "Give a short description of the image.",
            "What can you see in this picture?",
            "Please describe the image.",
            "Describe what is shown.",
            "What is in this image?",
            "Tell me about this image.",
            "Can you describe this picture?",
            "Summarise this image.",
            "Briefly summarise the content of this image.",
            "Provide a one-sentence description of this image.",
        ),
        _kind(
            "structures", "C", "open",
            "Which structures can you see in this image?",
            "What structures are shown here?",
            "Name the structures visible in this image.",
            "Which structures appear in this image?",
            "List the structures in this image.",
            "What structures are visible?",
            "Which structures does this image show?",
            "Tell me the structures you can see.",
            "What anatomical structures are present?",
            "Which structures are in this picture?",
            "Can you list the structures present in this picture?",
            "What structures would you point out in this image?",
        ),
        _kind(
            "region_name", "R", "open",
            "What is in {region}?",
            "What does {region} show?",
            "Which structure is marked by {region}?",
            "Name what lies in {region}.",
            "What structure is in {region}?",
            "What is shown in {region}?",
            "Tell me what {region} contains.",
            "What do you see in {region}?",
            "Which structure lies in {region}?",
            "What is located in {region}?",
            "Identify the structure inside {region}.",
            "What can be found within {region}?",
        ),
        _kind(
            "region_side", "R", "closed",
            "Which hemisphere contains {region}?",
            "Is {region} in the left or the right hemisphere?",
            "On which side of the brain is {region}?",
            "Does {region} lie in the left or right hemisphere?",
            "Which side of the brain is {region} on?",
            "Is {region} on the left or the right side of the brain?",
            "In which hemisphere is {region}?",
            "Tell me which hemisphere holds {region}.",
            "Which cerebral hemisphere contains {region}?",
            "Is {region} left or right?",
            "Which half of the brain does {region} belong to?",
            "Tell me the hemisphere of {region}.",
        ),
        _kind(
            "segment", "G", None,
            "Please segment {structure} in this image.",
            "Can you segment {structure} in this image?",
            "Show me {structure} with a segmentation mask.",
            "Outline {structure} in this image.",
            "Segment {structure}.",
            "Please mark {structure} in this image.",
            "Can you outline {structure}?",
            "Draw a mask of {structure}.",
            "Where is {structure}? Please segment it.",
            "Give me a mask of {structure} in this image.",
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
