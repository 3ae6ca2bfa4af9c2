"""Region marks for region questions: a point, a box or a free-form shape, drawn inside a label.

Every mark lies wholly inside what it is asked about, so the answer is never ambiguous: a point's
disc and a box are placed where the label is thick enough to hold them, and a shape is the label
itself near a point (or a whole object, such as one nucleus). A box around an object is the
exception, as in MeCoVQA: it is the object's bounding box and so holds a little background.
Points and boxes become masks through `core.regions`, as a user's prompts do.
"""

from __future__ import annotations

import numpy as np

from medplib.core.regions import BoxPrompt, PointPrompt
from medplib.trainers.data.sources.common import RegionLabel

MARKS = ("point", "box", "shape")
POINT_RADIUS = 2.0  # pixels: thin tissue such as the cortical ribbon must hold the whole disc
BOX_HALF_SIDES = (4, 3, 2, 1)  # the largest that fits is used: boxes of 9 down to 3 pixels
SHAPE_RADIUS = 10.0  # a free-form shape is the label within this distance of its centre


def mark_region(label: RegionLabel, mark: str, rng: np.random.Generator) -> np.ndarray | None:
    """A bool mask of a `mark` ('point', 'box' or 'shape') inside `label`; None if none fits."""
    if label.instances:
        target = label.instances[int(rng.integers(len(label.instances)))]
        if mark == "shape":
            return target
        if mark == "box":
            rows, cols = np.nonzero(target)
            box = BoxPrompt(box=(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
            return box.to_mask(*target.shape)
        return _point(target, rng)
    if mark == "point":
        return _point(label.area, rng)
    if mark == "box":
        return _box(label.area, rng)
    return _shape(label.area, rng)


def _depth(area: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the nearest pixel outside `area` (0 outside it)."""
    from scipy import ndimage

    # Padding counts the image border as outside: a mark never touches the edge of the image.
    return ndimage.distance_transform_edt(np.pad(area, 1))[1:-1, 1:-1]


def _pick(candidates: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    rows, cols = np.nonzero(candidates)
    if rows.size == 0:
        return None
    i = int(rng.integers(rows.size))
    return int(rows[i]), int(cols[i])


def _point(area: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    centre = _pick(_depth(area) > POINT_RADIUS, rng)
    if centre is None:
        return None
    row, col = centre
    prompt = PointPrompt(points=[(col + 0.5, row + 0.5)], radius=POINT_RADIUS)
    return prompt.to_mask(*area.shape)


def _box(area: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    depth = _depth(area)
    for half in BOX_HALF_SIDES:
        # A square of half-side h around a pixel reaches h * sqrt(2) from it, at its corners.
        centre = _pick(depth > half * np.sqrt(2), rng)
        if centre is not None:
            row, col = centre
            box = BoxPrompt(box=(col - half, row - half, col + half + 1, row + half + 1))
            return box.to_mask(*area.shape)
    return None


def _shape(area: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    from scipy import ndimage

    centre = _pick(_depth(area) > 1, rng)
    if centre is None:
        return None
    row, col = centre
    disc = PointPrompt(points=[(col + 0.5, row + 0.5)], radius=SHAPE_RADIUS).to_mask(*area.shape)
    pieces, _ = ndimage.label(area & disc)
    return pieces == pieces[row, col]  # the piece around the centre, not islands the disc also cut
