"""Real weights: a Hugging Face LLaVA-1.5 folder (CLIP tower, projector, LLM, tokenizer) plus SAM.

The weight surgery, spelled out:

- LLaVA keys come in two spellings, transformers 4's (`language_model.model.…`,
  `vision_tower.vision_model.…`, as on the Hub) and transformers 5's (`model.language_model.…`,
  `vision_tower.…`); both map to this model's `language_model.model.…`, `vision_tower.…`,
  `projector.…` (from `multi_modal_projector.…`).
- The control tokens are added to LLaVA's tokenizer (its `<image>` is reused); should the vocabulary
  outgrow the embedding matrix, the new rows of `embed_tokens` and `lm_head` start at the mean row.
- SAM's state dict (`image_encoder.`, `prompt_encoder.`, `mask_decoder.`) goes under `sam.`. A
  checkpoint made for a larger input (1024 px) is fitted to the configured one (256 px) as SAM-Med2D
  does: the absolute position embedding is resized bilinearly to the new grid, and the relative
  position tables of the global-attention blocks are resized bilinearly along their length.
- The region encoder and the `<SEG>` head are new in MedPLIB and start from their initialisation;
  every other weight must come from the checkpoints, or loading fails listing the keys.

Files are read as safetensors, or as `.pth` with `torch.load(weights_only=True)`: never pickle.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from transformers import LlavaConfig, PreTrainedTokenizerFast

from medplib.core.errors import CheckpointError
from medplib.core.model.configuration_medplib import MedPLIBConfig, MedPLIBSamConfig
from medplib.core.model.modeling_medplib import MedPLIBForCausalLM
from medplib.core.model.presets import MODEL_PRESETS
from medplib.core.model.storage import local_folder, read_bytes
from medplib.core.model.tokenizer import add_control_tokens
from medplib.core.plugins import require_experts

# (pattern, replacement) applied in order; the first that matches wins.
LLAVA_KEY_RULES = (
    (r"^(?:model\.)?(?:language_model\.)?lm_head\.", "language_model.lm_head."),
    (r"^language_model\.model\.", "language_model.model."),
    (r"^(?:model\.)?language_model\.", "language_model.model."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
)


def llava_key(name: str) -> str:
    """This model's name for a LLaVA checkpoint key (unknown keys stay as they are, and are reported)."""
    for pattern, replacement in LLAVA_KEY_RULES:
        renamed, hits = re.subn(pattern, replacement, name, count=1)
        if hits:
            return renamed
    return name


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's `model.safetensors`, or of the shards its index names."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise CheckpointError(f"{folder}: no model.safetensors (other weight formats are not read)")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: unreadable LLaVA weights ({exc})") from None


def read_llava(
    location: str | os.PathLike[str],
) -> tuple[LlavaConfig, PreTrainedTokenizerFast, dict[str, torch.Tensor]]:
    """Config, tokenizer and renamed weights of a LLaVA-1.5 folder (path or fsspec URI)."""
    from transformers import AutoConfig, AutoTokenizer

    with local_folder(location) as folder:
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{location}: not a LLaVA checkpoint folder ({exc})") from None
        if not isinstance(config, LlavaConfig):
            raise CheckpointError(f"{location}: a {config.model_type!r} checkpoint, not a LLaVA one")
        state = {llava_key(name): tensor for name, tensor in read_safetensors_folder(folder).items()}
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise CheckpointError(
            f"{location}: expected a fast tokenizer (tokenizer.json), got {type(tokenizer).__name__}"
        )
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        raise CheckpointError(
            f"{location}: only LLaVA-1.5's feature selection (one layer, CLS dropped) is supported"
        )
    return config, tokenizer, state


def read_sam_state_dict(location: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A SAM state dict from `.safetensors` or `.pth` (weights only); a `{"model": …}` wrapper is opened."""
    data = read_bytes(location)
    try:
        if os.fspath(location).endswith(".safetensors"):
            state: Any = load_safetensors_bytes(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        raise CheckpointError(f"{location}: unreadable SAM checkpoint ({exc})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{location}: a SAM checkpoint must hold a state dict of tensors")
    return state


def fit_sam_state_dict(state: dict[str, torch.Tensor], config: MedPLIBSamConfig) -> dict[str, torch.Tensor]:
    """Resize the position embeddings of a SAM made for another input size to `config`'s shapes."""
    (grounding,) = require_experts(["pixel_grounding"])  # SAM is the grounding expert's, built by its spec
    with torch.device("meta"):
        sam = grounding.build_head(MedPLIBConfig(sam_config=config.to_dict())).sam
        shapes = {key: value.shape for key, value in sam.state_dict().items()}
    fitted = {}
    for key, value in state.items():
        target = shapes.get(key)
        if target is not None and value.shape != target:
            if key == "image_encoder.pos_embed":  # (1, grid, grid, C)
                resized = F.interpolate(
                    value.permute(0, 3, 1, 2).float(), target[1:3], mode="bilinear", align_corners=False
                )
                value = resized.permute(0, 2, 3, 1).to(value.dtype)
            elif re.fullmatch(r"image_encoder\.blocks\.\d+\.attn\.rel_pos_[hw]", key):  # (2 * size - 1, C)
                resized = F.interpolate(
                    value[None, None].float(), tuple(target), mode="bilinear", align_corners=False
                )
                value = resized[0, 0].to(value.dtype)
        fitted[key] = value
    return fitted


def _grow_vocabulary(state: dict[str, torch.Tensor], vocab_size: int) -> None:
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        rows = state.get(key)
        if rows is not None and len(rows) < vocab_size:
            extra = rows.float().mean(dim=0, keepdim=True).expand(vocab_size - len(rows), -1).to(rows.dtype)
            state[key] = torch.cat([rows, extra])


def load_llava_and_sam(
    llava: str | os.PathLike[str],
    sam: str | os.PathLike[str],
    *,
    sam_config: MedPLIBSamConfig | dict | None = None,
    region_max_cells: int = 512,
    dtype: torch.dtype | None = None,
) -> MedPLIBForCausalLM:
    """MedPLIB from a LLaVA-1.5 folder and a SAM checkpoint (paths or fsspec URIs).

    `sam_config` defaults to the `medplib-7b` preset's (ViT-B at 256 px); it must describe the SAM
    checkpoint's architecture, the input size aside.
    """
    llava_config, tokenizer, state = read_llava(llava)
    ids = add_control_tokens(tokenizer)
    text_config = llava_config.text_config.to_dict()
    vocab_size = max(len(tokenizer), text_config["vocab_size"])
    text_config |= {
        "vocab_size": vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = MedPLIBConfig(
        vision_config=llava_config.vision_config.to_dict(),
        text_config=text_config,
        sam_config=sam_config if sam_config is not None else dict(MODEL_PRESETS["medplib-7b"]["sam_config"]),
        vision_feature_layer=llava_config.vision_feature_layer,
        region_max_cells=region_max_cells,
        **ids,
    )
    _grow_vocabulary(state, vocab_size)
    sam_state = fit_sam_state_dict(read_sam_state_dict(sam), config.sam_config)
    state |= {f"sam.{key}": value for key, value in sam_state.items()}
    model = MedPLIBForCausalLM.from_state_dict(
        config, state, fresh=("region_encoder", "seg_head"), dtype=dtype
    )
    model.tokenizer = tokenizer
    return model
