"""The grounding gallery of an evaluation: its best and worst cases by Dice, one PNG per case.

Each PNG holds three panels side by side, split by white gaps: the image, the reference mask over it
(green) and the predicted mask over it (red). Small images (the embedded dataset's 64 px nuclei) are
enlarged by whole pixels, so a mask's edge stays visible. A file is named
`<best|worst>-<rank>-dice<D>-<sample id>.png`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medplib.core.masks import PALETTE, Mask, overlay, save_png
from medplib.trainers.collate import Example

TRUTH_COLOR, PREDICTION_COLOR = PALETTE[1], PALETTE[0]  # green, red
GAP = 4  # white columns between panels
MIN_HEIGHT = 192  # smaller images are enlarged by a whole factor up to at least this height
GROUPS = ("best", "worst")


def panel_scale(height: int) -> int:
    """The whole factor an image of `height` rows is enlarged by in the gallery."""
    return max(1, math.ceil(MIN_HEIGHT / height))


def three_panels(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The image, the reference overlay and the prediction overlay, left to right, as one RGB array."""
    scale = panel_scale(image.shape[0])

    def enlarged(array: np.ndarray) -> np.ndarray:
        return array.repeat(scale, axis=0).repeat(scale, axis=1)

    rgb = enlarged(image)
    gap = np.full((rgb.shape[0], GAP, 3), 255, dtype=np.uint8)
    truth_panel = overlay(rgb, [enlarged(truth)], [TRUTH_COLOR])
    predicted_panel = overlay(rgb, [enlarged(predicted)], [PREDICTION_COLOR])
    return np.concatenate([rgb, gap, truth_panel, gap, predicted_panel], axis=1)


def ranked_cases(predictions: Sequence[dict], count: int) -> list[tuple[str, int, dict]]:
    """(group, rank, prediction) of the `count` highest and `count` lowest Dice; none is in both."""
    scored = sorted((p for p in predictions if "dice" in p), key=lambda p: (-p["dice"], p["id"]))
    best = scored[:count]
    worst = scored[len(best) :][::-1][:count]  # the lowest among those not already shown as best
    return [
        (group, rank, prediction)
        for group, cases in zip(GROUPS, (best, worst), strict=True)
        for rank, prediction in enumerate(cases, start=1)
    ]


def write_gallery(
    folder: Path, predictions: Sequence[dict], examples: Sequence[Example], count: int
) -> list[dict]:
    """Write the best and worst grounding cases into `folder`; returns what each file shows.

    `predictions` are `scoring.evaluate`'s with `keep_masks=True`. A gallery written before into the
    same folder is replaced, so no stale case is left beside the new ones.
    """
    for group in GROUPS:
        for stale in folder.glob(f"{group}-*.png"):
            stale.unlink()
    by_id = {example.id: example for example in examples}
    cases = []
    for group, rank, prediction in ranked_cases(predictions, count):
        example = by_id[prediction["id"]]
        name = f"{group}-{rank:02d}-dice{prediction['dice']:.3f}-{_file_safe(example.id)}.png"
        predicted = Mask.model_validate(prediction["mask"]).to_array()
        folder.mkdir(parents=True, exist_ok=True)
        save_png(three_panels(example.request.pixels, example.targets[0], predicted), folder / name)
        cases.append(
            {
                "file": f"{folder.name}/{name}",
                "group": group,
                "rank": rank,
                "id": example.id,
                "dice": prediction["dice"],
                "structure": example.structure,
                "modality": example.modality,
            }
        )
    return cases


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
