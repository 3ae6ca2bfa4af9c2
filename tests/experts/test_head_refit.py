"""Stage IV's head refit: after training, each generic head is fitted so that on the states the mixture
gives it, it says what it said on its expert stage's states; saved with the stage, and a resumed stage
refits exactly as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medplib.core.errors import InvalidInputError, MedplibError
from medplib.core.model import MedPLIBProcessor
from medplib.core.plugins import get_experts
from medplib.loading import load_model
from medplib.trainers.collate import Collator
from medplib.trainers.expert_training import head_input_states, plugin_examples
from medplib.trainers.head_refit import HeadRefit, refit_heads, refit_targets
from medplib.trainers.stages import stage_spec
from medplib.trainers.train import StageRun, run_stage

EXPERTS = ("vision_language", "modality")


def _stage(data: Path, key: str, source: Path | str, out: Path, steps: int = 2, **options) -> dict:
    run = StageRun(
        key, str(source), str(data), str(out), steps=steps, batch_size=4, progress=False, **options
    )
    return run_stage(run).record


@pytest.fixture(scope="module")
def expert_stage(example_module, small_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refit-chain")
    _stage(small_dataset, "2", "tiny", root / "stage2")
    _stage(small_dataset, "expert", root / "stage2", root / "modality", expert="modality")
    return root / "modality"


def _head_outputs(folder: Path, data: Path) -> torch.Tensor:
    """The modality head's outputs on its training samples as the saved model serves them."""
    loaded = load_model(folder)
    model = loaded.model.eval()
    collator = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    examples = plugin_examples([get_experts()["modality"]], data)
    states = head_input_states(model, examples, collator, loaded.moe)
    with torch.no_grad():
        return model.expert_heads["modality"](torch.stack([s for _, _, s in states]))


def test_the_tiny_stage_four_refits_plugin_heads_and_the_paper_schedule_does_not() -> None:
    assert stage_spec("4").head_refit == HeadRefit(steps=2000, lr=1e-2)
    assert stage_spec("4", "paper").head_refit is None
    assert stage_spec("expert", expert="pixel_grounding").head_refit is None


def test_stage_four_refits_the_head_to_its_expert_stage_outputs_and_saves_it(
    example_module, small_dataset, expert_stage, tmp_path
) -> None:
    record = _stage(small_dataset, "4", expert_stage, tmp_path / "moe", experts=EXPERTS)
    report = record["head_refit"]["modality"]
    assert report["samples"] == 6 and report["loss_after"] < report["loss_before"]
    served = _head_outputs(tmp_path / "moe", small_dataset)
    wanted = _head_outputs(expert_stage, small_dataset)  # the expert stage's head on its own states
    error = (served - wanted).square().mean().item()
    assert error == pytest.approx(report["loss_after"], rel=1e-3, abs=1e-6)
    assert torch.equal(served.argmax(-1), wanted.argmax(-1))
    # Only the head changed after training: the same stage without the refit differs in its head alone.
    plain = _stage(small_dataset, "4", expert_stage, tmp_path / "plain", experts=EXPERTS, head_refit=False)
    assert plain["head_refit"] is None and plain["spec"]["head_refit"] is None
    refit, unrefit = (load_file(str(tmp_path / f / "model" / "model.safetensors")) for f in ("moe", "plain"))
    changed = {key for key in refit if not torch.equal(refit[key], unrefit[key])}
    assert changed and all(key.startswith("modality_head.") for key in changed)
    error_plain = (_head_outputs(tmp_path / "plain", small_dataset) - wanted).square().mean().item()
    assert error_plain == pytest.approx(report["loss_before"], rel=1e-3, abs=1e-6)


def test_a_resumed_stage_four_refits_as_an_uninterrupted_one(
    example_module, small_dataset, expert_stage, tmp_path
) -> None:
    # Step 1 trains at a warm-up rate of 0: the step-2 checkpoint is the first to differ from the start.
    options = {"experts": EXPERTS, "checkpoint_every": 2, "steps": 3}
    whole = _stage(small_dataset, "4", expert_stage, tmp_path / "whole", **options)
    _stage(small_dataset, "4", expert_stage, tmp_path / "cut", **options)
    for entry in (tmp_path / "cut").iterdir():  # as if killed after the step-2 checkpoint
        if entry.name != "checkpoints":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    resumed = _stage(small_dataset, "4", expert_stage, tmp_path / "cut", resume=True, **options)
    assert resumed["started_at_step"] == 2 and resumed["head_refit"] == whole["head_refit"]
    saved = (load_file(str(tmp_path / f / "model" / "model.safetensors")) for f in ("whole", "cut"))
    expected, got = saved
    heads = [key for key in expected if key.startswith("modality_head.")]
    assert heads and all(torch.equal(expected[key], got[key]) for key in heads)


def test_refit_refuses_targets_taken_on_other_samples(example_module, small_dataset, expert_stage) -> None:
    loaded = load_model(expert_stage)
    model = loaded.model
    collator = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    examples = plugin_examples([get_experts()["modality"]], small_dataset)
    targets = refit_targets(model, head_input_states(model, examples, collator, forced=True))
    assert [key for key, _ in targets["modality"]] == [e.id for e in examples]
    with pytest.raises(MedplibError, match="head refit of 'modality': the examples' trigger tokens changed"):
        refit_heads(model, None, examples[1:], collator, targets, HeadRefit(steps=1))
    json.dumps(refit_heads(model, None, examples, collator, targets, HeadRefit(steps=1)))  # a JSON record


def test_a_run_turns_the_refit_on_or_off_in_stage_four_only() -> None:
    assert StageRun(stage="4", model="m", data="d", out="o", head_refit=False).spec().head_refit is None
    on = StageRun(stage="4", model="m", data="d", out="o", schedule="paper", head_refit=True).spec()
    assert on.head_refit == HeadRefit()
    with pytest.raises(InvalidInputError, match="head_refit applies to stage 4, not stage 2"):
        StageRun(stage="2", model="m", data="d", out="o", head_refit=True).spec()
