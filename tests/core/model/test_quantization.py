"""Quantised weights: which layers get quantised, outputs close to full precision, bytes per component."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medplib.core.errors import InvalidInputError
from medplib.core.expert_spec import ExpertSpec, LoraSpec
from medplib.core.model import MedPLIBForCausalLM, Request, Turn, build_medplib
from medplib.core.model.pretrained import COMPONENTS
from medplib.core.model.quantization import (
    Int4Linear,
    Int8Linear,
    Int8Weight,
    check_quantization,
    int4_group,
    quantize,
    quantized_linear_names,
    weight_bytes,
)


def _hidden(model: MedPLIBForCausalLM, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        ).last_hidden_state


def _quantized_copy(quantization: str) -> MedPLIBForCausalLM:
    torch.manual_seed(0)
    model = build_medplib("tiny").eval()
    quantize(model, quantization)
    return model


@pytest.mark.parametrize(("quantization", "kind"), [("int8", Int8Linear), ("int4", Int4Linear)])
def test_the_llms_linear_layers_are_quantised_and_the_rest_is_not(
    tiny_model, processor, image, quantization, kind
) -> None:
    names = quantized_linear_names(tiny_model)
    layers = tiny_model.config.text_config.num_hidden_layers
    clip_layers = tiny_model.config.vision_config.num_hidden_layers
    assert len(names) == 7 * layers + 1 + 6 * clip_layers and "language_model.lm_head" in names
    assert "vision_tower.encoder.layers.0.mlp.fc1" in names
    batch = processor([Request(image, [Turn("What modality is this?")])])
    expected = _hidden(tiny_model, batch)
    model = _quantized_copy(quantization)
    assert all(isinstance(model.get_submodule(name), kind) for name in names)
    for kept in ("seg_head.fc1", "projector.linear_1", "sam.mask_decoder.iou_prediction_head.layers.0"):
        assert type(model.get_submodule(kept)) is nn.Linear
    hidden = _hidden(model, batch)
    similarity = torch.nn.functional.cosine_similarity(hidden, expected, dim=-1)
    assert similarity.min() > (0.99 if quantization == "int8" else 0.95)
    assert not torch.equal(hidden, expected)


def test_a_routed_mlp_keeps_its_gate_in_full_precision_and_its_lora_factors_at_int8(processor, image) -> None:
    from medplib.router import compose

    torch.manual_seed(0)
    model = build_medplib("tiny").eval()
    specs = [ExpertSpec(name=f"e{i}", capabilities=("vqa",), adapter=LoraSpec(r=4, alpha=8)) for i in (0, 1)]
    compose(model, specs)
    for name, parameter in model.named_parameters():  # LoRA B starts at zero: give the experts a delta
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.05)
    batch = processor([Request(image, [Turn("What modality is this?")])])
    expected = _hidden(model, batch)
    factor = model.get_submodule("language_model.model.layers.0.mlp.experts.1.lora_B.up_proj")
    names = quantize(model, "int8")
    assert "language_model.model.layers.0.mlp.down_proj" in names
    assert not any(name.endswith("router") or "lora_" in name for name in names)
    assert type(model.get_submodule("language_model.model.layers.0.mlp.router")) is nn.Linear
    stored = model.get_submodule("language_model.model.layers.0.mlp.experts.1.lora_B.up_proj")
    assert isinstance(stored, Int8Weight) and stored.codes.dtype == torch.int8
    step = stored.scale[:, None] / 2  # half a code: the rounding error of each weight
    assert ((stored.weight - factor.weight).abs() <= step + 1e-7).all()
    similarity = torch.nn.functional.cosine_similarity(_hidden(model, batch), expected, dim=-1)
    # Over random draws of these deltas (std 0.05, far above a trained LoRA's) the worst token's
    # cosine ranged 0.964-0.999 and the mean 0.999-1.000 (torch seeds 0-3, both tiny tokenizers).
    assert similarity.mean() > 0.998 and similarity.min() > 0.95


def test_per_token_int8_quantises_each_token_on_its_own_range() -> None:
    """A row's output does not depend on the other rows of the call (fbgemm alone quantises the whole
    input on one range, so a large row would coarsen a small one), and is close to the float product."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    int8 = Int8Linear.from_linear(linear, per_token=True)
    small, large = torch.randn(1, 64) * 0.01, torch.randn(1, 64) * 100
    alone = int8(torch.cat([small, small]))[0]
    beside_a_large_row = int8(torch.cat([small, large]))[0]
    torch.testing.assert_close(beside_a_large_row, alone)
    step = (small.max() - small.min()) / 127 * linear.weight.abs().sum(dim=1)  # a 7-bit step per input
    assert ((int8(small)[0] - linear(small)[0]).abs() <= step).all()  # a lone token: fbgemm's own range
    assert ((alone - linear(small)[0]).abs() <= step).all()
    x = torch.randn(5, 7, 64)
    torch.testing.assert_close(int8(x), linear(x), rtol=0.05, atol=0.05)
    codes, scale = int8.codes()
    assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scale.shape == (32,)
    torch.testing.assert_close(codes.float() * scale[:, None], linear.weight, atol=scale.max().item(), rtol=0)


