"""The vision-language expert (stage II): VQA and region VQA; its head is the LM head itself.

Registered through the same hook as any third-party expert, so nothing treats built-ins specially.
"""

from __future__ import annotations

from collections.abc import Callable

from medplib.core.expert_spec import ExpertSpec, LoraSpec, LossWeights, Resources, SampleFilter
from medplib.core.hookspecs import hookimpl

SPEC = ExpertSpec(
    name="vision_language",
    version="0.1.0",
    description="Answers questions about a medical image or a region marked on it (stage II of MedPLIB).",
    capabilities=("vqa", "region_vqa"),
    special_tokens=("<image>", "<im_start>", "<im_end>", "<region>", "<region_feat>", "</region>"),
    adapter=LoraSpec(r=16, alpha=16, dropout=0.05),
    loss_weights=LossWeights(ce=1.0),
    trains_on=SampleFilter(tasks=("vqa", "region_vqa")),
    resources=Resources(num_gpus=1.0, num_cpus=2.0),
)


@hookimpl
def medplib_register_experts(register: Callable[[ExpertSpec], None]) -> None:
    register(SPEC)
