"""A grounding head that reads the request gets the same request through the assistant's paths (the
template prefill and decoding, both after the cached image prefix) as in training's forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
from medplib.core.model import MedPLIBProcessor, Request, Turn
from medplib.core.model.conversation import encode_conversation
from medplib.core.prompts import GROUNDING_ANSWER, GROUNDING_QUESTION, answer_parts
from medplib.loading import load
from medplib.trainers.stage_folder import add_request_reader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Scripted(torch.nn.Module):
    def __init__(self, tokens: list[int], vocab_size: int) -> None:
        super().__init__()
        self.tokens, self.vocab_size, self.step = tokens, vocab_size, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.tokens[min(self.step, len(self.tokens) - 1)]] = 1.0
        self.step += 1
        return logits


@pytest.mark.parametrize("embeddings", [False, True])
def test_prefill_decoding_and_training_give_one_mask_score(embeddings: bool) -> None:
    torch.manual_seed(0)
    assistant = load("tiny", device="cpu")
    model = assistant.model
    add_request_reader(model, seed=0, embeddings=embeddings)
    with torch.no_grad():
        model.seg_head.request.out.weight.normal_(std=0.3)
    ct = load_image(dicom_file("CT_small.dcm")).pixels
    text = "the left hemisphere"
    template = GROUNDING_ANSWER.format(seg="<SEG>")
    question = GROUNDING_QUESTION.format(text=text)
    prefilled = assistant.ground(ct, text, answer="template")
    assert prefilled.text == template and len(prefilled.masks) == 1

    tokens, tokenizer = model.config.num_image_tokens, model.tokenizer
    prompt = encode_conversation(tokenizer, [Turn(question)], num_image_tokens=tokens).input_ids
    full = encode_conversation(tokenizer, [Turn(question, answer_parts(template))], num_image_tokens=tokens)
    original = model.language_model.lm_head
    model.language_model.lm_head = _Scripted(
        full.input_ids[len(prompt) :], model.config.text_config.vocab_size
    )
    try:
        decoded = assistant.ground(
            ct, text, answer="generate", max_new_tokens=len(full.input_ids) - len(prompt) + 2
        )
    finally:
        model.language_model.lm_head = original
    assert decoded.text == template and decoded.cache.prefix == "hit"

    processor = MedPLIBProcessor(model.config, tokenizer)
    batch = processor([Request(ct, [Turn(question, answer_parts(template))])])
    with torch.no_grad():
        states = model(**batch).seg_hidden_states
        trained = model.predict_masks(
            states, batch["sam_pixel_values"], batch["sam_input_sizes"], batch["original_sizes"]
        )[0]
        model.seg_head.request.out.weight.zero_()
        unread = model.predict_masks(
            model(**batch).seg_hidden_states,
            batch["sam_pixel_values"],
            batch["sam_input_sizes"],
            batch["original_sizes"],
        )[0]
    score = float(trained.scores[0])
    assert abs(score - float(unread.scores[0])) > 1e-4  # the reader changed the prompt
    assert prefilled.masks[0].score == pytest.approx(score, abs=1e-4)
    assert decoded.masks[0].score == pytest.approx(score, abs=1e-4)
    assert np.array_equal(np.asarray(prefilled.masks[0].mask), np.asarray(decoded.masks[0].mask))
