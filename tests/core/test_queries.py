"""`InferenceLimits.check`: the one size check of a request, shared by the API, the Serve ingress and
the volume route (the HTTP bodies become the same `Query` first: tests/agents/serve/test_http_api.py)."""

from __future__ import annotations

from typing import Any

import pytest

from medplib.core.errors import CapacityError, InvalidInputError
from medplib.core.queries import ChatMessage, Decoding, InferenceLimits, Query
from medplib.core.regions import PointPrompt

LIMITS = InferenceLimits(max_new_tokens=16, max_regions=2, max_text_chars=20, max_turns=2)
POINT = PointPrompt(points=[(1, 1)])
USER, ASSISTANT = ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b")
MARKING = ChatMessage(role="user", content="c", regions=[POINT])
BLANK = ChatMessage(role="user", content=" ")

BAD: dict[str, tuple[dict[str, Any], dict[str, Any], type[Exception], str]] = {
    "blank question": ({"text": "  "}, {}, InvalidInputError, "the question is empty"),
    "blank grounding text": (
        {"text": " ", "task": "ground"},
        {},
        InvalidInputError,
        "grounding text is",
    ),
    "long question": ({"text": "x" * 21}, {}, CapacityError, "21 characters, over the limit of 20"),
    "regions": ({"regions": [POINT] * 3}, {}, CapacityError, "3 regions in one request, over the limit of 2"),
    "regions in the history": (
        {
            "regions": [POINT] * 2,
            "history": [ChatMessage(role="user", content="c", regions=[POINT]), ASSISTANT],
        },
        {},
        CapacityError,
        "3 regions",
    ),
    "new tokens": ({}, {"max_new_tokens": 17}, CapacityError, "max_new_tokens 17 is over the limit of 16"),
    "turns": ({"history": [USER, ASSISTANT] * 2}, {}, CapacityError, "3 user turns, over the limit of 2"),
    "history out of order": ({"history": [ASSISTANT, USER]}, {}, InvalidInputError, "alternate"),
    "history without its answer": ({"history": [USER]}, {}, InvalidInputError, "assistant's answer"),
    "blank message": (
        {"history": [ChatMessage(role="user", content=" "), ASSISTANT]},
        {},
        InvalidInputError,
        "message",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_check_names_what_is_wrong(case: str) -> None:
    fields, decoding, error, message = BAD[case]
    query = Query(image=None, **{"text": "what?", **fields})
    with pytest.raises(error, match=message):
        LIMITS.check(query, Decoding(**decoding))


def test_a_request_within_the_limits_passes() -> None:
    query = Query(image=None, text="x" * 20, regions=[POINT] * 2, history=[USER, ASSISTANT])
    LIMITS.check(query, Decoding(max_new_tokens=16))


def test_batches_are_checked_by_the_same_limits() -> None:
    with pytest.raises(InvalidInputError, match="no queries"):
        LIMITS.check_batch(0)
    with pytest.raises(CapacityError, match="33 queries in one batch, over the limit of 32"):
        LIMITS.check_batch(33)
