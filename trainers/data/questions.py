"""From what a source knows about an image to MeCoVQA samples of the three parts.

- C, complex VQA: modality, plane and body region (closed), whether a structure is present
  (closed, yes/no), which half of the image holds more of a structure (closed), and a description
  and the list of structures (open, with reference answers).
- R, region VQA: a question about a marked point, box or free-form shape, answered by what is there.
- G, grounding: a request to segment a structure, answered with `<SEG>` and its mask.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from medplib.trainers.data.marks import MARKS, mark_region
from medplib.trainers.data.mecovqa import IMAGE_TOKEN, SEG_TOKEN, Sample
from medplib.trainers.data.sources.common import SourceImage
from medplib.trainers.data.templates import GROUNDING_ANSWER, KINDS, STRUCTURES, fill

PRESENT = 30  # pixels: a structure with fewer (but some) is too small to say yes or no about
LARGER = 1.25  # one half of the image is 'larger' only with at least 25% more pixels than the other
HALVES = (("upper half", "lower half"), ("left half", "right half"))  # of the image, not the patient


@dataclass(frozen=True)
class ImageSamples:
    samples: list[Sample]
    masks: dict[str, np.ndarray]  # relative path -> bool mask, for the builder to write


def image_samples(image: SourceImage, rng: np.random.Generator) -> ImageSamples:
    """Every sample about `image`, and the masks they name."""
    writer = _Writer(image, rng)
    _complex(writer)
    _regions(writer)
    _grounding(writer)
    return ImageSamples(writer.samples, writer.masks)


class _Writer:
    """Collects one image's samples, numbering them and choosing their wordings."""

    def __init__(self, image: SourceImage, rng: np.random.Generator) -> None:
        self.image, self.rng = image, rng
        self.samples: list[Sample] = []
        self.masks: dict[str, np.ndarray] = {}

    def ask(
        self,
        kind: str,
        answer: str,
        *,
        fields: dict[str, str] | None = None,
        wordings: int | None = None,
        structure: str | None = None,
        mark: str | None = None,
    ) -> None:
        image, question_kind = self.image, KINDS[kind]
        for number in question_kind.choose(image.split, self.rng, wordings or image.wordings):
            question = fill(kind, number, **(fields or {}))
            self.samples.append(
                Sample.model_validate(
                    {
                        "id": f"{image.key}/{len(self.samples):02d}",
                        "image": f"images/{image.key}.png",
                        "conversations": [
                            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                            {"from": "gpt", "value": answer},
                        ],
                        "answer_type": question_kind.answer_type,
                        "split": image.split,
                        "part": question_kind.part,
                        "modality": image.modality,
                        "plane": image.plane,
                        "structure": structure,
                        "question_kind": kind,
                        "template": f"{kind}/{number}",
                        "series": image.series,
                        "position": list(image.position),
                        "mark": mark,
                    }
                )
            )

    def mask_path(self, name: str, mask: np.ndarray) -> str:
        path = f"masks/{self.image.key}_{name}.png"
        self.masks[path] = mask
        return path


def _complex(writer: _Writer) -> None:
    image = writer.image
    writer.ask("modality", image.modality)
    if image.plane:
        writer.ask("plane", image.plane)
    if image.body_region:
        writer.ask("body_region", image.body_region)
    areas = {key: int(mask.sum()) for key, mask in image.structures.items()}
    for key in image.presence:
        if areas[key] == 0 or areas[key] >= PRESENT:  # a sliver is neither clearly there nor not
            answer = "yes" if areas[key] else "no"
            writer.ask(
                "presence",
                answer,
                fields={"structure": STRUCTURES[key].asked},
                structure=STRUCTURES[key].name,
            )
    for key in image.compared:
        _compare_halves(writer, key)
    shown = [STRUCTURES[key].asked for key in image.listed if areas[key] >= PRESENT]
    listing = " and ".join(shown)
    writer.ask(
        "describe", image.subject[0].upper() + image.subject[1:] + (f", showing {listing}." if shown else ".")
    )
    if shown:
        writer.ask("structures", listing)


def _compare_halves(writer: _Writer, key: str) -> None:
    """Which half of the image holds a larger (or smaller) area of a structure, when that is clear.

    Larger or smaller is drawn, so each half is the answer about as often whatever the anatomy.
    """
    mask = writer.image.structures[key]
    for axis, names in enumerate(HALVES):
        first, second = np.array_split(mask, 2, axis=axis)
        amounts = int(first.sum()), int(second.sum())
        if max(amounts) < PRESENT or max(amounts) < LARGER * min(amounts):
            continue
        larger = "larger" if writer.rng.random() < 0.5 else "smaller"
        pick = np.argmax if larger == "larger" else np.argmin
        a, b = names if writer.rng.random() < 0.5 else names[::-1]  # the order gives nothing away
        fields = {"structure": STRUCTURES[key].asked, "a": a, "b": b, "larger": larger}
        writer.ask("larger", names[int(pick(amounts))], fields=fields)


def _regions(writer: _Writer) -> None:
    image, rng = writer.image, writer.rng
    # The marks take turns from a shuffled cycle, so every kind of mark is used about equally.
    marks = itertools.cycle([str(m) for m in rng.permutation(MARKS)])
    number = 0
    for family in image.regions:
        for label in family.labels:
            for _ in range(label.count):
                for mark in itertools.islice(marks, len(MARKS)):  # the next kind that fits
                    region = mark_region(label, mark, rng)
                    if region is not None:
                        break
                else:
                    continue
                path = writer.mask_path(f"region{number:02d}", region)
                number += 1
                writer.ask(
                    family.kind,
                    label.answer,
                    fields={"region": f"<region>{path}</region>"},
                    wordings=1,
                    structure=label.answer,
                    mark=mark,
                )


def _grounding(writer: _Writer) -> None:
    image = writer.image
    for key in image.grounded:
        mask = image.structures[key]
        if mask.sum() < PRESENT:
            continue
        path = writer.mask_path(key, mask)
        answer = GROUNDING_ANSWER.format(seg=f"{SEG_TOKEN}<mask>{path}</mask>")
        writer.ask(
            "segment", answer, fields={"structure": STRUCTURES[key].segmented}, structure=STRUCTURES[key].name
        )