def test_int4_codes_round_the_weight_to_its_group_grid() -> None:
    linear = nn.Linear(64, 8)
    packed = Int4Linear(linear)
    assert packed.packed.dtype == torch.uint8 and packed.packed.shape == (8, 32)
    error = (packed.dequantized(torch.float32) - linear.weight).abs()
    step = packed.scale.float().repeat_interleave(32, dim=1)
    assert (error <= step / 2 + 1e-2 * step).all()
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        packed(x), nn.functional.linear(x, packed.dequantized(torch.float32), linear.bias)
    )
    assert Int4Linear(nn.Linear(40, 8)).group == 8
    with pytest.raises(InvalidInputError, match="odd"):
        Int4Linear(nn.Linear(41, 8))


def test_bytes_per_component_count_the_quantised_weights() -> None:
    model = build_medplib("tiny", device="meta")
    full = weight_bytes(model, COMPONENTS, None)
    assert full["total"] == 4 * sum(p.numel() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    linears = [model.get_submodule(name) for name in quantized_linear_names(model)]
    weights = sum(linear.weight.numel() for linear in linears)
    groups = sum(linear.weight.numel() // int4_group(linear.in_features) for linear in linears)
    outputs = sum(linear.out_features for linear in linears)
    int8, int4 = weight_bytes(model, COMPONENTS, "int8"), weight_bytes(model, COMPONENTS, "int4")
    saved = {name: full[name] - int8[name] for name in ("language_model", "vision_tower")}
    assert sum(saved.values()) == 3 * weights - 4 * outputs
    saved = {name: full[name] - int4[name] for name in ("language_model", "vision_tower")}
    assert sum(saved.values()) == 3.5 * weights - 4 * groups
    for component in ("projector", "seg_head", "sam_mask_decoder"):
        assert full[component] == int8[component] == int4[component]


def test_unknown_quantization_is_refused() -> None:
    assert check_quantization(None) is None and check_quantization("int8") == "int8"
    with pytest.raises(InvalidInputError, match="unknown quantization 'int3'"):
        check_quantization("int3")


def test_int8_products_do_not_saturate_on_this_cpu() -> None:
    """Activations at the top code times weights at +-127, pairs adding up: what a 16-bit pair sum
    would clip. The range `Int8Linear` picks for this CPU multiplies them exactly."""
    weight = torch.ones(8, 64)
    weight[:, 1::2] = 1.0 - 2.0 * (torch.arange(8)[:, None] % 2)
    linear = nn.Linear(64, 8, bias=False)
    linear.weight.data = weight
    x = torch.ones(3, 64)
    x[:, 0] = 0.0
    torch.testing.assert_close(Int8Linear.from_linear(linear)(x), x @ weight.T, rtol=0, atol=1e-4)


def test_saving_quantised_merges_a_lora_adapter_first(processor, image) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from medplib.core.model.quantized_checkpoint import merge_adapters

    torch.manual_seed(0)
    model = build_medplib("tiny").eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    model.language_model = inject_adapter_in_model(config, model.language_model)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.05)
    batch = processor([Request(image, [Turn("What modality is this?")])])
    adapted = _hidden(model, batch)
    merged = merge_adapters(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert type(merged.get_submodule("language_model.model.layers.0.mlp.up_proj")) is nn.Linear
    torch.testing.assert_close(_hidden(merged, batch), adapted, rtol=1e-4, atol=1e-4)
