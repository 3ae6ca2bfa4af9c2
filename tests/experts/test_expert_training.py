"""An expert stage trains one expert's LoRA, head and token rows; stage IV composes the experts named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medplib.core.errors import InvalidInputError
from medplib.core.expert_spec import ExpertSpec, SampleFilter
from medplib.core.model import MedPLIBProcessor, build_medplib
from medplib.core.plugins import get_experts
from medplib.loading import load_model
from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.data.loader import load_samples
from medplib.trainers.expert_training import (
    anchor_states,
    head_input_states,
    head_losses,
    plugin_examples,
    routing_targets,
    trigger_positions,
)
from medplib.trainers.losses import BatchLoss
from medplib.trainers.stage_folder import load_source, prepare
from medplib.trainers.stages import stage_spec
from medplib.trainers.train import StageRun, run_stage

MODALITIES = ["MRI", "CT", "X-ray"]  # the modalities of `small_dataset` (conftest.py)


def test_the_plugins_dataset_feeds_its_expert_with_its_token_in_the_answers(
    example_module, small_dataset
) -> None:
    spec = get_experts()["modality"]
    examples = plugin_examples([spec], small_dataset)
    assert len(examples) == 6 and {e.modality for e in examples} == set(MODALITIES)
    answer = examples[0].request.turns[-1].assistant
    assert type(answer[0]).__name__ == "ExpertToken" and answer[0].text == "<MOD>"


def test_expert_stage_trains_only_its_lora_head_and_token_rows(
    example_module, small_dataset, tmp_path
) -> None:
    out = tmp_path / "modality"
    run = StageRun(
        stage="expert",
        model="tiny",
        data=str(small_dataset),
        out=str(out),
        expert="modality",
        steps=2,
        batch_size=4,
        progress=False,
    )
    outcome = run_stage(run)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(step.get("head", 0) > 0 for step in logged)  # the head's own loss was trained
    record = json.loads((out / "stage.json").read_text())
    assert record["active"] == "modality" and record["title"] == "expert modality"
    assert record["examples"] == 12  # its trains_on's 6 modality questions + its dataset's 6 <MOD> records
    assert "<MOD>" in (out / "model" / "tokenizer.json").read_text()
    assert (out / "adapters" / "modality" / "adapter_model.safetensors").is_file()

    torch.manual_seed(0)
    fresh = build_medplib("tiny").state_dict()
    trained = load_file(str(out / "model" / "model.safetensors"))
    mod = outcome.prepared.model.config.expert_token_ids["<MOD>"]
    changed = {
        key
        for key, value in trained.items()
        if key in fresh and value.shape == fresh[key].shape and not torch.equal(value, fresh[key])
    }
    assert changed == set()  # the shared trunk is untouched
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert torch.equal(trained[key][:mod], fresh[key]) and trained[key].shape[0] == mod + 1
    assert {key.split(".")[0] for key in set(trained) - set(fresh)} == {"modality_head"}


def test_stage_four_refuses_a_named_expert_the_folder_has_no_adapter_for(
    example_module, small_dataset, tmp_path
) -> None:
    source = tmp_path / "modality"
    run_stage(
        StageRun(
            stage="expert",
            model="tiny",
            data=str(small_dataset),
            out=str(source),
            expert="modality",
            steps=1,
            progress=False,
        )
    )
    composed = StageRun(
        stage="4",
        model=str(source),
        data=str(small_dataset),
        out=str(tmp_path / "moe"),
        steps=1,
        progress=False,
        experts=("vision_language", "pixel_grounding", "modality"),
    )
    with pytest.raises(
        InvalidInputError,
        match=r"--experts names vision_language, pixel_grounding, which .* \(its adapters: modality\)",
    ):
        run_stage(composed)
    with pytest.raises(InvalidInputError, match="--experts applies to stage 4"):
        StageRun(stage="2", model="tiny", data="d", out="o", experts=("a", "b")).spec()


def test_routing_targets_share_a_sample_among_the_experts_that_accept_it(
    example_module, small_dataset
) -> None:
    model = build_medplib("tiny")
    from medplib.core.expert_heads import add_expert

    add_expert(model, get_experts()["modality"])
    experts = [get_experts()[name] for name in ("vision_language", "pixel_grounding", "modality")]
    plain = ExampleStore(load_samples(small_dataset, split="train")).examples()[0]  # a modality question
    own = plugin_examples([experts[2]], small_dataset)[0]  # says <MOD>
    other = ExpertSpec(name="other", capabilities=("x",), trains_on=SampleFilter(tasks=("caption",)))
    targets = routing_targets([*experts, other], [plain, own], model)
    # vision_language (vqa) and modality (modality questions) both accept the plain one: they share it.
    assert targets[0].tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0])
    # The sample that trains <MOD> goes to the expert whose token it is.
    assert targets[1].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_stage_four_can_keep_the_experts_and_embeddings_as_their_stages_trained_them(
    example_module, small_dataset, tmp_path
) -> None:
    def stage(key: str, source: str, out: str, **options):
        data, folder = str(small_dataset), str(tmp_path / out)
        run = StageRun(key, source, data, folder, steps=2, batch_size=4, progress=False, **options)
        return run_stage(run)

    stage("2", "tiny", "stage2")
    stage("expert", str(tmp_path / "stage2"), "modality", expert="modality")
    frozen = ("embeddings", "experts")
    experts = ("vision_language", "modality")
    outcome = stage("4", str(tmp_path / "modality"), "moe", experts=experts, frozen=frozen)
    trained = {name for name, _ in outcome.prepared.trainable_parameters()}
    assert any(".mlp.router." in name for name in trained)
    # Neither the frozen groups nor the plugin's head (stage IV leaves it as its expert stage trained it).
    assert not any(".mlp.experts." in n or "embed_tokens" in n or "modality_head." in n for n in trained)
    embeddings = "language_model.model.embed_tokens.weight"
    before = load_file(str(tmp_path / "modality" / "model" / "model.safetensors"))[embeddings]
    assert torch.equal(before, load_file(str(tmp_path / "moe" / "model" / "model.safetensors"))[embeddings])
    record = json.loads((tmp_path / "moe" / "stage.json").read_text())
    assert record["run"]["frozen"] == list(frozen) and "experts" not in record["spec"]["trains"]
    with pytest.raises(InvalidInputError, match="frozen vision_tower: stage 4 trains only router"):
        StageRun(stage="4", model="m", data="d", out="o", frozen=("vision_tower",)).spec()


def test_stage_four_anchors_the_heads_input_at_its_expert_stage_state(
    example_module, small_dataset, tmp_path
) -> None:
    """`anchor_states` on the freshly composed model equals the expert stage's own `<MOD>` states, and
    the anchor term is 0 there and grows as the state moves away."""

    def stage(key: str, source: str, out: str, **options):
        data, folder = str(small_dataset), str(tmp_path / out)
        run = StageRun(key, source, data, folder, steps=2, batch_size=4, progress=False, **options)
        return run_stage(run)

    stage("2", "tiny", "stage2")
    stage("expert", str(tmp_path / "stage2"), "modality", expert="modality")
    spec = stage_spec("4").model_copy(update={"head_anchor": 2.0})
    prepared = prepare(spec, load_source(str(tmp_path / "modality")), experts=("vision_language", "modality"))
    model = prepared.model
    collator = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    examples = plugin_examples([get_experts()["modality"]], small_dataset)
    plain = ExampleStore(load_samples(small_dataset, split="train")).examples()  # no <MOD>: no anchor
    model.train()  # as the loop has it: the anchors are still computed without dropout
    anchors = anchor_states(head_input_states(model, [*examples, *plain], collator, prepared.moe, True))
    assert sorted(anchors) == sorted(e.id for e in examples) and model.training

    expert = load_model(tmp_path / "modality").model.eval()  # the expert stage, its adapter active
    batch = collator(examples)
    with torch.no_grad():
        hidden = expert(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        ).last_hidden_state
    found = trigger_positions(expert, batch["input_ids"], batch["attention_mask"])
    assert len(found) == len(examples)
    for row, position, name in found:
        assert name == "modality"
        assert torch.allclose(anchors[examples[row].id][0], hidden[row, position], atol=1e-5)

    empty = BatchLoss(torch.zeros(()), {}, {})
    kept = head_losses(empty, expert, hidden, batch, 0.0, len(examples), anchors, spec.head_anchor)
    assert kept.parts["anchor"] == pytest.approx(0.0, abs=1e-9) and kept.counts["anchor"] == len(examples)
    moved = head_losses(empty, expert, hidden * 0.5, batch, 0.0, len(examples), anchors, spec.head_anchor)
    # Half the state: (0.5 h)^2 / h^2 = 0.25 per sample, weighted 2, averaged over the global batch.
    assert moved.parts["anchor"] == pytest.approx(0.25, rel=1e-4)
    assert moved.total.item() == pytest.approx(2.0 * 0.25, rel=1e-4)


def test_stage_four_anchors_plugin_heads_by_default_and_the_option_is_checked() -> None:
    assert stage_spec("4").head_anchor == stage_spec("4", "paper").head_anchor == 5.0
    # The anchored heads stay as their expert stages trained them; their loss still trains the states.
    assert all("expert_heads" not in stage_spec("4", schedule).trains for schedule in ("tiny", "paper"))
    assert stage_spec("4").loss.head == 1.0
    assert stage_spec("3").head_anchor == 0.0
    run = StageRun(stage="4", model="m", data="d", out="o", head_anchor=0.0)
    assert run.spec().head_anchor == 0.0  # off
    with pytest.raises(InvalidInputError, match="--head-anchor applies to stage 4, not stage 2"):
        StageRun(stage="2", model="m", data="d", out="o", head_anchor=1.0).spec()
    with pytest.raises(InvalidInputError, match="--head-anchor must be 0 \\(off\\) or more, got -1"):
        StageRun(stage="4", model="m", data="d", out="o", head_anchor=-1.0).spec()
