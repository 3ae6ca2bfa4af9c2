"""Stage folders chain I -> IV, load back as the model they trained, and serve the demo's questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import medplib
from medplib.core.errors import InvalidInputError
from medplib.core.io.registry_data import dicom_file
from medplib.demo import ask_questions
from medplib.loading import load_model, read_record
from medplib.router import MixtureOfExperts
from medplib.trainers.collate import ExampleStore
from medplib.trainers.eval.metrics import mask_scores
from medplib.trainers.pipeline import run_and_score
from medplib.trainers.stage_folder import load_source
from medplib.trainers.train import StageRun, run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chain(built_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stages II, III and IV, two steps each (warm-up starts at learning rate 0), from the tiny preset:
    the folders a pipeline leaves."""
    root = tmp_path_factory.mktemp("chain")
    source = "tiny"
    for stage in ("2", "3", "4"):
        run = StageRun(stage=stage, model=source, data=str(built_dataset), out=str(root / stage), steps=2)
        run_stage(StageRun(**{**run.__dict__, "batch_size": 2, "progress": False}))
        source = str(root / stage)
    return root


def test_each_stage_carries_the_experts_forward(chain: Path) -> None:
    assert read_record(chain / "2")["adapters"] == {"vision_language": "adapters/vision_language"}
    assert set(read_record(chain / "3")["adapters"]) == {"vision_language", "pixel_grounding"}
    record = read_record(chain / "4")
    assert record["active"] == "moe" and (chain / "4" / "model" / "moe.safetensors").is_file()
    assert read_record(chain / "3")["active"] == "pixel_grounding"
    # Stage III's trunk is stage II's LLM: the experts are deltas on one shared trunk. Stage III trains
    # only the new `<SEG>` token's rows of the embeddings and the LM head.
    two, three = load_source(str(chain / "2")).model, load_source(str(chain / "3")).model
    other_rows = torch.arange(two.config.text_config.vocab_size) != two.config.seg_token_id
    for matrix in ("model.embed_tokens.weight", "lm_head.weight"):
        before, after = two.language_model.get_parameter(matrix), three.language_model.get_parameter(matrix)
        assert torch.equal(before[other_rows], after[other_rows]) and not torch.equal(before, after)
    assert all(
        torch.equal(p, three.language_model.get_parameter(name))
        for name, p in two.language_model.named_parameters()
        if not name.endswith(("embed_tokens.weight", "lm_head.weight"))
    )


def test_a_stage_folder_loads_as_the_model_it_trained(chain: Path) -> None:
    moe = load_model(chain / "4").moe
    assert isinstance(moe, MixtureOfExperts) and moe.expert_names == ("vision_language", "pixel_grounding")
    expert = load_model(chain / "2")
    assert expert.peft is not None and any(".lora_" in name for name, _ in expert.model.named_parameters())


@pytest.mark.parametrize("stage", ["2", "4"])
def test_medplib_load_takes_a_stage_folder_as_eval_does(chain: Path, stage: str) -> None:
    assistant = medplib.load(chain / stage)
    expected = load_model(chain / stage).model.state_dict()
    loaded = assistant.model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not assistant.untrained
    assert assistant.answer(str(dicom_file("ct_chest")), "What is this?", max_new_tokens=2).new_tokens >= 1


def test_medplib_info_describes_a_stage_folder(chain: Path) -> None:
    from typer.testing import CliRunner

    from medplib.cli import app

    result = CliRunner().invoke(app, ["info", str(chain / "4")])
    assert result.exit_code == 0 and "checkpoint" in result.output, result.output


def test_the_demo_asks_the_trained_model_its_questions(
    chain: Path, built_dataset: Path, tmp_path: Path
) -> None:
    asked = ask_questions(chain / "4", built_dataset, tmp_path)
    assert [item["kind"] for item in asked] == ["VQA", "region", "grounding", "grounding", "grounding"]
    assert "{region}" in asked[1]["question"]
    assert len({item["overlay"] for item in asked[1:]}) == 4  # one overlay each, none overwritten
    # Each Dice reported is that of the model's mask against the reference (greedy: asked again, the
    # same), and the left/right IoU that of the two hemisphere masks of one slice.
    store = ExampleStore.open(built_dataset, split="test")
    assistant = medplib.load(chain / "4")
    masks = {}
    for item in asked[2:]:
        example = next(
            e
            for e in store.examples()
            if e.image == item["image"] and e.structure == item["structure"] and e.targets
        )
        again = assistant.ground(str(store.loaded.path(example.image)), f"the {item['structure']}")
        masks[item["structure"]] = again.masks[0].mask.to_array()
        expected = mask_scores(masks[item["structure"]], example.targets[0]).dice
        assert item["dice"] == pytest.approx(expected) and item["seg_forced"] == again.seg_forced
    left, right = asked[3], asked[4]
    assert (left["structure"], right["structure"]) == ("left hemisphere", "right hemisphere")
    assert left["image"] == right["image"]
    assert left["iou_with_right_hemisphere"] == pytest.approx(
        mask_scores(masks["left hemisphere"], masks["right hemisphere"]).iou
    )
    assert "overlay" not in asked[0]  # a plain question has nothing to draw
    for item in asked[1:]:
        assert Image.open(tmp_path / item["overlay"]).mode == "RGB"
    json.dumps(asked)


def test_the_pipeline_reuses_a_finished_stage_of_its_own_seed_only(chain: Path, tmp_path: Path) -> None:
    folder = tmp_path / "stage2"
    folder.mkdir()
    (folder / "stage.json").write_text((chain / "2" / "stage.json").read_text())  # seed 0, tiny
    (folder / "eval.json").write_text(json.dumps({"closed_accuracy": 0.5}))
    run = StageRun(stage="2", model="tiny", data=str(chain), out=str(folder))
    record = run_and_score(run, str(chain), threads=None)
    assert record["reused"] and record["metrics"] == {"closed_accuracy": 0.5}
    assert record["seconds"] == read_record(chain / "2")["seconds"]  # the training time as it ran
    with pytest.raises(InvalidInputError, match=r"seed 0 .* runs seed 1"):
        run_and_score(StageRun(**{**run.__dict__, "seed": 1}), str(chain), threads=None)
    with pytest.raises(InvalidInputError, match=r"schedule 'tiny'.* schedule 'paper'"):
        run_and_score(StageRun(**{**run.__dict__, "schedule": "paper"}), str(chain), threads=None)
    options = {"region_appearance": True}
    with pytest.raises(InvalidInputError, match=r"without config options; .* \{'region_appearance': True\}"):
        run_and_score(StageRun(**{**run.__dict__, "config_options": options}), str(chain), threads=None)


def test_config_options_build_the_preset_and_are_refused_for_a_folder(chain: Path) -> None:
    options = {"region_appearance": True, "region_location_norm": True}
    source = load_source("tiny", options=options)
    assert source.model.config.region_appearance and source.model.region_encoder.appearance is not None
    assert len(source.model.region_encoder.part_norms) == 3  # content, place and appearance
    with pytest.raises(InvalidInputError, match="apply to a preset built from scratch"):
        load_source(str(chain / "2"), options=options)
