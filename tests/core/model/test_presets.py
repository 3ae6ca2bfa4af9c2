"""Presets: tiny and small build and run; medplib-7b has the paper's size, counted on the meta device.

Reference sizes (public): CLIP ViT-L/14-336 vision tower 303.5M; LLaMA-7B 6,738,415,616 (vocab 32000);
SAM ViT-B image encoder 89,670,912 at 1024 px; SAM ViT-B prompt encoder 6,220 + mask decoder
4,058,340. MedPLIB's own parts follow from the widths (1024 -> 4096 -> 256): the mlp2x_gelu projector,
the linear region adapter and the 2-layer `<SEG>` head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medplib.core.errors import InvalidInputError
from medplib.core.model import MODEL_PRESETS, build_config, build_medplib, tiny_tokenizer
from medplib.core.model.presets import TINY_RECIPE_OPTIONS, check_options

CLIP_L14_336 = 303_507_456
LLAMA_7B = 6_738_415_616
SAM_B_ENCODER_1024 = 89_670_912
SAM_B_PROMPT_ENCODER, SAM_B_MASK_DECODER = 6_220, 4_058_340
VISION, TEXT, PROMPT = 1024, 4096, 256


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


@pytest.fixture(scope="module")
def counts_7b() -> dict[str, int]:
    model = build_medplib("medplib-7b", device="meta")
    assert model.language_model.model.embed_tokens.weight.device.type == "meta"
    return model.parameter_counts()


def test_7b_total_is_within_two_percent_of_the_papers_components(counts_7b: dict[str, int]) -> None:
    heads = _linear(VISION, TEXT) + _linear(TEXT, TEXT)  # projector
    heads += _linear(VISION, TEXT)  # region adapter
    heads += _linear(TEXT, TEXT) + _linear(TEXT, PROMPT)  # <SEG> head
    reference = (
        CLIP_L14_336 + LLAMA_7B + SAM_B_ENCODER_1024 + SAM_B_PROMPT_ENCODER + SAM_B_MASK_DECODER + heads
    )
    assert abs(counts_7b["total"] - reference) / reference < 0.02
    assert counts_7b["total"] == sum(v for k, v in counts_7b.items() if k != "total")


def test_7b_components_match_their_public_sizes(counts_7b: dict[str, int]) -> None:
    assert counts_7b["vision_tower"] == CLIP_L14_336
    # LLaVA-1.5's vocabulary: 32000 + <pad> + 7 control tokens (its <image> included), input and output rows.
    assert counts_7b["language_model"] == LLAMA_7B + 8 * TEXT * 2
    assert counts_7b["projector"] == _linear(VISION, TEXT) + _linear(TEXT, TEXT)
    # The pooled features' adapter, and the map of the region's box and centroid (6 numbers).
    assert counts_7b["region_encoder"] == _linear(VISION, TEXT) + _linear(6, TEXT)
    assert counts_7b["seg_head"] == _linear(TEXT, TEXT) + _linear(TEXT, PROMPT)
    # At 256 px, the 64x64 absolute position embedding becomes 16x16 and the four global-attention
    # blocks' relative tables shrink from 127 to 31 rows (x 64 head dims, h and w).
    shrink = (64 * 64 - 16 * 16) * 768 + 4 * 2 * (127 - 31) * 64
    assert counts_7b["sam_image_encoder"] == SAM_B_ENCODER_1024 - shrink
    assert counts_7b["sam_prompt_encoder"] == SAM_B_PROMPT_ENCODER
    assert counts_7b["sam_mask_decoder"] == SAM_B_MASK_DECODER


def test_7b_config_uses_llava_ids() -> None:
    config = build_config("medplib-7b")
    assert config.image_token_id == 32000 and config.text_config.pad_token_id == 32001
    assert sorted(config.control_token_ids.values()) == [32000, *range(32002, 32008)]
    assert config.num_image_tokens == 576 and config.sam_config.embedding_size == 16


def test_tiny_config_takes_the_trained_tokenizer() -> None:
    config, tokenizer = build_config("tiny"), tiny_tokenizer()
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.seg_token_id == tokenizer.convert_tokens_to_ids("<SEG>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id


def test_small_is_a_few_times_larger_than_tiny() -> None:
    tiny, small = build_medplib("tiny", device="meta"), build_medplib("small", device="meta")
    assert 4 * tiny.parameter_counts()["total"] < small.parameter_counts()["total"]
    assert small.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="tiny"):
        build_medplib("huge")


def test_presets_name_only_real_config_fields() -> None:
    for name in MODEL_PRESETS:
        config = build_config(name)
        for section in ("vision_config", "text_config", "sam_config"):
            sub = getattr(config, section)
            for key, value in MODEL_PRESETS[name][section].items():  # a typo would be silently kept
                assert getattr(sub, key) == value, (name, section, key)


def test_tiny_is_small_enough_for_cpu_training() -> None:
    torch.manual_seed(0)
    counts = build_medplib("tiny").parameter_counts()
    assert counts["total"] < 6_000_000


def test_the_recipe_options_are_the_committed_runs_and_real_options() -> None:
    """`make demo` trains with `TINY_RECIPE_OPTIONS`; they must be the options the committed pipeline
    report was trained with, and each a config option `check_options` accepts."""
    check_options(TINY_RECIPE_OPTIONS)
    report = Path(__file__).parents[3] / "benchmarks" / "results" / "pipeline.json"
    seeds = json.loads(report.read_text(encoding="utf-8"))["per_seed"]
    assert seeds and all(seed["setup"]["config_options"] == TINY_RECIPE_OPTIONS for seed in seeds.values())
