"""Stage folders: where a stage starts from, how its model is set up, and what it leaves behind.

A stage's output folder holds

- `model/`: the shared trunk (`save_pretrained`: config, safetensors, tokenizer); after stage IV the
  composed model (`MixtureOfExperts.save_pretrained`: the trunk plus `moe.safetensors`);
- `adapters/<expert>/`: every expert adapter trained so far (peft's `adapter_config.json` and
  `adapter_model.safetensors`), carried forward from the source so that stage IV finds II's and
  III's (and any plugin expert's) side by side;
- `stage.json`: which stage and schedule made it, from which source, the adapters, the adapter the
  folder's model answers with (`active`), and the steps and time it took.

A stage's source (`--model`) is a preset name (a random trunk), a stage folder, or a checkpoint
folder of the model. Adapters are saved apart from the trunk and the trunk without them, so the
experts stay exactly what they were trained to be: the stage II expert is the trunk plus its LoRA.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from medplib.core.errors import InvalidInputError
from medplib.core.expert_heads import add_expert
from medplib.core.expert_spec import ExpertSpec
from medplib.core.model import MedPLIBForCausalLM
from medplib.core.plugins import get_experts, require_experts
from medplib.loading import STAGE_FILE, attach_lora, load_model
from medplib.router import MixtureOfExperts, compose
from medplib.trainers.stages import DEFAULT_EXPERTS, StageSpec


@dataclass
class StageStart:
    """A stage's starting point: the trunk, and the adapters trained before (name -> folder)."""

    location: str
    model: MedPLIBForCausalLM
    adapters: dict[str, Path] = field(default_factory=dict)
    specs: dict[str, ExpertSpec] = field(default_factory=dict)  # recorded specs of those adapters


@dataclass
class StageModel:
    """The model as a stage trains it, and the handles its setup made."""

    model: MedPLIBForCausalLM
    peft: PeftModel | None = None
    moe: MixtureOfExperts | None = None
    # Stage IV: per example id, the states its generic heads read before the stage trained
    # (`expert_training.anchor_states`), kept as targets where `StageSpec.head_anchor` > 0.
    head_anchors: dict[str, torch.Tensor] | None = None
    # Stage IV: each generic head's outputs on its training samples' expert-stage states, the targets
    # of its refit after training (`head_refit.refit_targets`), where `StageSpec.head_refit` is set.
    refit_targets: dict[str, list[tuple[str, torch.Tensor]]] | None = None

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]


def load_source(location: str, seed: int = 0, options: dict[str, Any] | None = None) -> StageStart:
    """The trunk and adapters a stage starts from: a preset (seeded random init, its config changed by
    `options`), a stage folder's trunk and adapters, or any other form `medplib.loading` recognises but
    a composed model."""
    loaded = load_model(location, seed=seed, active_adapter=False, options=options)
    record = loaded.record
    if loaded.moe is not None or record.get("active") == "moe":
        raise InvalidInputError(f"{location} holds a composed model (stage IV); no stage starts from one")
    specs = {name: ExpertSpec.model_validate(spec) for name, spec in record.get("specs", {}).items()}
    adapters = {name: Path(location, path) for name, path in record.get("adapters", {}).items()}
    return StageStart(location, loaded.model, adapters, specs)


def prepare(
    spec: StageSpec, source: StageStart, seed: int = 0, experts: Sequence[str] | None = None
) -> StageModel:
    """Set the source's model up as `spec` trains it and mark exactly the stage's parameters trainable.

    An expert stage first gives the model its expert (tokens, their rows, its head: `add_expert`);
    stage IV composes `experts` (default: every adapter the source carries)."""
    model = source.model
    if spec.seg_read_request:
        add_request_reader(model, seed, embeddings=spec.seg_read_embeddings)
    if spec.seg_image_film:
        add_image_film(model)
    torch.manual_seed(seed)  # fresh LoRA factors and router weights start the same on every worker
    prepared = StageModel(model)
    if spec.setup == "adapter":
        if spec.key == "expert":
            add_expert(model, spec.expert)
        prepared.peft = attach_lora(model, spec.expert)
    elif spec.setup == "compose":
        specs = composed_experts(source, experts)
        adapters = [source.adapters.get(s.name) for s in specs]
        prepared.moe = compose(
            model, specs, [str(a) if a is not None else None for a in adapters], config=spec.router
        )
    for name, parameter in model.named_parameters():
        rows = spec.trained_row_ids(name, model.config) if spec.trained_rows(name) else None
        parameter.requires_grad_(spec.trainable(name) and rows != [])  # [] : its rows are none of these
        if rows:
            keep = torch.zeros(len(parameter), 1, dtype=parameter.dtype, device=parameter.device)
            keep[rows] = 1
            # No gradient elsewhere: AdamW without weight decay (both schedules) leaves other rows as is.
            parameter.register_hook(lambda grad, keep=keep: grad * keep)
    if not prepared.trainable_parameters():
        raise InvalidInputError(f"stage {spec.key} trains nothing on this model: {spec.trains}")
    return prepared


