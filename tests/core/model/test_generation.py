"""Decoding with the KV cache: greedy equals recomputation, left-padded batches equal single requests."""

from __future__ import annotations

import pytest
import torch

from medplib.core.errors import InvalidInputError
from medplib.core.model import ControlToken, MedPLIBForCausalLM, MedPLIBProcessor, Request, Turn

STEPS = 6


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "region_masks")}


def _greedy_without_cache(model: MedPLIBForCausalLM, batch: dict) -> list[int]:
    """The reference: the whole sequence recomputed by `forward` at every step, no cache."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    never = [v for k, v in model.config.control_token_ids.items() if k != "seg_token_id"]
    never += [model.config.text_config.pad_token_id, model.config.text_config.bos_token_id]
    tokens = []
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(ids, mask, batch["pixel_values"], batch["region_masks"]).logits[:, -1]
            logits[:, never] = float("-inf")
            token = logits.argmax(dim=-1)
            tokens.append(token.item())
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return tokens


@pytest.fixture
def requests(image, box_mask) -> list[Request]:
    return [
        Request(image, [Turn("What modality is this?")]),
        Request(
            image,
            [Turn(["Describe", ControlToken.REGION, "in detail, it is a longer question."])],
            [box_mask],
        ),
    ]


def test_batched_greedy_equals_single_requests_and_recomputation(
    tiny_model: MedPLIBForCausalLM, processor: MedPLIBProcessor, requests: list[Request]
) -> None:
    batch = processor(requests)
    assert not batch["attention_mask"][:, 0].all()  # the shorter row really is left-padded
    out = tiny_model.generate(**_inputs(batch), max_new_tokens=STEPS)
    assert out.sequences.shape == (2, STEPS)
    for row, request in enumerate(requests):
        single = processor([request])
        alone = tiny_model.generate(**_inputs(single), max_new_tokens=STEPS)
        assert out.sequences[row].tolist() == alone.sequences[0].tolist()
        assert alone.sequences[0].tolist() == _greedy_without_cache(tiny_model, single)


def test_padding_does_not_change_the_logits(tiny_model: MedPLIBForCausalLM, processor, requests) -> None:
    with torch.no_grad():
        padded = tiny_model(**_inputs(processor(requests)))
        alone = tiny_model(**_inputs(processor(requests[:1])))
    length = alone.logits.shape[1]
    torch.testing.assert_close(padded.logits[0, -length:], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_with_a_generator(
    tiny_model: MedPLIBForCausalLM, processor, requests
) -> None:
    batch = _inputs(processor(requests))
    runs = [
        tiny_model.generate(
            **batch,
            max_new_tokens=STEPS,
            do_sample=True,
            top_k=50,
            top_p=0.9,
            generator=torch.Generator().manual_seed(s),
        ).sequences
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    never = set(tiny_model.config.control_token_ids.values()) - {tiny_model.config.seg_token_id}
    assert never.isdisjoint(torch.cat(runs).flatten().tolist())


def test_seg_hidden_states_are_kept_and_finished_rows_are_padded(
    tiny_model: MedPLIBForCausalLM, processor, requests, scripted_lm_head
) -> None:
    config = tiny_model.config
    seg, eos, pad = config.seg_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id
    script = [[eos, seg], [seg, seg], [eos, eos], [seg, seg]]
    batch = processor(requests)
    with scripted_lm_head(tiny_model, script):
        out = tiny_model.generate(**_inputs(batch), max_new_tokens=10)
    assert out.sequences.tolist() == [[eos, pad, pad], [seg, seg, eos]]  # stopped once every row ended
    assert [len(states) for states in out.seg_hidden_states] == [0, 2]
    assert processor.decode(out.sequences) == ["", "<SEG><SEG>"]
    masks = tiny_model.predict_masks(
        out.seg_hidden_states, batch["sam_pixel_values"], batch["sam_input_sizes"], batch["original_sizes"]
    )
    assert [m.masks.shape for m in masks] == [(0, 97, 130), (2, 97, 130)]


def test_bad_generation_arguments_are_refused(tiny_model: MedPLIBForCausalLM, processor, requests) -> None:
    batch = _inputs(processor(requests, padding_side="right"))
    with pytest.raises(InvalidInputError, match="left-padded"):
        tiny_model.generate(**batch)
    batch = _inputs(processor(requests))
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        tiny_model.generate(**batch, max_new_tokens=0)
    with pytest.raises(InvalidInputError, match="temperature"):
        tiny_model.generate(**batch, do_sample=True, temperature=0)
