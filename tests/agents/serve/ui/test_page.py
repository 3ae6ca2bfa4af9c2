"""The web page in a real browser (headless chromium) against `medplib ui --model tiny`.

Each test drives the page as a person would (file picker, mouse, buttons), checks what the page shows
and what it sent, and leaves a screenshot of its state in its tmp dir. A route on every page records
any request that is not to the server (and blocks it): none may happen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Request, Route

from medplib.agents.serve.sse import parse_events
from medplib.core.io.registry_data import dicom_file, mni152_file
from medplib.core.masks import Mask

if TYPE_CHECKING:
    from tests.agents.serve.ui.conftest import UiServer

TOKENS = "12"


@pytest.fixture
def outside_requests() -> list[str]:
    return []


def new_page(browser: Browser, server: UiServer, outside: list[str]) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})

    def only_the_server(route: Route, request: Request) -> None:
        if request.url.startswith((server.url + "/", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(request.url)
            route.abort()

    context.route("**/*", only_the_server)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    yield page
    context.close()
    assert outside == [], f"the page made requests outside the server: {outside}"


@pytest.fixture
def page(browser: Browser, ui_server: UiServer, outside_requests: list[str]) -> Iterator[Page]:
    yield from new_page(browser, ui_server, outside_requests)


def open_image(page: Page, path: Path) -> dict[str, Any]:
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#stack.loaded")
    page.wait_for_function("() => state.render !== null")
    return page.evaluate("() => ({width: state.render.width, height: state.render.height})")


class ImageMouse:
    """Mouse at image-pixel positions, and the image pixel a screen position lands on."""

    def __init__(self, page: Page, size: dict[str, Any]) -> None:
        self.page = page
        self.width, self.height = size["width"], size["height"]
        box = page.locator("#region-canvas").bounding_box()
        assert box is not None
        self.box = box

    def screen(self, x: float, y: float) -> tuple[float, float]:
        return self.box["x"] + x / self.width * self.box["width"], self.box["y"] + y / self.height * self.box[
            "height"
        ]

    def image(self, x: float, y: float) -> list[float]:
        """Where the page puts a screen point: what (x, y) became after the round trip through pixels."""
        sx, sy = self.screen(x, y)
        px = (sx - self.box["x"]) / self.box["width"] * self.width
        py = (sy - self.box["y"]) / self.box["height"] * self.height
        return [px, py]

    def click(self, x: float, y: float) -> None:
        self.page.mouse.click(*self.screen(x, y))

    def drag(self, points: list[tuple[float, float]]) -> None:
        self.page.mouse.move(*self.screen(*points[0]))
        self.page.mouse.down()
        for point in points[1:]:
            self.page.mouse.move(*self.screen(*point))
        self.page.mouse.up()


def tool(page: Page, name: str) -> None:
    page.click(f"[data-tool={name}]")


def ask(page: Page, text: str, *, button: str = "#ask") -> None:
    page.fill("#max-tokens", TOKENS)
    page.fill("#question", text)
    page.click(button)


def last_answer(page: Page) -> str:
    page.wait_for_selector(".msg.assistant:not(.streaming) .meta")
    return page.locator(".msg.assistant .text").last.inner_text()


def close(actual: list[float], expected: list[float], tolerance: float = 0.6) -> bool:
    return len(actual) == len(expected) and all(
        abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)
    )


def sse_result(body: str) -> dict[str, Any]:
    events = dict(parse_events(body.splitlines()))
    return json.loads(events["result"])


def test_ask_about_a_point_a_box_and_a_shape_on_a_dicom(page: Page, tmp_path: Path) -> None:
    size = open_image(page, dicom_file("CT_small.dcm"))
    assert size == {"width": 128, "height": 128}
    mouse = ImageMouse(page, size)
    mouse.click(40, 30)
    tool(page, "negative")
    mouse.click(52, 44)  # taken away from region 1, not a region of its own
    tool(page, "box")
    mouse.drag([(60, 60), (90, 100)])
    tool(page, "shape")
    shape = [(20.0, 70.0), (45.0, 75.0), (40.0, 110.0), (15.0, 100.0)]
    mouse.drag(shape)
    page.screenshot(path=tmp_path / "regions.png")

    with page.expect_request("**/v1/vqa") as sent:
        ask(page, "What is in {region}, {region} and {region}?")
    answer = last_answer(page)
    page.screenshot(path=tmp_path / "answered.png")

    assert answer
    assert page.locator("#regions li").count() == 3
    assert page.locator("#regions li").all_inner_texts()[0].startswith("point (40, 30)")
    regions = sent.value.post_data_json["regions"]
    assert [r["kind"] for r in regions] == ["point", "box", "polygon"]
    assert regions[0]["labels"] == [1, 0]
    assert close(regions[0]["points"][0], mouse.image(40, 30))
    assert close(regions[0]["points"][1], mouse.image(52, 44))
    assert close(regions[1]["box"], [*mouse.image(60, 60), *mouse.image(90, 100)])
    assert len(regions[2]["points"]) == len(shape)
    for got, (x, y) in zip(regions[2]["points"], shape, strict=True):
        assert close(got, mouse.image(x, y))


def test_segment_draws_the_servers_mask(page: Page, tmp_path: Path) -> None:
    open_image(page, dicom_file("CT_small.dcm"))
    with page.expect_response("**/v1/ground") as answered:
        ask(page, "the lung", button="#segment")
    page.wait_for_selector("#masks li")
    result = sse_result(answered.value.text())
    expected = np.zeros((128, 128), dtype=bool)
    for segmentation in result["masks"]:
        expected |= Mask.model_validate(segmentation["mask"]).to_array()
    drawn = page.evaluate(
        """() => { const c = document.getElementById('mask-canvas');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    )
    page.screenshot(path=tmp_path / "segmented.png")
    assert result["masks"] and expected.sum() > 0
    assert drawn == int(expected.sum())
    # Each mask downloads as COCO RLE JSON (the server's, as sent) and as a PNG of the same pixels.
    with page.expect_download() as rle:
        page.click("#masks li button:text('RLE')")
    assert json.loads(Path(rle.value.path()).read_text()) == result["masks"][0]["mask"]
    with page.expect_download() as png:
        page.click("#masks li button:text('PNG')")
    first = Mask.model_validate(result["masks"][0]["mask"]).to_array()
    assert np.array_equal(np.asarray(Image.open(png.value.path()).convert("L")) > 127, first)
    # The <SEG> chip highlights its mask; the toggle hides it.
    page.hover(".seg-chip")
    assert page.locator(".seg-chip.active").count() == 1
    page.locator("#masks li input[type=checkbox]").first.uncheck()
    page.mouse.move(0, 0)
    hidden = page.evaluate(
        """() => { const c = document.getElementById('mask-canvas');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   return d.some((v, i) => i % 4 === 3 && v > 0); }"""
    )
    assert not hidden


