"""MedPLIB's released checkpoint format (`MedPLIB-7b-2e`): recognise it, describe it, map its keys.

The release is one folder saved by transformers 4.31: `config.json` (`model_type`
`medplib_moe_llama`, a `moe` dict), `pytorch_model-*.bin` shards with `pytorch_model.bin.index.json`,
or `*.safetensors` shards without an index. Every part of the model is in it under MedPLIB's names;
`RELEASE_KEY_RULES` is the one table that renames them to this model's state-dict keys.

Nothing here loads tensor data: shapes come from the safetensors headers or the `.bin` pickles
opened with `torch.load(mmap=True, weights_only=True)`, which reads metadata and maps the bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medplib.core.errors import CheckpointError

RELEASE_MODEL_TYPE = "medplib_moe_llama"
BIN_INDEX = "pytorch_model.bin.index.json"
_LAYER = r"model\.layers\.(\d+)\."
# (MedPLIB key pattern, this model's key; None drops the key). Each source key must match exactly one.
RELEASE_KEY_RULES: tuple[tuple[str, str | None], ...] = (
    (r"model\.embed_tokens\.weight", "language_model.model.embed_tokens.weight"),
    (r"lm_head\.weight", "language_model.lm_head.weight"),
    (r"model\.norm\.weight", "language_model.model.norm.weight"),
    (_LAYER + r"self_attn\.rotary_emb\.inv_freq", None),  # a 4.31 buffer, recomputed from the config
    (_LAYER + r"mlp\.deepspeed_moe\.gate\.wg\.weight", r"language_model.model.layers.\1.mlp.router.weight"),
    (
        _LAYER
        + r"mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight",
        r"language_model.model.layers.\1.mlp.experts.\2.\3.weight",
    ),
    (
        _LAYER
        + r"(self_attn\.[qkvo]_proj|input_layernorm|post_attention_layernorm|mlp\.(?:gate|up|down)_proj)"
        r"\.weight",
        r"language_model.model.layers.\1.\2.weight",
    ),
    (r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"vision_tower.\1"),
    (r"model\.mm_projector\.0\.(weight|bias)", r"projector.linear_1.\1"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"projector.linear_2.\1"),
    (r"model\.region_fea_adapter\.(weight|bias)", r"region_encoder.adapter.\1"),
    (r"model\.text_hidden_fcs\.0\.0\.(weight|bias)", r"seg_head.fc1.\1"),
    (r"model\.text_hidden_fcs\.0\.2\.(weight|bias)", r"seg_head.fc2.\1"),
    (r"model\.visual_model\.((?:image_encoder|prompt_encoder|mask_decoder)\..+)", r"sam.\1"),
)
_COMPILED = tuple((re.compile(pattern), target) for pattern, target in RELEASE_KEY_RULES)


def release_key(name: str) -> str | None:
    """This model's key for a MedPLIB key (None: dropped); CheckpointError naming a key no rule maps."""
    for pattern, target in _COMPILED:
        match = pattern.fullmatch(name)
        if match:
            return None if target is None else match.expand(target)
    raise CheckpointError(f"MedPLIB checkpoint key {name!r} is not mapped by any conversion rule")


def read_release_config(folder: str | Path) -> dict | None:
    """The folder's config.json if it is MedPLIB's released format, else None."""
    path = Path(folder, "config.json")
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if is_release_config(config) else None


def is_release_config(config: dict) -> bool:
    """Whether a config.json (as a dict) is that of MedPLIB's released checkpoint."""
    if config.get("model_type") == RELEASE_MODEL_TYPE:
        return True
    return "MedPLIBForCausalLM" in (config.get("architectures") or []) and "moe" in config


def convert_hint(folder: object) -> str:
    return (
        f"{folder} is MedPLIB's released checkpoint, not a medplib one: convert it once with "
        f"`medplib convert medplib {folder} OUT`, then load OUT"
    )


