"""Token-triggered expert heads: one mechanism for every expert, the built-in grounding expert included.

An expert's spec names its trigger tokens and its head's factory. The model builds every head it holds
through that factory (`build_expert_heads`) and places it on itself (`attach_head`); when an answer
holds a trigger token, the hidden state that predicts it goes to the head, whose predictions become
the result's `outputs[expert]`. `add_expert` gives a model a new expert: its tokens enter the
tokenizer as special tokens (typed text never becomes one), the embedding and LM-head rows grow, the
config records it (so `save_pretrained` keeps it), and its head is attached.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from medplib.core.errors import InvalidInputError, PluginError
from medplib.core.expert_spec import ExpertSpec
from medplib.core.plugins import get_experts, require_experts
from medplib.core.results import ExpertInfo

if TYPE_CHECKING:
    from medplib.core.model.modeling_medplib import MedPLIBForCausalLM

BUILTIN_EXPERTS = ("vision_language", "pixel_grounding")


class ExpertHead(nn.Module):
    """The base of every expert's head: a module on the hidden state that predicts a trigger token.

    Subclasses implement `forward` ((n, hidden) -> prediction (n, ...)), and, to be trained and called
    through the generic path, `target`, `loss` and `to_outputs`. `model_parts` maps model attributes to
    submodules for a head whose weights keep historical names (default: the whole head at
    `<expert>_head`). An `image_conditioned` head (grounding) is decoded by the model on the image.
    """

    model_parts: ClassVar[dict[str, str] | None] = None
    image_conditioned: ClassVar[bool] = False
    # Where a token a capability asks for is forced when the model does not say it: "start" (the
    # answer opens with it, as an expert's data places it) or "end" (where the answer would end, as
    # grounding's "Sure, it is <SEG>." does).
    forced_at: ClassVar[str] = "start"

    @property
    def reads_request(self) -> bool:
        """Whether the head also reads the request's token states (`read_request`)."""
        return False

    @property
    def reads_embeddings(self) -> bool:
        """Whether `read_request` also takes the request tokens' input embeddings."""
        return False

    def read_request(
        self,
        states: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The trigger states (n, hidden) as the head takes them, given the request's last-layer token
        states `context` (n, T, hidden) and which of them belong to each state's request `mask`
        (n, T) bool: the tokens after the image up to the state's own position
        (`core.model.request_states`); `embeddings` (n, T, hidden), those tokens' input embeddings,
        come to a head that `reads_embeddings`. Default: the states unchanged. Every path that hands
        a head its states (training, scoring, decoding, the template prefill) calls this first."""
        return states

    def target(self, sample: Any) -> torch.Tensor | None:
        """The training target of one sample (fields task, answer_type, kind, modality, structure);
        None: the sample does not supervise this head."""
        return None

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-trigger loss (n,) of predictions (n, ...) against targets (n, ...)."""
        raise NotImplementedError(f"{type(self).__name__} is not trained through the generic head loss")

    def refit_loss(self, prediction: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """Per-row loss (n,) of predictions (n, ...) against this head's own earlier predictions on
        other states (stage IV's head refit, `trainers.head_refit`). Default: the mean squared
        difference; a classifier may compare the probabilities instead."""
        return (prediction.float() - wanted.float()).square().flatten(1).mean(1)

    def to_outputs(self, prediction: torch.Tensor) -> list[BaseModel]:
        """One output (the spec's `head_output`) per row of `prediction`."""
        raise NotImplementedError(f"{type(self).__name__} has no generic outputs")


def head_attribute(name: str) -> str:
    return f"{name}_head"


def head_parameter_prefixes(name: str, head: nn.Module) -> tuple[str, ...]:
    """Where the head's parameters sit in the model's state dict ("seg_head.", "sam." / "modality_head.")."""
    parts = getattr(head, "model_parts", None)
    return tuple(f"{part}." for part in parts) if parts else (f"{head_attribute(name)}.",)


def build_expert_heads(config: Any) -> dict[str, nn.Module]:
    """Every head of the experts the config holds, built by each spec's own factory, in order."""
    specs = require_experts(list(config.experts))
    heads = {}
    for spec in specs:
        head = spec.build_head(config)
        if head is not None:
            if not isinstance(head, nn.Module):
                raise PluginError(f"expert {spec.name!r}: its head factory returned {type(head).__name__}")
            heads[spec.name] = head
    return heads


def attach_head(model: nn.Module, name: str, head: nn.Module) -> None:
    """Register the head's parts on the model, each under its attribute; refuse to shadow one."""
    parts = getattr(head, "model_parts", None) or {head_attribute(name): ""}
    for attribute, path in parts.items():
        if attribute in model._modules:
            raise PluginError(f"expert {name!r}: its head part {attribute!r} clashes with the model's")
        model.add_module(attribute, head.get_submodule(path) if path else head)
    model.expert_heads[name] = head


def trigger_experts(config: Any) -> dict[int, str]:
    """Token id -> the expert whose head that token triggers."""
    specs = {spec.name: spec for spec in require_experts(list(config.experts))}
    triggers = {}
    for name, spec in specs.items():
        if spec.head is None:
            continue
        for token in spec.special_tokens:
            if token not in config.expert_token_ids:
                raise PluginError(f"expert {name!r}: the checkpoint has no id for its token {token}")
            triggers[config.expert_token_ids[token]] = name
    return triggers


def add_expert(model: MedPLIBForCausalLM, spec: ExpertSpec) -> bool:
    """Give `model` the expert `spec`: tokens, embedding and LM-head rows, config record and head.

    Returns False when the model already holds it. New rows start at the mean of the existing ones
    (transformers' `mean_resizing`), so a new token starts as likely as an average one.
    """
    config = model.config
    if spec.name in config.experts:
        return False
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InvalidInputError("the model has no tokenizer to add the expert's tokens to")
    taken = {token: name for name in config.experts for token in _tokens(name)}
    clashes = [f"{token} (expert {taken[token]!r})" for token in spec.special_tokens if token in taken]
    if clashes:
        raise PluginError(f"expert {spec.name!r}: its tokens are already another expert's: {clashes}")
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    plain = [token for token in spec.special_tokens if token in vocab and token not in special]
    if plain:
        raise PluginError(f"expert {spec.name!r}: {plain} are words of this tokenizer, not new tokens")
    new = [token for token in spec.special_tokens if token not in vocab]
    if new:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [*tokenizer.extra_special_tokens, *new]},
            replace_extra_special_tokens=True,
        )
    embeddings = model.get_input_embeddings()
    if len(tokenizer) > embeddings.num_embeddings:
        model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        config.text_config.vocab_size = len(tokenizer)
    head = spec.build_head(config)
    if head is not None:
        config.expert_token_ids = {
            **config.expert_token_ids,
            **{token: tokenizer.convert_tokens_to_ids(token) for token in spec.special_tokens},
        }
        parameter = next(model.parameters())
        attach_head(model, spec.name, head.to(device=parameter.device, dtype=parameter.dtype))
    config.experts = [*config.experts, spec.name]
    model.trigger_experts = trigger_experts(config)
    return True


