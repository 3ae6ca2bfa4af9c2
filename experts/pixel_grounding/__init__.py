"""The pixel-grounding expert (stage III): text in, mask out through `<SEG>` and SAM's mask decoder.

Its head is named by import path, so this module (and `medplib experts`) never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable

from medplib.core.expert_spec import ExpertSpec, LoraSpec, LossWeights, Resources, SampleFilter
from medplib.core.hookspecs import hookimpl

SPEC = ExpertSpec(
    name="pixel_grounding",
    version="0.1.0",
    description="Grounds a phrase to a segmentation mask via <SEG> and a SAM mask decoder (stage III).",
    capabilities=("grounding",),
    special_tokens=("<SEG>",),
    adapter=LoraSpec(target_modules=("gate_proj", "up_proj", "down_proj"), r=8, alpha=16, dropout=0.05),
    head="medplib.experts.pixel_grounding.head:build_grounding_head",
    head_output="medplib.core.masks:SegmentationResult",
    loss_weights=LossWeights(ce=1.0, bce=1.0, dice=5.0, focal=1.0),
    trains_on=SampleFilter(tasks=("grounding",)),
    resources=Resources(num_gpus=0.5, num_cpus=1.0),
)


@hookimpl
def medplib_register_experts(register: Callable[[ExpertSpec], None]) -> None:
    register(SPEC)
