"""`compose`: K registered experts' adapters become one Mixture of Experts inside a model's LLM.

`compose` swaps the MLP of each routed decoder layer for a `RoutedMLP` in place and returns a
`MixtureOfExperts` handle; the model keeps its class, its forward and its `generate`. The handle forces
an expert, returns the router logits and the load-balancing loss, records routing statistics, and
saves and loads the composed model: the trunk as the model's own `save_pretrained` writes it, plus
`moe.safetensors` with the router and expert weights and, in its metadata, which experts (name,
version, source) and router options it was composed from.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from medplib.core.errors import CheckpointError, InvalidInputError, describe_key_problems
from medplib.core.expert_spec import ExpertSpec
from medplib.core.model.storage import local_folder, writable_folder
from medplib.core.plugins import ENV_VAR, get_experts, require_experts
from medplib.router.adapters import AdapterSource, Factors, read_expert_adapter, routable_mlps
from medplib.router.config import RouterConfig
from medplib.router.routed_mlp import ExpertLoRA, RoutedMLP
from medplib.router.statistics import RoutingStatistics

MOE_FILE = "moe.safetensors"
METADATA_KEY = "medplib_moe"
FORMAT_VERSION = 1


def compose(
    model: nn.Module,
    experts: Sequence[str | ExpertSpec],
    adapters: Sequence[AdapterSource | None] | None = None,
    config: RouterConfig | None = None,
) -> MixtureOfExperts:
    """Route the model's MLPs over `experts` (names of registered experts, or specs), K >= 2.

    `adapters[i]` initialises expert i from its separately trained peft adapter (a state dict or an
    adapter folder), as stage IV does; None gives a fresh adapter (B = 0: the expert starts as the trunk).
    Everything is checked before the model is touched.
    """
    config = config or RouterConfig()
    names = [e for e in experts if isinstance(e, str)]
    registered = iter(require_experts(names))
    specs = tuple(e if isinstance(e, ExpertSpec) else next(registered) for e in experts)
    adapters = [None] * len(specs) if adapters is None else list(adapters)
    if len(specs) < 2 or len({s.name for s in specs}) != len(specs):
        raise InvalidInputError(
            f"a mixture needs at least two distinct experts, got {[s.name for s in specs]}"
        )
    if len(adapters) != len(specs) or config.top_k > len(specs):
        raise InvalidInputError(f"{len(specs)} experts need {len(specs)} adapters and top_k <= {len(specs)}")
    mlps = routable_mlps(model)
    layers = tuple(mlps) if config.layers is None else config.layers
    # An expert whose spec names no layers adapts every routed layer.
    for spec in (None, *specs):
        wanted = layers if spec is None else spec.adapter.layers or ()
        outside = sorted(set(wanted) - (set(mlps) if spec is None else set(layers)))
        if outside:
            what = "the model has no" if spec is None else f"expert {spec.name!r} adapts unrouted"
            raise InvalidInputError(f"{what} decoder layers {outside} (routed: {list(layers)})")
    factors = [
        read_expert_adapter(a, s) if a is not None else None for a, s in zip(adapters, specs, strict=True)
    ]
    routed = {}
    for layer in layers:
        mlp = mlps[layer][1]
        loras = [_expert_lora(mlp, layer, spec, found) for spec, found in zip(specs, factors, strict=True)]
        routed[layer] = RoutedMLP(mlp, loras, config).train(mlp.training)  # eval mode stays eval mode
    for spec, left in zip(specs, factors, strict=True):
        if left:
            raise CheckpointError(
                f"adapter of expert {spec.name!r} has weights on layers or projections its spec does not "
                f"declare or the router does not route: {sorted(left)[:5]}"
            )
    for layer, routed_mlp in routed.items():
        parent, _, attribute = mlps[layer][0].rpartition(".")
        setattr(model.get_submodule(parent), attribute, routed_mlp)
    return MixtureOfExperts(model, specs, config, routed)


def _expert_lora(mlp: nn.Module, layer: int, spec: ExpertSpec, found: Factors | None) -> ExpertLoRA:
    """One expert's LoRA on one layer, loaded from (and popped off) its adapter's factors if given."""
    adapted = spec.adapter.layers is None or layer in spec.adapter.layers
    targets = spec.adapter.target_modules if adapted else ()
    lora = ExpertLoRA(
        {t: (getattr(mlp, t).in_features, getattr(mlp, t).out_features) for t in targets}, spec.adapter
    )
    for target in targets if found is not None else ():
        factors = found.pop((layer, target), None)
        if factors is None:
            raise CheckpointError(f"adapter of expert {spec.name!r} has no LoRA on layer {layer} {target}")
        for param, value in zip(
            (lora.lora_A[target].weight, lora.lora_B[target].weight), factors, strict=True
        ):
            if param.shape != value.shape:
                raise CheckpointError(
                    f"adapter of expert {spec.name!r}, layer {layer} {target}: shape {tuple(value.shape)}, "
                    f"expected {tuple(param.shape)} (r={spec.adapter.r})"
                )
            param.data.copy_(value)
    return lora


@dataclass
class MixtureOfExperts:
    """A model whose routed layers' MLPs are `RoutedMLP`s over `experts`."""

    model: nn.Module
    experts: tuple[ExpertSpec, ...]
    config: RouterConfig
    layers: dict[int, RoutedMLP]  # decoder layer index -> its routed MLP

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.experts)

    def expert_index(self, expert: int | str) -> int:
        if isinstance(expert, str) and expert in self.expert_names:
            return self.expert_names.index(expert)
        if isinstance(expert, int) and 0 <= expert < len(self.experts):
            return expert
        raise InvalidInputError(f"no expert {expert!r} in this mixture of {list(self.expert_names)}")

    @contextlib.contextmanager
    def force_expert(self, expert: int | str) -> Iterator[None]:
        """Every token to `expert` with weight 1.0 (not its gate probability): the model then equals the
        trunk with that expert's adapter merged, which is what the equivalence tests check."""
        index = self.expert_index(expert)
        for mlp in self.layers.values():
            mlp.forced_expert = index
        try:
            yield
        finally:
            for mlp in self.layers.values():
                mlp.forced_expert = None

    def router_logits(self) -> dict[int, torch.Tensor]:
        """Per routed layer, the gate logits (tokens, K) of the last forward."""
        if any(mlp.last_routing is None for mlp in self.layers.values()):
            raise InvalidInputError("no forward has run through the routed layers yet")
        return {layer: mlp.last_routing.logits for layer, mlp in self.layers.items()}

    @contextlib.contextmanager
    def padding(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """Tell the routed layers which tokens of the forwards inside are real (`attention_mask` 1):
        padding then takes no expert capacity and counts in no loss or statistic of the router."""
        real = attention_mask.reshape(-1).bool()
        for mlp in self.layers.values():
            mlp.real_tokens = real
        try:
            yield
        finally:
            for mlp in self.layers.values():
                mlp.real_tokens = None

    def load_balancing_loss(self, weight: float | None = None) -> torch.Tensor:
        """Switch Transformer's auxiliary loss of the last forward, K * sum_e f_e * P_e averaged over
        layers (1 when balanced), times `weight` (default: the config's, 0 as in MedPLIB). Padding
        tokens (see `padding`) are left out of both f and P."""
        weight = self.config.load_balancing_weight if weight is None else weight
        losses = []
        for layer, logits in self.router_logits().items():
            routing = self.layers[layer].last_routing
            experts, probs = routing.experts, logits.float().softmax(-1)
            if routing.real is not None:
                experts, probs = experts[routing.real], probs[routing.real]
            dispatched = F.one_hot(experts, len(self.experts)).float().mean(dim=(0, 1))
            losses.append(len(self.experts) * (dispatched * probs.mean(0)).sum())
        return weight * torch.stack(losses).mean()

    @contextlib.contextmanager
    def track(
        self,
        image_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        statistics: RoutingStatistics | None = None,
    ) -> Iterator[RoutingStatistics]:
        """Record routing statistics of the forwards run inside the block.

        `image_mask` (batch, seq) marks image tokens; given `input_ids` instead, the model's own
        `config.image_token_id` marks them (MedPLIB's image placeholders). Pass `statistics` to add
        to it (e.g. over the batches of an epoch) rather than to a new one.
        """
        if input_ids is not None:
            image_mask = input_ids == self.model.config.image_token_id
        if statistics is None:
            statistics = RoutingStatistics(self.expert_names)
        handles = [
            mlp.register_forward_hook(
                lambda module, args, output, layer=layer: statistics.update(
                    layer, module.last_routing.experts, image_mask, module.last_routing.real
                )
            )
            for layer, mlp in self.layers.items()
        ]
        try:
            yield statistics
        finally:
            for handle in handles:
                handle.remove()

    # ---- checkpoints --------------------------------------------------------------------------------

    def routed_state_dict(self) -> dict[str, torch.Tensor]:
        """Router and expert weights, keyed as in the model's state dict; the trunk's keys are unchanged."""
        names = {id(module): name for name, module in self.model.named_modules()}
        return {
            f"{names[id(mlp)]}.{key}": value
            for mlp in self.layers.values()
            for key, value in mlp.state_dict().items()
            if key.startswith(("router.", "experts."))
        }

    def load_routed_state_dict(self, state: dict[str, torch.Tensor], source: object = "state dict") -> None:
        current = self.routed_state_dict()
        problems = {
            "missing_keys": sorted(current.keys() - state.keys()),
            "unexpected_keys": sorted(state.keys() - current.keys()),
            "mismatched_keys": sorted(
                k for k in current.keys() & state.keys() if current[k].shape != state[k].shape
            ),
        }
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            raise CheckpointError(describe_key_problems(source, problems))
        with torch.no_grad():
            for key, value in state.items():
                current[key].copy_(value)

    def save_pretrained(self, location: str | os.PathLike[str], **kwargs: object) -> None:
        """The trunk by the model's own `save_pretrained`, then `moe.safetensors` (written atomically)."""
        routed = self.routed_state_dict()
        trunk = {key: value for key, value in self.model.state_dict().items() if key not in routed}
        record = {
            "format_version": FORMAT_VERSION,
            "router": self.config.model_dump(mode="json"),
            "experts": [spec.model_dump(mode="json") for spec in self.experts],
        }
        with writable_folder(location) as folder:
            self.model.save_pretrained(folder, state_dict=trunk, **kwargs)
            partial = Path(folder, MOE_FILE + ".partial")
            tensors = {key: value.detach().contiguous().cpu() for key, value in routed.items()}
            save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(record)})
            os.replace(partial, Path(folder, MOE_FILE))

    @classmethod
    def from_pretrained(
        cls, location: str | os.PathLike[str], model_class: type | None = None, **kwargs: object
    ) -> MixtureOfExperts:
        """Load a composed checkpoint; CheckpointError naming every recorded expert not registered here.

        The trunk loads with `model_class.from_pretrained` (default: transformers' AutoModelForCausalLM,
        which knows MedPLIB); the experts are rebuilt from the specs recorded in the checkpoint.
        """
        with local_folder(location) as folder:
            path = Path(folder, MOE_FILE)
            if not path.is_file():
                raise CheckpointError(f"{location}: no {MOE_FILE}, so not a composed checkpoint")
            record = read_moe_record(path, location)
            with safe_open(str(path), framework="pt") as handle:
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            specs = [ExpertSpec.model_validate(expert) for expert in record["experts"]]
            _check_registered(location, specs)
            if model_class is None:
                from transformers import AutoModelForCausalLM as model_class

                import medplib.core.model  # noqa: F401  (registers MedPLIB with the Auto classes)
            model = model_class.from_pretrained(folder, **kwargs)
        moe = compose(model, specs, None, RouterConfig.model_validate(record["router"]))
        moe.load_routed_state_dict(state, source=location)
        return moe


def read_moe_record(path: str | os.PathLike[str], location: object = None) -> dict:
    """The record `save_pretrained` wrote beside the routed weights (router config, expert specs),
    read from the file's header without loading a tensor."""
    with safe_open(os.fspath(path), framework="pt") as handle:
        record = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{location or path}: {MOE_FILE} has no medplib MoE record of format {FORMAT_VERSION}"
        )
    return record


def _check_registered(location: object, specs: Sequence[ExpertSpec]) -> None:
    registered = get_experts()
    missing = [spec for spec in specs if spec.name not in registered]
    if missing:
        described = ", ".join(f"{s.name} {s.version} (from {s.source or 'unknown'})" for s in missing)
        raise CheckpointError(
            f"{location} was composed from experts {[s.name for s in specs]}; not registered here: "
            f"{described}. Install the plugin(s) that provide them, or check {ENV_VAR}."
        )
    for spec in specs:
        if registered[spec.name].version != spec.version:
            warnings.warn(
                f"{location}: expert {spec.name!r} was composed at version {spec.version}, "
                f"registered now at {registered[spec.name].version}",
                stacklevel=3,
            )
