"""`medical_volume_grounding`: the summary for the LLM, the mask as the artifact, in process and over
HTTP (the client against a scripted transport answering what the server would), errors as messages."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from langchain_core.messages import ToolMessage

from medplib.agents import MedPLIBToolkit
from medplib.agents.serve.client import MedPLIBClient
from medplib.agents.serve.http_backend import HTTPBackend
from medplib.agents.serve.schemas import ExpertsResponse, GroundVolumeResponse
from medplib.agents.volume_tools import MedicalVolumeGroundingTool
from medplib.core.assistant import MedPLIB
from medplib.core.io.volume_writers import mask_nifti_bytes
from medplib.core.volume_results import VolumeGroundingResult

TOKENS = 2


@pytest.fixture
def scan(tmp_path: Path, make_sphere) -> Path:
    affine = np.diag([0.8, -0.9, 2.0, 1.0])
    path = tmp_path / "scan.nii.gz"
    nib.save(
        nib.Nifti1Image(np.where(make_sphere((9, 8, 6), (4, 4, 3), 2), 180, 15).astype(np.uint8), affine),
        path,
    )
    return path


def call(tool: MedicalVolumeGroundingTool, **args: object) -> ToolMessage:
    return tool.invoke({"type": "tool_call", "id": "call-1", "name": tool.name, "args": args})


def volume_tool(toolkit: MedPLIBToolkit) -> MedicalVolumeGroundingTool:
    return next(t for t in toolkit.get_tools() if isinstance(t, MedicalVolumeGroundingTool))


def test_in_process_summary_and_mask_artifact(tiny_model: MedPLIB, scan: Path) -> None:
    toolkit = MedPLIBToolkit.from_model(tiny_model, decoding={"max_new_tokens": TOKENS})
    volume_id = toolkit.images.put(str(scan))
    message = call(volume_tool(toolkit), image=volume_id, target="the ball", slices="1:4", axis="axial")
    assert message.status == "success"
    assert message.content.startswith(f"Grounded 'the ball' through 3 axial slices of {volume_id}")
    assert "mL" in message.content and "extent" in message.content
    artifact = message.artifact
    assert isinstance(artifact, VolumeGroundingResult) and artifact.mask.shape == (9, 8, 6)
    direct = tiny_model.ground_volume(scan, "the ball", slices="1:4", max_new_tokens=TOKENS)
    np.testing.assert_array_equal(artifact.mask, direct.mask)

    refused = call(volume_tool(toolkit), image=volume_id, target="the ball", slices="1:40")
    assert refused.status == "error" and "outside the axis's 6 slices" in refused.content


def test_over_http_the_volume_is_uploaded_and_the_mask_decoded(tiny_model: MedPLIB, scan: Path) -> None:
    expected = tiny_model.ground_volume(scan, "the ball", slices="2:4", max_new_tokens=TOKENS)
    reply = GroundVolumeResponse(
        result=expected, mask_nifti_base64=base64.b64encode(mask_nifti_bytes(expected)).decode()
    )
    seen: list[dict] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/experts":  # the toolkit asks which plugin capabilities to offer
            no_plugins = ExpertsResponse(experts=[], deployments={})
            return httpx.Response(200, json=no_plugins.model_dump(mode="json"))
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=reply.model_dump(mode="json"))

    client = MedPLIBClient("http://medplib.test", transport=httpx.MockTransport(handle))
    toolkit = MedPLIBToolkit(backend=HTTPBackend(client), decoding={"max_new_tokens": TOKENS})
    message = call(
        volume_tool(toolkit), image=str(scan), target="the ball", slices="2:4", largest_component=True
    )
    body = seen[0]
    assert base64.b64decode(body["volume"]["base64"]) == scan.read_bytes()
    assert body["text"] == "the ball" and body["slices"] == "2:4" and body["largest_component"] is True
    assert body["decoding"] == {"max_new_tokens": TOKENS} and body["axis"] == "axial"
    np.testing.assert_array_equal(message.artifact.mask, expected.mask)
    assert message.artifact.volume_ml == expected.volume_ml
