"""The text a row is embedded as, and the key that marks two rows as the same content."""

from __future__ import annotations

import re

_WHITESPACE = re.compile(r"\s+")


def compose_text(title: str | None, description: str | None) -> str:
    """Join title and description into the one string the model embeds."""
    title = (title or "").strip()
    description = (description or "").strip()
    if title and description:
        separator = " " if title[-1] in ".!?:" else ". "
        return title + separator + description
    return title or description


def content_key(title: str | None, description: str | None) -> str:
    """Return a sha256 hex digest of title and description, normalised by
    `tagcli.dedupe.normalise_text` (case, spacing, punctuation, URLs).

    Two rows with the same key hold the same content; the training manifest
    stores these keys to detect evaluation rows the head was fitted on.
    """
    from tagcli.dedupe import content_key as normalised_key

    return normalised_key(title, description)