def add_request_reader(model: MedPLIBForCausalLM, seed: int, embeddings: bool = False) -> None:
    """Switch `seg_read_request` on: the grounding head gets its reader (seeded, the global random
    state untouched; reading the input `embeddings` too if asked) unless it has one, which is kept as
    it is; the config records the reader the head has, so the saved stage loads with it."""
    head = model.expert_heads.get(model.trigger_experts.get(model.config.seg_token_id))
    if head is None or not hasattr(head, "add_request_reader"):
        raise InvalidInputError("seg_read_request needs the pixel-grounding head; this model has none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.add_request_reader(embeddings=embeddings)
    model.config.seg_read_request = True
    model.config.seg_read_embeddings = head.reads_embeddings


def add_image_film(model: MedPLIBForCausalLM) -> None:
    """Switch `seg_image_film` on: the grounding head gets a zero-gain `ImageFiLM` unless it has one;
    the config records it, so the saved stage loads with it."""
    head = model.expert_heads.get(model.trigger_experts.get(model.config.seg_token_id))
    if head is None or not hasattr(head, "add_image_film"):
        raise InvalidInputError("seg_image_film needs the pixel-grounding head; this model has none")
    head.add_image_film()
    model.config.seg_image_film = True


def composed_experts(source: StageStart, names: Sequence[str] | None = None) -> list[ExpertSpec]:
    """The experts stage IV composes: `names` (`--experts`), else every adapter the source carries, in
    training order. A named expert the source has no adapter for is an error, never a silent drop.

    A source with fewer than two adapters and no names (a preset, for a smoke run) composes the built-in
    experts, each from its trained adapter where the source has one and fresh otherwise.
    """
    registered = get_experts()
    if names is not None:
        names = list(dict.fromkeys(names))
        missing = [name for name in names if name not in source.adapters]
        if missing:
            held = ", ".join(source.adapters) or "none"
            raise InvalidInputError(
                f"--experts names {', '.join(missing)}, which {source.location} has no adapter for "
                f"(its adapters: {held}); train each first with --stage expert --expert NAME"
            )
        if len(names) < 2:
            raise InvalidInputError(f"--experts needs at least two experts to compose, got {names}")
        return [registered.get(name) or source.specs[name] for name in names]
    if len(source.adapters) >= 2:
        return [registered.get(name) or source.specs[name] for name in source.adapters]
    return require_experts(list(DEFAULT_EXPERTS.values()))


def save_adapter(peft: PeftModel, folder: Path) -> None:
    """peft's own adapter folder (`adapter_config.json`, `adapter_model.safetensors`), as `compose` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    peft.save_pretrained(str(folder))


def trunk_state_dict(model: MedPLIBForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights without any attached peft LoRA, under the plain model's names."""
    return {
        key.replace(".base_layer.", "."): value
        for key, value in model.state_dict().items()
        if ".lora_" not in key
    }


def save_stage(out: Path, spec: StageSpec, prepared: StageModel, source: StageStart, record: dict) -> None:
    """Write the stage's model, adapters and `stage.json` into `out`."""
    adapters = {name: f"adapters/{name}" for name in source.adapters}
    specs = {name: s.model_dump(mode="json") for name, s in source.specs.items()}
    for name, folder in source.adapters.items():
        target = out / adapters[name]
        if folder.resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target)
    active = None
    if prepared.moe is not None:
        prepared.moe.save_pretrained(out / "model")
        active = "moe"
    else:
        prepared.model.save_pretrained(out / "model", state_dict=trunk_state_dict(prepared.model))
    if prepared.peft is not None:
        expert = spec.expert
        save_adapter(prepared.peft, out / "adapters" / expert.name)
        adapters[expert.name] = f"adapters/{expert.name}"
        specs[expert.name] = expert.model_dump(mode="json")
        active = expert.name
    # The joint baseline's adapter is no expert: it is evaluated, never composed.
    carried = {name: path for name, path in adapters.items() if name != "joint" or active == "joint"}
    full = {"stage": spec.key, "title": spec.title, "source": source.location, "adapters": carried}
    full |= {"specs": {name: specs[name] for name in carried}, "active": active, **record}
    (out / STAGE_FILE).write_text(json.dumps(full, indent=1))
