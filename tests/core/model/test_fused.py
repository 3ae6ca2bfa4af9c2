"""The lean trunk's fused int8 products and rotary embedding are exact: the same numbers, bit for bit,
as the layers and functions they stand in for, and a checkpoint does not see them."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from medplib.core.expert_spec import ExpertSpec, LoraSpec
from medplib.core.model import MedPLIBForCausalLM, Request, Turn, build_medplib
from medplib.core.model.fused import fuse_int8, fused_projections
from medplib.core.model.generation import decode
from medplib.core.model.kv_cache import (
    LayerPlan,
    StaticKVCache,
    direct_call,
    norm_call,
    rotate,
    run_trunk,
    signed_sin,
)
from medplib.core.model.quantization import Int8Linear, quantize


def _int8_model() -> MedPLIBForCausalLM:
    torch.manual_seed(0)
    model = build_medplib("tiny").eval()
    quantize(model, "int8")
    return model


def test_a_fused_int8_product_equals_the_layers_it_replaces() -> None:
    torch.manual_seed(0)
    layers = [Int8Linear.from_linear(nn.Linear(64, width, bias=False)) for width in (64, 32, 32)]
    x = torch.randn(5, 64) * 3
    outputs = [layer(x) for layer in layers]
    codes = [layer.codes() for layer in layers]
    fused = fuse_int8(layers)
    assert fused is not None and fused.out_features == 128
    assert torch.equal(fused(x), torch.cat(outputs, dim=-1))
    for layer, output, (code, scale) in zip(layers, outputs, codes, strict=True):
        assert layer._packed is None and layer.slice_of[0] is fused  # the weight is held once
        assert torch.equal(layer(x), output)  # a slice called on its own: the same numbers
        assert torch.equal(layer.codes()[0], code) and torch.equal(layer.codes()[1], scale)
    # Called in turn on one input, as a trunk does, the slices share one product, then let it go.
    calls = []
    fused.register_forward_hook(lambda *_: calls.append(1))
    for index, layer in enumerate(layers):
        assert torch.equal(layer(x), outputs[index])
        assert (fused._shared is None) == (index == len(layers) - 1)
    assert len(calls) == 1


def test_layers_that_are_not_bias_free_int8_are_not_fused() -> None:
    torch.manual_seed(0)
    assert fuse_int8([nn.Linear(8, 8), nn.Linear(8, 8)]) is None
    with_bias = [Int8Linear.from_linear(nn.Linear(8, 8)) for _ in range(2)]
    assert fuse_int8(with_bias) is None and all(layer.slice_of is None for layer in with_bias)
    fp32 = build_medplib("tiny").eval()
    assert fused_projections(fp32.language_model.model.layers[0]) is None


def test_the_rotation_equals_transformers_apply_rotary_pos_emb_bit_for_bit() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)  # (B, heads, T, head_dim)
    angles = torch.rand(2, 7, 8) * 40
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    cos_, sin_ = cos[:, :, None], signed_sin(sin)[:, :, None]
    assert torch.equal(rotate(q.transpose(1, 2), cos_, sin_).transpose(1, 2), expected_q)
    assert torch.equal(rotate(k.transpose(1, 2), cos_, sin_).transpose(1, 2), expected_k)


def test_the_fused_trunk_equals_the_unfused_one_bit_for_bit(processor, image) -> None:
    fused_model = _int8_model()
    plain_model = copy.deepcopy(fused_model)
    batch = processor([Request(image, [Turn("What modality is this?")]), Request(image, [Turn("Say.")])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = torch.tensor([[5], [6]])
    longer = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    outputs = []
    with torch.no_grad():
        for model, fuse in ((fused_model, True), (plain_model, False)):
            trunk = model.language_model.model
            embeds = model.embed_inputs(ids, batch["pixel_values"])
            cache = StaticKVCache.empty(trunk, len(ids), ids.shape[1] + 1, embeds, fuse=fuse)
            assert (cache.fused is not None) == fuse
            prompt = run_trunk(trunk, embeds, mask, positions, cache)
            after = run_trunk(trunk, model.get_input_embeddings()(step), longer, mask.sum(1, True), cache)
            outputs.append((prompt, after, cache.keys[0], cache.values[-1]))
    layer = fused_model.language_model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and layer.self_attn.q_proj.slice_of is not None
    assert plain_model.language_model.model.layers[0].self_attn.q_proj.slice_of is None
    for fused_tensor, plain_tensor in zip(*outputs, strict=True):
        assert torch.equal(fused_tensor, plain_tensor)


def test_fusing_leaves_the_checkpoint_as_it_was_and_a_reload_is_fused_again(processor, image) -> None:
    model = _int8_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    batch = processor([Request(image, [Turn("What modality is this?")])])
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    first = decode(model, *args, max_new_tokens=6)
    layer = model.language_model.model.layers[0]
    fused = fused_projections(layer)
    assert fused is not None and fused.qkv is not None and fused.gate_up is not None
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    model.load_state_dict(before)  # every layer packs its own weight again: the fusion is stale
    assert layer.self_attn.q_proj.slice_of is None and not fused.is_current(layer)
    again = decode(model, *args, max_new_tokens=6)
    assert fused_projections(layer) is not fused and layer.self_attn.q_proj.slice_of is not None
    assert torch.equal(again.sequences, first.sequences)


def test_a_routed_mlp_keeps_its_own_path_and_its_attention_is_fused(processor, image) -> None:
    from medplib.router import compose

    torch.manual_seed(0)
    model = build_medplib("tiny").eval()
    specs = [ExpertSpec(name=f"e{i}", capabilities=("vqa",), adapter=LoraSpec(r=4, alpha=8)) for i in (0, 1)]
    compose(model, specs)
    for name, parameter in model.named_parameters():  # LoRA B starts at zero: give the experts a delta
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.05)
    quantize(model, "int8")
    plain = copy.deepcopy(model)
    batch = processor([Request(image, [Turn("What modality is this?")])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = []
    with torch.no_grad():
        for copy_, fuse in ((model, True), (plain, False)):
            trunk = copy_.language_model.model
            embeds = copy_.embed_inputs(ids, batch["pixel_values"])
            cache = StaticKVCache.empty(trunk, 1, ids.shape[1], embeds, fuse=fuse)
            hidden.append(run_trunk(trunk, embeds, mask, positions, cache))
    fused = fused_projections(model.language_model.model.layers[0])
    assert fused is not None and fused.qkv is not None and fused.gate_up is None
    assert torch.equal(hidden[0], hidden[1])
    output = decode(model, ids, mask, batch["pixel_values"], max_new_tokens=8, require_seg=True)
    assert output.seg_hidden_states[0].shape[0] >= 1  # the routed layers decode through the fused ones


def test_the_layer_plan_calls_compute_what_the_modules_do_bit_for_bit() -> None:
    """The lean trunk calls an int8 layer's kernel, an fp32 layer's `F.linear` and SiLU's `F.silu`
    directly (`LayerPlan`), on (B, T, width) inputs as the trunk has them; anything else as it is."""
    torch.manual_seed(0)
    int8 = Int8Linear.from_linear(nn.Linear(64, 48, bias=False))
    fp32 = nn.Linear(64, 48)
    with_bias = Int8Linear.from_linear(nn.Linear(64, 48))
    per_token = Int8Linear.from_linear(nn.Linear(64, 48, bias=False), per_token=True)
    x = torch.randn(3, 5, 64) * 4
    with torch.no_grad():
        for module in (int8, fp32, with_bias, per_token, nn.SiLU()):
            direct = direct_call(module)
            assert torch.equal(direct(x), module(x))
            assert torch.equal(direct(x[:, -1:]), module(x[:, -1:]))  # one token per row
        assert direct_call(int8) is not int8 and direct_call(fp32) is not fp32
        # their forward does more than the kernel
        assert direct_call(with_bias) is with_bias and direct_call(per_token) is per_token
        gelu = nn.GELU()
        assert direct_call(gelu) is gelu
        int8.register_forward_hook(lambda *_: None)
        assert direct_call(int8) is int8  # a hook is not skipped
    model = _int8_model()
    layer = model.language_model.model.layers[0]
    plan = LayerPlan.of(layer, fused_projections(layer), torch.float32)
    assert plan.qkv is not None and plan.gate_up is not None and plan.gate is None
    assert LayerPlan.of(layer, None, torch.float32).gate is not None  # unfused: gate and up apart
    norm = layer.input_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        for dtype in (torch.float32, torch.bfloat16):  # the fused op itself, or the cast and product
            hidden = torch.randn(2, 3, norm.weight.shape[0]).to(dtype)
            assert torch.equal(norm_call(norm, dtype)(hidden), norm(hidden))