def test_streamed_answer_grows_and_equals_the_plain_answer(
    page: Page, ui_server: UiServer, tmp_path: Path
) -> None:
    open_image(page, dicom_file("MR_small.dcm"))
    page.evaluate(
        """() => { window.lengths = [];
                   new MutationObserver(() => {
                     const text = document.querySelector('.msg.assistant.streaming .text');
                     if (text) window.lengths.push(text.textContent.length);
                   }).observe(document.getElementById('conversation'),
                              {subtree: true, childList: true, characterData: true}); }"""
    )
    with page.expect_response("**/v1/vqa") as answered:
        ask(page, "Which organ is this?")
    shown = last_answer(page)
    page.screenshot(path=tmp_path / "streamed.png")
    growth = sorted(set(page.evaluate("() => window.lengths")) - {0})
    sent_deltas = [event for event, _ in parse_events(answered.value.text().splitlines()) if event == "delta"]
    assert len(growth) >= 2, f"the text grew in {len(growth)} step(s)"
    assert len(growth) == len(sent_deltas)  # one step per delta the server sent

    body = {**answered.value.request.post_data_json, "stream": False}
    plain = httpx.post(ui_server.url + "/v1/vqa", json=body, timeout=60).json()
    assert shown == plain["text"] != ""
    # A follow-up carries the conversation so far.
    with page.expect_request("**/v1/vqa") as follow_up:
        ask(page, "And its size?")
    last_answer(page)
    history = follow_up.value.post_data_json["history"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"] == plain["text"]


def test_nifti_slice_control_changes_the_image(page: Page, tmp_path: Path) -> None:
    open_image(page, mni152_file("t1"))
    assert page.is_visible("#slice-control")

    def pixels() -> str:
        return page.evaluate("() => document.getElementById('image-canvas').toDataURL()")

    before, first = pixels(), page.inner_text("#slice-value")
    page.eval_on_selector("#slice", "el => { el.value = 40; el.dispatchEvent(new Event('change')); }")
    page.wait_for_function(f"() => document.getElementById('slice-value').textContent !== {first!r}")
    page.screenshot(path=tmp_path / "nifti-slice.png")
    assert page.inner_text("#slice-value").startswith("41 /")
    assert pixels() != before

    # A mask made on this slice downloads as a NIfTI on the volume's grid, at this slice.
    with page.expect_response("**/v1/ground") as answered:
        ask(page, "the brain", button="#segment")
    page.wait_for_selector("#masks li")
    mask = Mask.model_validate(sse_result(answered.value.text())["masks"][0]["mask"]).to_array()
    with page.expect_download() as downloaded:
        page.click("#masks li button:text('NIfTI')")
    path = tmp_path / "mask.nii.gz"
    downloaded.value.save_as(path)
    volume = np.asanyarray(nib.load(path).dataobj)
    assert volume.shape == (197, 233, 189)
    assert np.array_equal(np.rot90(volume[:, :, 40]), mask)
    assert volume.sum() == mask.sum() > 0


def test_frame_control_of_a_multi_frame_dicom(page: Page, tmp_path: Path) -> None:
    open_image(page, dicom_file("emri_small.dcm"))
    assert page.is_visible("#frame-control") and page.is_hidden("#slice-control")
    before = page.evaluate("() => document.getElementById('image-canvas').toDataURL()")
    page.eval_on_selector("#frame", "el => { el.value = 7; el.dispatchEvent(new Event('change')); }")
    page.wait_for_function("() => document.getElementById('frame-value').textContent.startsWith('8 /')")
    page.screenshot(path=tmp_path / "frame.png")
    assert page.evaluate("() => document.getElementById('image-canvas').toDataURL()") != before
    with page.expect_request("**/v1/vqa") as sent:
        ask(page, "What is this?")
    last_answer(page)
    assert sent.value.post_data_json["image"]["frame"] == 7  # the question is about the frame shown


def test_errors_are_shown_and_the_page_keeps_working(page: Page, ui_server: UiServer, tmp_path: Path) -> None:
    size = open_image(page, dicom_file("CT_small.dcm"))
    mouse = ImageMouse(page, size)
    ask(page, "What modality is this?")
    first = last_answer(page)

    tool(page, "box")
    mouse.drag([(100, 100), (150, 140)])  # runs off the 128 x 128 image
    ask(page, "What is in {region}?")
    page.wait_for_selector("#ask-error:not([hidden])")
    page.screenshot(path=tmp_path / "region-error.png")
    assert "outside" in page.inner_text("#ask-error")
    assert page.locator(".msg.assistant").count() == 1  # the conversation is as it was
    assert page.locator(".msg.assistant .text").first.inner_text() == first

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes((ui_server.max_body_mb << 20) + 1))
    page.set_input_files("#file", str(big))
    page.wait_for_selector("#file-error:not([hidden])")
    page.screenshot(path=tmp_path / "too-large.png")
    assert "too large" in page.inner_text("#file-error")

    page.click("#regions li button")  # remove the bad box; the CT is still open
    assert page.locator("#regions li").count() == 0
    ask(page, "What is in this image?")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .meta').length === 2")
    assert page.is_hidden("#ask-error")


def test_api_key_is_asked_for(
    browser: Browser, keyed_ui_server: UiServer, outside_requests: list[str], tmp_path: Path
) -> None:
    url = keyed_ui_server.url
    assert httpx.get(url + "/v1/experts").status_code == 401
    assert httpx.post(url + "/v1/vqa", json={}).status_code == 401
    for page in new_page(browser, keyed_ui_server, outside_requests):
        page.wait_for_selector("#key-dialog[open]")
        page.screenshot(path=tmp_path / "api-key.png")
        page.fill("#api-key", "wrong")
        page.click("#key-save")
        page.wait_for_selector("#key-dialog[open] #key-error:not([hidden])")
        page.fill("#api-key", keyed_ui_server.api_key or "")
        page.click("#key-save")
        page.wait_for_selector("#model-panel dt")
        open_image(page, dicom_file("CT_small.dcm"))
        ask(page, "What modality is this?")
        assert last_answer(page)
