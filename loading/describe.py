"""What a model holds, described without loading its weights, for every form `load` takes:
`model_info` (`medplib info`), `model_config` (Serve's grounding deployment), `checkpoint_experts`."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig

from medplib.core.devices import resolve_dtype
from medplib.core.errors import CheckpointError
from medplib.core.expert_spec import ExpertSpec
from medplib.core.model import MedPLIBForCausalLM, build_config, build_medplib
from medplib.core.model.configuration_medplib import MedPLIBConfig
from medplib.core.model.medplib_release import read_release_config
from medplib.core.model.pretrained import COMPONENTS
from medplib.core.model.quantization import check_quantization, weight_bytes
from medplib.core.model.storage import local_folder
from medplib.core.model.tokenizer import load_tokenizer
from medplib.core.model_info import (
    ExpertSummary,
    ModelInfo,
    Weights,
    config_summary,
    converted_experts,
    expert_summary,
    held_experts,
    registered_experts,
    release_info,
    special_tokens,
)
from medplib.core.plugins import get_experts
from medplib.loading.forms import LoadRequest, read_record, recognise
from medplib.router.dense import MedPLIBWithRoutedExperts
from medplib.router.moe import MOE_FILE, read_moe_record


def model_info(
    preset_or_path: str | os.PathLike[str], *, dtype: str = "float32", quantization: str | None = None
) -> ModelInfo:
    """What the model `preset_or_path` holds, read without its weights (`medplib info`): a preset built on
    the meta device, a folder's config and tokenizer. `bytes` counts the weights at `dtype`, the LLM's
    linear layers at `quantization` if given."""
    source = os.fspath(preset_or_path)
    torch_dtype, quantization = resolve_dtype(dtype), check_quantization(quantization)
    form = recognise(LoadRequest(source)).name
    if form == "preset":
        model = build_medplib(source, device="meta")
        weights: Weights = "random (seeded)" if model.tokenizer is not None else "none (meta device)"
        tokenizer = model.tokenizer
        experts = registered_experts()
    else:
        stage_record = None
        if form == "stage folder":  # describe its model, as load does
            stage_record = read_record(Path(os.path.expanduser(source)))
            source = os.path.join(os.path.expanduser(source), "model")
        with local_folder(source) as folder:
            if read_release_config(folder) is not None:
                return release_info(source, folder, registered_experts())
            try:
                config = MedPLIBConfig.from_pretrained(folder)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{source}: not a medplib checkpoint ({exc})") from None
            tokenizer = load_tokenizer(folder)
            experts = checkpoint_experts(folder, stage_record, config)
        model_class = MedPLIBWithRoutedExperts if config.routed_experts else MedPLIBForCausalLM
        with torch.device("meta"):
            model = model_class(config)
        weights = "checkpoint"
    model.to(torch_dtype)  # on the meta device: only the element sizes change
    return ModelInfo(
        model=os.fspath(preset_or_path),
        weights=weights,
        parameters=model.parameter_counts(),
        weights_dtype=str(torch_dtype).removeprefix("torch."),
        quantization=quantization,
        bytes=weight_bytes(model, COMPONENTS, quantization),
        special_tokens=special_tokens(model.config, tokenizer),
        config=config_summary(model.config),
        experts=experts,
        routed_experts=model.config.routed_experts,
    )


def checkpoint_experts(
    folder: str | os.PathLike[str], stage_record: dict | None, config: MedPLIBConfig
) -> list[ExpertSummary]:
    """The experts a checkpoint holds, from its own records (the specs as they were when it was made):
    those its router composes (`moe.safetensors`' header), else the adapters its stage folder carries
    (`stage.json`), else those a converted release routes, else those whose tokens and heads the
    trunk holds (`config.experts`; the built-ins for a checkpoint older than that record)."""
    installed = get_experts()
    moe_file = Path(folder, MOE_FILE)
    if moe_file.is_file():
        specs = [ExpertSpec.model_validate(spec) for spec in read_moe_record(moe_file)["experts"]]
        return [expert_summary(spec, "routed", spec.name in installed) for spec in specs]
    if stage_record is None:
        return converted_experts(config.routed_experts) if config.routed_experts else held_experts(config)
    recorded = stage_record.get("specs", {})
    active = stage_record.get("active")
    return [
        expert_summary(
            ExpertSpec.model_validate(recorded[name]),
            "active adapter" if name == active else "adapter",
            name in installed,
        )
        for name in stage_record.get("adapters", {})
    ]


def model_config(source: str | os.PathLike[str]) -> MedPLIBConfig:
    """The config of the model `source` holds, without its weights: a preset's, or a folder's
    config.json (a stage folder's model's)."""
    source = os.fspath(source)
    form = recognise(LoadRequest(source)).name
    if form == "preset":
        return build_config(source)
    if form == "stage folder":
        source = os.path.join(os.path.expanduser(source), "model")
    with local_folder(source) as folder:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
