"""`POST /v1/ground_volume` in the ingress: a volume grounded slice by slice through the deployments.

The volume is read (a NIfTI or DICOM file in base64, or a path/URI the config allows: a file or a
DICOM series folder) with the volume limits checked on its headers before any voxel is decoded;
then each batch of planes goes through `IngressService.infer` concurrently, where `serve.batch`
gathers them into trunk and grounding-decoder batches as it gathers concurrent requests. The masks
are collected by the same `VolumeMaskBuilder` as `MedPLIB.ground_volume`, so the HTTP result equals
the in-process one. The whole request has `limits.volume_timeout_s`, else 504.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any

from medplib.agents.serve.config import ServeLimits
from medplib.agents.serve.schemas import GroundVolumeRequest, GroundVolumeResponse, ServeError, SliceMask
from medplib.core.errors import CapacityError, MedplibError
from medplib.core.io import load_volume, volume_plane
from medplib.core.io.volume import MedicalVolume
from medplib.core.io.volume_writers import canonical_mask, mask_nifti_bytes
from medplib.core.masks import Mask
from medplib.core.queries import Decoding, Query
from medplib.core.results import AnswerResult, GroundingResult
from medplib.core.volume_grounding import SlicePlan, VolumeMaskBuilder
from medplib.core.volume_results import VolumeGroundingResult

Infer = Callable[[Query, Decoding], Awaitable[AnswerResult | GroundingResult]]


async def ground_volume_request(
    request: GroundVolumeRequest,
    *,
    infer: Infer,
    allowed: Callable[[str, str], str],
    limits: ServeLimits,
    model: str,
    batch_size: int,
) -> GroundVolumeResponse:
    timeout = limits.volume_timeout_s
    try:
        return await asyncio.wait_for(
            _ground(request, infer=infer, allowed=allowed, limits=limits, model=model, batch_size=batch_size),
            timeout,
        )
    except TimeoutError:
        raise ServeError(
            f"the volume was not grounded within the volume timeout of {timeout:g} s: ground fewer"
            " slices (slices=START:STOP) or retry later",
            kind="timeout",
            status=504,
        ) from None


async def _ground(
    request: GroundVolumeRequest,
    *,
    infer: Infer,
    allowed: Callable[[str, str], str],
    limits: ServeLimits,
    model: str,
    batch_size: int,
) -> GroundVolumeResponse:
    start = time.perf_counter()
    query = request.query()
    limits.inference(batch_size).check(query, request.decoding)
    volume = await _load(request, allowed, limits)
    load_ms = 1000 * (time.perf_counter() - start)
    plan = SlicePlan.make(volume, request.axis, request.slices, request.window)
    if len(plan.indices) > limits.max_volume_slices:
        raise CapacityError(
            f"{len(plan.indices)} slices, over the limit of {limits.max_volume_slices} per request:"
            " ground a slab (slices=START:STOP)"
        )
    builder = VolumeMaskBuilder(plan, min_score=request.min_score, skip_forced=request.skip_forced)
    for indices in plan.batches(batch_size):
        images = await asyncio.to_thread(lambda batch=indices: [plan.image(i) for i in batch])
        queries = [query.model_copy(update={"image": image}) for image in images]
        results = await asyncio.gather(*(infer(each, request.decoding) for each in queries))
        for index, result in zip(indices, results, strict=True):
            builder.add(index, result.masks, result.seg_forced)
    grounding_ms = 1000 * (time.perf_counter() - start) - load_ms
    timings = {"load": load_ms, "grounding": grounding_ms, "total": 1000 * (time.perf_counter() - start)}
    result = await asyncio.to_thread(
        builder.finish,
        model=model,
        query=request.text,
        largest_component=request.largest_component,
        timings_ms=timings,
    )
    return await asyncio.to_thread(_response, result, volume, plan, request.mask_format)


async def _load(
    request: GroundVolumeRequest, allowed: Callable[[str, str], str], limits: ServeLimits
) -> MedicalVolume:
    from medplib.agents.serve.schemas import decode_base64

    spec = request.volume
    source: Any
    if spec.base64 is not None:
        source = await asyncio.to_thread(decode_base64, spec.base64, "volume.base64")
    else:
        source = allowed(spec.uri or "", "volume.uri")
    try:
        return await asyncio.to_thread(
            load_volume,
            source,
            volume_index=spec.volume_index,
            series_uid=spec.series_uid,
            limits=limits.volume(),
        )
    except MedplibError as exc:
        raise type(exc)(f"volume: {exc}") from None


def _response(
    result: VolumeGroundingResult, volume: MedicalVolume, plan: SlicePlan, mask_format: str
) -> GroundVolumeResponse:
    if mask_format == "nifti":
        encoded = base64.b64encode(mask_nifti_bytes(result)).decode("ascii")
        return GroundVolumeResponse(result=result, mask_nifti_base64=encoded)
    if mask_format == "rle":
        masks = MedicalVolume(canonical_mask(result, volume), volume.affine, volume.zooms, volume.meta)
        slices = [
            SliceMask(index=index, mask=Mask.from_array(volume_plane(masks, axis=plan.axis, index=index)))
            for index in plan.indices
        ]
        return GroundVolumeResponse(result=result, slice_masks=slices)
    return GroundVolumeResponse(result=result)
