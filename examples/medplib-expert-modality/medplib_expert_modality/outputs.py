"""What one `<MOD>` yields in a result: the modality and every modality's probability."""

from __future__ import annotations

from pydantic import BaseModel, Field

# The modalities of medplib's embedded dataset (`medplib data stats`), in the head's output order.
MODALITIES = (
    "MRI",
    "CT",
    "X-ray",
    "ultrasound",
    "fluorescence microscopy",
    "histopathology",
    "fundus photography",
)


class ModalityPrediction(BaseModel):
    modality: str = Field(description="the most probable imaging modality")
    probability: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every modality's probability")
