"""From a generated row to the result a caller gets (`AnswerResult`, `GroundingResult`): the masks as
COCO RLE scored by SAM, each expert's outputs, token counts, cache use and timings."""

from __future__ import annotations

import time
from typing import Any

from medplib.core.image import MedicalImage
from medplib.core.inference import BatchGeneration, Generated
from medplib.core.masks import Mask, SegmentationResult
from medplib.core.model import MaskPrediction, Request
from medplib.core.results import CacheHits, InferenceResult


def inference_result(
    cls: type[InferenceResult],
    model_name: str,
    request: Request,
    image: MedicalImage,
    load_ms: float,
    row: Generated,
    batch: BatchGeneration,
    start: float,
    *,
    label: str | None = None,
    **fields: Any,
) -> Any:
    """A generated row as the result a caller gets: masks as RLE, the experts' outputs, the image's
    size and source, token counts, cache use and timings (load and total included)."""
    masks = segmentations(row.masks, label)
    timings = {"load": load_ms, **batch.milliseconds, "total": 1000 * (time.perf_counter() - start)}
    outputs = dict(row.outputs)
    if masks:  # the grounding head's outputs are its masks, decoded on the image
        outputs["pixel_grounding"] = [mask.model_dump(mode="json") for mask in masks]
    return cls(
        model=model_name,
        text=row.text,
        masks=masks,
        seg_forced=row.seg_forced and request.require_seg,
        outputs=outputs,
        forced=row.seg_forced,
        image_size=image.size,
        image_source=image.meta.source,
        num_regions=len(request.regions),
        prompt_tokens=row.prompt_tokens,
        new_tokens=row.new_tokens,
        cache=CacheHits(**row.cache),
        timings_ms={stage: round(ms, 2) for stage, ms in timings.items()},
        **fields,
    )


def segmentations(prediction: MaskPrediction, label: str | None) -> list[SegmentationResult]:
    """Predicted masks as results: COCO RLE, each scored by SAM's predicted IoU. Built without
    validation: pydantic would re-decode the RLE its own encoder just wrote (a third of a cached
    grounding call for a noisy mask)."""
    return [
        SegmentationResult.model_construct(
            mask=Mask.from_array(mask), label=label, score=round(float(score), 4)
        )
        for mask, score in zip(prediction.masks.cpu().numpy(), prediction.scores.float().cpu(), strict=True)
    ]
