"""Expert adapters are peft LoRA adapters: configs from specs, fresh adapters, saved ones, merged references.

An expert is trained as an ordinary peft LoRA on the LLM (`attach_expert_adapter`, then peft's own
`save_pretrained`), so its adapter is a peft state dict or adapter folder that `compose` loads into
the routed MLPs. `merge_expert` is peft's `merge_and_unload` of one expert: the reference a routed
model forced to that expert must equal.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import nn

from medplib.core.errors import CheckpointError, InvalidInputError
from medplib.core.expert_spec import MLP_PROJECTIONS, ExpertSpec
from medplib.core.model.storage import local_folder
from medplib.router.routed_mlp import RoutedMLP

AdapterSource = Mapping[str, torch.Tensor] | str | os.PathLike
# peft keys end like `layers.3.mlp.up_proj.lora_B.weight` (`lora_B.<adapter>.weight` inside a live model);
# any prefix is accepted, so an adapter trained on the whole MedPLIB model or on its LLM alone loads.
ADAPTER_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.\w+)?\.weight$"
)
MLP_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")
Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, target) -> (A, B)


def language_model_of(model: nn.Module) -> nn.Module:
    """The LLaMA-family LLM inside `model` (MedPLIB's `language_model`), or `model` itself."""
    return getattr(model, "language_model", model)


def routable_mlps(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """Decoder layer index -> (qualified name, MLP) for every LLaMA-style MLP of an uncomposed `model`."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        match = MLP_NAME.search(name)
        if match and all(hasattr(module, proj) for proj in MLP_PROJECTIONS):
            if isinstance(module, RoutedMLP):
                raise InvalidInputError(f"{name} is already routed; compose experts into an uncomposed trunk")
            if int(match[1]) in found:
                raise InvalidInputError(
                    f"two LLaMA-style MLPs claim layer {match[1]}: {found[int(match[1])][0]}, {name}"
                )
            found[int(match[1])] = (name, module)
    if not found:
        raise InvalidInputError(
            f"{type(model).__name__} has no LLaMA-style MLP (gate_proj, up_proj, down_proj)"
        )
    return dict(sorted(found.items()))


def lora_config(spec: ExpertSpec, **overrides: object) -> LoraConfig:
    """The peft `LoraConfig` of an expert's adapter (overrides such as `init_lora_weights` pass through)."""
    adapter = spec.adapter
    layers = list(adapter.layers) if adapter.layers is not None else None
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        **overrides,
    )


def _peft_model(llm: nn.Module, config: LoraConfig) -> PeftModel:
    with warnings.catch_warnings():  # peft 0.21 still calls an alias transformers 5 deprecates
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        return get_peft_model(llm, config)


def attach_expert_adapter(model: nn.Module, spec: ExpertSpec, **overrides: object) -> PeftModel:
    """Wrap the model's LLM in a peft LoRA for `spec`, in place, as stages II and III train an expert.

    peft's default adapter name keeps `save_pretrained`'s plain folder layout, which `compose` reads.
    """
    return _peft_model(language_model_of(model), lora_config(spec, **overrides))


def new_expert_adapter(
    model: nn.Module, spec: ExpertSpec, *, init_lora_weights: bool = True, seed: int | None = None
) -> dict[str, torch.Tensor]:
    """A fresh peft adapter state dict of `spec` on a copy of the model's LLM (the model is untouched).

    `init_lora_weights=False` leaves A and B random: a stand-in for a trained adapter in tests and benchmarks.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        llm = copy.deepcopy(language_model_of(model))
        peft_model = _peft_model(llm, lora_config(spec, init_lora_weights=init_lora_weights))
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(peft_model).items()}


def adapter_state_dict(adapter: AdapterSource, spec: ExpertSpec) -> Mapping[str, torch.Tensor]:
    """The adapter's state dict; a peft adapter folder (path or URI) must match the spec's rank and alpha."""
    if isinstance(adapter, Mapping):
        return adapter
    with local_folder(adapter) as folder:
        try:
            config = LoraConfig.from_pretrained(str(folder))
            state = load_peft_weights(str(folder), device="cpu")
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read the adapter of expert {spec.name!r} at {adapter}: {exc}"
            ) from None
    if (config.r, float(config.lora_alpha)) != (spec.adapter.r, spec.adapter.alpha):
        raise CheckpointError(
            f"adapter at {adapter} has r={config.r}, alpha={config.lora_alpha}; expert {spec.name!r} "
            f"declares r={spec.adapter.r}, alpha={spec.adapter.alpha}"
        )
    return state


def read_expert_adapter(adapter: AdapterSource, spec: ExpertSpec) -> Factors:
    """An adapter's LoRA factors by (layer, target); CheckpointError on a weight the router cannot place."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    stray = []
    for key, value in adapter_state_dict(adapter, spec).items():
        match = ADAPTER_KEY.search(key)
        if match is None:
            stray.append(key)
            continue
        parts.setdefault((int(match[1]), match[2]), {})[match[3]] = value
    incomplete = [f"layer {layer} {target}" for (layer, target), ab in parts.items() if len(ab) != 2]
    if stray or incomplete:
        raise CheckpointError(
            f"adapter of expert {spec.name!r}: only LoRA A/B pairs on the MLP can be routed; "
            f"stray keys {stray[:5]}, incomplete pairs {incomplete[:5]}"
        )
    return {place: (ab["A"], ab["B"]) for place, ab in parts.items()}


def merge_expert(model: nn.Module, spec: ExpertSpec, adapter: AdapterSource) -> nn.Module:
    """A copy of the model's LLM with `spec`'s adapter merged by peft's `merge_and_unload`."""
    llm = copy.deepcopy(language_model_of(model))
    names = {layer: name for layer, (name, _) in routable_mlps(llm).items()}
    state = {
        f"base_model.model.{names[layer]}.{target}.lora_{part}.weight": tensor
        for (layer, target), factors in read_expert_adapter(adapter, spec).items()
        for part, tensor in zip("AB", factors, strict=True)
    }
    peft_model = _peft_model(llm, lora_config(spec))
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise CheckpointError(
            f"adapter of expert {spec.name!r} does not fit the model: {result.unexpected_keys[:5]}"
        )
    return peft_model.merge_and_unload()
