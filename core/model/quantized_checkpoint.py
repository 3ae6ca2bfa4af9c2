"""Quantised checkpoints: `medplib quantize SOURCE OUT --mode int8|int4`, loaded by `medplib.load(OUT)`.

A folder holds `quantized.safetensors` (the quantised model's state: a quantised linear layer's
int8 `codes` and float32 `scale` per output channel, or its int4 `packed` / `scale` / `offset`, and
everything kept in full precision as it is), `config.json` (the model's config, with
`quantization`) and the tokenizer. Loading builds the model from its config, quantises its layout and
then overwrites every tensor from the file: the codes are the ones quantisation chose (nothing is
rounded twice), so the loaded model computes exactly what the saved one did. The file is about a
quarter (int8) or an eighth (int4) of the float32 weights; loading still allocates the float32 layout
once before the codes replace it.

The model's layout must follow from its config: a checkpoint with LoRA adapters (a stage II / III
folder) is saved with its active adapter merged into the weights it adapts first; a mixture of
experts (stage IV, a routed MedPLIB conversion) keeps its own layout and is quantised when loaded
(`medplib.load(folder, quantization=...)`) instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from medplib.core.errors import CheckpointError, describe_key_problems
from medplib.core.model.quantization import Quantization, check_quantization, quantize

QUANTIZED_FILE = "quantized.safetensors"


def merge_adapters(model: nn.Module) -> nn.Module:
    """The model with its peft LoRA layers' active adapters merged into the weights they adapt (exact
    up to float rounding) and the layers replaced by their base; a routed mixture of experts is
    refused: its layout is not the config's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, module.get_base_layer())
    if any("lora_" in name or name.endswith(".router") for name, _ in model.named_modules()):
        raise CheckpointError(
            "a mixture of experts cannot be saved quantised; load it quantised instead: "
            "medplib.load(folder, quantization='int8')"
        )
    return model


def save_quantized(model: nn.Module, out: str | os.PathLike[str], quantization: str) -> list[str]:
    """Quantise `model` (float32, CPU, in place) and write it to the folder `out`; returns the names of
    the quantised layers."""
    mode = check_quantization(quantization)
    if mode is None:
        raise CheckpointError("name a quantization to save: int8 or int4")
    model = merge_adapters(model)
    names = quantize(model, mode)
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
    save_file(tensors, str(folder / QUANTIZED_FILE))
    config = model.config.to_dict()
    config["quantization"] = mode
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.tokenizer.save_pretrained(folder)
    return names


def is_quantized_folder(source: str | os.PathLike[str]) -> bool:
    return (Path(source).expanduser() / QUANTIZED_FILE).is_file()


def load_quantized(source: str | os.PathLike[str]) -> tuple[nn.Module, Quantization]:
    """The model a `save_quantized` folder holds, and its quantization."""
    from medplib.core.model.modeling_medplib import MedPLIBForCausalLM
    from medplib.core.model.tokenizer import load_tokenizer

    folder = Path(source).expanduser()
    raw = json.loads((folder / "config.json").read_text())
    mode = check_quantization(raw.pop("quantization", None))
    if mode is None:
        raise CheckpointError(f"{source}: config.json names no quantization")
    config = MedPLIBForCausalLM.config_class.from_dict(raw)
    # The layout: the model at this config, its layers quantised (their weights then come from the file).
    model = MedPLIBForCausalLM(config).eval()
    quantize(model, mode)
    result = model.load_state_dict(load_file(str(folder / QUANTIZED_FILE)), strict=False)
    problems = {
        kind: sorted(keys)
        for kind, keys in (("missing_keys", result.missing_keys), ("unexpected_keys", result.unexpected_keys))
        if keys
    }
    if problems:
        raise CheckpointError(describe_key_problems(source, problems))
    model.tokenizer = load_tokenizer(folder)
    return model, mode
