"""Grounding and asking through a volume, slice by slice, through the assistant's batch path.

    result = model.ground_volume("ct.nii.gz", "the liver", axis="axial", slices="40:120")
    result.volume_ml, result.bbox, result.mask            # mask: bool, on the file's own grid
    save_mask("liver.nii.gz", result, volume)              # core/io/volume_writers.py

Slices stream: a batch of `batch_size` planes is cut out of the volume, grounded as one batch
(`answer_batch`: CLIP, the LLM and SAM batched, the embedding cache consulted), each plane's mask
written into one boolean volume, and the batch dropped before the next is cut. By default the
slices' cache entries are dropped with them (`keep_embeddings=False`): a volume is hundreds of new
images, and keeping them would evict what the cache holds for everyone else, for images rarely
asked about again; keep them to ask a second question about the same volume cheaply.

The LLM's cached prefix (system prompt, `USER:`, the image tokens) holds the image, so each slice has
its own; the question's words follow the image and so cannot be shared across slices in a causal LM.

One `SlicePlan` and one `VolumeMaskBuilder` serve the in-process path here and the HTTP ingress
(`agents/serve/ingress.py`), which sends the planes through its own batched deployments.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medplib.core.errors import InvalidInputError
from medplib.core.image import MedicalImage
from medplib.core.io.intensity import Window
from medplib.core.io.volume import AXES, MedicalVolume, axis_number, place_plane, slice_volume, to_file_grid
from medplib.core.masks import SegmentationResult
from medplib.core.per_image_cache import image_digest
from medplib.core.volume_results import (
    SliceAnswer,
    SliceGrounding,
    VolumeAnswerResult,
    VolumeBox,
    VolumeGroundingResult,
    normalise_answer,
)

if TYPE_CHECKING:
    from medplib.core.assistant import MedPLIB

Progress = Callable[[int, int], None]  # (slices done, slices in all)
BATCH_STAGES = ("encode_clip", "prefill", "decode", "encode_sam", "masks")
SliceSpec = str | slice | range | Sequence[int] | None


def parse_slices(spec: SliceSpec, count: int) -> list[int]:
    """Slice indices from None (all), 'START:STOP' (Python's half-open range, either end optional,
    negatives from the end), a slice, a range or a list of indices; each checked against `count`."""
    if spec is None:
        return list(range(count))
    if isinstance(spec, str):
        text = spec.strip()
        parts = text.split(":")
        try:
            if len(parts) == 1:
                spec = [int(text)]
            elif len(parts) in (2, 3):
                spec = slice(*(int(p) if p.strip() else None for p in parts))
            else:
                raise ValueError
        except ValueError:
            raise InvalidInputError(
                f"slices {text!r} is not START:STOP, START:STOP:STEP or an index"
            ) from None
    if isinstance(spec, slice):
        if spec.step == 0:
            raise InvalidInputError("the slice step must not be 0")
        ends = [end for end in (spec.start, spec.stop) if end is not None and not -count <= end <= count]
        if ends:  # Python would clamp silently; a typo'd range is worth an error
            raise InvalidInputError(f"slices end {ends[0]} is outside the axis's {count} slices")
        spec = range(count)[spec]
    indices = [int(i) for i in spec]
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise InvalidInputError(
            f"slice {bad[0]} is out of range: the axis has {count} slices (0..{count - 1})"
        )
    if not indices:
        raise InvalidInputError(f"the slices {spec!r} select none of the {count} slices")
    return indices


def volume_window(volume: MedicalVolume, window: Window) -> Window:
    """One window for every slice: the asked one, else the file's; else the volume's own range, so
    contrast does not change from slice to slice (uint8 volumes stay as stored, as `render` keeps)."""
    if window is not None or volume.meta.file_window is not None or volume.data.dtype == np.uint8:
        return window
    low, high = float(np.min(volume.data)), float(np.max(volume.data))
    return ((low + high) / 2, high - low) if high > low else None


@dataclass(frozen=True)
class SlicePlan:
    """Which planes of `volume` to run, cut out lazily with one window."""

    volume: MedicalVolume
    axis: int
    indices: list[int]
    window: Window

    @classmethod
    def make(cls, volume: MedicalVolume, axis: str | int, slices: SliceSpec, window: Window) -> SlicePlan:
        number = axis_number(axis)
        indices = parse_slices(slices, volume.shape[number])
        return cls(volume, number, indices, volume_window(volume, window))

    @property
    def axis_name(self) -> str:
        return AXES[self.axis]

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(self.indices), batch_size):
            yield self.indices[start : start + batch_size]

    def image(self, index: int) -> MedicalImage:
        return slice_volume(self.volume, axis=self.axis, index=index, window=self.window)


class VolumeMaskBuilder:
    """Collects each slice's masks into one boolean volume; `finish` applies the 3-D options."""

    def __init__(self, plan: SlicePlan, *, min_score: float | None = None, skip_forced: bool = False) -> None:
        self.plan = plan
        self.min_score = min_score
        self.skip_forced = skip_forced
        self.mask = np.zeros(plan.volume.shape, dtype=bool)
        self._slices: dict[int, tuple[float | None, bool, bool]] = {}

    def add(self, index: int, masks: Sequence[SegmentationResult], seg_forced: bool) -> None:
        scores = [m.score for m in masks if m.score is not None]
        score = max(scores) if scores else None
        kept = not (self.skip_forced and seg_forced) and not (
            self.min_score is not None and (score is None or score < self.min_score)
        )
        if kept and masks:
            plane = np.logical_or.reduce([m.mask.to_array() for m in masks])
            place_plane(self.mask, plane, axis=self.plan.axis, index=index)
        self._slices[index] = (score, seg_forced, kept)

    def finish(
        self, *, model: str, query: str, largest_component: bool, timings_ms: dict[str, float]
    ) -> VolumeGroundingResult:
        volume = self.plan.volume
        mask = keep_largest_component(self.mask) if largest_component else self.mask
        per_slice = mask.sum(axis=tuple(a for a in range(3) if a != self.plan.axis))
        slices = [
            SliceGrounding(
                index=index,
                score=None if score is None else round(score, 4),
                seg_forced=forced,
                kept=kept,
                pixels=int(per_slice[index]),
            )
            for index, (score, forced, kept) in sorted(self._slices.items())
        ]
        file_mask, affine = to_file_grid(volume, mask)
        voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
        voxels = int(file_mask.sum())
        return VolumeGroundingResult(
            model=model,
            query=query,
            source=volume.meta.source,
            axis=self.plan.axis_name,  # type: ignore[arg-type]
            shape=file_mask.shape,
            affine=np.asarray(affine, dtype=float).tolist(),
            voxel_volume_mm3=round(voxel_mm3, 6),
            voxels=voxels,
            volume_ml=round(voxels * voxel_mm3 / 1000, 4),
            bbox=bounding_box(file_mask, affine),
            slices=slices,
            options={
                "min_score": self.min_score,
                "skip_forced": self.skip_forced,
                "largest_component": largest_component,
                "window": self.plan.window,
            },
            timings_ms={k: round(v, 2) for k, v in timings_ms.items()},
            mask=file_mask,
        )


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3-D mask (all of an empty mask)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def bounding_box(mask: np.ndarray, affine: np.ndarray) -> VolumeBox | None:
    """The mask's voxel box, and its world (RAS+ mm) box through the voxels' outer edges."""
    if not mask.any():
        return None
    low = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    high = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[-1]) for a in range(3)]
    corners = np.array(
        [
            [x, y, z, 1.0]
            for x in (low[0] - 0.5, high[0] + 0.5)
            for y in (low[1] - 0.5, high[1] + 0.5)
            for z in (low[2] - 0.5, high[2] + 0.5)
        ]
    )
    world = (corners @ np.asarray(affine).T)[:, :3]
    return VolumeBox(
        voxel_min=tuple(low),  # type: ignore[arg-type]
        voxel_max=tuple(high),  # type: ignore[arg-type]
        world_min_mm=tuple(round(float(v), 3) for v in world.min(axis=0)),  # type: ignore[arg-type]
        world_max_mm=tuple(round(float(v), 3) for v in world.max(axis=0)),  # type: ignore[arg-type]
    )


