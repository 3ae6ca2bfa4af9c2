"""What every source hands the builder: images at their stored size, with what is known about them.

A source knows its images (the modality, the plane, the body region, the masks of its structures, which
split each image belongs to); the builder turns that knowledge into questions. Masks are on the grid
of the stored pixels, so they always match the image they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_SIDE = 256  # stored images' longest side: small enough for a tiny model trained on CPUs
SINGLE_IMAGE_WORDINGS = 3  # a source's only image is asked each question in three wordings


@dataclass(frozen=True)
class RegionLabel:
    """What a region marked inside `area` is called ('grey matter', 'left', ...), and how many such
    regions an image gets.

    With `instances` (separate objects, such as nuclei) a region marks one whole object; without, a
    patch of `area` away from its border.
    """

    answer: str
    area: np.ndarray
    count: int = 1
    instances: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class RegionFamily:
    """Region questions of one kind ('region_name', 'region_side') and the labels they are about."""

    kind: str
    labels: tuple[RegionLabel, ...]


@dataclass(frozen=True)
class SourceImage:
    key: str  # unique, file-name safe: the image is written as images/<key>.png
    pixels: np.ndarray  # (H, W, 3) uint8, the canonical rendering at its stored size
    split: str
    series: str  # what `position` is measured in, e.g. 'mni152/axial' or 'stardist/img2d'
    position: tuple[int, int]  # the [start, stop) the split was decided on (see splits.py)
    modality: str
    subject: str  # the description's opening, e.g. 'an axial MRI slice of the brain'
    plane: str | None = None
    body_region: str | None = None
    structures: dict[str, np.ndarray] = field(default_factory=dict)  # STRUCTURES key -> bool mask
    presence: tuple[str, ...] = ()  # structures asked about with yes/no
    grounded: tuple[str, ...] = ()  # structures a grounding request asks for (when present)
    listed: tuple[str, ...] = ()  # structures the 'structures' question names (when present)
    compared: tuple[str, ...] = ()  # structures whose amount in the image's halves is compared
    regions: tuple[RegionFamily, ...] = ()
    wordings: int = 1  # how many wordings of each question: single images get more


def fit_image(pixels: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """`pixels` shrunk (Lanczos) so that the longer side is at most `max_side`; never enlarged."""
    size = _fitted_size(pixels.shape[:2], max_side)
    if size == pixels.shape[:2]:
        return pixels
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.Resampling.LANCZOS))


def fit_mask(mask: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """A bool mask shrunk onto the grid `fit_image` gives: a pixel is in when over half its area was."""
    size = _fitted_size(mask.shape, max_side)
    if size == mask.shape:
        return mask
    from PIL import Image

    coverage = Image.fromarray(mask.astype(np.float32)).resize(size[::-1], Image.Resampling.BOX)
    return np.asarray(coverage) > 0.5


def _fitted_size(shape: tuple[int, ...], max_side: int) -> tuple[int, int]:
    height, width = shape[0], shape[1]
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def with_article(phrase: str) -> str:
    """'a' or 'an' before `phrase` as it is spoken: 'an MRI slice', 'a CT slice', 'an axial ...'."""
    first = phrase[0]
    # An initialism (capitalised: MRI, X-ray, CT) is spelled out, so its first letter's name counts.
    vowel = first in "AEFHILMNORSX" if first.isupper() else first in "aeiou"
    return f"{'an' if vowel else 'a'} {phrase}"
