"""From MeCoVQA samples to the model's inputs: `Example`s (one `Request` each) and batches of them.

A sample's text is cut at its markup, and everything between the markup stays verbatim: the model's
template tokenises each text piece on its own, so a space that separates a word from a region or a
`<SEG>` has to stay inside its text piece (`"Which structure is marked by "`, `REGION`, `"?"`).

- `<image>` is dropped: the template places the image itself.
- `<region>masks/x.png</region>` in a question becomes `ControlToken.REGION` and that region mask.
- `<SEG><mask>masks/y.png</mask>` in an answer becomes `ControlToken.SEG`, and `y.png` its target.

Images and masks are read once per process (`ExampleStore`), since every epoch reuses them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medplib.core.errors import InvalidInputError
from medplib.core.io import load_image
from medplib.core.masks import read_mask
from medplib.core.model import ControlToken, MedPLIBProcessor, Request, Turn
from medplib.core.model.conversation import ExpertToken, Part
from medplib.trainers.data.loader import LoadedSamples, load_samples
from medplib.trainers.data.mecovqa import IMAGE_TOKEN, Sample, strip_references
from medplib.trainers.data.templates import KINDS

# One pattern for both kinds of markup, so pieces come out in the order they are written.
MARKUP = re.compile(r"<region>(?P<region>.*?)</region>|<SEG><mask>(?P<mask>.*?)</mask>", re.S)
TASKS = {"C": "vqa", "R": "region_vqa", "G": "grounding"}  # MeCoVQA part -> `SampleFilter` task


@dataclass(frozen=True)
class Example:
    """One training or evaluation item: the request (answers included) and what it is scored on."""

    id: str
    task: str  # caption, vqa, region_vqa or grounding
    request: Request
    image: str = ""  # the image's path under the dataset root
    targets: tuple[np.ndarray, ...] = ()  # bool (H, W) grounding masks, one per `<SEG>` in the answers
    answer_type: str | None = None
    kind: str | None = None  # the question kind, e.g. modality, describe, region_name, segment
    modality: str | None = None
    plane: str | None = None  # axial, coronal or sagittal for a brain slice
    structure: str | None = None
    reference: str = ""  # the last answer as the model should say it (`<SEG>` kept, mask paths dropped)
    held_out_wording: bool = False  # asked with a wording the training split never uses

    def question_only(self) -> Request:
        """The request with its last answer removed: what generation is asked to complete."""
        turns = list(self.request.turns)
        turns[-1] = Turn(turns[-1].user)
        return replace(self.request, turns=turns)


def split_markup(text: str, expert_tokens: Sequence[str] = ()) -> tuple[list[Part], list[str]]:
    """Text and control tokens of one turn, and the mask paths its markup names, in order;
    `expert_tokens` (an expert dataset's answers: `<MOD>`) become `ExpertToken`s."""
    text = text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
    parts: list[Part] = []
    paths: list[str] = []
    start = 0
    markup = MARKUP
    if expert_tokens:
        alternatives = "|".join(re.escape(token) for token in expert_tokens)
        markup = re.compile(f"{MARKUP.pattern}|(?P<expert>{alternatives})", re.S)
    for match in markup.finditer(text):
        if match.start() > start:
            parts.append(text[start : match.start()])
        start = match.end()
        if match.groupdict().get("expert") is not None:
            parts.append(ExpertToken(match["expert"]))
            continue
        parts.append(ControlToken.REGION if match["region"] is not None else ControlToken.SEG)
        paths.append(match["region"] if match["region"] is not None else match["mask"])
    if start < len(text):
        parts.append(text[start:])
    return parts, paths


def is_held_out(template: str | None) -> bool:
    """Whether a sample's wording ('<kind>/<number>') is one the builder keeps for the test split."""
    if template is None or "/" not in template:
        return False
    kind, number = template.split("/")
    return kind in KINDS and int(number) >= len(KINDS[kind].train)


class ExampleStore:
    """Examples of one dataset; each image and mask file is read once and shared by its samples."""

    def __init__(self, loaded: LoadedSamples, expert_tokens: Sequence[str] = ()) -> None:
        self.loaded = loaded
        self.expert_tokens = tuple(expert_tokens)  # trigger tokens its answers may hold
        self._images: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, source: Path, split: str | None = None) -> ExampleStore:
        return cls(load_samples(source, split=split, on_error="skip"))

    def image(self, relative: str) -> np.ndarray:
        if relative not in self._images:
            self._images[relative] = load_image(self.loaded.path(relative)).pixels
        return self._images[relative]

    def mask(self, relative: str) -> np.ndarray:
        if relative not in self._masks:
            self._masks[relative] = read_mask(self.loaded.path(relative))
        return self._masks[relative]

    def examples(self) -> list[Example]:
        return [self.example(sample) for sample in self.loaded.samples]

    def example(self, sample: Sample) -> Example:
        if sample.image is None:
            raise InvalidInputError(f"sample {sample.id}: no image; medplib trains on image samples only")
        turns, regions, targets = [], [], []
        pairs = zip(sample.conversations[::2], sample.conversations[1::2], strict=True)
        for human, gpt in pairs:
            question, region_paths = split_markup(human.value)
            answer, mask_paths = split_markup(gpt.value, self.expert_tokens)
            turns.append(Turn(question, answer))
            regions += [self.mask(path) for path in region_paths]
            targets += [self.mask(path) for path in mask_paths]
        return Example(
            id=sample.id,
            task=TASKS[sample.inferred_part],
            request=Request(self.image(sample.image), turns, tuple(regions)),
            image=sample.image,
            targets=tuple(targets),
            answer_type=sample.answer_type,
            kind=sample.question_kind,
            modality=sample.modality,
            plane=sample.plane,
            structure=sample.structure,
            reference=strip_references(sample.conversations[-1].value),
            held_out_wording=is_held_out(sample.template),
        )


