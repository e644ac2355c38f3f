"""JSON lines in, JSON lines out, for `tagcli predict`.

Each input line is one object with `id`, `title` and `description`. Each line
gets one output line, written and flushed before the next input line is read:
the prediction, or an error object naming the line number. A bad line never
stops the stream.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from tagcli.predict import Item, Predictor

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "title", "description")


class LineError(ValueError):
    """A line that cannot be tagged. The message states why and how to fix the line."""

    def __init__(self, message: str, item_id=None) -> None:
        super().__init__(message)
        self.item_id = item_id


@dataclass
class StreamSummary:
    """Counts of one stream. Blank lines are skipped and counted in none of them."""

    lines: int = 0
    tagged: int = 0
    failed: int = 0


def parse_line(raw: bytes) -> Item:
    """Parse one input line into an Item, or raise LineError.

    `id` must be a string or an integer; `title` and `description` strings or
    null, and not both empty. Other fields are ignored.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LineError(
            f"not valid UTF-8 (invalid byte 0x{raw[error.start]:02x} at offset "
            f"{error.start}); write the stream in UTF-8"
        ) from error
    try:
        # Without its line ending, an unclosed string is reported as such, not
        # as a control character.
        value = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        # Some messages of the json module end with "at", ready for a position.
        message = error.msg.removesuffix(" at")
        raise LineError(
            f"invalid JSON: {message} at column {error.colno}; write one JSON "
            "object per line"
        ) from error
    if not isinstance(value, dict):
        raise LineError(
            f"expected a JSON object with {', '.join(REQUIRED_FIELDS)}, got "
            f"{_json_type(value)}"
        )

    item_id = value.get("id")
    missing = [name for name in REQUIRED_FIELDS if name not in value]
    if missing:
        raise LineError(
            f"missing field(s) {', '.join(missing)}; each object needs "
            f"{', '.join(REQUIRED_FIELDS)}",
            item_id if _valid_id(item_id) else None,
        )
    if not _valid_id(item_id):
        raise LineError(f"id must be a string or an integer, got {_json_type(item_id)}")
    for name in ("title", "description"):
        if value[name] is not None and not isinstance(value[name], str):
            raise LineError(
                f"{name} must be a string or null, got {_json_type(value[name])}",
                item_id,
            )

    title = value["title"] or ""
    description = value["description"] or ""
    if not title.strip() and not description.strip():
        raise LineError(
            "title and description are both empty; there is no text to tag", item_id
        )
    return Item(item_id, title, description)


def _valid_id(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def run_stream(predictor: Predictor, source: BinaryIO, output: TextIO) -> StreamSummary:
    """Tag each line of `source` and write one JSON line per line to `output`.

    Reads with `readline`, one line at a time, so each line is tagged as soon
    as it arrives, even when `source` is a pipe that stays open (`tail -f`).
    An error line is {"line": N, "id": ..., "error": "line N: ..."}; `id` is
    there when the line had a usable one.
    """
    summary = StreamSummary()
    line_number = 0
    for raw in iter(source.readline, b""):
        line_number += 1
        if not raw.strip():
            continue
        summary.lines += 1

        try:
            item = parse_line(raw)
        except LineError as error:
            summary.failed += 1
            reply = {"line": line_number}
            if error.item_id is not None:
                reply["id"] = error.item_id
            reply["error"] = f"line {line_number}: {error}"
            log.info("Rejected %s", reply["error"])
        else:
            reply = predictor.predict(item)
            summary.tagged += 1

        output.write(json.dumps(reply) + "\n")
        output.flush()
    return summary