# ---- the in-process drivers (MedPLIB.ground_volume / answer_volume) ------------------------------------


def ground_volume(
    assistant: MedPLIB,
    volume: Any,
    text: str,
    *,
    axis: str | int = "axial",
    slices: SliceSpec = None,
    batch_size: int = 8,
    min_score: float | None = None,
    skip_forced: bool = False,
    largest_component: bool = False,
    window: Window = None,
    keep_embeddings: bool = False,
    progress: Progress | None = None,
    volume_options: dict[str, Any] | None = None,
    **decoding: Any,
) -> VolumeGroundingResult:
    start = time.perf_counter()
    plan = _plan(volume, axis, slices, window, volume_options)
    load_ms = 1000 * (time.perf_counter() - start)
    builder = VolumeMaskBuilder(plan, min_score=min_score, skip_forced=skip_forced)
    stages: dict[str, float] = {}
    for batch, results in _run_batches(
        assistant, plan, text, "ground", batch_size, keep_embeddings, progress, decoding
    ):
        for index, result in zip(batch, results, strict=True):
            builder.add(index, result.masks, result.seg_forced)
        for stage in BATCH_STAGES:  # a batch's rows share these timings: count them once
            stages[stage] = stages.get(stage, 0.0) + results[0].timings_ms.get(stage, 0.0)
    grounding_ms = 1000 * (time.perf_counter() - start) - load_ms
    timings = {
        "load": load_ms,
        **stages,
        "grounding": grounding_ms,
        "total": 1000 * (time.perf_counter() - start),
    }
    return builder.finish(
        model=assistant.name, query=text, largest_component=largest_component, timings_ms=timings
    )


