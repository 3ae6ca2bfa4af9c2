"""The `compat: medplib` rules against what MedPLIB's own code produced (tests/fixtures/medplib-original)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medplib.core.errors import RegionError
from medplib.core.model import compat
from medplib.core.model.configuration_medplib import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
)

FIXTURE = Path(__file__).parents[2] / "fixtures" / "medplib-original"
CASE = FIXTURE / "case-raw"
REFERENCE = json.loads((FIXTURE / "tokenizer-reference.json").read_text())


@pytest.fixture(scope="module")
def tokenization() -> compat.MedPLIBTokenization:
    added = json.loads((FIXTURE / "tokenizer" / "added_tokens.json").read_text())
    return compat.MedPLIBTokenization(
        FIXTURE / "tokenizer" / "tokenizer.model", added, {"<s>": 1, "</s>": 2, "<unk>": 0}
    )


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    return load_file(CASE / "reference.safetensors")


def _turns(case: dict) -> list[tuple[str, str | None]]:
    given = case["turns_as_given"]
    return [
        (question["value"], answer["value"]) for question, answer in zip(given[::2], given[1::2], strict=True)
    ]


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["name"])
def test_prompt_text_and_ids_equal_medplibs(tokenization, case):
    prompt = compat.medplib_prompt(_turns(case), image=case["has_image"])
    assert prompt == case["prompt"]
    assert tokenization.prompt_ids(prompt) == case["input_ids"]


def test_the_fast_tokenizer_alone_would_differ(tokenization):
    """The reason for the SentencePiece path: transformers 5 gives other ids for most prompts."""
    differing = [c["name"] for c in REFERENCE["cases"] if not c["transformers_5_fast"]["same_as_input_ids"]]
    assert len(differing) == 11


def test_clip_and_sam_inputs_equal_medplibs(case):
    pixels = np.asarray(Image.open(CASE / "image.png").convert("RGB"))
    clip = compat.preprocess_clip_image(pixels, image_size=56, mean=CLIP_IMAGE_MEAN, std=CLIP_IMAGE_STD)
    assert torch.allclose(clip, case["images_clip"][0], atol=1e-5)
    sam, size = compat.preprocess_sam_image(pixels, image_size=64, mean=SAM_PIXEL_MEAN, std=SAM_PIXEL_STD)
    assert size == (46, 64)
    assert torch.equal(sam, case["images"][0])  # centre padding: 9 rows above, 9 below


def test_region_grid_equals_medplibs(case):
    region = np.asarray(Image.open(CASE / "region.png").convert("L")) >= 1
    grid = compat.region_grid(region)
    assert torch.equal(grid, case["region_mask_grid"][0])
    with pytest.raises(RegionError, match="non-empty"):
        compat.region_grid(np.zeros_like(region))


def test_largest_component_keeps_one_8_connected_piece():
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # diagonal: one 8-connected piece of 3
    mask[4:6, 4:6] = 1  # a square of 4
    assert compat.largest_component(mask).sum() == 4
    mask[3, 3] = 1  # joins both diagonally: 8 cells
    assert compat.largest_component(mask).sum() == 8


def test_region_features_sample_every_cell_with_corners_aligned():
    feature_map = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    mask = torch.zeros(4, 4)
    mask[1, 2] = 1  # (row 1, col 2) of a 4x4 mask -> x = 2/4, y = 1/4 -> grid (-0, -0.5) with corners aligned
    value = compat.sample_region_features(feature_map, mask, max_points=512)
    # align_corners=True: x 0.0 -> column 1.5, y -0.5 -> row 0.75 of the 4x4 map
    expected = feature_map[:, 0:2, 1:3]
    weights = torch.tensor([[0.25 * 0.5, 0.25 * 0.5], [0.75 * 0.5, 0.75 * 0.5]])
    assert torch.allclose(value, (expected * weights).sum(dim=(1, 2)))


def test_mask_crop_is_medplibs_negative_slice(case):
    """resize (46, 64) on a 16x16 low-res mask keeps rows 1..15, all columns, then resizes to 50x70."""
    low_res = case["gen_low_res"][0]
    masks = compat.postprocess_masks(low_res, (46, 64), (50, 70))
    assert torch.equal(masks, case["gen_mask"])
    cropped = low_res[:, 1:, :]
    direct = torch.nn.functional.interpolate(cropped[:, None], (50, 70), mode="bilinear", align_corners=False)
    assert torch.equal(masks, direct[:, 0])
    assert not torch.allclose(compat.postprocess_masks(low_res, (64, 64), (50, 70)), masks)
