"""Zoom-out augmentation: the slice of a hemisphere request shrunk about its centre onto the black
background, its target mask with it.

Why: the test split's brain slices include the ends of each plane's range, where each hemisphere
covers a few hundred pixels (the training split stops a few slices earlier). On one seed of three the
grounding expert gave the right hemisphere of such a slice a mask of both sides (left/right IoU 0.26)
while every larger slice was split cleanly. A shrunk slice is a smaller brain on the same background,
its sides where they were, so the request stays true and the decoder meets small hemispheres in
training. Only hemisphere requests are zoomed: shrinking the slices of grey and white matter requests
too (resampling thin tissue) cost white matter on every seed, and which tissue a pixel is does not
depend on where the brain lies (benchmarks/results/pipeline.md, session 13).

Both hemisphere requests about one image in a step are zoomed together by one factor (the pair
contrast compares them), the image's other requests stay as they are, and the factors are drawn from
the seed and the step, so a resumed run zooms what the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from medplib.core.model import Request
from medplib.trainers.collate import Example

ZOOMED_PLANES = ("axial", "coronal", "sagittal")
SMALLEST = 0.5  # the smallest factor drawn; factors are uniform in [SMALLEST, 1)
_STREAM = 0x7A6F6F  # keeps these draws apart from the data order's, the mirror's and the rewording's
SIDED = ("left hemisphere", "right hemisphere")  # the structures whose side is all that names them


def zoomable(example: Example) -> bool:
    return example.plane in ZOOMED_PLANES and bool(example.targets) and example.structure in SIDED


def _shrunk(array: np.ndarray, factor: float, resample: Image.Resampling) -> np.ndarray:
    """`array` (H, W[, C]) scaled by `factor` about its centre, the border filled with zeros."""
    height, width = array.shape[:2]
    small_h, small_w = max(1, round(height * factor)), max(1, round(width * factor))
    is_bool = array.dtype == bool
    source = array.astype(np.uint8) * 255 if is_bool else array
    small = np.asarray(Image.fromarray(source).resize((small_w, small_h), resample))
    out = np.zeros_like(source)
    top, left = (height - small_h) // 2, (width - small_w) // 2
    out[top : top + small_h, left : left + small_w] = small
    return out > 127 if is_bool else out


def zoomed(example: Example, factor: float) -> Example:
    """The example's image and targets shrunk by `factor` (0 < factor <= 1); its text is unchanged."""
    if not zoomable(example):
        raise ValueError(f"{example.id}: only hemisphere requests on brain slices are zoomed")
    if not 0 < factor <= 1:
        raise ValueError(f"a zoom-out factor is in (0, 1], got {factor}")
    request = example.request
    return replace(
        example,
        id=f"{example.id}/zoom-{factor:.3f}",
        request=Request(
            _shrunk(request.pixels, factor, Image.Resampling.BILINEAR),
            request.turns,
            tuple(_shrunk(region, factor, Image.Resampling.NEAREST) for region in request.regions),
            request.require_seg,
            request.require_token,
            request.require_at_start,
        ),
        image=f"{example.image}#zoom-{factor:.3f}",  # pairs of one image stay pairs of one zoomed image
        targets=tuple(_shrunk(target, factor, Image.Resampling.NEAREST) for target in example.targets),
    )


def zoom_factors(
    examples: Sequence[Example], chosen: Sequence[int], rate: float, seed: int, step: int
) -> dict[str, float]:
    """Image -> factor for the images step `step` zooms: each image of its global batch that holds a
    hemisphere request, with probability `rate`, drawn from (seed, step) in the batch's order."""
    if rate <= 0:
        return {}
    images = list(dict.fromkeys(examples[i].image for i in chosen if zoomable(examples[i])))
    rng = np.random.default_rng([seed, step, _STREAM])
    draws, factors = rng.random(len(images)), rng.uniform(SMALLEST, 1.0, len(images))
    return {
        image: float(factor)
        for image, draw, factor in zip(images, draws, factors, strict=True)
        if draw < rate
    }


def as_zoomed(example: Example, factor: float | None) -> Example:
    """The example as a step trains on it: zoomed by its image's `factor` (None: not zoomed this step)
    when it is a hemisphere request, else as it is."""
    return example if factor is None or not zoomable(example) else zoomed(example, factor)
