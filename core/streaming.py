"""Streaming an answer: the text of a step generator's first row as deltas, then its final result.

The assistant's calls are step generators (`CachedGenerator.run_steps`): they yield each decoding
step's tokens and return the results. The non-streamed calls run them to the end (`run_to_end`); the
streamed ones pass them through `stream_text`, so both take the same decoding path.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from medplib.core.model.conversation import decode_answer
from medplib.core.results import TextDelta

T = TypeVar("T")


def stream_text(
    steps: Generator[torch.Tensor, None, Any],
    tokenizer: PreTrainedTokenizerBase,
    final: Callable[[Any], T],
    text_of: Callable[[T], str] = lambda result: result.text,  # type: ignore[attr-defined]
) -> Iterator[TextDelta | T]:
    """Deltas of the first row's decoded text as its tokens come, then `final(returned value)`, whose
    text (`text_of`) the deltas join to.

    The text so far is decoded whole at every step (a token may complete a character or change how
    the text before it reads); a delta goes out only while what was sent stays a prefix, so the
    deltas always join to the result's text.
    """
    tokens: list[int] = []
    sent = ""
    while True:
        try:
            tokens.append(int(next(steps)[0]))
        except StopIteration as stop:
            result = final(stop.value)
            answer = text_of(result)
            break
        text = decode_answer(tokenizer, tokens)
        if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
            yield TextDelta(text=text[len(sent) :])
            sent = text
    if not answer.startswith(sent):
        raise RuntimeError("the streamed text is no prefix of the answer")  # a bug, not bad input
    if len(answer) > len(sent):
        yield TextDelta(text=answer[len(sent) :])
    yield result
