"""Streamed answers (`answer_stream`, `ground_stream`, `chat_stream`) on the tiny preset: the deltas
come one decoding step at a time and join to exactly the answer the non-streamed call gives."""

from __future__ import annotations

import numpy as np
import pytest

from medplib.core.assistant import MedPLIB, load
from medplib.core.errors import InvalidInputError
from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
from medplib.core.regions import BoxPrompt
from medplib.core.results import AnswerResult, ChatResult, GroundingResult, TextDelta

TOKENS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assistant() -> MedPLIB:
    return load("tiny", device="cpu")


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return load_image(dicom_file("CT_small.dcm")).pixels


def split(parts: list) -> tuple[list[str], object]:
    *deltas, final = parts
    assert all(isinstance(delta, TextDelta) and delta.text for delta in deltas)
    return [delta.text for delta in deltas], final


def test_answer_stream_joins_to_the_greedy_answer(assistant: MedPLIB, ct: np.ndarray) -> None:
    regions = [BoxPrompt(box=(20, 30, 80, 90))]
    expected = assistant.answer(ct, "What is in {region}?", regions, max_new_tokens=TOKENS)
    deltas, final = split(
        list(assistant.answer_stream(ct, "What is in {region}?", regions, max_new_tokens=TOKENS))
    )
    assert isinstance(final, AnswerResult)
    assert len(deltas) >= 2
    assert "".join(deltas) == final.text == expected.text
    assert final.new_tokens == expected.new_tokens
    assert final.cache.prefix == "hit"  # the non-streamed call cached the prefix: same cached path


def test_ground_stream_ends_with_masks(assistant: MedPLIB, ct: np.ndarray) -> None:
    expected = assistant.ground(ct, "the lung", max_new_tokens=TOKENS)
    deltas, final = split(list(assistant.ground_stream(ct, "the lung", max_new_tokens=TOKENS)))
    assert isinstance(final, GroundingResult)
    assert "".join(deltas) == final.text == expected.text
    assert len(final.masks) == len(expected.masks) >= 1
    assert [m.mask.counts for m in final.masks] == [m.mask.counts for m in expected.masks]


def test_chat_stream_follows_up(assistant: MedPLIB, ct: np.ndarray) -> None:
    first = assistant.chat(ct, "Which organ is this?", max_new_tokens=TOKENS)
    messages = [*first.messages, {"role": "user", "content": "And its size?"}]
    expected = assistant.chat(ct, messages, max_new_tokens=TOKENS)
    deltas, final = split(list(assistant.chat_stream(ct, messages, max_new_tokens=TOKENS)))
    assert isinstance(final, ChatResult)
    assert "".join(deltas) == final.text == expected.text
    assert final.messages == expected.messages


def test_stream_raises_bad_input_at_the_first_step(assistant: MedPLIB, ct: np.ndarray) -> None:
    stream = assistant.answer_stream(ct, "   ")
    with pytest.raises(InvalidInputError, match="empty"):
        next(stream)
