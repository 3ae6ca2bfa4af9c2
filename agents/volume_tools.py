"""LangChain tool `medical_volume_grounding`: segment a structure through a CT or MR volume.

The volume is named as an image is (an image-store id, or a path/URI: a NIfTI file, a multi-frame
DICOM, a folder holding a DICOM series). The content the LLM reads is the summary (volume in mL,
extent in mm, the slices it lies on, and a caution when the model had to be pushed); the artifact is
the `VolumeGroundingResult` itself, its boolean `mask` on the input's own grid, for the application
to save (`core/io/volume_writers.save_mask`) or show. It runs on the same backends as the other
tools (in-process, or a `medplib serve` server's `/v1/ground_volume`), through the same hook.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from langchain_core.tools import ToolException
from pydantic import BaseModel, Field

from medplib.agents.image_store import StoredImage
from medplib.agents.tools import MedPLIBTool, ToolInput
from medplib.core.volume_results import VolumeGroundingResult


class VolumeGroundingInput(ToolInput):
    """What to segment through a CT or MR volume."""

    image: str = Field(
        min_length=1,
        description="the volume: an id from the image store (e.g. 'img-1') or a path or URI of a NIfTI "
        "file, a multi-frame DICOM or a folder holding one DICOM series",
    )
    target: str = Field(
        min_length=1, description="what to segment, as a short noun phrase (e.g. 'the liver')"
    )
    axis: Literal["axial", "coronal", "sagittal"] = Field(
        "axial", description="the planes to ground slice by slice"
    )
    slices: str | None = Field(
        None, description="only these slices along the axis, as START:STOP (e.g. '40:120'); default all"
    )
    largest_component: bool = Field(False, description="keep only the largest connected 3-D part of the mask")


class MedicalVolumeGroundingTool(MedPLIBTool):
    name: str = "medical_volume_grounding"
    description: str = (
        "Segment an organ or structure through a whole CT or MR volume (NIfTI or DICOM series), slice by "
        "slice. Returns its volume in millilitres, its extent in mm and which slices it lies on; the 3-D "
        "mask goes to the application. Slow on a whole volume: pass slices to ground a slab."
    )
    args_schema: type[BaseModel] = VolumeGroundingInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    backend_method: ClassVar[str] = "ground_volume"  # type: ignore[assignment]

    def _backend_args(self, args: VolumeGroundingInput, image: StoredImage) -> tuple[Any, ...]:
        if not hasattr(self.backend, self.backend_method):
            raise ToolException(f"{self.backend!r} cannot ground volumes (it has no ground_volume)")
        options = {"axis": args.axis, "slices": args.slices, "largest_component": args.largest_component}
        return image, args.target, options

    def _output(
        self, args: VolumeGroundingInput, image: StoredImage, result: VolumeGroundingResult
    ) -> tuple[str, VolumeGroundingResult]:
        summary = result.summary().replace(f"of {result.source}", f"of {args.image}", 1)
        return f"{summary}\nThe 3-D mask is with the application (on the volume's own grid).", result


VOLUME_TOOLS: tuple[type[MedPLIBTool], ...] = (MedicalVolumeGroundingTool,)