def _tokens(name: str) -> Sequence[str]:
    (spec,) = require_experts([name])
    return spec.special_tokens


def checkpoint_experts(config: Any) -> list[str]:
    """The experts a checkpoint holds (its config's `experts`; the built-ins for an older one)."""
    experts = config.get("experts") if isinstance(config, dict) else getattr(config, "experts", None)
    return list(experts) if experts else list(BUILTIN_EXPERTS)


def head_outputs(
    model: MedPLIBForCausalLM, states: Mapping[str, torch.Tensor], apart: Collection[str] = ()
) -> dict[str, list[dict]]:
    """Run each triggered head on its hidden states (`trigger_states`): expert -> JSON outputs, in the
    answer's order; the heads of the experts `apart` are left to run elsewhere (a serving deployment)."""
    return {name: run_head(model.expert_heads[name], s) for name, s in states.items() if name not in apart}


def trigger_states(
    model: MedPLIBForCausalLM, triggered: Sequence[tuple[int, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The hidden states (n, hidden) that predicted each expert's trigger tokens, in the answer's order.
    Image-conditioned heads (grounding) are left out: the model decodes their masks on the image."""
    by_expert: dict[str, list[torch.Tensor]] = {}
    for token_id, state in triggered:
        name = model.trigger_experts.get(token_id)
        if name is not None and not model.expert_heads[name].image_conditioned:
            by_expert.setdefault(name, []).append(state)
    return {name: torch.stack(states) for name, states in by_expert.items()}


def run_head(head: nn.Module, states: torch.Tensor) -> list[dict]:
    """One head on hidden states (n, hidden): its n outputs as JSON (the spec's `head_output`)."""
    parameter = next(head.parameters(), None)
    if parameter is not None:
        states = states.to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        return [out.model_dump(mode="json") for out in head.to_outputs(head(states))]


def capability_token(model: MedPLIBForCausalLM, capability: str | None) -> tuple[int, bool] | None:
    """The trigger token a request for `capability` is steered to, and whether it is forced at the
    answer's start (else where it would end); None: no capability, or one whose expert has no head
    (e.g. vqa). InvalidInputError naming the capabilities the model has otherwise."""
    if capability is None:
        return None
    held = require_experts(list(model.config.experts))
    for spec in held:
        if capability in spec.capabilities:
            if spec.head is None:
                return None
            at_start = getattr(model.expert_heads[spec.name], "forced_at", "start") == "start"
            return model.config.expert_token_ids[spec.special_tokens[0]], at_start
    available = sorted(c for spec in held for c in spec.capabilities)
    installed = [spec.name for spec in get_experts().values() if capability in spec.capabilities]
    hint = f"; expert {installed[0]!r} has it but this model was not trained with it" if installed else ""
    raise InvalidInputError(
        f"unknown capability {capability!r}; this model has: {', '.join(available)}{hint}"
    )


def expert_infos(model: MedPLIBForCausalLM) -> list[ExpertInfo]:
    """Every installed expert (and any the model holds), with whether the model holds it."""
    held = set(model.config.experts)
    infos = []
    for spec in get_experts().values():
        infos.append(
            ExpertInfo(
                name=spec.name,
                description=spec.description,
                capabilities=list(spec.capabilities),
                tokens=list(spec.special_tokens) if spec.head else [],
                output_schema=spec.output_schema(),
                trained=spec.name in held,
            )
        )
    return infos