def answer_volume(
    assistant: MedPLIB,
    volume: Any,
    question: str,
    *,
    axis: str | int = "axial",
    slices: SliceSpec = None,
    batch_size: int = 8,
    window: Window = None,
    keep_embeddings: bool = False,
    progress: Progress | None = None,
    volume_options: dict[str, Any] | None = None,
    **decoding: Any,
) -> VolumeAnswerResult:
    start = time.perf_counter()
    plan = _plan(volume, axis, slices, window, volume_options)
    answers: list[SliceAnswer] = []
    for batch, results in _run_batches(
        assistant, plan, question, "answer", batch_size, keep_embeddings, progress, decoding
    ):
        answers += [SliceAnswer(index=i, text=r.text.strip()) for i, r in zip(batch, results, strict=True)]
    grouped: dict[str, list[int]] = {}
    for answer in answers:
        grouped.setdefault(normalise_answer(answer.text), []).append(answer.index)
    return VolumeAnswerResult(
        model=assistant.name,
        question=question,
        source=plan.volume.meta.source,
        axis=plan.axis_name,  # type: ignore[arg-type]
        slices=answers,
        by_answer=grouped,
        timings_ms={"total": round(1000 * (time.perf_counter() - start), 2)},
    )


def _plan(
    volume: Any, axis: str | int, slices: SliceSpec, window: Window, volume_options: dict[str, Any] | None
) -> SlicePlan:
    from medplib.core.io import load_volume

    try:
        loaded = load_volume(volume, **(volume_options or {}))
    except TypeError as exc:  # an unknown option name
        raise InvalidInputError(f"invalid volume options {sorted(volume_options or {})}: {exc}") from None
    return SlicePlan.make(loaded, axis, slices, window)


def _run_batches(
    assistant: MedPLIB,
    plan: SlicePlan,
    text: str,
    task: str,
    batch_size: int,
    keep_embeddings: bool,
    progress: Progress | None,
    decoding: dict[str, Any],
) -> Iterator[tuple[list[int], list[Any]]]:
    """Each batch of slice indices with its results; a batch's images are gone before the next."""
    done = 0
    for batch in plan.batches(batch_size):
        images = [plan.image(index) for index in batch]
        queries = [{"image": image, "text": text, "task": task} for image in images]
        results = assistant.answer_batch(queries, **decoding)
        if not keep_embeddings:
            assistant.cache.discard_images(image_digest(image.pixels) for image in images)
        done += len(batch)
        if progress is not None:
            progress(done, len(plan.indices))
        yield batch, results
