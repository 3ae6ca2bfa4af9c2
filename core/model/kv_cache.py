"""A preallocated KV cache and a lean pass of the LLaMA trunk over it, for generation.

transformers' `LlamaModel.forward` rebuilds the causal mask, dispatches through its attention
interface and grows a `DynamicCache` by concatenation at every step. At the `small` preset one
decoded token costs about 3.6 ms of matrix products and as much again of that bookkeeping
(`benchmarks/peers.py`). `run_trunk` keeps the trunk's own modules (norms, projections, whatever MLP
sits in a layer: a routed MLP, a peft LoRA or a quantised linear runs unchanged) and its rotary
embedding, and does the rest directly: keys and values are written into buffers sized once for the
whole generation, and the mask is one boolean tensor per call. Where a layer's projections are int8,
q/k/v and gate/up run as one product each (`fused.py`), and the rotary embedding is four ops on
queries and keys together (`rotate`); both give the same numbers bit for bit.

The arithmetic is the trunk's: positions count real tokens only, a query sees the real keys at or
before it, and each query also sees its own key, so a padding row attends to something and stays
finite (its output is never read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.activations import SiLUActivation
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

from medplib.core.model.fused import FusedProjections, fused_projections
from medplib.core.model.quantization import Int8Linear


class RotaryTable:
    """The rotary embedding's cos and sin for every position a generation can reach, computed once:
    each decoding step then indexes them instead of recomputing (the same values: each entry is one
    product inv_freq * position, then cos / sin, whatever the shape of the call)."""

    def __init__(self, trunk: nn.Module, positions: int, like: torch.Tensor) -> None:
        every = torch.arange(positions, device=like.device)[None]
        cos, sin = trunk.rotary_emb(like, every)
        self.cos, self.sin = cos[0], signed_sin(sin[0])

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and `signed_sin` (B, 1, T, head_dim) at the positions, for `rotate`."""
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin = x.roll(half) * signed_sin, exactly
    (rotate_half(x) is (-x2, x1), x.roll(half) is (x2, x1), and negating is exact)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding (`apply_rotary_pos_emb`, the same products in the same order) of x
    (B, heads, T, head_dim), in four ops instead of its slicing, negating and concatenating."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class StaticKVCache:
    """Keys and values per layer, (B, heads_kv, capacity, head_dim), of which `length` columns are filled."""

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
        rotary: RotaryTable | None = None,
        fused: list[FusedProjections | None] | None = None,
        plans: list[LayerPlan] | None = None,
    ) -> None:
        self.keys, self.values, self.length = keys, values, length
        self.rotary = rotary  # cos and sin of every position it can hold, or None: computed per call
        self.fused = fused  # per layer, its fused int8 products (`fused.py`), checked once per cache
        self.plans = plans  # per layer, what `run_trunk` calls (`LayerPlan`); None: built per call
        self.final_norm: Product | None = None  # the trunk's last norm, as `LayerPlan`'s norms

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @classmethod
    def empty(
        cls, trunk: nn.Module, batch: int, capacity: int, like: torch.Tensor, *, fuse: bool = True
    ) -> StaticKVCache:
        """An empty cache; `fuse`: its layers' int8 projections run fused (`fused.py`; exact)."""
        config = trunk.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, capacity, head_dim)
        layers = len(trunk.layers)
        make = [like.new_empty(shape) for _ in range(2 * layers)]
        # Positions count real tokens, so they stay below the capacity. A dynamic rope (frequencies
        # that depend on the longest position of the call) is computed per call, as transformers does.
        fixed = getattr(trunk.rotary_emb, "rope_type", "default") == "default"
        rotary = RotaryTable(trunk, capacity, like) if fixed else None
        fused = [fused_projections(layer) for layer in trunk.layers] if fuse else None
        per_layer = fused or [None] * layers
        plans = [LayerPlan.of(layer, f, like.dtype) for layer, f in zip(trunk.layers, per_layer, strict=True)]
        static = cls(make[:layers], make[layers:], 0, rotary, fused, plans)
        static.final_norm = norm_call(trunk.norm, like.dtype)
        return static

    @classmethod
    def from_cache(
        cls, cache: Cache | PrefixKV, trunk: nn.Module, capacity: int, like: torch.Tensor
    ) -> StaticKVCache:
        """A copy of a cache's keys and values, with room for `capacity` columns in all."""
        length = cache.get_seq_length()
        static = cls.empty(trunk, like.shape[0], max(capacity, length), like)
        if isinstance(cache, PrefixKV):
            for row, prefix in enumerate(cache.rows):
                for layer, (keys, values) in enumerate(zip(static.keys, static.values, strict=True)):
                    keys[row, :, :length] = prefix[layer, 0]
                    values[row, :, :length] = prefix[layer, 1]
        else:
            for layer, keys, values in zip(cache.layers, static.keys, static.values, strict=True):
                keys[:, :, :length] = layer.keys
                values[:, :, :length] = layer.values
        static.length = length
        return static


