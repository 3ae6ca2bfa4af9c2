"""The one way in: every form of model a user hands medplib is recognised here, and loaded here.

    model = medplib.load("tiny")                # the assistant (`MedPLIB`) around `load_model`'s model
    loaded = load_model("runs/stage4")          # the model and its handles (peft adapter, mixture)

Each form has one recogniser, tried in this order (the first that matches loads the source):

- `llava+sam`: a LLaVA-1.5 folder, given with `sam=` a SAM checkpoint (`core/model/loading.py`);
- `preset`: `tiny`, `small` (seeded random weights); `medplib-7b` has none and is refused;
- `quantized checkpoint`: a `medplib quantize` output, its layers loaded quantised as saved;
- `stage folder`: a training stage's output (`stage.json`): the model as it answers (its active
  adapter, or its mixture of experts), or, for the next stage, the trunk and its adapters;
- `moe folder`: a stage IV `save_pretrained` folder or URI (`moe.safetensors`): its experts composed;
- `medplib release`: MedPLIB's released checkpoint, recognised and refused: convert it first;
- `converted release`: a `medplib convert` output (its config declares `routed_experts`);
- `checkpoint`: any other `save_pretrained` folder or fsspec URI.

`model_info` and `model_config` describe the same forms without loading their weights (`medplib info`,
Serve's grounding deployment): `describe.py`; the forms and their loaders: `forms.py`.

The CLI, `eval`, training, Serve and the tools all come through here; this package sits above `core/`
and `router/` and is the only one that knows all the forms.
"""

from medplib.loading.describe import checkpoint_experts, model_config, model_info
from medplib.loading.forms import (
    ADAPTER_WEIGHTS,
    FORMS,
    STAGE_FILE,
    Form,
    LoadedModel,
    LoadRequest,
    attach_adapter,
    attach_lora,
    load,
    load_model,
    read_record,
    recognise,
    stage_folder,
)

__all__ = [
    "ADAPTER_WEIGHTS",
    "FORMS",
    "STAGE_FILE",
    "Form",
    "LoadRequest",
    "LoadedModel",
    "attach_adapter",
    "attach_lora",
    "checkpoint_experts",
    "load",
    "load_model",
    "model_config",
    "model_info",
    "read_record",
    "recognise",
    "stage_folder",
]
