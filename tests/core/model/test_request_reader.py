"""The `<SEG>` state reads the request (`seg_read_request`): the same request in every path, off by
default, on where a grounding stage of the tiny schedule switches it on, kept on save and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medplib.core.model import (
    ControlToken,
    MedPLIBForCausalLM,
    MedPLIBProcessor,
    Request,
    Turn,
    build_medplib,
)
from medplib.core.model.generation import prefill_answers
from medplib.core.model.presets import build_config
from medplib.core.model.request_states import request_columns
from medplib.experts.pixel_grounding.head import RequestReader
from medplib.trainers.stage_folder import StageStart, add_request_reader, prepare
from medplib.trainers.stages import stage_spec


class _Scripted(torch.nn.Module):
    """An LM head that says `tokens` in order, whatever the states."""

    def __init__(self, tokens: list[int], vocab_size: int) -> None:
        super().__init__()
        self.tokens, self.vocab_size, self.step = tokens, vocab_size, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.tokens[min(self.step, len(self.tokens) - 1)]] = 1.0
        self.step += 1
        return logits


def _reading(model: MedPLIBForCausalLM, embeddings: bool = False) -> MedPLIBForCausalLM:
    add_request_reader(model, seed=0, embeddings=embeddings)
    with torch.no_grad():  # a trained reader: a zero `out` would hide a wrong request
        model.seg_head.request.out.weight.normal_(std=0.3)
    return model


def test_request_columns_are_the_real_tokens_after_the_last_im_end() -> None:
    ids = torch.tensor([[0, 7, 9, 5, 6, 5], [7, 9, 7, 9, 3, 4], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    columns = request_columns(ids, mask, im_end_id=9)
    assert columns.int().tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_a_new_reader_changes_nothing_until_trained(tiny_model, processor, image) -> None:
    batch = processor(
        [Request(image, [Turn("Segment the left hemisphere.", ["Sure, it is", ControlToken.SEG, "."])])]
    )
    with torch.no_grad():
        before = tiny_model(**batch).seg_hidden_states[0]
        add_request_reader(tiny_model, seed=0)
        after = tiny_model(**batch).seg_hidden_states[0]
    assert len(before) == 1
    assert tiny_model.config.seg_read_request and isinstance(tiny_model.seg_head.request, RequestReader)
    assert torch.equal(before, after)


@pytest.mark.parametrize("embeddings", [False, True])
def test_training_decoding_and_the_template_prefill_read_the_same_request(
    tiny_model: MedPLIBForCausalLM, processor: MedPLIBProcessor, image, embeddings: bool
) -> None:
    model = _reading(tiny_model, embeddings)
    assert model.seg_head.request.reads_embeddings is embeddings
    config = model.config
    words = model.tokenizer("Sure, it is", add_special_tokens=False).input_ids
    answer = [*words, config.seg_token_id, config.text_config.eos_token_id]
    prompt = processor([Request(image, [Turn("Segment the left hemisphere.")])])
    inputs = {k: prompt[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model.language_model.lm_head = _Scripted(answer, config.text_config.vocab_size)
    decoded = model.generate(**inputs, max_new_tokens=8)
    assert decoded.sequences[0].tolist() == answer
    full = torch.cat([prompt["input_ids"], torch.tensor([answer])], dim=1)
    ones = torch.ones_like(full)
    with torch.no_grad():
        forced = model(full, ones, prompt["pixel_values"]).seg_hidden_states[0]
    features = model.image_features(prompt["pixel_values"])
    prefilled = prefill_answers(model, full, ones, len(answer), image_features=features)
    raw = model.seg_head.request
    model.seg_head.request = None  # the trunk's own state, unread
    with torch.no_grad():
        unread = model(full, ones, prompt["pixel_values"]).seg_hidden_states[0]
    model.seg_head.request = raw
    assert not torch.allclose(forced, unread, atol=1e-3)  # the reader did something
    torch.testing.assert_close(decoded.seg_hidden_states[0], forced, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prefilled.seg_hidden_states[0], forced, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("embeddings", [False, True])
def test_the_read_state_follows_the_words_of_the_request(tiny_model, processor, image, embeddings) -> None:
    """Two requests differing in one word: the reader moves their states apart beyond the trunk's own."""
    model = _reading(tiny_model, embeddings)
    answer = ["Sure, it is", ControlToken.SEG, "."]
    batch = processor(
        [Request(image, [Turn(f"Segment the {side} hemisphere.", answer)]) for side in ("left", "right")]
    )
    with torch.no_grad():
        read = model(**batch).seg_hidden_states
        model.seg_head.request.out.weight.zero_()
        unread = model(**batch).seg_hidden_states
    assert [len(states) for states in read] == [1, 1]
    assert (read[0] - read[1]).norm() > 1.5 * (unread[0] - unread[1]).norm()