Product = Callable[[torch.Tensor], torch.Tensor]


def direct_call(module: nn.Module) -> Product:
    """`module(x)` with less around it: an `Int8Linear`'s kernel alone, an `nn.Linear`'s `F.linear`,
    SiLU's `F.silu` (each what their forward computes); any other module (a peft LoRA wrapper, a
    routed MLP, int4, bitsandbytes), or one with forward hooks, is called as it is."""
    if _hooked(module):
        return module
    if type(module) is Int8Linear:
        return module.kernel() or module
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if type(module) is SiLUActivation or (type(module) is nn.SiLU and not module.inplace):
        return F.silu
    return module


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module runs hooks (its own or global ones) a direct call would skip."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


@dataclass(frozen=True)
class LayerPlan:
    """What `run_trunk` calls in one decoder layer, looked up once per generation: a decoded token
    pays a module call and two reshapes per product otherwise, a tenth of its step at the `small`
    preset (int8). The same arithmetic as the layer's modules, bit for bit."""

    input_norm: Product
    post_attention_norm: Product
    qkv: Product | None  # the fused q/k/v product (`fused.py`), or None: `projections`
    projections: tuple[Product, ...]  # q, k, v apart
    o: Product
    gate_up: Product | None  # the fused gate/up product of a `LlamaMLP`, or None
    gate: Product | None  # a `LlamaMLP`'s gate and up apart (None: fused, or not a `LlamaMLP`)
    up: Product | None
    act: Product | None
    down: Product | None
    mlp: Product  # the whole MLP: whatever a layer holds that is not a `LlamaMLP` (a routed MLP)

    @classmethod
    def of(cls, layer: nn.Module, products: FusedProjections | None, dtype: torch.dtype) -> LayerPlan:
        """The plan of `layer` for hidden states of `dtype`, with its fused products (or None)."""
        attention, mlp = layer.self_attn, layer.mlp
        fused_qkv = products.qkv if products is not None else None
        fused_gate_up = products.gate_up if products is not None else None
        llama_mlp = type(mlp) is LlamaMLP and not _hooked(mlp)
        return cls(
            input_norm=norm_call(layer.input_layernorm, dtype),
            post_attention_norm=norm_call(layer.post_attention_layernorm, dtype),
            qkv=direct_call(fused_qkv) if fused_qkv is not None else None,
            projections=tuple(direct_call(p) for p in (attention.q_proj, attention.k_proj, attention.v_proj)),
            o=direct_call(attention.o_proj),
            gate_up=direct_call(fused_gate_up) if fused_gate_up is not None and llama_mlp else None,
            gate=direct_call(mlp.gate_proj) if llama_mlp and fused_gate_up is None else None,
            up=direct_call(mlp.up_proj) if llama_mlp and fused_gate_up is None else None,
            act=direct_call(mlp.act_fn) if llama_mlp else None,
            down=direct_call(mlp.down_proj) if llama_mlp else None,
            mlp=mlp,
        )


class PrefixKV:
    """Per row, the keys and values of a prefix all rows share in length, each (layers, 2, heads_kv,
    P, head_dim): `past_key_values` that generation copies once, straight into its preallocated cache
    (a transformers cache built from them would concatenate every layer first)."""

    def __init__(self, rows: list[torch.Tensor]) -> None:
        self.rows = rows

    def get_seq_length(self) -> int:
        return self.rows[0].shape[3]

    def to_dynamic(self, config: Any) -> DynamicCache:
        stacked = torch.stack(self.rows, dim=2)  # (layers, 2, batch, heads, P, head_dim)
        return DynamicCache([(layer[0], layer[1]) for layer in stacked], config=config)


def supports_static_cache(trunk: nn.Module) -> bool:
    """Whether `run_trunk` knows every layer's attention (LLaMA's); else transformers' forward runs."""
    return all(isinstance(getattr(layer, "self_attn", None), LlamaAttention) for layer in trunk.layers)


