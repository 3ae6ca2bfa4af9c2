"""A checkpoint whose `<SEG>` head reads the request, served split: the trunk ships the read states,
the grounding decoder (SAM and the `<SEG>` head only) turns them into the assistant's own masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medplib
from medplib.agents.serve.config import ServeConfig
from medplib.agents.serve.deployments import GroundingDecoder, GroundingItem, Trunk, completed
from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
from medplib.core.model import build_medplib
from medplib.core.queries import Query
from medplib.trainers.stage_folder import add_request_reader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_split_equals_the_assistant_with_a_request_reader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_medplib("tiny")
    add_request_reader(model, seed=0)
    with torch.no_grad():  # a trained reader: a zero `out` would hide a lost request
        model.seg_head.request.out.weight.normal_(std=0.3)
    model.save_pretrained(tmp_path / "reader")
    config = ServeConfig().with_overrides(model=str(tmp_path / "reader"), load={"device": "cpu"})
    trunk, grounding = Trunk.func_or_class(config), GroundingDecoder.func_or_class(config)
    reference = medplib.load(str(tmp_path / "reader"), device="cpu")
    assert reference.model.seg_head.request is not None

    ct = load_image(dicom_file("CT_small.dcm")).pixels
    queries = [Query(image=ct, text=f"the {side} hemisphere", task="ground") for side in ("left", "right")]
    expected = reference.answer_batch(queries)
    outputs = []
    for query, output in zip(queries, trunk._generate(queries, {}), strict=True):
        (grounded,) = grounding._decode([GroundingItem(query.image, output.seg_hidden_states, query.text)])
        outputs.append(completed(output.result, grounded, {}, 0.0))
    for result, wanted in zip(outputs, expected, strict=True):
        assert len(result.masks) == 1
        assert np.array_equal(np.asarray(result.masks[0].mask), np.asarray(wanted.masks[0].mask))
        assert result.masks[0].score == wanted.masks[0].score
    assert outputs[0].masks[0].score != outputs[1].masks[0].score  # the two requests were read
