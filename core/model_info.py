"""What a model is made of, without loading its weights: components and their parameter counts,
special tokens and their ids, a summary of the config, and its experts (`medplib info`; read from any
form of model by `medplib.loading.model_info`): a checkpoint's own (those its router composes, or the
adapters its stage folder carries), each marked when this environment has not installed it; a preset's
are the registered ones it would compose.

A preset builds on the meta device (no memory, no time: `medplib-7b` counts its 7 billion parameters
in a second); a checkpoint folder or URI is read for its config and tokenizer only.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, Field

from medplib.core.expert_spec import ExpertSpec

Weights = Literal[
    "random (seeded)", "none (meta device)", "checkpoint", "MedPLIB release (convert it before loading)"
]


class ExpertSummary(BaseModel):
    name: str
    capabilities: list[str]
    special_tokens: list[str]
    adapter: str = Field(description="LoRA rank, alpha and target projections")
    source: str
    role: Literal["registered", "routed", "adapter", "active adapter", "held"] = Field(
        "registered",
        description="registered: installed here (a preset's experts); in a checkpoint: routed (composed "
        "by its router), adapter (carried by its stage folder), active adapter (the one it answers "
        "with) or held (its tokens and head are in the trunk, without an adapter)",
    )
    installed: bool = Field(True, description="registered here: a checkpoint's experts must be, to load")


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
    from medplib.core.model.pretrained import COMPONENTS

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


def expert_summary(spec: ExpertSpec, role: str = "registered", installed: bool = True) -> ExpertSummary:
    return ExpertSummary(
        name=spec.name,
        capabilities=list(spec.capabilities),
        special_tokens=list(spec.special_tokens),
        adapter=f"LoRA r{spec.adapter.r}/alpha {spec.adapter.alpha:g} on "
        + ", ".join(spec.adapter.target_modules),
        source=spec.source,
        role=role,
        installed=installed,
    )


def registered_experts() -> list[ExpertSummary]:
    from medplib.core.plugins import get_experts

    return [expert_summary(spec) for spec in get_experts().values()]


def held_experts(config: Any) -> list[ExpertSummary]:
    """The experts a plain checkpoint holds (tokens, rows, heads; no adapter), by its config."""
    from medplib.core.expert_heads import checkpoint_experts as recorded_experts
    from medplib.core.plugins import get_experts

    installed = get_experts()
    return [
        expert_summary(installed[name], "held")
        if name in installed
        else ExpertSummary(
            name=name,
            capabilities=[],
            special_tokens=[],
            adapter="-",
            source="?",
            role="held",
            installed=False,
        )
        for name in recorded_experts(config)
    ]


def converted_experts(routed: dict[str, Any] | None) -> list[ExpertSummary]:
    """A converted MedPLIB release's experts: its config names them, their specs are the built-ins'."""
    from medplib.core.plugins import get_experts

    installed = get_experts()
    names = (routed or {}).get("names", [])
    return [expert_summary(installed[name], "routed") for name in names if name in installed]


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
    lines += ["", f"{'expert':<18} {'capabilities':<26} {'in the model':<15} adapter"]
    for expert in info.experts:
        role = expert.role + ("" if expert.installed else ", NOT INSTALLED here")
        lines.append(f"{expert.name:<18} {', '.join(expert.capabilities):<26} {role:<15} {expert.adapter}")
    return "\n".join(lines)
