"""Server-sent events of a streamed answer (`"stream": true`): the wire format, both ways.

    event: delta      data: {"text": "..."}              a piece of the answer, in order
    event: result     data: {...AnswerResult / GroundingResult...}   last: the whole result, masks included
    event: error      data: {"error": kind, "message": ...}          instead of a result, if it failed

Neither FastAPI nor Ray is imported here: the client parses with the same module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

MEDIA_TYPE = "text/event-stream"
EVENTS = ("delta", "result", "error")


def encode_event(event: str, data: str) -> bytes:
    """One event; `data` is JSON, so it holds no newline."""
    return f"event: {event}\ndata: {data}\n\n".encode()


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from a stream's lines (an event ends at an empty line)."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)
