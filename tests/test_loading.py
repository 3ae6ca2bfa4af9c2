"""The one loader: each form a user hands medplib is recognised as that form and loads as it should."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medplib.core.errors import CheckpointError
from medplib.core.model import build_medplib
from medplib.loading import STAGE_FILE, LoadRequest, load_model, model_config, model_info, recognise


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (seed 0) saved with `save_pretrained`."""
    folder = tmp_path_factory.mktemp("checkpoint")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_medplib("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stage_folder(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage folder whose model is the saved trunk and that answers with it (no active adapter)."""
    folder = tmp_path_factory.mktemp("stage")
    shutil.copytree(saved, folder / "model")
    record = {"stage": "1", "adapters": {}, "specs": {}, "active": None}
    (folder / STAGE_FILE).write_text(json.dumps(record))
    return folder


def form(source: object, sam: str | None = None) -> str:
    return recognise(LoadRequest(str(source), sam)).name


def test_every_form_is_recognised_by_its_own_recogniser(
    saved: Path, stage_folder: Path, tiny_moe_checkpoint: Path, tmp_path: Path
) -> None:
    assert form("tiny") == "preset"
    assert form(saved) == "checkpoint"
    assert form(f"file://{saved}") == "checkpoint"  # an fsspec URI
    assert form(stage_folder) == "stage folder"
    assert form(tiny_moe_checkpoint) == "moe folder"
    assert form(saved, sam="sam_vit_b.pth") == "llava+sam"  # sam= names a LLaVA-1.5 folder
    # MedPLIB's release is recognised by its config.json, and refused before any weight is read.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "medplib_moe_llama"}))
    assert form(tmp_path) == "medplib release"
    with pytest.raises(CheckpointError, match="medplib convert medplib"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="neither a preset"):
        form(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no weights in medplib"):
        load_model("medplib-7b")


def test_a_preset_a_checkpoint_and_a_stage_folder_load_the_same_weights(
    saved: Path, stage_folder: Path
) -> None:
    preset = load_model("tiny", seed=0)
    assert preset.untrained and preset.kind == "preset, seed 0"
    expected = preset.model.state_dict()
    for source, kind in ((saved, "checkpoint"), (stage_folder, "stage 1 folder, answers with the trunk")):
        loaded = load_model(source)
        assert not loaded.untrained and loaded.kind == kind and loaded.peft is None and loaded.moe is None
        state = loaded.model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[key], expected[key]) for key in expected)


def test_a_moe_folder_loads_with_its_experts(tiny_moe_checkpoint: Path) -> None:
    loaded = load_model(tiny_moe_checkpoint)
    assert loaded.form == "moe folder" and loaded.moe is not None and len(loaded.moe.experts) >= 2


def test_the_config_and_the_info_of_a_form_are_read_without_its_weights(
    saved: Path, stage_folder: Path
) -> None:
    preset = model_config("tiny")
    configs = [model_config(source).to_dict() for source in (saved, stage_folder)]
    assert [{k: v for k, v in c.items() if k != "_name_or_path"} for c in configs[1:]] == [
        {k: v for k, v in configs[0].items() if k != "_name_or_path"}
    ]
    assert model_config(saved).text_config.hidden_size == preset.text_config.hidden_size
    assert model_info(stage_folder).parameters == model_info("tiny").parameters
    assert model_info(saved).weights == "checkpoint"
