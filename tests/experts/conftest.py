"""Every expert test runs torch on one thread; the example plugin's fixtures (`example_plugin`,
`example_module`) live in tests/conftest.py, shared with the serving and agents tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _tiny_tensors_on_one_thread(one_torch_thread: None) -> None:
    """Every expert test runs torch on one thread (see `one_torch_thread`)."""


MODALITIES = ["MRI", "CT", "X-ray"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six images of three modalities, each with a modality question, as `medplib data build` writes."""
    root = tmp_path_factory.mktemp("modality-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    samples = []
    for index in range(6):
        modality = MODALITIES[index % 3]
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) // (1 + index % 3)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        samples.append(
            {
                "id": f"s{index}",
                "image": f"images/{index}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat modality is this scan?"},
                    {"from": "gpt", "value": modality},
                ],
                "answer_type": "closed",
                "split": "train",
                "part": "C",
                "modality": modality,
                "question_kind": "modality",
            }
        )
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps([{**s, "split": split} for s in samples]))
    return root
