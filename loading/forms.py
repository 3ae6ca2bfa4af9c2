"""The forms of model medplib takes, each with its recogniser and its loader, and `load`/`load_model`
over them (the overview of the forms: `medplib/loading/__init__.py`)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from medplib.core.assistant import MedPLIB
from medplib.core.devices import resolve_device, resolve_dtype
from medplib.core.errors import CheckpointError, InvalidInputError, describe_key_problems
from medplib.core.expert_spec import ExpertSpec
from medplib.core.io.sources import is_uri
from medplib.core.model import (
    MODEL_PRESETS,
    MedPLIBForCausalLM,
    build_medplib,
    load_llava_and_sam,
)
from medplib.core.model.medplib_release import convert_hint, is_release_config
from medplib.core.model.quantization import check_quantization, quantize
from medplib.core.model.quantized_checkpoint import is_quantized_folder, load_quantized
from medplib.core.per_image_cache import DEFAULT_MAX_BYTES, PerImageCache
from medplib.core.queries import DEFAULT_INFERENCE_LIMITS, InferenceLimits
from medplib.router import MixtureOfExperts, attach_expert_adapter
from medplib.router.dense import MedPLIBWithRoutedExperts
from medplib.router.moe import MOE_FILE

STAGE_FILE = "stage.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoadedModel:
    """A loaded model, which form it came in, and the handles loading it made."""

    model: MedPLIBForCausalLM
    form: str
    untrained: bool = False  # a preset's random weights
    peft: PeftModel | None = None  # a stage folder's active adapter
    moe: MixtureOfExperts | None = None
    record: dict[str, Any] = field(default_factory=dict)  # a stage folder's stage.json
    seed: int | None = None  # a preset's
    quantization: str | None = None  # a `medplib quantize` folder's: its layers arrive quantised

    @property
    def kind(self) -> str:
        """How the model was read, in words (for reports)."""
        if self.form == "stage folder":
            active = self.record.get("active") or "the trunk"
            return f"stage {self.record.get('stage')} folder, answers with {active}"
        return f"preset, seed {self.seed}" if self.form == "preset" else self.form


@dataclass(frozen=True)
class LoadRequest:
    source: str
    sam: str | None = None
    seed: int = 0
    dtype: torch.dtype | None = None  # the LLaVA + SAM weights are read at this dtype
    active_adapter: bool = True  # a stage folder: with its active adapter / mixture, or the bare trunk
    options: dict[str, Any] | None = None  # a preset: config fields changed from the preset's


@dataclass(frozen=True)
class Form:
    name: str
    matches: Callable[[LoadRequest], bool]
    load: Callable[[LoadRequest], LoadedModel]


def load(
    preset_or_path: str | os.PathLike[str] = "tiny",
    *,
    sam: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    cache_bytes: int = DEFAULT_MAX_BYTES,
    seed: int = 0,
    limits: InferenceLimits = DEFAULT_INFERENCE_LIMITS,
    quantization: str | None = None,
) -> MedPLIB:
    """A ready assistant from any form `load_model` recognises. `seed` seeds a preset's random weights.
    `quantization` ("int8", "int4") stores the LLM's linear layers in 8 or 4 bits
    (`core/model/quantization.py`); a folder written by `medplib quantize` loads quantised as saved."""
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    quantization = check_quantization(quantization)
    source = os.fspath(preset_or_path)
    loaded = load_model(source, sam=sam, seed=seed, dtype=torch_dtype)
    if loaded.quantization is not None:  # saved quantised: loaded as saved, for the CPU at float32
        if quantization not in (None, loaded.quantization) or (torch_device.type, torch_dtype) != (
            "cpu",
            torch.float32,
        ):
            raise CheckpointError(
                f"{source} holds {loaded.quantization} weights for the CPU at float32: load it so"
            )
        model = loaded.model.eval()
        quantization = loaded.quantization
    else:
        model = loaded.model.to(device=torch_device, dtype=torch_dtype).eval()
        if quantization is not None:
            quantize(model, quantization)
    return MedPLIB(
        model,
        name=source,
        untrained=loaded.untrained,
        cache=PerImageCache(cache_bytes),
        limits=limits,
        quantization=quantization,
    )


def load_model(
    source: str | os.PathLike[str],
    *,
    sam: str | os.PathLike[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    active_adapter: bool = True,
    options: dict[str, Any] | None = None,
) -> LoadedModel:
    """The model `source` holds, in whichever form it comes (see the module's list). `options` change
    a preset's config fields (`build_config`); a checkpoint keeps the config it was saved with."""
    request = LoadRequest(
        os.fspath(source), None if sam is None else os.fspath(sam), seed, dtype, active_adapter, options
    )
    form = recognise(request)
    if options and form.name != "preset":
        raise InvalidInputError(
            f"config options ({', '.join(sorted(options))}) apply to a preset built from scratch; "
            f"{request.source} is a {form.name} with its own saved config"
        )
    return form.load(request)


def recognise(request: LoadRequest) -> Form:
    """The form of `request.source`; CheckpointError when it is none of them."""
    for form in FORMS:
        if form.matches(request):
            return form
    raise CheckpointError(
        f"{request.source} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a checkpoint folder"
    )


# ---- presets and LLaVA + SAM ---------------------------------------------------------------------------


def _load_preset(request: LoadRequest) -> LoadedModel:
    if MODEL_PRESETS[request.source]["tokenizer"] != "trained":
        raise CheckpointError(
            f"the {request.source} preset has no weights in medplib (it builds on the meta device to count "
            "parameters): pass a checkpoint folder saved by save_pretrained (a path or fsspec URI), "
            "or a LLaVA-1.5 folder with sam=SAM_CHECKPOINT"
        )
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.manual_seed(request.seed)
        model = build_medplib(request.source, options=request.options)
    return LoadedModel(model, "preset", untrained=True, seed=request.seed)


def _load_llava_and_sam(request: LoadRequest) -> LoadedModel:
    return LoadedModel(load_llava_and_sam(request.source, request.sam, dtype=request.dtype), "llava+sam")


# ---- stage folders ------------------------------------------------------------------------------------


def stage_folder(source: str) -> Path | None:
    """The local stage folder `source` names, or None when it is not one."""
    if is_uri(source):
        return None
    folder = Path(os.path.expanduser(source))
    return folder if (folder / STAGE_FILE).is_file() else None


def read_record(folder: Path) -> dict:
    """A stage folder's `stage.json`."""
    try:
        return json.loads((folder / STAGE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} is not a stage folder: {exc}") from None


def _load_stage_folder(request: LoadRequest) -> LoadedModel:
    """The model a stage folder answers with: the trunk with its active adapter, or the composed MoE
    (with `active_adapter` False: the trunk alone, as the next stage starts from it)."""
    folder = stage_folder(request.source)
    assert folder is not None  # the recogniser matched
    record = read_record(folder)
    active = record.get("active") if request.active_adapter else None
    if active == "moe":
        moe = MixtureOfExperts.from_pretrained(folder / "model", model_class=MedPLIBForCausalLM)
        return LoadedModel(moe.model, "stage folder", moe=moe, record=record)
    model = MedPLIBForCausalLM.from_pretrained(folder / "model")
    if active is None:
        return LoadedModel(model, "stage folder", record=record)
    expert = ExpertSpec.model_validate(record["specs"][active])
    peft = attach_adapter(model, expert, folder / record["adapters"][active])
    return LoadedModel(model, "stage folder", peft=peft, record=record)


def attach_adapter(model: MedPLIBForCausalLM, expert: ExpertSpec, folder: Path) -> PeftModel:
    """Attach `expert`'s LoRA to the model and load its trained weights from `folder`."""
    LoraConfig.from_pretrained(str(folder))  # refuses a folder that is not an adapter
    peft = attach_lora(model, expert)
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"adapter {folder}: unreadable {ADAPTER_WEIGHTS} ({exc})") from None
    result = set_peft_model_state_dict(peft, state)
    # The trunk's own weights are "missing" from any adapter file; its LoRA factors must all be there.
    missing = sorted(key for key in result.missing_keys if ".lora_" in key)
    found = (("missing_keys", missing), ("unexpected_keys", sorted(result.unexpected_keys)))
    problems = {kind: keys for kind, keys in found if keys}
    if problems:
        raise CheckpointError(describe_key_problems(f"adapter {folder}", problems, limit=5))
    return peft


def attach_lora(model: MedPLIBForCausalLM, expert: ExpertSpec) -> PeftModel:
    """A fresh LoRA of `expert` on the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers 5 deprecated alias
        return attach_expert_adapter(model, expert)


# ---- save_pretrained folders and URIs -------------------------------------------------------------------


def _load_moe_folder(request: LoadRequest) -> LoadedModel:
    moe = MixtureOfExperts.from_pretrained(request.source, model_class=MedPLIBForCausalLM)
    return LoadedModel(moe.model, "moe folder", moe=moe)


def _refuse_release(request: LoadRequest) -> LoadedModel:
    raise CheckpointError(convert_hint(request.source))


def _load_converted_release(request: LoadRequest) -> LoadedModel:
    return LoadedModel(MedPLIBWithRoutedExperts.from_pretrained(request.source), "converted release")


def _load_checkpoint(request: LoadRequest) -> LoadedModel:
    return LoadedModel(MedPLIBForCausalLM.from_pretrained(request.source), "checkpoint")


def _is_folder(source: str) -> bool:
    return is_uri(source) or os.path.isdir(os.path.expanduser(source))


def _has_file(folder: str, name: str) -> bool:
    import fsspec  # deferred: fsspec pulls in a lot at import time

    try:
        fs, root = fsspec.core.url_to_fs(folder if is_uri(folder) else os.path.expanduser(folder))
    except (ValueError, ImportError):  # unknown protocol: from_pretrained names the problem
        return False
    return fs.isfile(f"{root.rstrip('/')}/{name}")


def folder_config(folder: str) -> dict:
    """A checkpoint folder's config.json as a dict ({} when unreadable: from_pretrained names the problem)."""
    import fsspec  # deferred: fsspec pulls in a lot at import time

    try:
        fs, root = fsspec.core.url_to_fs(folder if is_uri(folder) else os.path.expanduser(folder))
        with fs.open(f"{root.rstrip('/')}/config.json") as handle:
            config = json.load(handle)
    except (OSError, ValueError, ImportError):
        return {}
    return config if isinstance(config, dict) else {}


def _load_quantized(request: LoadRequest) -> LoadedModel:
    model, mode = load_quantized(request.source)
    return LoadedModel(model, "quantized checkpoint", quantization=mode)


FORMS = (
    Form("llava+sam", lambda r: r.sam is not None, _load_llava_and_sam),
    Form("preset", lambda r: r.source in MODEL_PRESETS, _load_preset),
    Form(
        "quantized checkpoint",
        lambda r: _is_folder(r.source) and is_quantized_folder(r.source),
        _load_quantized,
    ),
    Form("stage folder", lambda r: stage_folder(r.source) is not None, _load_stage_folder),
    Form("moe folder", lambda r: _is_folder(r.source) and _has_file(r.source, MOE_FILE), _load_moe_folder),
    Form(
        "medplib release",
        lambda r: _is_folder(r.source) and is_release_config(folder_config(r.source)),
        _refuse_release,
    ),
    Form(
        "converted release",
        lambda r: _is_folder(r.source) and bool(folder_config(r.source).get("routed_experts")),
        _load_converted_release,
    ),
    Form("checkpoint", lambda r: _is_folder(r.source), _load_checkpoint),
)
