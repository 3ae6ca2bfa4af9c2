"""q/k/v and gate/up of a LLaMA layer as one int8 product each, for the lean trunk (`kv_cache.run_trunk`).

A decoded token costs an int8 product about the same whether it has 512 or 1536 outputs (50-60 us
at the `small` preset): quantising the activation and the call dominate, not the weight. One product
for q, k and v and one for gate and up turn a layer's seven calls into four. For `Int8Linear` this is
exact: the three (or two) projections read the same input, which fbgemm quantises on the same range
either way, and every output channel keeps its own int8 codes and scale. fp32 products are left
alone: measured, one (512 -> 1536) product is no faster than three (512 -> 512) ones, their time being
the weight's bytes.

The fused layer holds the weight; the original layers become row slices of it (`Int8Linear.slice_of`),
so nothing is stored twice and a checkpoint's keys and codes are unchanged. Called on their own
(transformers' trunk, e.g. building a prefix's keys and values), the slices share one fused product
per input (`Int8Linear.shared_output`), so that path costs what it did. A layer whose projections
are anything else (fp32, a peft LoRA wrapper, a routed MLP, int4, bitsandbytes) is run as it is.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

from medplib.core.model.quantization import Int8Linear


@dataclass(frozen=True)
class FusedProjections:
    """One decoder layer's fused products (None where its projections cannot be fused)."""

    qkv: Int8Linear | None  # outputs: q's, then k's, then v's
    gate_up: Int8Linear | None  # outputs: gate's, then up's
    sources: tuple[nn.Module, ...]  # the layers fused, in order: q, k, v, gate, up (those fused)

    def is_current(self, layer: nn.Module) -> bool:
        """Whether the layer still holds these sources, each still a slice of its fused product (a
        layer replaced, or reloaded from a state dict, has its own weight again)."""
        current = _sources(layer, self.qkv is not None, self.gate_up is not None)
        return current == self.sources and all(
            isinstance(source, Int8Linear) and source.slice_of is not None for source in self.sources
        )


_FUSED: weakref.WeakKeyDictionary[nn.Module, FusedProjections] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def fuse_int8(layers: list[nn.Module]) -> Int8Linear | None:
    """One `Int8Linear` whose outputs are `layers`' outputs side by side, the layers turned into its row
    slices; None (nothing changed) unless they are bias-free `Int8Linear`s on one input and settings."""
    if not all(type(layer) is Int8Linear and layer.bias is None for layer in layers):
        return None
    if len({(layer.in_features, layer.reduce_range, layer.per_token) for layer in layers}) != 1:
        return None
    codes, scales = zip(*(layer.codes() for layer in layers), strict=True)
    first = layers[0]
    fused = Int8Linear(
        torch.cat(codes), torch.cat(scales), None, reduce_range=first.reduce_range, per_token=first.per_token
    )
    fused.readers = len(layers)
    start = 0
    for layer in layers:
        layer._packed = None
        layer.slice_of = (fused, start, start + layer.out_features)
        start += layer.out_features
    return fused


def fused_projections(layer: nn.Module) -> FusedProjections | None:
    """The layer's fused products, built on first use and rebuilt when its projections changed;
    None where nothing of it can be fused."""
    known = _FUSED.get(layer)
    if known is not None and known.is_current(layer):
        return known
    with _LOCK:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = fuse_int8([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = fuse_int8([mlp.gate_proj, mlp.up_proj]) if type(mlp) is LlamaMLP else None
        if qkv is None and gate_up is None:
            _FUSED.pop(layer, None)
            return None
        fused = FusedProjections(qkv, gate_up, _sources(layer, qkv is not None, gate_up is not None))
        _FUSED[layer] = fused
        return fused


def _sources(layer: nn.Module, attention: bool, mlp: bool) -> tuple[nn.Module, ...]:
    """The projections a layer holds now, of the parts fused."""
    parts: tuple[nn.Module, ...] = ()
    if attention:
        parts += (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    if mlp:
        parts += (getattr(layer.mlp, "gate_proj", None), getattr(layer.mlp, "up_proj", None))
    return parts
