"""Fixtures for the router tests: a tiny LLaMA trunk and K unlike experts with trained-like adapters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medplib.core.expert_spec import ExpertSpec, LoraSpec
from medplib.router import new_expert_adapter

# Ranks, targets, layers and dropout all differ, so nothing relies on experts being alike.
ADAPTERS = (
    LoraSpec(r=4, alpha=8),
    LoraSpec(r=2, alpha=2, target_modules=("up_proj",), dropout=0.1),
    LoraSpec(r=3, alpha=6, target_modules=("gate_proj", "down_proj"), layers=(1,)),
    LoraSpec(r=2, alpha=4),
)


def make_llama(mlp_bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        mlp_bias=mlp_bias,
    )
    return LlamaForCausalLM(config).eval()


def make_specs(num_experts: int) -> list[ExpertSpec]:
    return [
        ExpertSpec(name=f"expert_{i}", version=f"1.{i}", capabilities=("vqa",), adapter=ADAPTERS[i])
        for i in range(num_experts)
    ]


def make_adapters(trunk: torch.nn.Module, specs: list[ExpertSpec]) -> list[dict[str, torch.Tensor]]:
    """Random A and B (peft's `init_lora_weights=False`): stand-ins for separately trained adapters."""
    return [new_expert_adapter(trunk, spec, init_lora_weights=False, seed=i) for i, spec in enumerate(specs)]


@pytest.fixture(autouse=True)
def _tiny_tensors_on_one_thread(one_torch_thread: None) -> None:
    """Every router test runs torch on one thread (see `one_torch_thread`)."""


@pytest.fixture(scope="session")
def trunk() -> LlamaForCausalLM:
    """Shared by the session: compose a deep copy of it, never the trunk itself."""
    return make_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def llama_factory() -> Callable[..., LlamaForCausalLM]:
    return make_llama


@pytest.fixture(scope="session")
def experts() -> Callable[[torch.nn.Module, int], tuple[list[ExpertSpec], list[dict[str, torch.Tensor]]]]:
    """`experts(trunk, K)` -> K specs and their adapters on `trunk` (cached: peft is not free)."""
    cache: dict[tuple[int, int], tuple[list[ExpertSpec], list[dict[str, torch.Tensor]]]] = {}

    def build(trunk: torch.nn.Module, num_experts: int):
        key = (id(trunk), num_experts)
        if key not in cache:
            specs = make_specs(num_experts)
            cache[key] = specs, make_adapters(trunk, specs)
        return cache[key]

    return build
