"""Server-sent events of a streamed answer (`"stream": true`): the wire format, both ways.

    event: delta      data: {"text": "..."}              a piece of the answer, in order
    event: result     data: {...AnswerResult / GroundingResult...}   last: the whole result, masks included
    event: error      data: {"error": kind, "message": ...}          instead of a result, if it failed

Neither FastAPI nor Ray is imported here: the client reads streams with the same module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TypeVar

from pydantic import BaseModel

from medplib.agents.serve.schemas import error_from_response
from medplib.core.results import TextDelta

M = TypeVar("M", bound=BaseModel)

MEDIA_TYPE = "text/event-stream"
EVENTS = ("delta", "result", "error")


def encode_event(event: str, data: str) -> bytes:
    """One event; `data` is JSON, so it holds no newline."""
    return f"event: {event}\ndata: {data}\n\n".encode()


class EventReader:
    """Assembles events line by line, so a sync and an async stream of lines read alike."""

    def __init__(self) -> None:
        self._event, self._data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        """The (event, data) an empty line completes, else None."""
        if not line:
            found = (self._event, "\n".join(self._data)) if self._data else None
            self._event, self._data = "message", []
            return found
        if line.startswith("event:"):
            self._event = line[6:].strip()
        elif line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
        return None


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from a stream's lines (an event ends at an empty line)."""
    reader = EventReader()
    for line in [*lines, ""]:
        if (found := reader.feed(line)) is not None:
            yield found


def stream_item(event: tuple[str, str] | None, model: type[M]) -> TextDelta | M | None:
    """What a completed event carries: a piece, the result (a `model`), or, for an `error` event, the
    exception it stands for (raised)."""
    if event is None:
        return None
    kind, data = event
    if kind == "delta":
        return TextDelta.model_validate_json(data)
    if kind == "result":
        return model.model_validate_json(data)
    if kind == "error":
        raise error_from_response(500, json.loads(data))
    return None
