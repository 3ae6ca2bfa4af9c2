"""What one optimizer step trains on: each sample of its global batch as the step's augmentations
draw it (mirrored, zoomed out, reworded), every draw a function of the seed and the step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medplib.trainers.collate import Example
from medplib.trainers.mirror import as_drawn, mirrored_images
from medplib.trainers.rewording import as_worded, step_wordings
from medplib.trainers.stages import StageSpec
from medplib.trainers.zoom import as_zoomed, zoom_factors


@dataclass(frozen=True)
class StepDraws:
    flips: set[str]  # images mirrored this step (`mirror.py`)
    zooms: dict[str, float]  # image -> zoom-out factor (`zoom.py`)
    wordings: dict[int, int]  # sample index -> extra wording number (`rewording.py`)

    @classmethod
    def of(
        cls, spec: StageSpec, examples: Sequence[Example], chosen: Sequence[int], seed: int, step: int
    ) -> StepDraws:
        return cls(
            mirrored_images(examples, chosen, spec.mirror, seed, step),
            zoom_factors(examples, chosen, spec.zoom, seed, step),
            step_wordings(examples, chosen, spec.reword, seed, step),
        )

    def sample(self, examples: Sequence[Example], index: int) -> Example:
        """Sample `index` as this step trains on it; the draws are keyed by the original image."""
        example = examples[index]
        drawn = as_zoomed(as_drawn(example, self.flips), self.zooms.get(example.image))
        return as_worded(drawn, self.wordings.get(index))
