"""Dense experts: K full LLaMA MLPs behind a float32 gate, as MedPLIB's released checkpoint holds them.

Where medplib's own experts are low-rank deltas on one shared MLP (`RoutedMLP`), MedPLIB trained its
stage IV MoE with DeepSpeed on full copies of the MLP, one per expert. `DenseRoutedMLP` computes what
DeepSpeed 0.13.1 computes at inference:

- the gate runs in float32 on the MLP input of every token (text, image, region, padding), whatever
  the model's dtype, so a near-tie decides the same way in a bfloat16 model;
- top-1: `p_e * MLP_e(x)` for the winning expert e, the probability NOT renormalised to 1;
- top-k: the k best experts, probabilities renormalised over them (for K = 2, top-2 is the plain
  mixture `p_0 MLP_0(x) + p_1 MLP_1(x)`). DeepSpeed picks the second expert with Gumbel noise, which
  for K = 2 is always the other one; for K > 2 this takes the second best, deterministically.
- nothing is dropped: MedPLIB's eval capacity (factor 2.0 over 2 experts) never drops a token.

`--experts lora` conversions store the same experts as one shared MLP plus a low-rank delta each
(`factor_experts.py`), run by medplib's own `RoutedMLP` behind the same float32 gate.

`MedPLIBWithRoutedExperts` is the model class of a checkpoint whose config declares `routed_experts`
(a converted MedPLIB checkpoint): the composed model with the routed MLPs built before the weights load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

from medplib.core.errors import CheckpointError
from medplib.core.expert_spec import MLP_PROJECTIONS, LoraSpec
from medplib.core.model.compat import MedPLIBTokenization
from medplib.core.model.modeling_medplib import MedPLIBForCausalLM
from medplib.core.model.storage import local_folder
from medplib.router.config import RouterConfig
from medplib.router.routed_mlp import ExpertLoRA, RoutedMLP, Routing, forced_routing, route


class Float32Gate(nn.Linear):
    """A bias-free Linear that stays float32 when the model around it is cast to another dtype."""

    def __init__(self, in_features: int, out_features: int, device: Any = None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=torch.float32)

    def _apply(self, fn, recurse: bool = True):
        # Follow the device of a move, never the dtype of a cast.
        device = fn(torch.empty(0, device=self.weight.device)).device
        if self.weight.is_meta and device.type != "meta":
            self.weight.data = torch.empty_like(self.weight, device=device, dtype=torch.float32)
        else:
            self.weight.data = self.weight.data.to(device=device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.float(), self.weight)


def release_routing(logits: torch.Tensor, top_k: int, forced_expert: int | None) -> Routing:
    """A released checkpoint's routing: top-k of the fp32 gate with no capacity limit (the converter
    refuses capacities that would drop tokens), or every token to `forced_expert` with weight 1."""
    return route(logits, top_k) if forced_expert is None else forced_routing(logits, forced_expert)


class DenseRoutedMLP(nn.Module):
    """Drop-in replacement of a LLaMA MLP: K full MLP experts and a float32 gate (`router`)."""

    def __init__(self, text_config: Any, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise CheckpointError(f"top_k {top_k} must lie in 1..{num_experts} (the experts)")
        self.router = Float32Gate(text_config.hidden_size, num_experts)
        self.experts = nn.ModuleList(LlamaMLP(text_config) for _ in range(num_experts))
        self.top_k = top_k
        self.forced_expert: int | None = None  # as `RoutedMLP`: every token to one expert, weight 1
        self.last_routing: Routing | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(flat)
        routing = self.last_routing = release_routing(logits, self.top_k, self.forced_expert)
        out = torch.zeros_like(flat)
        for expert_index, expert in enumerate(self.experts):
            rows, choice = torch.nonzero(routing.experts == expert_index, as_tuple=True)
            if len(rows):
                weights = routing.weights[rows, choice, None].to(flat.dtype)
                out.index_add_(0, rows, expert(flat[rows]) * weights)
        return out.reshape(hidden_states.shape)


def install_routed_experts(model: MedPLIBForCausalLM, spec: dict) -> dict[int, nn.Module]:
    """Replace the MLP of each layer in `spec["layers"]` by the routed MLP `spec` declares, in place."""
    kind = spec.get("kind")
    text_config = model.config.text_config
    layers = model.language_model.model.layers
    routed = {}
    for index in spec["layers"]:
        if not 0 <= index < len(layers):
            raise CheckpointError(f"routed layer {index} outside the model's {len(layers)} decoder layers")
        if kind == "dense":
            mlp = DenseRoutedMLP(text_config, spec["num_experts"], spec["top_k"])
        elif kind == "lora":
            mlp = factored_routed_mlp(layers[index].mlp, spec)
        else:
            raise CheckpointError(f"unknown routed expert kind {kind!r}; expected 'dense' or 'lora'")
        layers[index].mlp = mlp
        routed[index] = mlp
    return routed


class FactoredRoutedMLP(RoutedMLP):
    """`RoutedMLP` behind a float32 gate: the gate weights are cast to the activations' dtype before
    mixing, as DeepSpeed casts its combine weights to the input's."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(flat)
        routing = self.last_routing = release_routing(logits, self.top_k, self.forced_expert)
        mixed = Routing(routing.logits, routing.experts, routing.weights.to(flat.dtype), routing.kept)
        return self.mix(flat, mixed).reshape(hidden_states.shape)


def factored_routed_mlp(mlp: nn.Module, spec: dict) -> RoutedMLP:
    """Dense experts stored as a shared MLP plus a rank-r delta each (`--experts lora`): medplib's own
    `RoutedMLP` over LoRA experts, with the float32 gate. Scaling 1: the factors hold the delta itself."""
    lora = LoraSpec(r=spec["rank"], alpha=float(spec["rank"]))
    shapes = {
        name: (getattr(mlp, name).in_features, getattr(mlp, name).out_features) for name in MLP_PROJECTIONS
    }
    experts = [ExpertLoRA(shapes, lora) for _ in range(spec["num_experts"])]
    routed = FactoredRoutedMLP(mlp, experts, RouterConfig(top_k=spec["top_k"]))
    routed.router = Float32Gate(
        mlp.gate_proj.in_features, spec["num_experts"], device=mlp.gate_proj.weight.device
    )
    return routed


class MedPLIBWithRoutedExperts(MedPLIBForCausalLM):
    """The composed model whose config declares `routed_experts`; loads like any medplib checkpoint."""

    # The gates compute and are stored in float32, also in a bfloat16 model.
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["router"]

    def __init__(self, config) -> None:
        super().__init__(config)
        if not config.routed_experts:
            raise CheckpointError("this config declares no routed_experts")
        self.routed_layers = install_routed_experts(self, config.routed_experts)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """As `MedPLIBForCausalLM.from_pretrained`; a `compat: medplib` checkpoint also brings MedPLIB's
        SentencePiece tokenisation (`spiece.model`), attached to its tokenizer."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if model.config.compat == "medplib":
            with local_folder(pretrained_model_name_or_path) as folder:
                model.tokenizer.medplib_tokenization = MedPLIBTokenization.from_tokenizer(
                    model.tokenizer, folder
                )
        return model
