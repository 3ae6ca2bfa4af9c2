"""A medplib plugin: the `modality` expert, registered through the entry point group `medplib`.

This module is imported whenever medplib loads its plugins (e.g. `medplib experts`), so it only
declares the expert; the head, which needs torch, lives in `head.py` and is named by import path.
"""

from __future__ import annotations

from collections.abc import Callable

from medplib.core.expert_spec import ExpertSpec, LoraSpec, LossWeights, Resources, SampleFilter
from medplib.core.hookspecs import hookimpl

MODALITIES = ("CT", "MRI", "X-Ray", "Ultrasound", "Microscopy", "Endoscopy", "Fundus", "PET")

SPEC = ExpertSpec(
    name="modality",
    version="0.1.0",
    description="Recognises the imaging modality of a medical image (CT, MRI, X-ray, ...).",
    capabilities=("modality_classification",),
    special_tokens=("<MOD>",),
    adapter=LoraSpec(target_modules=("gate_proj", "up_proj"), r=4, alpha=8, dropout=0.05),
    head="medplib_expert_modality.head:build_modality_head",
    loss_weights=LossWeights(ce=1.0),
    trains_on=SampleFilter(tasks=("vqa",), answer_types=("closed",)),
    resources=Resources(num_gpus=0.25, num_cpus=1.0, memory_gb=2.0),
)


@hookimpl
def medplib_register_experts(register: Callable[[ExpertSpec], None]) -> None:
    register(SPEC)
