"""The modality expert's dataset: one `<MOD>` question per image of a medplib dataset split.

`modality_records(root, split)` reads `root/<split>.json` (MeCoVQA, as `medplib data build` writes)
and yields, for each image with a known modality, one record whose answer starts with `<MOD>`: the
head learns the modality from the hidden state that predicts `<MOD>`, the LM learns to say it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

# Its own wordings (the dataset's modality questions are answered in words, without <MOD>).
QUESTIONS = (
    "Classify the imaging modality of this image.",
    "Classify the modality of this scan.",
    "Run the modality classifier on this image.",
)


def modality_records(root: str | Path, split: str) -> Iterator[dict]:
    path = Path(root) / f"{split}.json"
    if not path.is_file():
        return
    for number, (sample, image, modality) in enumerate(images_with_modality(path), start=1):
        question = QUESTIONS[number % len(QUESTIONS)]
        yield modality_record(f"modality/{sample['id']}", image, modality, question, split)


def images_with_modality(path: Path) -> Iterator[tuple[dict, str, str]]:
    """(sample, image, modality) for the first sample of each image with a known modality in the
    MeCoVQA split file `path`."""
    seen: set[str] = set()
    for sample in json.loads(path.read_text()):
        image, modality = sample.get("image"), sample.get("modality")
        if image and modality and image not in seen:
            seen.add(image)
            yield sample, image, modality


def modality_record(record_id: str, image: str, modality: str, question: str, split: str) -> dict:
    """One MeCoVQA record asking `question` about `image`, answered `<MOD> modality.`."""
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": f"<MOD> {modality}."},
        ],
        "answer_type": "closed",
        "split": split,
        "part": "C",
        "modality": modality,
        "question_kind": "modality",
    }
