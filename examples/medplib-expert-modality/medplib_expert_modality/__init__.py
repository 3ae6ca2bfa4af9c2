"""A medplib plugin: the `modality` expert, registered through the entry point group `medplib`.

This module is imported whenever medplib loads its plugins (e.g. `medplib experts`), so it only
declares the expert and its dataset; the head, which needs torch, lives in `head.py` and is named by
import path, and its output type in `outputs.py`.
"""

from __future__ import annotations

from collections.abc import Callable

from medplib.core.expert_spec import ExpertSpec, LoraSpec, LossWeights, Resources, SampleFilter
from medplib.core.hookspecs import hookimpl
from medplib_expert_modality.data import modality_records

SPEC = ExpertSpec(
    name="modality",
    version="0.1.0",
    description="Recognises the imaging modality of an image (MRI, CT, X-ray, ...) from its <MOD> token.",
    capabilities=("modality_classification",),
    special_tokens=("<MOD>",),
    adapter=LoraSpec(target_modules=("gate_proj", "up_proj"), r=4, alpha=8, dropout=0.05),
    head="medplib_expert_modality.head:build_modality_head",
    head_output="medplib_expert_modality.outputs:ModalityPrediction",
    loss_weights=LossWeights(ce=1.0, head=1.0),
    # Its own samples come from its dataset (`modality_records`); from the main data it also learns
    # the modality questions, whose answers name the modality in words.
    trains_on=SampleFilter(tasks=("vqa",), kinds=("modality",)),
    resources=Resources(num_gpus=0.25, num_cpus=1.0, memory_gb=2.0),
)


@hookimpl
def medplib_register_experts(register: Callable[[ExpertSpec], None]) -> None:
    register(SPEC)


@hookimpl
def medplib_register_datasets(register: Callable[[str, Callable], None]) -> None:
    register("modality", modality_records)  # named after the expert: its expert stage trains on it
