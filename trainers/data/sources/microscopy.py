"""Tiles of stardist's fluorescence microscopy image (512 x 512) with its 125 annotated nuclei.

Tiles are 128 px. Rows 0..351 are training and rows 352..511 test, with 32 px dropped either side of
the seam, so training tiles end by row 320 and test tiles start at row 384: no test nucleus is seen
in training. Training tiles overlap (stride 64, seven per row); test tiles do not (stride 128), so
each test nucleus is scored about once.

Regions: a nucleus region marks one whole nucleus lying inside the tile; a background region marks
pixels at least 3 px from every annotated nucleus and darker than the tile's median, so it never
lands on a bright cell the annotators left out.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from medplib.core.image import DEFAULT_LIMITS
from medplib.core.io import load_image
from medplib.core.io.raster import decode_raster
from medplib.core.io.registry_data import stardist_file
from medplib.core.io.sources import read_source
from medplib.trainers.data.sources.common import RegionFamily, RegionLabel, SourceImage
from medplib.trainers.data.splits import PositionSplit

TILE = 128
SPLIT = PositionSplit(((0, 352, "train"), (352, 512, "test")), margin=32)
STRIDE = {"train": 64, "test": 128}
MIN_NUCLEUS = 50  # pixels: smaller annotated pieces are too small to mark as a region


def microscopy_images() -> Iterator[SourceImage]:
    from scipy import ndimage

    image = load_image(stardist_file("nuclei_image")).pixels
    path = stardist_file("nuclei_labels")
    labels = decode_raster(
        read_source(path, max_bytes=DEFAULT_LIMITS.max_bytes), source=str(path), limits=DEFAULT_LIMITS
    )
    height, width = labels.shape
    for top in range(0, height - TILE + 1, min(STRIDE.values())):
        split = SPLIT.split_of(top, top + TILE)
        if split is None:
            continue
        for left in range(0, width - TILE + 1, STRIDE[split]):
            tile = labels[top : top + TILE, left : left + TILE]
            pixels = image[top : top + TILE, left : left + TILE]
            nuclei = tile > 0
            inside = [tile == n for n in _whole_nuclei(tile)]
            grey = pixels[..., 0]
            background = ~ndimage.binary_dilation(nuclei, iterations=3) & (grey < np.median(grey))
            yield SourceImage(
                key=f"stardist_nuclei_y{top:03d}_x{left:03d}",
                pixels=pixels,
                split=split,
                series="stardist/img2d",
                position=(top, top + TILE),
                modality="fluorescence microscopy",
                subject="a fluorescence microscopy image of cells",
                structures={"nuclei": nuclei},
                grounded=("nuclei",),
                listed=("nuclei",),
                compared=("nuclei",),
                regions=(
                    RegionFamily(
                        "region_name",
                        (
                            RegionLabel("nucleus", nuclei, count=2, instances=tuple(inside)),
                            RegionLabel("background", background),
                        ),
                    ),
                ),
            )


def _whole_nuclei(tile: np.ndarray) -> list[int]:
    """Labels of the nuclei that lie wholly inside the tile and are large enough to mark."""
    border = np.unique(np.concatenate([tile[0], tile[-1], tile[:, 0], tile[:, -1]]))
    ids, areas = np.unique(tile[tile > 0], return_counts=True)
    return [int(n) for n, area in zip(ids, areas, strict=True) if n not in border and area >= MIN_NUCLEUS]
