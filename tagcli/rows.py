"""The row policy of `tagcli tag`: which rows are tagged and which are rejected.

`[rows]` in tagcli.toml sets what happens to a row with neither title nor
description (`empty_text`) and to a row whose text has more tokens than the
embedding model reads (`long_text`). Screening runs on each batch where it is
embedded, in-process or on a Ray actor. A rejected row leaves that step with
null tag columns and its reason in `REJECT_MARKER`. The driver then splits
the batch into tagged rows and rows for the rejects file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Columns that carry a rejected row's reason, and whether a tagged row's text
# was truncated, from the embedding step to the driver. Neither reaches the
# output; the rejects file calls the first one `reason`.
REJECT_MARKER = "_tagcli_reject_reason"
TRUNCATED_MARKER = "_tagcli_truncated"
REASON_COLUMN = "reason"

# Values of the `reason` column.
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"


@dataclass(frozen=True)
class RowPolicy:
    """The `[rows]` settings: the handling of rows with no text or too many tokens."""

    empty_text: str = "reject"
    long_text: str = "truncate"

    @classmethod
    def from_config(cls, config) -> RowPolicy:
        return cls(empty_text=config.rows.empty_text, long_text=config.rows.long_text)


@dataclass
class Screening:
    """Result of screening one batch of texts.

    `reasons` has one entry per text: None for a row to tag, else the reason
    it is rejected. `truncated_rows` marks tagged texts longer than the model
    reads, which it embeds from their first tokens. `token_counts` contains
    each text's untruncated token count.
    """

    reasons: list[str | None]
    truncated_rows: list[bool]
    token_counts: list[int] = field(default_factory=list)


def count_tokens(encoder, texts: list[str]) -> list[int]:
    """Return the number of tokens the encoder's tokenizer makes of each text.

    Special tokens such as [CLS] and [SEP] are counted, because they count
    towards the model's maximum sequence length too.
    """
    if not texts:
        return []
    if hasattr(encoder, "count_tokens"):
        # A backend from tagcli.backends, which may have no transformers tokenizer.
        return encoder.count_tokens(texts)
    encoded = encoder.tokenizer(
        texts, add_special_tokens=True, truncation=False, verbose=False
    )
    return [len(ids) for ids in encoded["input_ids"]]


def screen_texts(
    texts: list[str], encoder, policy: RowPolicy, known_counts=None
) -> Screening:
    """Screen composed texts: mark each row to reject, or to tag and maybe truncate.

    `known_counts`, one entry per text, contains token counts found in the
    embedding cache, or None for a text to count with the encoder's tokenizer.
    """
    reasons: list[str | None] = [None] * len(texts)
    if policy.empty_text == "reject":
        for index, text in enumerate(texts):
            if not text.strip():
                reasons[index] = EMPTY_TEXT

    max_tokens = encoder.max_seq_length
    token_counts = _count_unknown(encoder, texts, known_counts)
    truncated_rows = [False] * len(texts)
    for index, tokens in enumerate(token_counts):
        if reasons[index] is not None or tokens <= max_tokens:
            continue
        if policy.long_text == "reject":
            reasons[index] = TEXT_TOO_LONG
        else:
            truncated_rows[index] = True
    return Screening(
        reasons=reasons, truncated_rows=truncated_rows, token_counts=token_counts
    )


def _count_unknown(encoder, texts: list[str], known_counts) -> list[int]:
    """Return the token count of each text, from `known_counts` where it has one."""
    if known_counts is None:
        return count_tokens(encoder, texts)
    unknown = [index for index, count in enumerate(known_counts) if count is None]
    counts = list(known_counts)
    new_counts = count_tokens(encoder, [texts[index] for index in unknown])
    for index, count in zip(unknown, new_counts):
        counts[index] = count
    return counts


@dataclass
class SplitBatch:
    """A classified batch split into rows for the output and for the rejects file."""

    tagged: object
    rejected: object | None
    truncated: int


def split_rejects(batch, renames: dict[str, str], added: list[str]) -> SplitBatch:
    """Split a classified Arrow batch by its marker columns.

    `added` names the columns classification appended. Tagged rows lose the
    marker columns. Rejected rows keep only the input columns, under their
    input names, plus `reason`. A batch without markers is all tagged.
    """
    import pyarrow.compute as pc

    if REJECT_MARKER not in batch.column_names:
        return SplitBatch(tagged=batch, rejected=None, truncated=0)
    marker = batch.column(REJECT_MARKER)
    truncated = pc.sum(batch.column(TRUNCATED_MARKER)).as_py() or 0
    markers = [REJECT_MARKER, TRUNCATED_MARKER]
    tagged = batch.filter(pc.is_null(marker)).drop_columns(markers)
    if marker.null_count == len(marker):
        return SplitBatch(tagged=tagged, rejected=None, truncated=truncated)

    input_names = [
        name
        for name in batch.column_names
        if name not in added and name not in markers
    ]
    original_names = {new: old for old, new in renames.items()}
    rejected = batch.filter(pc.is_valid(marker)).select(input_names + [REJECT_MARKER])
    rejected = rejected.rename_columns(
        [original_names.get(name, name) for name in input_names] + [REASON_COLUMN]
    )
    return SplitBatch(tagged=tagged, rejected=rejected, truncated=truncated)


def rejects_path(output: str | Path, folder_format: str) -> Path:
    """Return the rejects file beside `output` (see `writer.sidecar_path`)."""
    from tagcli.writer import sidecar_path

    return sidecar_path(output, "rejects", folder_format)
