"""The routed model equals peft-merged experts: forced to one expert, and mixed as the router decides."""

from __future__ import annotations

import copy

import pytest
import torch

from medplib.router import RouterConfig, attach_expert_adapter, compose, merge_expert


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_experts", [2, 3, 4])
def test_forced_gate_equals_trunk_with_that_expert_merged(
    trunk, experts, input_ids, num_experts, top_k
) -> None:
    specs, adapters = experts(trunk, num_experts)
    merged = [
        merge_expert(trunk, spec, adapter).eval() for spec, adapter in zip(specs, adapters, strict=True)
    ]
    moe = compose(copy.deepcopy(trunk), specs, adapters, RouterConfig(top_k=top_k))
    with torch.no_grad():
        unrouted = trunk(input_ids).logits
        for k, reference in enumerate(merged):
            expected = reference(input_ids).logits
            assert not torch.allclose(expected, unrouted, atol=1e-3)  # the adapters really change the model
            with moe.force_expert(specs[k].name):
                torch.testing.assert_close(moe.model(input_ids).logits, expected)


@pytest.mark.parametrize(
    ("num_experts", "top_k", "mlp_bias"),
    [(2, 1, False), (2, 2, True), (3, 1, True), (3, 2, False), (4, 1, False), (4, 2, True)],
)
def test_each_layer_mixes_the_merged_experts_by_the_gate(
    llama_factory, experts, input_ids, num_experts, top_k, mlp_bias
) -> None:
    trunk = llama_factory(mlp_bias=mlp_bias)
    specs, adapters = experts(trunk, num_experts)
    merged = [merge_expert(trunk, spec, adapter) for spec, adapter in zip(specs, adapters, strict=True)]
    moe = compose(copy.deepcopy(trunk), specs, adapters, RouterConfig(top_k=top_k, router_init_std=1.0))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(layer: int):
        def hook(_module, args, out) -> None:
            seen[layer] = (args[0], out)

        return hook

    for layer, mlp in moe.layers.items():
        mlp.register_forward_hook(keep(layer))
    with torch.no_grad():
        moe.model(input_ids)
        for layer, (x, out) in seen.items():
            routing = moe.layers[layer].last_routing
            flat = x.reshape(-1, x.shape[-1])
            each = torch.stack([m.model.layers[layer].mlp(flat) for m in merged], dim=1)  # (N, K, H)
            chosen = each.gather(1, routing.experts[..., None].expand(-1, -1, flat.shape[1]))
            expected = (routing.weights[..., None] * chosen).sum(dim=1)
            torch.testing.assert_close(out.reshape(flat.shape), expected)
            if top_k == 1:
                torch.testing.assert_close(routing.weights[:, 0], routing.logits.softmax(-1).max(-1).values)
            else:
                torch.testing.assert_close(routing.weights.sum(-1), torch.ones(len(flat)))


def test_adapters_saved_by_peft_compose_and_match_their_merge(trunk, experts, input_ids, tmp_path) -> None:
    """Stage IV's start: experts trained and saved as ordinary peft adapters, then composed from folders."""
    specs, _ = experts(trunk, 2)
    folders = []
    for i, spec in enumerate(specs):
        torch.manual_seed(10 + i)
        trained = attach_expert_adapter(copy.deepcopy(trunk), spec, init_lora_weights=False)
        trained.save_pretrained(tmp_path / spec.name)
        folders.append(tmp_path / spec.name)
    moe = compose(copy.deepcopy(trunk), specs, folders)
    with torch.no_grad():
        for spec, folder in zip(specs, folders, strict=True):
            with moe.force_expert(spec.name):
                torch.testing.assert_close(
                    moe.model(input_ids).logits, merge_expert(trunk, spec, folder)(input_ids).logits
                )


def test_fresh_experts_start_as_the_trunk(trunk, experts, input_ids) -> None:
    specs, _ = experts(trunk, 3)
    moe = compose(copy.deepcopy(trunk), specs)
    with torch.no_grad(), moe.force_expert(2):
        torch.testing.assert_close(moe.model(input_ids).logits, trunk(input_ids).logits)