@dataclass
class ReleaseCheckpoint:
    """A MedPLIB release folder: its config and, per shard file, the keys that file holds."""

    folder: Path
    config: dict
    shards: dict[str, list[str]] = field(default_factory=dict)  # file name -> keys in it, in order
    kind: str = "bin"  # "bin" (index + .bin shards) or "safetensors" (shards found by glob)

    @classmethod
    def open(cls, folder: str | Path) -> ReleaseCheckpoint:
        folder = Path(folder).expanduser()
        config = read_release_config(folder)
        if config is None:
            raise CheckpointError(
                f"{folder}: no config.json of MedPLIB's release (model_type {RELEASE_MODEL_TYPE!r})"
            )
        if not isinstance(config.get("moe"), dict):
            raise CheckpointError(f"{folder}: config.json has no `moe` dict; not a MedPLIB MoE release")
        checkpoint = cls(folder, config)
        index = folder / BIN_INDEX
        safetensors = sorted(folder.glob("*.safetensors"))
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({exc})") from None
            for key, shard in weight_map.items():
                checkpoint.shards.setdefault(shard, []).append(key)
            missing = [shard for shard in checkpoint.shards if not (folder / shard).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shards named by {BIN_INDEX} are missing: {missing}")
        elif safetensors:
            from safetensors import safe_open

            checkpoint.kind = "safetensors"
            for path in safetensors:
                with safe_open(str(path), framework="pt") as handle:
                    checkpoint.shards[path.name] = list(handle.keys())
        elif (folder / "pytorch_model.bin").is_file():
            checkpoint.shards["pytorch_model.bin"] = list(checkpoint.read_shard("pytorch_model.bin"))
        else:
            raise CheckpointError(f"{folder}: no {BIN_INDEX}, no *.safetensors and no pytorch_model.bin")
        return checkpoint

    @property
    def keys(self) -> list[str]:
        return [key for keys in self.shards.values() for key in keys]

    def read_shard(self, name: str) -> Mapping[str, torch.Tensor]:
        """One shard's tensors, lazily: a `.bin` memory-mapped (bytes read when a tensor is used), a
        safetensors shard one tensor per lookup."""
        path = self.folder / name
        try:
            if name.endswith(".safetensors"):
                return SafetensorsShard(path)
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{path}: unreadable shard ({exc})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: a shard must be a plain dict of tensors")
        return state

    def iter_shards(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for name in self.shards:
            yield name, self.read_shard(name)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor's shape and dtype, without reading tensor data."""
        found = {}
        for _, state in self.iter_shards():
            if isinstance(state, SafetensorsShard):
                found.update(state.shapes())
            else:
                found.update({key: (tuple(value.shape), value.dtype) for key, value in state.items()})
        return found

    # ---- what the moe dict declares -----------------------------------------------------------------

    def routed_experts(self) -> dict:
        """The `routed_experts` record of the converted config, read from the `moe` dict (never assumed)."""
        moe, layers_total = self.config["moe"], self.config["num_hidden_layers"]
        if not moe.get("moe_enable", True):
            raise CheckpointError(f"{self.folder}: moe_enable is false; a MoE-less MedPLIB is not supported")
        if moe.get("use_residual"):
            raise CheckpointError(
                f"{self.folder}: use_residual MoE (a shared MLP beside the experts) is not supported"
            )
        layers = list(moe.get("moe_layers_idx") or range(layers_total))
        counts = moe["num_experts"]
        counts = counts if isinstance(counts, list) else [counts] * len(layers)
        if len(set(counts)) != 1 or len(counts) != len(layers):
            raise CheckpointError(f"{self.folder}: num_experts {counts} must name one count per routed layer")
        top_k = int(moe.get("top_k_experts", 1))
        capacity = float(moe.get("eval_capacity_factor", 1.0))
        if capacity * top_k < counts[0]:
            raise CheckpointError(
                f"{self.folder}: eval_capacity_factor {capacity} drops tokens at inference (DeepSpeed drops "
                "them at random); only capacities that never drop are reproduced"
            )
        return {
            "kind": "dense",
            "layers": layers,
            "num_experts": counts[0],
            "top_k": top_k,
            # MedPLIB's initialize_moe_modules puts the stage III (grounding) model first.
            "names": ["pixel_grounding", "vision_language", *[f"expert_{i}" for i in range(2, counts[0])]],
            "eval_capacity_factor": capacity,
        }


class SafetensorsShard(Mapping):
    """A safetensors file as a read-only mapping that reads one tensor per lookup."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as handle:
            self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        from safetensors import safe_open

        dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}
        with safe_open(str(self.path), framework="pt") as handle:
            return {
                key: (tuple(handle.get_slice(key).get_shape()), dtypes.get(handle.get_slice(key).get_dtype()))
                for key in self._keys
            }


# ---- the converted config ---------------------------------------------------------------------------

# OpenAI CLIP ViT-L/14 at 336 px, MedPLIB's tower, for a release whose tower folder is not at hand.
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
SAM_MED2D_DECODER_HEADS = 8  # MedPLIB's build_sam_vit_b; shapes do not record it
SAM_PREFIX = "model.visual_model."
CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."


def _count(shapes: dict, pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({m[1] for key in shapes if (m := compiled.fullmatch(key))})


def sam_config_from_shapes(shapes: dict, decoder_heads: int = SAM_MED2D_DECODER_HEADS) -> dict:
    """SAM-Med2D's geometry from its weights' shapes (MedPLIB does not record it in config.json)."""
    encoder, decoder = SAM_PREFIX + "image_encoder.", SAM_PREFIX + "mask_decoder."
    try:
        embed_dim, _, patch, _ = shapes[encoder + "patch_embed.proj.weight"][0]
        grid = shapes[encoder + "pos_embed"][0][1]
        depth = _count(shapes, re.escape(encoder) + r"blocks\.(\d+)\..+")
        rel_rows = [shapes[f"{encoder}blocks.{b}.attn.rel_pos_h"][0] for b in range(depth)]
        head_dim = rel_rows[0][1]
        windowed = [rows for rows, _ in rel_rows if rows != 2 * grid - 1]
        adapter = shapes.get(f"{encoder}blocks.0.Adapter.channel.0.weight")
        return {
            "image_size": grid * patch,
            "patch_size": patch,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": embed_dim // head_dim,
            "mlp_ratio": shapes[f"{encoder}blocks.0.mlp.lin1.weight"][0][0] / embed_dim,
            "global_attn_indexes": [b for b, (rows, _) in enumerate(rel_rows) if rows == 2 * grid - 1],
            "window_size": (windowed[0] + 1) // 2 if windowed else 0,
            "use_rel_pos": True,
            "prompt_embed_dim": shapes[encoder + "neck.0.weight"][0][0],
            "mask_in_chans": shapes[SAM_PREFIX + "prompt_encoder.mask_downscaling.3.weight"][0][0],
            "decoder_depth": _count(shapes, re.escape(decoder) + r"transformer\.layers\.(\d+)\..+"),
            "decoder_mlp_dim": shapes[decoder + "transformer.layers.0.mlp.lin1.weight"][0][0],
            "decoder_num_heads": decoder_heads,
            "num_multimask_outputs": shapes[decoder + "mask_tokens.weight"][0][0] - 1,
            "iou_head_depth": _count(shapes, re.escape(decoder) + r"iou_prediction_head\.layers\.(\d+)\..+"),
            "iou_head_hidden_dim": shapes[decoder + "iou_prediction_head.layers.0.weight"][0][0],
            "adapter_hidden_dim": adapter[0][0] if adapter else 0,
            "mask_postprocess": "medplib",
        }
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"the checkpoint's SAM-Med2D weights are incomplete: no {exc}") from None


def vision_config_from(release: ReleaseCheckpoint, shapes: dict, tower: str | Path | None) -> dict:
    """The CLIP tower's config: from its folder (`tower`, else the config's `mm_vision_tower` resolved
    against the checkpoint folder), or OpenAI CLIP-L/14-336 when the weights have exactly its shape."""
    named = tower or release.config.get("mm_vision_tower") or release.config.get("vision_tower")
    for candidate in [Path(named).expanduser(), release.folder / named] if named else []:
        if (candidate / "config.json").is_file():
            config = json.loads((candidate / "config.json").read_text())
            config = config.get("vision_config", config)
            return {
                k: v
                for k, v in config.items()
                if k not in ("architectures", "model_type", "transformers_version")
            }
    width, _, patch, _ = shapes[CLIP_PREFIX + "embeddings.patch_embedding.weight"][0]
    positions = shapes[CLIP_PREFIX + "embeddings.position_embedding.weight"][0][0]
    layers = _count(shapes, re.escape(CLIP_PREFIX) + r"encoder\.layers\.(\d+)\..+")
    expected = CLIP_L_336
    if (width, patch, layers, positions) != (1024, 14, 24, (336 // 14) ** 2 + 1):
        raise CheckpointError(
            f"the CLIP tower {named!r} is not a folder here and its weights are not CLIP ViT-L/14-336: "
            "pass the tower's folder (--vision-tower)"
        )
    return dict(expected)


def text_config_from(release: ReleaseCheckpoint, vocab_size: int) -> dict:
    """LLaMA's config from MedPLIB's (4.31 fields), with the vocabulary grown by the placeholder tokens."""
    source = release.config
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "hidden_act",
    )
    config = {name: source[name] for name in fields}
    config |= {
        "vocab_size": vocab_size,
        "num_key_value_heads": source.get("num_key_value_heads", source["num_attention_heads"]),
        "rope_theta": source.get("rope_theta", 10000.0),
        "rope_scaling": source.get("rope_scaling"),
        "bos_token_id": source.get("bos_token_id", 1),
        "eos_token_id": source.get("eos_token_id", 2),
        "pad_token_id": source.get("pad_token_id") or 0,
        "tie_word_embeddings": bool(source.get("tie_word_embeddings", False)),
        "attention_bias": False,
        "mlp_bias": False,
    }
    return config
