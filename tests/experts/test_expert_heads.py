"""Token-triggered expert heads: built through each spec, tokens added and saved, heads run on emission."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medplib
from medplib.core.errors import InvalidInputError
from medplib.core.expert_heads import add_expert, checkpoint_experts
from medplib.core.model import (
    MedPLIBForCausalLM,
    MedPLIBProcessor,
    Request,
    Turn,
    build_medplib,
    tokenize_user_text,
)
from medplib.core.model.conversation import ExpertToken, encode_conversation
from medplib.core.plugins import get_experts
from medplib.experts.pixel_grounding.head import GroundingHead, PixelGroundingHead

IMAGE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)


@pytest.fixture
def modality_model(example_module):
    torch.manual_seed(0)
    model = build_medplib("tiny")
    assert add_expert(model, get_experts()["modality"])
    return model


def test_builtin_grounding_head_is_built_through_its_spec_under_its_checkpoint_names() -> None:
    model = build_medplib("tiny")
    head = model.expert_heads["pixel_grounding"]
    assert isinstance(head, PixelGroundingHead) and isinstance(model.seg_head, GroundingHead)
    assert model.seg_head is head.prompt and model.sam is head.sam
    keys = model.state_dict().keys()
    assert any(k.startswith("seg_head.fc1.") for k in keys) and any(
        k.startswith("sam.mask_decoder.") for k in keys
    )
    assert model.trigger_experts == {model.config.seg_token_id: "pixel_grounding"}


def test_adding_an_expert_adds_its_token_rows_and_head_and_they_are_saved(modality_model, tmp_path) -> None:
    model = modality_model
    tokenizer, config = model.tokenizer, model.config
    mod = tokenizer.convert_tokens_to_ids("<MOD>")
    assert config.expert_token_ids["<MOD>"] == mod and model.trigger_experts[mod] == "modality"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == config.text_config.vocab_size
    assert model.language_model.lm_head.weight.shape[0] == len(tokenizer)
    assert type(model.expert_heads["modality"]).__name__ == "ModalityHead"  # the plugin's own factory
    assert mod not in tokenize_user_text(tokenizer, "is this <MOD> or <SEG>?")  # typed text stays text
    assert not add_expert(model, get_experts()["modality"])  # idempotent
    # An answer opening with the token says it right after "ASSISTANT:", where a capability forces it.
    tokens = config.num_image_tokens
    prompt = encode_conversation(tokenizer, [Turn("Which modality?")], num_image_tokens=tokens)
    full = encode_conversation(
        tokenizer, [Turn("Which modality?", [ExpertToken("<MOD>"), " MRI."])], num_image_tokens=tokens
    )
    assert full.input_ids[len(prompt.input_ids)] == full.labels[len(prompt.input_ids)] == mod

    model.save_pretrained(tmp_path)
    assert "<MOD>" in json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"][-1]["content"]
    assert checkpoint_experts(json.loads((tmp_path / "config.json").read_text())) == [
        "vision_language",
        "pixel_grounding",
        "modality",
    ]
    loaded = MedPLIBForCausalLM.from_pretrained(tmp_path)
    assert loaded.tokenizer.convert_tokens_to_ids("<MOD>") == mod
    for name, value in model.state_dict().items():
        if name.startswith("modality_head.") or name.endswith("embed_tokens.weight"):
            assert torch.equal(loaded.state_dict()[name], value), name


def test_an_emitted_token_runs_its_head_on_the_state_that_predicted_it(modality_model) -> None:
    model = modality_model
    assistant = medplib.MedPLIB(model.eval(), name="tiny+modality")
    batch = MedPLIBProcessor(model.config, model.tokenizer)(
        [Request(IMAGE, [Turn("Which modality is this?")])]
    )
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "region_masks")}
    said = int(model.generate(**inputs, max_new_tokens=1).sequences[0, 0])
    # Make <MOD> the first token the model says: its LM-head row twice the row of the one it said.
    mod = model.config.expert_token_ids["<MOD>"]
    with torch.no_grad():
        model.language_model.lm_head.weight[mod] = 2 * model.language_model.lm_head.weight[said]
    assistant.clear_cache()
    result = assistant.answer(IMAGE, "Which modality is this?", max_new_tokens=4)
    assert result.text.startswith("<MOD>") and not result.forced
    outputs = result.outputs["modality"]
    assert len(outputs) == result.text.count("<MOD>") >= 1  # one output per emitted token
    for output in outputs:
        assert output["modality"] in output["probabilities"]
        assert sum(output["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    assert result.masks == [] and "pixel_grounding" not in result.outputs


def test_a_capability_forces_its_token_and_says_so(modality_model) -> None:
    assistant = medplib.MedPLIB(modality_model.eval(), name="tiny+modality")
    plain = assistant.answer(IMAGE, "Which modality is this?", max_new_tokens=3)
    asked = assistant.answer(
        IMAGE, "Which modality is this?", capability="modality_classification", max_new_tokens=3
    )
    assert "modality" not in plain.outputs and not plain.forced
    assert asked.forced and not asked.seg_forced and asked.text.startswith("<MOD>")
    assert len(asked.outputs["modality"]) == 1
    grounded = assistant.answer(IMAGE, "Where is it?", capability="grounding", max_new_tokens=3)
    assert (
        len(grounded.masks) == 1
        and grounded.outputs["pixel_grounding"][0]["mask"]
        == grounded.masks[0].model_dump(mode="json")["mask"]
    )
    with pytest.raises(InvalidInputError, match=r"unknown capability 'laterality'.*modality_classification"):
        assistant.answer(IMAGE, "Which side?", capability="laterality")


def test_experts_lists_what_the_model_holds(modality_model) -> None:
    plain = {info.name: info for info in medplib.MedPLIB(build_medplib("tiny"), name="tiny").experts()}
    held = {info.name: info for info in medplib.MedPLIB(modality_model, name="tiny+modality").experts()}
    assert plain["pixel_grounding"].trained and not plain["modality"].trained and held["modality"].trained
    assert (
        held["modality"].tokens == ["<MOD>"]
        and "probabilities" in held["modality"].output_schema["properties"]
    )
    assert plain["vision_language"].output_schema is None and plain["pixel_grounding"].tokens == ["<SEG>"]
    with pytest.raises(InvalidInputError, match="not trained with it"):
        medplib.MedPLIB(build_medplib("tiny"), name="tiny").answer(
            IMAGE, "?", capability="modality_classification"
        )


def test_an_earlier_answer_keeps_its_expert_tokens_as_tokens() -> None:
    from medplib.core.model import ControlToken
    from medplib.core.model.conversation import ExpertToken
    from medplib.core.prompts import answer_parts

    assert answer_parts("<MOD> MRI, see <SEG>.", ["<SEG>", "<MOD>"]) == [
        ExpertToken("<MOD>"),
        " MRI, see ",
        ControlToken.SEG,
        ".",
    ]
    assert answer_parts("<MOD> MRI.") == ["<MOD> MRI."]  # a model without the expert: plain text