def caption_examples(examples: Sequence[Example]) -> list[Example]:
    """Stage I's image-caption pairs: each image once, captioned by its own `describe` answer.

    The embedded dataset's description of an image is written by its builder from what it knows of
    the image (modality, plane, body region, structures present), so these captions are derived from
    the dataset's annotations, not written by people. The question is empty: the image alone is the
    prompt, as in LLaVA's alignment stage.
    """
    captions: dict[int, Example] = {}
    for example in examples:
        key = id(example.request.pixels)  # ExampleStore shares one array per image file
        if example.kind == "describe" and key not in captions:
            captions[key] = Example(
                id=f"{example.id}/caption",
                task="caption",
                request=Request(example.request.pixels, [Turn("", example.reference)]),
                image=example.image,
                modality=example.modality,
                reference=example.reference,
            )
    return list(captions.values())


# What a collated batch carries for the losses beside `model.forward`'s own arguments.
LOSS_ONLY_KEYS = ("examples", "pair_keys")


class Collator:
    """A list of examples -> the keyword arguments of `model.forward`, plus the grounding targets."""

    def __init__(self, processor: MedPLIBProcessor) -> None:
        self.processor = processor

    def __call__(self, examples: Sequence[Example], *, train: bool = True) -> dict:
        if train:
            batch = self.processor([example.request for example in examples], padding_side="right")
        else:
            batch = self.processor([example.question_only() for example in examples], padding_side="left")
        # What each sample is, for losses that depend on it: stage IV's routing targets, the heads' targets.
        batch["examples"] = list(examples)
        # (image, structure) of each grounding request, for losses that compare requests on one image.
        batch["pair_keys"] = [
            (example.image, example.structure or "") if example.targets else None for example in examples
        ]
        batch["mask_targets"] = [
            torch.from_numpy(np.stack(example.targets)) if example.targets else None for example in examples
        ]
        return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors, those in lists too (`region_masks`), on `device`."""

    def move(value):
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {key: move(value) for key, value in batch.items()}