def run_trunk(
    trunk: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    cache: StaticKVCache,
) -> torch.Tensor:
    """The trunk (`LlamaModel`) on T new embeddings (B, T, hidden) after `cache.length` cached columns.

    `attention_mask` (B, cache.length + T) marks the real columns (None: all are); the new keys and
    values are written into the cache, whose `length` grows by T. Returns the final-norm hidden states
    (B, T, hidden).
    """
    batch, steps, _ = inputs_embeds.shape
    start, end = cache.length, cache.length + steps
    if end > cache.capacity:
        raise RuntimeError(f"the KV cache holds {cache.capacity} columns, {end} needed")
    allowed = _attention_mask(attention_mask, start, steps, inputs_embeds.device)
    hidden = inputs_embeds
    rotary = cache.rotary
    if rotary is not None:
        cos, sin = rotary(position_ids)
    else:
        cos, sin = trunk.rotary_emb(hidden, position_ids)
        cos, sin = cos[:, None], signed_sin(sin)[:, None]
    plans = cache.plans or [LayerPlan.of(layer, None, hidden.dtype) for layer in trunk.layers]
    for layer, keys, values, plan in zip(trunk.layers, cache.keys, cache.values, plans, strict=True):
        attention = layer.self_attn
        kv_heads = keys.shape[1]
        normed = plan.input_norm(hidden)
        # Heads first, (B, heads, T, head_dim), as sdpa and the cache take them.
        if plan.qkv is not None:  # q heads, then k's, then v's
            qkv = plan.qkv(normed).view(batch, steps, -1, attention.head_dim).transpose(1, 2)
            query_key = rotate(qkv[:, :-kv_heads], cos, sin)  # both rotated in one pass
            query, key = query_key[:, :-kv_heads], query_key[:, -kv_heads:]
            value = qkv[:, -kv_heads:]
        else:
            shape = (batch, steps, -1, attention.head_dim)
            q, k, v = (product(normed).view(shape).transpose(1, 2) for product in plan.projections)
            query, key, value = rotate(q, cos, sin), rotate(k, cos, sin), v
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        attended = F.scaled_dot_product_attention(
            query,
            keys[:, :, :end],
            values[:, :, :end],
            attn_mask=allowed,
            scale=attention.scaling,
            enable_gqa=attention.num_key_value_groups > 1,
        )
        hidden = hidden + plan.o(attended.transpose(1, 2).reshape(batch, steps, -1))
        normed = plan.post_attention_norm(hidden)
        if plan.gate_up is not None:  # LlamaMLP's arithmetic, one product
            gate, up = plan.gate_up(normed).chunk(2, dim=-1)
            hidden = hidden + plan.down(plan.act(gate) * up)
        elif plan.gate is not None:
            hidden = hidden + plan.down(plan.act(plan.gate(normed)) * plan.up(normed))
        else:
            hidden = hidden + plan.mlp(normed)
    cache.length = end
    return (cache.final_norm or norm_call(trunk.norm, hidden.dtype))(hidden)


def _attention_mask(
    attention_mask: torch.Tensor | None, start: int, steps: int, device: torch.device
) -> torch.Tensor | None:
    """allowed (B, 1, T, start + T): key j is real and not after query t; each query always sees itself.
    None where that is every key (one new token per row and no padding): sdpa then needs no mask.
    `attention_mask` None: every column is real."""
    if attention_mask is None:
        if steps == 1:
            return None
        attention_mask = torch.ones(1, start + steps, dtype=torch.bool, device=device)
    real = attention_mask.bool()
    if steps == 1:
        return None if real.all() else real[:, None, None, :]
    columns = torch.arange(start + steps, device=real.device)
    query_columns = torch.arange(start, start + steps, device=real.device)[:, None]
    allowed = (real[:, None, :] & (columns <= query_columns)) | (columns == query_columns)
    return allowed[:, None]


def norm_call(norm: nn.Module, dtype: torch.dtype) -> Product:
    """`_rms_norm(norm, hidden)` for hidden states of `dtype`, its checks done once: torch's fused op
    itself where everything is float32."""
    if isinstance(norm, LlamaRMSNorm) and dtype == torch.float32 == norm.weight.dtype:
        shape, weight, eps = (norm.weight.shape[-1],), norm.weight, norm.variance_epsilon
        return lambda hidden: torch.rms_norm(hidden, shape, weight, eps)
    return lambda hidden: _rms_norm(norm, hidden)


def _rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LLaMA's RMSNorm (in float32, back to the input's dtype, times the weight) as torch's fused op."""
    if not isinstance(norm, LlamaRMSNorm):
        return norm(hidden)
    if hidden.dtype == torch.float32 == norm.weight.dtype:  # one kernel, the same products in order
        return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, eps=norm.variance_epsilon)
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)


def generation_cache(
    model: Any, past_key_values: Cache | PrefixKV | None, rows: int, capacity: int, like: torch.Tensor
) -> StaticKVCache | Cache:
    """The cache one generation of `rows` rows and at most `capacity` columns runs over, continuing
    `past_key_values`: a `StaticKVCache` for a LLaMA trunk (`run_trunk`), else a transformers cache.
    `MedPLIBForCausalLM.forward` takes either as `past_key_values`."""
    trunk = model.language_model.model
    if not supports_static_cache(trunk):
        cache = past_key_values if past_key_values is not None else DynamicCache(config=trunk.config)
        return cache.to_dynamic(trunk.config) if isinstance(cache, PrefixKV) else cache
    if past_key_values is None:
        return StaticKVCache.empty(trunk, rows, capacity, like)
    return StaticKVCache.from_cache(past_key_values, trunk, capacity, like)
