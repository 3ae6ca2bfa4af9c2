"""Quantised weights for the LLM: `medplib.load(..., quantization="int8" | "int4")`.

What is quantised: every linear layer of the LLM: the attention and MLP projections of each decoder
layer (a routed MLP's shared projections included) and the LM head; and the CLIP tower's blocks (as
LISA's and MedPLIB's 8-bit loading quantises the LLaVA tower with the LLM). What stays in full
precision: the router gate (its top-1 choice flips on small errors), the norms and embeddings (not
linear layers), the CLIP patch embedding, the projector, the region encoder, the `<SEG>` head and
SAM, and the experts' LoRA factors (rank 8-16: under 1% of the LLM's bytes at every preset).

How, by device:

- CPU, int8: torch's dynamic quantisation (`torch.ao.quantization.quantize_dynamic`): int8 weights
  per output channel, activations quantised per call, products on fbgemm's int8 kernels (VNNI).
  torchao 0.18 was measured too: its int8 tensors run 2-30x slower than fp32 in eager mode on this
  CPU, while fbgemm's are 2-7x faster (`docs/performance.md`).
- CPU, int4: weights packed two per byte with a scale and an offset per group of 32 input columns
  (`Int4Linear`), dequantised per call. It saves memory, not time: neither torch's int4 CPU kernel
  (`_weight_int4pack_mm_for_cpu`, measured 100x slower than fp32 here) nor torchao 0.18 (no CPU int4
  layout) is faster.
- CUDA: bitsandbytes, `Linear8bitLt` (LLM.int8()) and `Linear4bit` (nf4, bf16 compute), as MedPLIB
  and LISA load their 8- and 4-bit models.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medplib.core.errors import InvalidInputError

Quantization = Literal["int8", "int4"]
QUANTIZATIONS: tuple[str, ...] = ("int8", "int4")
INT4_GROUP = 32
# Module names (last component) of linear layers inside the LLM that stay in full precision.
FULL_PRECISION = ("router", "lora_A", "lora_B")


def int4_group(in_features: int) -> int:
    """Columns per int4 scale: `INT4_GROUP`, or the largest smaller power of two that divides the width."""
    group = INT4_GROUP
    while in_features % group:
        group //= 2
    return group


def check_quantization(quantization: str | None) -> Quantization | None:
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise InvalidInputError(f"unknown quantization {quantization!r}; use one of {list(QUANTIZATIONS)}")
    return quantization  # type: ignore[return-value]


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Full names (from `model`) of the linear layers `quantize` replaces."""
    names = []
    for root in ("language_model", "vision_tower.encoder"):
        for name, module in model.get_submodule(root).named_modules():
            parts = name.split(".")
            if isinstance(module, nn.Linear) and not any(part in FULL_PRECISION for part in parts):
                names.append(f"{root}.{name}")
    return names


class Int4Linear(nn.Module):
    """A linear layer whose weight is stored as 4-bit codes, one scale and offset per group of inputs.

    w = offset + scale * code, code in 0..15 (asymmetric, per group: the group's min maps to 0 and its
    max to 15). Scales and offsets are bf16; the weight is dequantised to the input's dtype per call.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        group = int4_group(in_features)
        if group < 2:
            raise InvalidInputError(f"int4 packs two columns per byte: the width {in_features} is odd")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        weight = linear.weight.detach().float().reshape(out_features, in_features // group, group)
        low, high = weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny)
        scale, low = scale.bfloat16(), low.bfloat16()
        codes = ((weight - low.float()) / scale.float()).round().clamp(0, 15).to(torch.uint8)
        codes = codes.reshape(out_features, in_features)
        self.register_buffer("packed", codes[:, 0::2] | (codes[:, 1::2] << 4))
        self.register_buffer("scale", scale[..., 0])
        self.register_buffer("offset", low[..., 0])
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        codes = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(
            self.out_features, -1, self.group
        )
        weight = self.offset[..., None].to(dtype) + self.scale[..., None].to(dtype) * codes.to(dtype)
        return weight.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)


def quantize(model: nn.Module, quantization: Quantization) -> list[str]:
    """Replace the LLM's linear layers of a loaded model in place (after it is on its device); returns
    the names replaced."""
    names = quantized_linear_names(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        _quantize_bitsandbytes(model, names, quantization)
    elif quantization == "int8":
        if model.dtype != torch.float32:
            raise InvalidInputError("int8 on the CPU needs dtype float32 (fbgemm's kernels take fp32 inputs)")
        with warnings.catch_warnings():
            # torch marks torch.ao.quantization deprecated (for torchao), yet 2.14 still ships it and its
            # fbgemm kernels; until torchao's int8 is as fast on the CPU, this is the one that is.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
            from torch.ao.quantization import quantize_dynamic

            quantize_dynamic(model, set(names), dtype=torch.qint8, inplace=True)
    else:
        for name in names:
            _replace(model, name, Int4Linear(model.get_submodule(name)))
    return names


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)


def _quantize_bitsandbytes(model: nn.Module, names: list[str], quantization: Quantization) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise InvalidInputError(
            "quantization on CUDA needs bitsandbytes: pip install 'medplib[quantization]'"
        ) from None
    for name in names:
        linear = model.get_submodule(name)
        device, weight = linear.weight.device, linear.weight.detach().cpu()
        bias = linear.bias is not None
        if quantization == "int8":
            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
            )
            new.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            new.weight = bnb.nn.Params4bit(weight.half(), requires_grad=False, quant_type="nf4")
        if bias:
            new.bias = nn.Parameter(linear.bias.detach().cpu().half(), requires_grad=False)
        _replace(model, name, new.to(device))  # bitsandbytes quantises on the move to the GPU


def weight_bytes(
    model: nn.Module, components: dict[str, str], quantization: Quantization | None
) -> dict[str, int]:
    """Bytes of the weights per component (and 'total') once quantised, counted from shapes (works on
    the meta device): a quantised linear's weight at 1 byte (int8; + an fp32 scale per output
    channel) or half a byte (int4; + a bf16 scale and offset per `int4_group` columns), everything else at its
    dtype's size."""
    quantized = set(quantized_linear_names(model)) if quantization else set()
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        for tensor_name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            full = f"{name}.{tensor_name}" if name else tensor_name
            if name in quantized and tensor_name == "weight":
                out_features, in_features = tensor.shape
                if quantization == "int8":
                    size = tensor.numel() + 4 * out_features
                else:
                    size = tensor.numel() // 2 + 2 * 2 * out_features * (
                        in_features // int4_group(in_features)
                    )
            else:
                size = tensor.numel() * tensor.element_size()
            sizes[full] = size
    result = {
        component: sum(size for key, size in sizes.items() if key.startswith(f"{path}."))
        for component, path in components.items()
    }
    result["total"] = sum(sizes.values())
    return result
