"""Model presets: one registry dict and one builder, as segment-anything's `sam_model_registry`.

- `tiny`: random init, trains on 2 CPU cores in minutes (CLIP 112 px / 14, LLaMA 256 wide, SAM at
  128 px with patch 8, so a 16x16 embedding grid and 64x64 low-res masks).
- `small`: a few times larger, for benchmarks.
- `medplib-7b`: the paper's dimensions: CLIP ViT-L/14-336, LLaMA-7B (Vicuna-7B v1.5) with LLaVA's
  32000 tokens plus `<pad>` and the control tokens, SAM ViT-B at 256 px. Build it on the meta device
  to count parameters; real weights come from `loading.load_llava_and_sam`.

`tiny` and `small` use the tokenizer trained on the project's corpus (`tiny_tokenizer`); the
7B preset's ids are LLaVA-1.5's (`<image>` 32000, `<pad>` 32001, then the other control tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from medplib.core.errors import InvalidInputError
from medplib.core.model.configuration_medplib import MedPLIBConfig
from medplib.core.model.modeling_medplib import MedPLIBForCausalLM
from medplib.core.model.tokenizer import ControlToken, add_control_tokens, tiny_tokenizer
from medplib.core.model.word_vectors import init_from_word_vectors

LLAVA_VOCAB_SIZE = 32000

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "tokenizer": "trained",
        # trained from scratch: see MedPLIBConfig
        "config": {"visual_token_norm": True, "seg_dense_film": True},
        "vision_config": {
            "image_size": 112,
            "patch_size": 14,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
        },
        "text_config": {
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
        },
        "sam_config": {
            "image_size": 128,
            "patch_size": 8,
            "embed_dim": 96,
            "depth": 2,
            "num_heads": 3,
            "global_attn_indexes": [1],
            "window_size": 8,
            "prompt_embed_dim": 128,
            "decoder_mlp_dim": 512,
            "decoder_num_heads": 4,
            "iou_head_hidden_dim": 128,
        },
    },
    "small": {
        "tokenizer": "trained",
        "config": {"visual_token_norm": True, "seg_dense_film": True},
        "vision_config": {
            "image_size": 224,
            "patch_size": 16,
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
        },
        "text_config": {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "max_position_embeddings": 2048,
        },
        "sam_config": {
            "image_size": 256,
            "patch_size": 16,
            "embed_dim": 256,
            "depth": 4,
            "num_heads": 4,
            "global_attn_indexes": [1, 3],
            "window_size": 8,
        },
    },
    "medplib-7b": {
        "tokenizer": "llava",
        "vision_config": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "projection_dim": 768,
        },
        "text_config": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
        "sam_config": {"image_size": 256},  # ViT-B otherwise, as MedPLIB (SAM-Med2D geometry)
    },
}


def _llava_token_ids() -> tuple[dict[str, int], int]:
    """Config ids and vocab size of a LLaVA-1.5 tokenizer after `add_control_tokens`."""
    ids = {ControlToken.IMAGE.config_field: LLAVA_VOCAB_SIZE}  # LLaVA's own <image>; <pad> follows it
    others = [token for token in ControlToken if token is not ControlToken.IMAGE]
    ids |= {token.config_field: LLAVA_VOCAB_SIZE + 2 + n for n, token in enumerate(others)}
    return ids, LLAVA_VOCAB_SIZE + 2 + len(others)


def _spec(preset: str) -> dict[str, Any]:
    if preset not in MODEL_PRESETS:
        raise InvalidInputError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[preset]


def preset_tokenizer(preset: str) -> PreTrainedTokenizerFast | None:
    """The trained tokenizer for `tiny` and `small`; None for presets whose tokenizer is a checkpoint's."""
    return tiny_tokenizer() if _spec(preset)["tokenizer"] == "trained" else None


# The config options of the committed tiny pipeline run (benchmarks/results/pipeline.json, the README's
# Results), which `make demo` trains too; no preset sets them (docs/model.md says what each does).
TINY_RECIPE_OPTIONS: dict[str, Any] = {
    "image_feature_standardize": True,
    "word_vectors": "glove-6b-50d",
    "word_vector_share": 0.5,
    "region_appearance": True,
    "region_location_norm": True,
    "seg_read_build_rows": True,
}


def check_options(options: dict[str, Any]) -> None:
    """Refuse config options that name no field of `MedPLIBConfig` or give a switch a non-boolean."""
    unknown = sorted(name for name in options if not hasattr(MedPLIBConfig, name))
    if unknown:
        raise InvalidInputError(f"unknown config options {unknown}")
    for name, value in options.items():
        if isinstance(getattr(MedPLIBConfig, name), bool) and not isinstance(value, bool):
            raise InvalidInputError(f"config option {name} is true or false, got {value!r}")


def build_config(
    preset: str, tokenizer: PreTrainedTokenizerFast | None = None, options: dict[str, Any] | None = None
) -> MedPLIBConfig:
    """The preset's config, its token ids and vocab size from `tokenizer` (default: the preset's).

    Without a tokenizer, a `llava` preset takes LLaVA-1.5's ids and LLaMA's BOS/EOS (1, 2). `options`
    change top-level config fields from the preset's, e.g. `{"word_vectors": "glove-6b-50d"}`.
    """
    spec = _spec(preset)
    options = options or {}
    check_options(options)
    tokenizer = tokenizer if tokenizer is not None else preset_tokenizer(preset)
    if tokenizer is not None:
        ids, vocab_size = add_control_tokens(tokenizer), len(tokenizer)
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    else:
        ids, vocab_size = _llava_token_ids()
        special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": LLAVA_VOCAB_SIZE + 1}
    text_config = {**spec["text_config"], "vocab_size": vocab_size, **special}
    try:
        return MedPLIBConfig(
            vision_config=dict(spec["vision_config"]),
            text_config=text_config,
            sam_config=dict(spec["sam_config"]),
            **{**spec.get("config", {}), **options},
            **ids,
        )
    except ValueError as exc:  # a config check refused an option's value
        raise InvalidInputError(f"config options for preset {preset!r}: {exc}") from None


def build_medplib(
    preset: str = "tiny",
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    device: str | torch.device | None = None,
    options: dict[str, Any] | None = None,
) -> MedPLIBForCausalLM:
    """A randomly initialised model of `preset`, with its tokenizer attached.

    `tiny` and `small` train their tokenizer when none is given; `medplib-7b` takes a checkpoint's
    tokenizer or, without one, LLaVA-1.5's ids (enough on `device="meta"` to count parameters).
    `options` change config fields from the preset's (`build_config`); with `word_vectors` the word
    pieces' input embeddings start from those vectors (`word_vectors.py`).
    """
    tokenizer = tokenizer if tokenizer is not None else preset_tokenizer(preset)
    config = build_config(preset, tokenizer, options)
    with torch.device(device or "cpu"):
        model = MedPLIBForCausalLM(config)
    if config.word_vectors is not None and str(device) != "meta":
        embedding = model.get_input_embeddings()
        init_from_word_vectors(embedding, tokenizer, config.word_vectors, config.word_vector_share)
    if config.seg_read_build_rows and str(device) != "meta":
        with torch.no_grad():
            model.build_word_rows.copy_(model.get_input_embeddings().weight)
    model.tokenizer = tokenizer
    return model
