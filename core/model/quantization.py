"""Quantised weights for the LLM: `medplib.load(..., quantization="int8" | "int4")`.

What is quantised: every linear layer of the LLM: the attention and MLP projections of each decoder
layer (a routed MLP's shared projections included) and the LM head; and the CLIP tower's blocks (as
LISA's and MedPLIB's 8-bit loading quantises the LLaVA tower with the LLM). What stays in full
precision: the router gate (its top-1 choice flips on small errors), the norms and embeddings (not
linear layers), the CLIP patch embedding, the projector, the region encoder, the `<SEG>` head and
SAM. The experts' LoRA factors (rank 8-16: under 1% of the LLM's bytes at every preset) are kept at
int8 too (below).

How, by device:

- CPU, int8: `Int8Linear`: int8 weights, symmetric per output channel, on fbgemm's dynamic int8
  kernels (VNNI), activations on all 8 bits where the CPU multiplies them exactly. torch's
  `quantize_dynamic` defaults (one weight scale per tensor, 7-bit activations) left greedy answers
  of the trained tiny pipeline equal to fp32's on only 91% of questions; 8-bit activations give 96%,
  and quantising each token on its own range (`per_token=True`) 98% (`benchmarks/quantization.py`).
  torchao 0.18 was measured too: its int8 tensors run 2-30x slower than fp32 in eager mode on this
  CPU, while fbgemm's are 2-7x faster (`docs/performance.md`).
- CPU, int4: weights packed two per byte with a scale and an offset per group of 32 input columns
  (`Int4Linear`), dequantised per call. It saves memory, not time: neither torch's int4 CPU kernel
  (`_weight_int4pack_mm_for_cpu`, measured 100x slower than fp32 here) nor torchao 0.18 (no CPU int4
  layout) is faster.
- CUDA: bitsandbytes, `Linear8bitLt` (LLM.int8()) and `Linear4bit` (nf4, bf16 compute), as MedPLIB
  and LISA load their 8- and 4-bit models.
- The experts' LoRA factors (`lora_A` / `lora_B`, read as `.weight` by the routed MLP) are stored as
  int8 per output channel (`Int8Weight`) and dequantised when read, on every device: they are under
  1% of the bytes, so this is for completeness of a quantised checkpoint, not for memory or speed.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medplib.core.errors import InvalidInputError

Quantization = Literal["int8", "int4"]
QUANTIZATIONS: tuple[str, ...] = ("int8", "int4")
INT4_GROUP = 32
# The operator itself: calling the overload packet (`torch.ops.quantized.linear_dynamic`) adds a
# Python-side dispatch check per call, measured at a fifth of a one-token product's time here.
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default
# ... and its C++ function itself: the overload's `__call__` still asks per call whether a traced
# (fake) argument needs Python dispatch, about 15 us per call here; eager int8 never does.
_LINEAR_DYNAMIC = getattr(_LINEAR_DYNAMIC, "_op", _LINEAR_DYNAMIC)
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


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (-127..127) of a (out, in) weight and one float32 scale per output row."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


@functools.cache
def full_range_is_exact() -> bool:
    """Whether fbgemm multiplies 8-bit activations exactly on this CPU. Without VNNI its kernels sum
    pairs of u8 x s8 products in 16 bits, which saturate unless activations keep to 7 bits
    (`reduce_range`, half the resolution: 92.9% of the tiny pipeline's stage III answers equal fp32's
    instead of 98.0%). Probed with products that would saturate there."""
    weight = torch.ones(8, 64)
    weight[:, 1::2] = 1.0 - 2.0 * (torch.arange(8)[:, None] % 2)  # pairs that add up, and pairs that cancel
    codes, scale = int8_codes(weight)
    x = torch.ones(2, 64)
    x[:, 0] = 0.0  # every row spans [0, 1]: code 255
    layer = Int8Linear(codes, scale, None, reduce_range=False)
    return torch.allclose(layer(x), x @ (codes.float() * scale[:, None]).T, rtol=0, atol=1e-3)


class Int8Linear(nn.Module):
    """A linear layer on fbgemm's dynamic int8 kernel: int8 weights per output channel, activations
    quantised per call on 8 bits where this CPU multiplies them exactly (`full_range_is_exact`).

    The weight lives only in fbgemm's packed form (`codes()` unpacks it for a checkpoint). fbgemm
    quantises its whole input on one range; with `per_token`, each row x is first mapped onto [0, 1],
    x = low + span * u, and W x = span * (W u) + low * (W 1): every row then spans exactly the same
    range, is quantised as finely as on its own, and its result does not depend on the other rows.
    That is more faithful (98.0% instead of 96.0% of the tiny pipeline's stage III answers equal fp32's)
    but costs five passes over the activations per call: 15% of a cold question, 26% of a cold batch
    of 8 (`docs/performance.md`), so it is off by default.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        reduce_range: bool | None = None,
        per_token: bool = False,
    ) -> None:
        super().__init__()
        self.per_token = per_token
        # Rows start:stop of a fused layer's output (`fused.fuse_int8`), which holds the weight instead.
        self.slice_of: tuple[Int8Linear, int, int] | None = None
        self.readers = 0  # of a fused layer: its slices; `shared_output` holds its last output for them
        self._shared: list | None = None
        self.out_features, self.in_features = codes.shape
        # 7-bit activations where 8 would saturate (None: probe this CPU once).
        self.reduce_range = not full_range_is_exact() if reduce_range is None else reduce_range
        self._pack(codes, scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, per_token: bool = False) -> Int8Linear:
        return cls(*int8_codes(linear.weight), linear.bias, per_token=per_token)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "codes"], destination[prefix + "scale"] = self.codes()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        codes, scale = state_dict.get(prefix + "codes"), state_dict.get(prefix + "scale")
        rest = {k: v for k, v in state_dict.items() if k not in (prefix + "codes", prefix + "scale")}
        super()._load_from_state_dict(rest, prefix, *args)
        missing_keys = args[2]
        if codes is None or scale is None:
            missing_keys += [prefix + part for part in ("codes", "scale")]
        elif codes.shape != (self.out_features, self.in_features) or codes.dtype != torch.int8:
            wanted = (self.out_features, self.in_features)
            args[4].append(f"{prefix}codes: int8 {wanted} expected, got {codes.dtype} {tuple(codes.shape)}")
        else:
            self._pack(codes, scale)

    def _pack(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        with warnings.catch_warnings():  # torch marks quantized tensor creation deprecated (for torchao)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(
                codes.cpu(), scale.double().cpu(), torch.zeros(len(codes), dtype=torch.long), 0
            )
            self._packed = torch.ops.quantized.linear_prepack(weight, None)
        self.slice_of = None
        # W 1 of the dequantised weight: what a row's offset adds to its output.
        self.register_buffer("row_sums", codes.float().sum(dim=1) * scale.float(), persistent=False)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes (out, in) and float32 scale per output channel."""
        if self.slice_of is not None:
            fused, start, stop = self.slice_of
            codes, scale = fused.codes()
            return codes[start:stop].clone(), scale[start:stop].clone()
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.int_repr(), weight.q_per_channel_scales().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slice_of is not None:  # outside the lean trunk: the fused product, this layer's rows
            fused, start, stop = self.slice_of
            out = fused.shared_output(x)[..., start:stop]
            return out if self.bias is None else out + self.bias
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] == 1 or not self.per_token:  # one token: fbgemm's one range is already its own
            out = _LINEAR_DYNAMIC(flat, self._packed, self.reduce_range)
        else:
            low, high = torch.aminmax(flat, dim=1, keepdim=True)
            span = (high - low).clamp_(min=torch.finfo(flat.dtype).tiny)
            out = _LINEAR_DYNAMIC((flat - low) / span, self._packed, self.reduce_range)
            out = out.mul_(span).addcmul_(low, self.row_sums)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def kernel(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """fbgemm's product alone, `self(x)` without the module call and the reshapes around it (the
        kernel flattens leading dims itself), for the lean trunk's per-token calls; None where the
        forward does more than that (a slice of a fused layer, a bias, per-token ranges)."""
        if self.slice_of is not None or self.bias is not None or self.per_token:
            return None
        packed, reduce_range = self._packed, self.reduce_range
        return lambda x: _LINEAR_DYNAMIC(x, packed, reduce_range)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """This (fused) layer's output on x, computed once for its `readers` slices, which a trunk
        calls in turn on the same input (q, k, v; gate, up); dropped once each has read it."""
        shared = self._shared
        if shared is None or shared[0] is not x or shared[1] != x._version:
            shared = [x, x._version, self(x), self.readers]
        shared[3] -= 1
        self._shared = shared if shared[3] > 0 else None
        return shared[2]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Weight(nn.Module):
    """A LoRA factor stored as int8 per output channel; `.weight` dequantises it to `dtype` when read
    (the routed MLP reads factors as `.weight`, peft calls them), so callers see a plain linear."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Weight:
        if linear.bias is not None:
            raise InvalidInputError("a LoRA factor has no bias")
        return cls(*int8_codes(linear.weight), linear.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return (self.codes.to(self.scale.dtype) * self.scale[:, None]).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


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


def lora_factor_names(model: nn.Module) -> list[str]:
    """Full names of the experts' LoRA factors in the LLM (peft's `lora_A.<adapter>` or a routed
    expert's `lora_A.<target>`): stored at int8 by `quantize`."""
    return [
        f"language_model.{name}"
        for name, module in model.get_submodule("language_model").named_modules()
        if isinstance(module, nn.Linear) and any(p in ("lora_A", "lora_B") for p in name.split(".")[-2:])
    ]


def quantize(model: nn.Module, quantization: Quantization, *, per_token: bool = False) -> list[str]:
    """Replace the LLM's linear layers of a loaded model in place (after it is on its device), and
    store the LoRA factors at int8; returns the names of the linear layers replaced. `per_token`: the
    CPU's int8 quantises each token on its own range (`Int8Linear`)."""
    names = quantized_linear_names(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        _quantize_bitsandbytes(model, names, quantization)
    elif quantization == "int8":
        if model.dtype != torch.float32:
            raise InvalidInputError("int8 on the CPU needs dtype float32 (fbgemm's kernels take fp32 inputs)")
        for name in names:
            _replace(model, name, Int8Linear.from_linear(model.get_submodule(name), per_token=per_token))
    else:
        for name in names:
            _replace(model, name, Int4Linear(model.get_submodule(name)))
    for name in lora_factor_names(model):
        _replace(model, name, Int8Weight.from_linear(model.get_submodule(name)))
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
    factors = set(lora_factor_names(model)) if quantization else set()
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        for tensor_name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            full = f"{name}.{tensor_name}" if name else tensor_name
            if name in factors and tensor_name == "weight":  # int8 + a float32 scale per row
                size = tensor.numel() + 4 * tensor.shape[0]
            elif name in quantized and tensor_name == "weight":
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
