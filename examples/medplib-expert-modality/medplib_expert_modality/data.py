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
    seen: set[str] = set()
    for sample in json.loads(path.read_text()):
        image, modality = sample.get("image"), sample.get("modality")
        if not image or not modality or image in seen:
            continue
        seen.add(image)
        question = QUESTIONS[len(seen) % len(QUESTIONS)]
        yield {
            "id": f"modality/{sample['id']}",
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