def test_presets_and_checkpoints_keep_it_off_and_the_tiny_grounding_stages_turn_it_on() -> None:
    for preset in ("tiny", "small", "medplib-7b"):
        assert not build_config(preset).seg_read_request
    assert stage_spec("3").seg_read_request and stage_spec("4").seg_read_request
    assert not stage_spec("2").seg_read_request
    assert not stage_spec("3", schedule="paper").seg_read_request
    for preset in ("tiny", "small", "medplib-7b"):
        assert not build_config(preset).seg_read_embeddings
    assert not stage_spec("3", schedule="paper").seg_read_embeddings
    assert all(stage_spec(stage).seg_read_embeddings for stage in ("3", "4", "joint"))
    assert not stage_spec("2").seg_read_embeddings


def test_a_reader_of_embeddings_needs_them_and_uses_them() -> None:
    torch.manual_seed(0)
    reader = RequestReader(16, embeddings=True)
    torch.nn.init.normal_(reader.out.weight, std=0.3)
    states, context, mask = torch.randn(2, 16), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="input embeddings"):
        reader(states, context, mask)
    words = torch.randn(2, 5, 16)
    other = words.clone()
    other[:, 2] = torch.randn(2, 16)  # one word swapped, the states the same
    assert not torch.allclose(reader(states, context, mask, words), reader(states, context, mask, other))


@pytest.mark.parametrize("embeddings", [False, True])
def test_a_stage_model_with_a_reader_saves_and_loads_bit_identical(
    tiny_model, tmp_path: Path, embeddings
) -> None:
    model = _reading(tiny_model, embeddings)
    model.save_pretrained(tmp_path / "read")
    stored = json.loads((tmp_path / "read" / "config.json").read_text())
    assert stored["seg_read_request"] is True and stored["seg_read_embeddings"] is embeddings
    loaded = MedPLIBForCausalLM.from_pretrained(tmp_path / "read")
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert any(k.startswith("seg_head.request.") for k in saved)
    assert any(k.startswith("seg_head.request.embedding_") for k in saved) is embeddings
    assert saved.keys() == reloaded.keys()
    assert [k for k in saved if not torch.equal(saved[k], reloaded[k])] == []


def test_a_checkpoint_without_the_field_loads_without_a_reader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_medplib("tiny")
    model.save_pretrained(tmp_path / "old")
    stored = json.loads((tmp_path / "old" / "config.json").read_text())
    stored.pop("seg_read_request", None)
    (tmp_path / "old" / "config.json").write_text(json.dumps(stored))
    loaded = MedPLIBForCausalLM.from_pretrained(tmp_path / "old")
    assert loaded.seg_head.request is None and not loaded.config.seg_read_request
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert [k for k in saved if not torch.equal(saved[k], reloaded[k])] == []


def test_the_tiny_stage_three_reads_embeddings_and_a_reader_from_before_is_kept_as_it_is() -> None:
    torch.manual_seed(0)
    fresh = prepare(stage_spec("3"), StageStart("tiny", build_medplib("tiny"))).model
    assert fresh.seg_head.request.reads_embeddings and fresh.config.seg_read_embeddings
    # A stage III trained before the option (its reader reads the states only) stays that way.
    older = build_medplib("tiny")
    add_request_reader(older, seed=0)
    weights = {k: v.clone() for k, v in older.seg_head.request.state_dict().items()}
    kept = prepare(stage_spec("3"), StageStart("tiny", older)).model
    assert not kept.seg_head.request.reads_embeddings and not kept.config.seg_read_embeddings
    assert all(torch.equal(v, kept.seg_head.request.state_dict()[k]) for k, v in weights.items())
