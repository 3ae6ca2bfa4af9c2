"""What grounding or asking through a volume returns: a 3-D mask with its summary, or answers per slice.

`VolumeGroundingResult` serialises to its summary (`model_dump_json`): the voxels (`mask`) are
excluded, so the JSON stays a few KB for any volume; the mask travels as a file (NIfTI, DICOM SEG, see
`core/io/volume_writers.py`) or per-slice RLE. Slice indices count along the plane's axis of the
volume in RAS+ order, as `medplib ground --slice` and `slice_volume` do; the mask, its affine and
the voxel bounding box are on the input's own grid (the file's voxel order), world coordinates are
RAS+ millimetres (NIfTI's convention; DICOM's LPS negates x and y).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

Axis = Literal["sagittal", "coronal", "axial"]


class SliceGrounding(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int = Field(description="slice index along the axis (RAS+ order)")
    score: float | None = Field(description="SAM's predicted IoU of the slice's mask (the best, if several)")
    seg_forced: bool = Field(description="the model would have ended without <SEG> on this slice")
    kept: bool = Field(description="False when an option (min_score, skip_forced) left the slice empty")
    pixels: int = Field(description="mask pixels on the slice, after every option")


class VolumeBox(BaseModel):
    model_config = ConfigDict(frozen=True)

    voxel_min: tuple[int, int, int] = Field(description="first voxel (i, j, k) of the mask, input grid")
    voxel_max: tuple[int, int, int] = Field(description="last voxel (i, j, k) of the mask, inclusive")
    world_min_mm: tuple[float, float, float] = Field(description="RAS+ corner of the box, voxel edges")
    world_max_mm: tuple[float, float, float]


class VolumeGroundingResult(BaseModel):
    """A structure grounded through a volume; `mask` (bool, on the input grid) is not serialised."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    task: Literal["ground_volume"] = "ground_volume"
    model: str
    query: str = Field(description="what was asked to be segmented")
    source: str = Field(description="where the volume came from")
    axis: Axis
    shape: tuple[int, int, int] = Field(description="the input grid, in the file's voxel order")
    affine: list[list[float]] = Field(description="voxel -> RAS+ mm of the input grid (the file's own)")
    voxel_volume_mm3: float
    voxels: int = Field(description="voxels in the mask")
    volume_ml: float = Field(description="voxels x voxel volume, in millilitres")
    bbox: VolumeBox | None = Field(description="None when the mask is empty")
    slices: list[SliceGrounding] = Field(description="every slice grounded, in index order")
    options: dict[str, Any] = Field(description="min_score, skip_forced, largest_component, window")
    timings_ms: dict[str, float] = Field(
        description="load; encode_clip, prefill, decode, encode_sam, masks summed over the batches;"
        " grounding (all batches); total"
    )
    # Voxels never travel as JSON (nor appear in its schema): a file or per-slice RLE carries them.
    mask: SkipJsonSchema[np.ndarray | None] = Field(default=None, exclude=True, repr=False)

    def summary(self) -> str:
        """A few lines for people and LLMs: volume, extent, slices."""
        grounded = [s for s in self.slices if s.pixels]
        forced = sum(s.seg_forced for s in self.slices)
        lines = [
            f"Grounded {self.query!r} through {len(self.slices)} {self.axis} slices of {self.source}"
            f" ({'x'.join(map(str, self.shape))} voxels):",
            f"- volume {self.volume_ml:.2f} mL ({self.voxels} voxels of {self.voxel_volume_mm3:.3g} mm^3)",
        ]
        if self.bbox is None:
            lines.append("- the mask is empty: nothing was found")
        else:
            low, high = self.bbox.world_min_mm, self.bbox.world_max_mm
            size = [round(b - a, 1) for a, b in zip(low, high, strict=True)]
            lines.append(
                f"- extent {size[0]} x {size[1]} x {size[2]} mm (RAS), from"
                f" {[round(v, 1) for v in low]} to {[round(v, 1) for v in high]} mm;"
                f" voxels {list(self.bbox.voxel_min)} to {list(self.bbox.voxel_max)}"
            )
            lines.append(f"- on slices {compact_ranges([s.index for s in grounded])}")
        if forced:
            lines.append(
                f"- caution: on {forced} of {len(self.slices)} slices the model did not point at the"
                " target on its own (the mask was forced)"
            )
        return "\n".join(lines)


class SliceAnswer(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    text: str


class VolumeAnswerResult(BaseModel):
    """One question asked about every slice of a slab, and the slices grouped by their answer."""

    model_config = ConfigDict(frozen=True)

    task: Literal["answer_volume"] = "answer_volume"
    model: str
    question: str
    source: str
    axis: Axis
    slices: list[SliceAnswer]
    by_answer: dict[str, list[int]] = Field(
        description="normalised answer (lower case, no end punctuation) -> the slices that gave it"
    )
    timings_ms: dict[str, float]

    def summary(self) -> str:
        parts = [
            f"{answer or '(empty)'}: slices {compact_ranges(indices)}"
            for answer, indices in sorted(self.by_answer.items(), key=lambda item: -len(item[1]))
        ]
        return (
            f"{self.question!r} over {len(self.slices)} {self.axis} slices of {self.source}:\n"
            + "\n".join(f"- {part}" for part in parts)
        )


def normalise_answer(text: str) -> str:
    return re.sub(r"[\s.!?,;:]+$", "", text.strip().lower())


def compact_ranges(indices: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    if not indices:
        return "none"
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
