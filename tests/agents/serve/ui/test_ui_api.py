"""`medplib ui`'s API over real HTTP: streamed answers through the Python client, follow-ups with
history, the render route, the page's files, and what the server refuses."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import nibabel as nib
import numpy as np
import pytest

from medplib.agents.serve.client import MedPLIBClient
from medplib.core.errors import InvalidInputError, RegionError
from medplib.core.io import load_volume
from medplib.core.io.registry_data import dicom_file, mni152_file
from medplib.core.masks import Mask
from medplib.core.regions import BoxPrompt
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

if TYPE_CHECKING:
    from tests.agents.serve.ui.conftest import UiServer

TOKENS = 12


@pytest.fixture
def client(ui_server: UiServer) -> MedPLIBClient:
    return MedPLIBClient(ui_server.url, timeout=60)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_streamed_answers_equal_the_plain_ones(client: MedPLIBClient) -> None:
    ct = dicom_file("CT_small.dcm")
    regions = [BoxPrompt(box=(20, 30, 80, 90))]
    *deltas, result = client.vqa_stream(ct, "What is in {region}?", regions, max_new_tokens=TOKENS)
    plain = client.vqa(ct, "What is in {region}?", regions, max_new_tokens=TOKENS)
    assert isinstance(result, AnswerResult) and all(isinstance(d, TextDelta) for d in deltas)
    assert len(deltas) >= 2
    assert "".join(d.text for d in deltas) == result.text == plain.text

    async def streamed_async() -> list:
        return [
            part
            async for part in client.avqa_stream(ct, "What is in {region}?", regions, max_new_tokens=TOKENS)
        ]

    *async_deltas, async_result = asyncio.run(streamed_async())
    assert [d.text for d in async_deltas] == [d.text for d in deltas] and async_result.text == plain.text
    *deltas, grounded = client.ground_stream(ct, "the lung", max_new_tokens=TOKENS)
    plain_grounded = client.ground(ct, "the lung", max_new_tokens=TOKENS)
    assert isinstance(grounded, GroundingResult) and grounded.masks
    assert "".join(d.text for d in deltas) == grounded.text == plain_grounded.text
    assert [m.mask for m in grounded.masks] == [m.mask for m in plain_grounded.masks]


def test_a_stream_refused_up_front_is_an_ordinary_error(client: MedPLIBClient, ui_server: UiServer) -> None:
    with pytest.raises(RegionError, match="outside"):
        list(
            client.vqa_stream(
                dicom_file("CT_small.dcm"), "What is in {region}?", [BoxPrompt(box=(100, 100, 200, 120))]
            )
        )
    response = httpx.post(
        ui_server.url + "/v1/vqa",
        json={"image": {"uri": "/etc/passwd"}, "question": "q", "stream": True},
    )
    assert response.status_code == 400 and "reads no paths" in response.json()["message"]


def test_a_follow_up_carries_the_history(ui_server: UiServer) -> None:
    image = {"base64": b64(dicom_file("CT_small.dcm"))}
    first = httpx.post(
        ui_server.url + "/v1/vqa",
        json={"image": image, "question": "Which organ?", "decoding": {"max_new_tokens": 4}},
        timeout=60,
    ).json()
    history = [{"role": "user", "content": "Which organ?"}, {"role": "assistant", "content": first["text"]}]
    body = {
        "image": image,
        "question": "And its size?",
        "history": history,
        "decoding": {"max_new_tokens": 4},
    }
    follow_up = httpx.post(ui_server.url + "/v1/vqa", json=body, timeout=60)
    assert follow_up.status_code == 200
    result = AnswerResult.model_validate_json(follow_up.content)
    assert result.question == "And its size?"
    assert result.prompt_tokens > first["prompt_tokens"]  # the earlier turn is in the prompt
    assert result.cache.prefix == "hit"
    bad = httpx.post(ui_server.url + "/v1/vqa", json={**body, "history": history[1:]}, timeout=60)
    assert bad.status_code == 400 and "alternate" in bad.json()["message"]


def test_render_shows_slices_frames_and_windows(ui_server: UiServer) -> None:
    def render(path: Path, **options: object) -> dict:
        response = httpx.post(ui_server.url + "/v1/render", json={"image": {"base64": b64(path), **options}})
        assert response.status_code == 200, response.text
        return response.json()

    volume = render(mni152_file("t1"), axis="coronal", slice_index=100)
    assert volume["num_slices"] == {"sagittal": 197, "coronal": 233, "axial": 189}
    assert (volume["axis"], volume["slice_index"]) == ("coronal", 100)
    assert render(mni152_file("t1"), axis="coronal", slice_index=60)["png"] != volume["png"]
    frames = render(dicom_file("emri_small.dcm"), frame=3)
    assert frames["num_frames"] == 10 and frames["frame"] == 3 and frames["num_slices"] == {}
    ct = render(dicom_file("CT_small.dcm"), window="lung")
    assert ct["modality"] == "CT" and ct["png"].startswith("data:image/png;base64,")
    assert ct["png"] != render(dicom_file("CT_small.dcm"), window="bone")["png"]
    bad = httpx.post(
        ui_server.url + "/v1/render",
        json={"image": {"base64": b64(dicom_file("CT_small.dcm")), "slice_index": 3}},
    )
    assert bad.status_code == 400


def test_the_page_and_its_files_are_served_from_the_package(ui_server: UiServer) -> None:
    page = httpx.get(ui_server.url + "/")
    assert page.status_code == 200 and "/ui/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("app.css", "css")):
        asset = httpx.get(f"{ui_server.url}/ui/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert httpx.get(ui_server.url + "/ui/../cli.py").status_code == 404


def test_with_a_key_only_the_page_is_open(keyed_ui_server: UiServer) -> None:
    url = keyed_ui_server.url
    assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/ui/app.js").status_code == 200
    body = {"image": {"base64": b64(dicom_file("CT_small.dcm"))}}
    assert httpx.post(url + "/v1/render", json=body).status_code == 401
    keyed = MedPLIBClient(url, api_key=keyed_ui_server.api_key)
    assert keyed.experts().experts
    with pytest.raises(InvalidInputError):  # past the key: the body is checked
        keyed.vqa(b"not an image", "q")


def test_a_slice_mask_goes_back_onto_the_volume(ui_server: UiServer, tmp_path: Path) -> None:
    plane = np.zeros((189, 197), dtype=bool)  # a coronal plane of the 197 x 233 x 189 template
    plane[50:60, 70:90] = True
    image = {"base64": b64(mni152_file("t1")), "axis": "coronal", "slice_index": 120}
    body = {"image": image, "mask": Mask.from_array(plane).model_dump()}
    response = httpx.post(ui_server.url + "/v1/render/mask-nifti", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(response.content)
    saved = nib.load(path)
    volume = np.asanyarray(saved.dataobj)
    assert volume.shape == (197, 233, 189) and volume.sum() == plane.sum()
    assert np.array_equal(np.rot90(volume[:, 120, :]).astype(bool), plane)
    assert np.allclose(saved.affine, load_volume(mni152_file("t1")).affine)
    wrong = {**body, "mask": Mask.from_array(plane.T).model_dump()}
    refused = httpx.post(ui_server.url + "/v1/render/mask-nifti", json=wrong, timeout=60)
    assert refused.status_code == 400 and "not 189x197" in refused.json()["message"]
    flat = {**body, "image": {"base64": b64(dicom_file("CT_small.dcm"))}}
    assert httpx.post(ui_server.url + "/v1/render/mask-nifti", json=flat, timeout=60).status_code == 400


def test_a_capability_steers_the_answer_and_an_unknown_one_is_refused(ui_server: UiServer) -> None:
    """The same `capability` field as the Serve ingress: "grounding" forces the `<SEG>` token and its
    head's mask into a VQA answer, "vqa" (no head) leaves the answer as it is, one the model lacks
    is a 400."""
    body = {
        "image": {"base64": b64(dicom_file("CT_small.dcm"))},
        "question": "Which structure?",
        "decoding": {"max_new_tokens": 4},
    }

    def ask(capability: str | None) -> httpx.Response:
        return httpx.post(ui_server.url + "/v1/vqa", json={**body, "capability": capability}, timeout=60)

    plain = AnswerResult.model_validate_json(ask(None).content)
    grounded = AnswerResult.model_validate_json(ask("grounding").content)
    assert grounded.forced and grounded.text.endswith("<SEG>") and len(grounded.masks) == 1
    assert list(grounded.outputs) == ["pixel_grounding"]
    unsteered = AnswerResult.model_validate_json(ask("vqa").content)
    assert not unsteered.forced and unsteered.masks == [] and unsteered.text == plain.text
    refused = ask("laterality")
    assert refused.status_code == 400
    message = refused.json()["message"]
    assert "unknown capability 'laterality'; this model has: grounding, region_vqa, vqa" in message
