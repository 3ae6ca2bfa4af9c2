"""Region prompts: exact masks for exact shapes, and a clear error for every bad prompt."""

from __future__ import annotations

import base64
import io
import itertools
import math

import fsspec
import numpy as np
import pydantic
import pytest
from PIL import Image

from medplib.core.errors import InvalidInputError, RegionError
from medplib.core.masks import Mask
from medplib.core.regions import (
    BoxPrompt,
    MaskPrompt,
    PointPrompt,
    PolygonPrompt,
    ScribblePrompt,
    parse_box,
    parse_point,
    parse_region,
    regions_to_masks,
)

SHAPES = [(1, 1), (7, 13), (13, 7), (64, 64), (33, 100)]


def centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every pixel centre, each shaped (H, W)."""
    return np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)


def even_odd_reference(vertices: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """Point-in-polygon one pixel centre at a time, the textbook way: the slow, obvious oracle."""
    mask = np.zeros((height, width), dtype=bool)
    for i in range(height):
        for j in range(width):
            cx, cy, inside = j + 0.5, i + 0.5, False
            for (xa, ya), (xb, yb) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
                if min(ya, yb) <= cy < max(ya, yb) and xa + (cy - ya) * (xb - xa) / (yb - ya) <= cx:
                    inside = not inside
            mask[i, j] = inside
    return mask


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()


# --- boxes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_integer_box_round_trips_exactly(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    for _ in range(20):
        x0, x1 = sorted(rng.choice(width + 1, 2, replace=False))
        y0, y1 = sorted(rng.choice(height + 1, 2, replace=False))
        mask = BoxPrompt(box=(x0, y0, x1, y1)).to_mask(height, width)
        assert mask.shape == (height, width) and mask.dtype == bool
        assert mask.sum() == (x1 - x0) * (y1 - y0)
        assert Mask.from_array(mask).bbox == (x0, y0, x1, y1)


def test_float_box_holds_the_pixels_whose_centre_is_inside() -> None:
    rng = np.random.default_rng(0)
    cx, cy = centres(20, 30)
    for _ in range(50):
        x0, x1 = sorted(rng.uniform(0, 30, 2))
        y0, y1 = sorted(rng.uniform(0, 20, 2))
        expected = (x0 <= cx) & (cx < x1) & (y0 <= cy) & (cy < y1)
        if expected.any():
            np.testing.assert_array_equal(BoxPrompt(box=(x0, y0, x1, y1)).to_mask(20, 30), expected)


@pytest.mark.parametrize(
    ("box", "problem"),
    [((5, 0, 2, 4), "x0 < x1"), ((0, 4, 2, 4), "y0 < y1"), ((3, 3, 3, 9), "x0 < x1")],
)
def test_box_in_the_wrong_order_is_refused(box: tuple, problem: str) -> None:
    with pytest.raises(RegionError, match=problem):
        parse_region({"kind": "box", "box": box})
    with pytest.raises(pydantic.ValidationError, match=problem):
        BoxPrompt(box=box)


@pytest.mark.parametrize("box", [(-1, 0, 5, 5), (0, 0, 11, 5), (0, 0, 5, 8.5), (2, -0.1, 5, 5)])
def test_box_outside_the_image_names_box_and_size(box: tuple) -> None:
    with pytest.raises(RegionError, match=r"box \(.*\).*outside the 10x8 \(WxH\) image"):
        BoxPrompt(box=box).to_mask(8, 10)


def test_box_between_pixel_centres_is_empty() -> None:
    with pytest.raises(RegionError, match="covers no pixel centre"):
        BoxPrompt(box=(2.6, 0, 2.9, 5)).to_mask(8, 10)


# --- polygons ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_rectangle_polygon_equals_box(height: int, width: int) -> None:
    rng = np.random.default_rng(height + width)
    for _ in range(20):
        x0, x1 = sorted(rng.uniform(0, width, 2))
        y0, y1 = sorted(rng.uniform(0, height, 2))
        if rng.random() < 0.5:
            x0, x1, y0, y1 = np.floor(x0), np.ceil(x1), np.floor(y0), np.ceil(y1)
        try:
            box = BoxPrompt(box=(x0, y0, x1, y1)).to_mask(height, width)
        except RegionError:  # a sliver between pixel centres; the polygon must agree
            with pytest.raises(RegionError, match="empty polygon"):
                PolygonPrompt(points=[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]).to_mask(height, width)
            continue
        for corners in ([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], [(x0, y0), (x0, y1), (x1, y1), (x1, y0)]):
            np.testing.assert_array_equal(PolygonPrompt(points=corners).to_mask(height, width), box)


def test_polygon_matches_the_textbook_even_odd_rule() -> None:
    rng = np.random.default_rng(1)
    for n in (3, 4, 5, 8, 12):
        vertices = [tuple(v) for v in rng.uniform([0, 0], [17, 13], (n, 2))]
        expected = even_odd_reference(vertices, 13, 17)
        if expected.any():
            np.testing.assert_array_equal(PolygonPrompt(points=vertices).to_mask(13, 17), expected)


@pytest.mark.parametrize("scale", [1, 4, 16])
def test_triangle_area_is_close_to_its_geometric_area(scale: int) -> None:
    (ax, ay), (bx, by), (cx, cy) = triangle = [
        (1 * scale, 1 * scale),
        (30 * scale, 5 * scale),
        (12 * scale, 25 * scale),
    ]
    area = abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay)) / 2
    perimeter = sum(math.dist(p, q) for p, q in zip(triangle, triangle[1:] + triangle[:1], strict=True))
    mask = PolygonPrompt(points=triangle).to_mask(26 * scale, 31 * scale)
    assert abs(int(mask.sum()) - area) <= perimeter / 2


def test_self_crossing_polygon_leaves_a_hole() -> None:
    # A pentagram: the central pentagon is crossed twice, so even-odd leaves it out.
    star = [
        (50 + 40 * math.sin(k * 4 * math.pi / 5), 50 - 40 * math.cos(k * 4 * math.pi / 5)) for k in range(5)
    ]
    mask = PolygonPrompt(points=star).to_mask(100, 100)
    assert not mask[50, 50]
    assert mask[15, 50]  # in the top tip
    bowtie = PolygonPrompt(points=[(0, 0), (10, 10), (10, 0), (0, 10)]).to_mask(10, 10)
    assert bowtie[5, 1] and bowtie[5, 8] and not bowtie[1, 5]


def test_polygon_errors() -> None:
    with pytest.raises(RegionError, match="at least 3"):
        parse_region({"kind": "polygon", "points": [[1, 2], [3, 4]]})
    with pytest.raises(RegionError, match="empty polygon: its vertices are collinear"):
        PolygonPrompt(points=[(1, 1), (5, 5), (9, 9)]).to_mask(10, 10)
    with pytest.raises(RegionError, match="empty polygon"):  # a thin triangle between pixel centres
        PolygonPrompt(points=[(1.6, 1.6), (1.9, 1.6), (1.9, 1.9)]).to_mask(10, 10)
    with pytest.raises(RegionError, match=r"polygon: point \(12, 3\) lies outside the 10x10"):
        PolygonPrompt(points=[(1, 1), (12, 3), (5, 8)]).to_mask(10, 10)


# --- scribbles and points ------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 3, 5, 9])
def test_scribble_has_its_width(width: float) -> None:
    mask = ScribblePrompt(points=[(2, 20.5), (60, 20.5)], width=width).to_mask(40, 64)
    assert mask.sum(axis=0)[30] == width  # rows whose centre is within width/2 of y = 20.5
    cx, cy = centres(40, 64)
    expected = np.hypot(cx - np.clip(cx, 2, 60), cy - 20.5) <= width / 2
    np.testing.assert_array_equal(mask, expected)


def test_scribble_follows_a_bent_stroke() -> None:
    points = [(5.0, 5.0), (40.0, 30.0), (10.0, 45.0)]
    mask = ScribblePrompt(points=points, width=4).to_mask(50, 50)
    cx, cy = centres(50, 50)
    distance = np.full(cx.shape, np.inf)
    for (xa, ya), (xb, yb) in itertools.pairwise(points):
        t = np.clip(((cx - xa) * (xb - xa) + (cy - ya) * (yb - ya)) / ((xb - xa) ** 2 + (yb - ya) ** 2), 0, 1)
        distance = np.minimum(distance, np.hypot(cx - xa - t * (xb - xa), cy - ya - t * (yb - ya)))
    np.testing.assert_array_equal(mask, distance <= 2)


def test_scribble_errors() -> None:
    with pytest.raises(RegionError, match="width"):
        parse_region({"kind": "scribble", "points": [[1, 2]], "width": 0})
    with pytest.raises(RegionError, match="at least 1"):
        parse_region({"kind": "scribble", "points": [], "width": 2})
    with pytest.raises(RegionError, match=r"scribble: point \(3, 40\) lies outside the 20x30"):
        ScribblePrompt(points=[(1, 1), (3, 40)], width=2).to_mask(30, 20)


@pytest.mark.parametrize("radius", [5.0, 10.0, 25.0])
def test_point_disc_area_is_about_pi_r_squared(radius: float) -> None:
    mask = PointPrompt(points=[(50, 50)], radius=radius).to_mask(100, 100)
    assert mask.sum() == pytest.approx(math.pi * radius**2, rel=0.05)
    assert mask[50, 50] and not mask[50, 50 + int(radius) + 1]


@pytest.mark.parametrize(("height", "width", "radius"), [(512, 512, 10.24), (50, 300, 2.0), (200, 100, 2.0)])
def test_default_point_radius_scales_with_the_image(height: int, width: int, radius: float) -> None:
    default = PointPrompt(points=[(width / 2, height / 2)]).to_mask(height, width)
    explicit = PointPrompt(points=[(width / 2, height / 2)], radius=radius).to_mask(height, width)
    np.testing.assert_array_equal(default, explicit)


def test_negative_points_carve_holes() -> None:
    whole = PointPrompt(points=[(50, 50)], radius=20).to_mask(100, 100)
    carved = PointPrompt(points=[(50, 50), (60, 50)], labels=[1, 0], radius=20).to_mask(100, 100)
    hole = PointPrompt(points=[(60, 50)], radius=20).to_mask(100, 100)
    np.testing.assert_array_equal(carved, whole & ~hole)
    assert not carved[50, 60] and carved[50, 35]


def test_several_positive_points_unite() -> None:
    two = PointPrompt(points=[(10, 10), (80, 80)], radius=5).to_mask(100, 100)
    assert two[10, 10] and two[80, 80] and not two[45, 45]


def test_point_errors() -> None:
    with pytest.raises(RegionError, match=r"point prompt: point \(120, 5\) lies outside the 100x50 \(WxH\)"):
        PointPrompt(points=[(3, 4), (120, 5)]).to_mask(50, 100)
    with pytest.raises(RegionError, match="2 points but 1 labels"):
        parse_region({"kind": "point", "points": [[1, 2], [3, 4]], "labels": [1]})
    with pytest.raises(RegionError, match="0 or 1"):
        parse_region({"kind": "point", "points": [[1, 2]], "labels": [2]})
    with pytest.raises(RegionError, match="only negative points"):
        parse_region({"kind": "point", "points": [[1, 2]], "labels": [0]})
    with pytest.raises(RegionError, match="empty region"):  # the negative disc swallows the positive one
        PointPrompt(points=[(5, 5), (5, 5)], labels=[1, 0]).to_mask(10, 10)
    with pytest.raises(RegionError, match="finite"):
        parse_region('{"kind": "point", "points": [[NaN, 2]]}')


# --- mask prompts --------------------------------------------------------------------------------------


@pytest.fixture
def blob() -> np.ndarray:
    yy, xx = np.mgrid[:37, :53]
    return (xx - 20) ** 2 / 200 + (yy - 15) ** 2 / 60 <= 1


def test_mask_prompt_from_array_survives_json(blob: np.ndarray) -> None:
    prompt = MaskPrompt.from_array(blob)
    again = parse_region(prompt.model_dump_json())
    np.testing.assert_array_equal(again.to_mask(37, 53), blob)


@pytest.mark.parametrize("encoding", ["bool", "uint8-255", "uint16", "rgb-one-channel", "rgba-opaque"])
def test_mask_prompt_from_png_file(tmp_path, blob: np.ndarray, encoding: str) -> None:
    if encoding == "bool":
        array = blob
    elif encoding == "uint8-255":
        array = blob.astype(np.uint8) * 255
    elif encoding == "uint16":
        array = blob.astype(np.uint16) * 1000
    elif encoding == "rgb-one-channel":
        array = np.zeros((*blob.shape, 3), np.uint8)
        array[..., 2] = blob * 7  # any non-zero channel is foreground
    else:
        array = np.zeros((*blob.shape, 4), np.uint8)
        array[..., 1] = blob * 255
        array[..., 3] = 255  # opaque everywhere: alpha must not count as foreground
    path = tmp_path / "mask.png"
    path.write_bytes(png_bytes(array))
    np.testing.assert_array_equal(MaskPrompt(source=str(path)).to_mask(37, 53), blob)


def test_mask_prompt_from_memory_uri(memory_fs, blob: np.ndarray) -> None:
    memory_fs.pipe("/masks/blob.png", png_bytes(blob))
    np.testing.assert_array_equal(MaskPrompt(source="memory://masks/blob.png").to_mask(37, 53), blob)


def test_mask_prompt_errors(tmp_path, blob: np.ndarray) -> None:
    with pytest.raises(RegionError, match=r"is 53x37 \(WxH\) but the image is 50x37"):
        MaskPrompt.from_array(blob).to_mask(37, 50)
    with pytest.raises(RegionError, match="empty region"):
        MaskPrompt.from_array(np.zeros((5, 5), bool)).to_mask(5, 5)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(blob)[:60])
    with pytest.raises(InvalidInputError, match="truncated or corrupt PNG"):
        MaskPrompt(source=str(truncated)).to_mask(37, 53)
    with pytest.raises(InvalidInputError, match="no such file"):
        MaskPrompt(source=str(tmp_path / "missing.png")).to_mask(37, 53)
    with pytest.raises(RegionError, match="not valid base64"):
        MaskPrompt(data_base64="not base64!").to_mask(37, 53)
    with pytest.raises(InvalidInputError, match="not a PNG"):
        MaskPrompt(data_base64=base64.b64encode(b"hello").decode()).to_mask(37, 53)
    with pytest.raises(RegionError, match="exactly one of 'source'"):
        parse_region({"kind": "mask"})
    with pytest.raises(RegionError, match="exactly one of 'source'"):
        parse_region({"kind": "mask", "source": "a.png", "data_base64": "AAAA"})
    with pytest.raises(InvalidInputError, match="threshold it first"):
        MaskPrompt.from_array(blob.astype(np.float32))


# --- parsing and batches -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        PointPrompt(points=[(3, 4), (8, 8)], labels=[1, 0], radius=3),
        BoxPrompt(box=(1, 2, 9, 7)),
        PolygonPrompt(points=[(1, 1), (9, 2), (4, 8)]),
        ScribblePrompt(points=[(1, 1), (9, 9)], width=2),
        MaskPrompt(source="memory://x.png"),
    ],
)
def test_prompts_round_trip_through_json(prompt) -> None:
    assert parse_region(prompt.model_dump_json()) == prompt
    assert parse_region(prompt.model_dump()) == prompt


def test_point_labels_default_to_positive() -> None:
    assert parse_region({"kind": "point", "points": [[1, 2], [3, 4]]}).labels == [1, 1]


def test_regions_to_masks_keeps_order() -> None:
    prompts = [
        BoxPrompt(box=(0, 0, 2, 2)),
        ScribblePrompt(points=[(5, 5)], width=2),
        BoxPrompt(box=(8, 8, 10, 10)),
    ]
    masks = regions_to_masks(prompts, 10, 10)
    assert [Mask.from_array(m).bbox for m in masks] == [(0, 0, 2, 2), (4, 4, 6, 6), (8, 8, 10, 10)]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ('{"kind": "circle", "centre": [1, 2]}', "'circle'"),
        ('{"box": [1, 2, 3, 4]}', "discriminator 'kind'"),
        ("{not json", "Invalid JSON"),
        ({"kind": "box", "box": [1, 2, 3]}, "box.box"),
        ({"kind": "box", "box": [0, 0, 5, 5], "colour": "red"}, "colour"),
    ],
)
def test_parse_region_gives_one_line_naming_the_problem(data, problem: str) -> None:
    with pytest.raises(RegionError, match="invalid region prompt") as info:
        parse_region(data)
    assert problem in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10,20", (10.0, 20.0, 1)), ("1.5, 2.5, 0", (1.5, 2.5, 0)), ("3,4,1", (3.0, 4.0, 1))],
)
def test_parse_point(text: str, expected: tuple) -> None:
    assert parse_point(text) == expected


@pytest.mark.parametrize("text", ["", "10", "10,x", "1,2,3", "1,2,0.5", "1,2,1,4", "nan,2", "1;2"])
def test_parse_point_refuses_bad_text(text: str) -> None:
    with pytest.raises(InvalidInputError, match=f"bad point {text!r}"):
        parse_point(text)


def test_parse_box() -> None:
    assert parse_box("1,2,30.5,40") == BoxPrompt(box=(1, 2, 30.5, 40))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1,2,3", "four numbers"),
        ("a,b,c,d", "four numbers"),
        ("1,2,3,inf", "four numbers"),
        ("5,0,2,4", "x0 < x1"),
    ],
)
def test_parse_box_refuses_bad_text(text: str, problem: str) -> None:
    with pytest.raises(InvalidInputError, match=f"bad box {text!r}.*{problem}"):
        parse_box(text)


def test_bad_image_size_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="image size must be positive"):
        BoxPrompt(box=(0, 0, 1, 1)).to_mask(0, 5)
