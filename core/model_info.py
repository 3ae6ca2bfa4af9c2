"""What a model is made of, without loading its weights: components and their parameter counts,
special tokens and their ids, a summary of the config, and the registered experts (`medplib info`;
`medplib.loading.model_info` reads them from any form of model it recognises).

A preset builds on the meta device (no memory, no time: `medplib-7b` counts its 7 billion parameters
in a second); a checkpoint folder or URI is read for its config and tokenizer only.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, Field

Weights = Literal[
    "random (seeded)", "none (meta device)", "checkpoint", "MedPLIB release (convert it before loading)"
]


class ExpertSummary(BaseModel):
    name: str
    capabilities: list[str]
    special_tokens: list[str]
    adapter: str = Field(description="LoRA rank, alpha and target projections")
    source: str


class ModelInfo(BaseModel):
    model: str
    weights: Weights
    parameters: dict[str, int] = Field(description="per component, and 'total'")
    weights_dtype: str = Field("float32", description="dtype of the weights `bytes` counts")
    quantization: str | None = Field(None, description="int8 / int4 of the LLM's linear layers, or none")
    bytes: dict[str, int] = Field(default_factory=dict, description="weights per component, and 'total'")
    special_tokens: dict[str, int] = Field(description="token text -> id")
    config: dict[str, dict[str, Any]]
    experts: list[ExpertSummary]
    routed_experts: dict[str, Any] | None = Field(
        None,
        description="experts stored in the checkpoint's routed MLPs (a MedPLIB release or its conversion)",
    )


def release_info(source: str, folder: str | os.PathLike[str], experts: list) -> ModelInfo:
    """`medplib info` of an unconverted release: its config and parameters per component, from shapes."""
    from medplib.core.model.medplib_release import ReleaseCheckpoint, release_key
    from medplib.core.model.modeling_medplib import COMPONENTS

    release = ReleaseCheckpoint.open(folder)
    parameters = dict.fromkeys(COMPONENTS, 0)
    prefixes = sorted(((path + ".", name) for name, path in COMPONENTS.items()), key=lambda p: -len(p[0]))
    experts_total = 0
    for key, (shape, _) in release.shapes().items():
        target = release_key(key)
        if target is None:
            continue
        count = 1
        for size in shape:
            count *= size
        parameters[next(name for prefix, name in prefixes if target.startswith(prefix))] += count
        experts_total += count if ".mlp.experts." in target else 0
    parameters["total"] = sum(parameters.values())
    source_config, moe = release.config, release.routed_experts()
    return ModelInfo(
        model=source,
        weights="MedPLIB release (convert it before loading)",
        parameters=parameters,
        special_tokens={},
        config={
            "language": {
                key: source_config.get(key)
                for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
            },
            "vision": {
                "tower": source_config.get("mm_vision_tower"),
                "feature_layer": source_config.get("mm_vision_select_layer"),
            },
            "format": {"kind": release.kind, "shards": len(release.shards), "keys": len(release.keys)},
        },
        experts=experts,
        routed_experts=moe | {"parameters": experts_total},
    )


def special_tokens(config: Any, tokenizer: Any | None) -> dict[str, int]:
    """BOS, EOS, PAD and the control tokens by their text, from the config's ids."""
    from medplib.core.model import ControlToken

    text = config.text_config
    names = {text.bos_token_id: "<s>", text.eos_token_id: "</s>", text.pad_token_id: "<pad>"}
    if tokenizer is not None:
        names = {i: tokenizer.convert_ids_to_tokens(i) for i in names if i is not None}
    tokens = {name: i for i, name in names.items() if i is not None}
    return tokens | {token.value: getattr(config, token.config_field) for token in ControlToken}


def config_summary(config: Any) -> dict[str, dict[str, Any]]:
    vision, text, sam = config.vision_config, config.text_config, config.sam_config
    return {
        "vision": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_size": vision.hidden_size,
            "layers": vision.num_hidden_layers,
            "image_tokens": config.num_image_tokens,
            "feature_layer": config.vision_feature_layer,
        },
        "language": {
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "layers": text.num_hidden_layers,
            "heads": text.num_attention_heads,
            "vocab_size": text.vocab_size,
            "max_positions": text.max_position_embeddings,
        },
        "sam": {
            "image_size": sam.image_size,
            "patch_size": sam.patch_size,
            "embed_dim": sam.embed_dim,
            "depth": sam.depth,
            "prompt_embed_dim": sam.prompt_embed_dim,
        },
        "joins": {"projector": config.projector_type, "region_max_cells": config.region_max_cells},
    }


def registered_experts() -> list[ExpertSummary]:
    from medplib.core.plugins import get_experts

    return [
        ExpertSummary(
            name=spec.name,
            capabilities=list(spec.capabilities),
            special_tokens=list(spec.special_tokens),
            adapter=f"LoRA r{spec.adapter.r}/alpha {spec.adapter.alpha:g} on "
            + ", ".join(spec.adapter.target_modules),
            source=spec.source,
        )
        for spec in get_experts().values()
    ]


def format_info(info: ModelInfo) -> str:
    """The text `medplib info` prints: one block per section, aligned columns."""
    total = info.parameters["total"]
    weights = info.weights_dtype + (f", LLM linears {info.quantization}" if info.quantization else "")
    lines = [
        f"model     {info.model}",
        f"weights   {info.weights}",
        "",
        f"{'component':<20} {'parameters':>14} {'share':>7} {'MB, ' + weights:>16}",
    ]
    megabytes = {name: f"{size / 1e6:16,.1f}" for name, size in info.bytes.items()}
    for name, count in info.parameters.items():
        if name != "total":
            lines.append(f"{name:<20} {count:>14,} {100 * count / total:6.2f}% {megabytes.get(name, '')}")
    lines += [f"{'total':<20} {total:>14,} {'':7} {megabytes.get('total', '')}", "", "special token   id"]
    lines += [f"{token:<15} {token_id:>6}" for token, token_id in info.special_tokens.items()]
    lines.append("")
    for section, values in info.config.items():
        lines.append(f"{section:<9} " + ", ".join(f"{key} {value}" for key, value in values.items()))
    if info.routed_experts:
        routed = info.routed_experts
        lines += [
            "",
            f"routed    {routed['num_experts']} {routed['kind']} experts ({', '.join(routed['names'])}), "
            f"top-{routed['top_k']}, layers {routed['layers']}"
            + (f", {routed['parameters']:,} parameters" if "parameters" in routed else ""),
        ]
    lines += ["", "expert             capabilities               adapter"]
    for expert in info.experts:
        lines.append(f"{expert.name:<18} {', '.join(expert.capabilities):<26} {expert.adapter}")
    return "\n".join(lines)
