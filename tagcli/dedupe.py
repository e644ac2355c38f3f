"""Duplicate content: normalised content keys, exact duplicates, near duplicates.

Two rows are exact duplicates when their title and description are equal after
`normalise_text`. A screening pass over the input (`screen_exact`) finds them
before any model time is spent, keeping per row only a 16-byte key, a
`created_on` sort value and the row numbers of its duplicate (40 bytes per
input row). Rows whose embeddings have a cosine similarity of at least
`[dedupe] near_threshold` to a row kept before them are near duplicates
(`tagcli.near`); past `[dedupe] exact_search_max_rows` vectors, that search
keeps a PQ code, an 8-byte id and the row's id text in memory per kept row,
and the float16 vectors on disk. Both kinds are found within the batch and
against the history of earlier runs (`tagcli.history`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

# Query parameters that track where a click came from, not what the page shows.
TRACKING_PARAMETERS = frozenset(
    {"fbclid", "gclid", "dclid", "msclkid", "yclid", "igshid", "mc_cid", "mc_eid"}
    | {"ref", "ref_src", "ref_url", "source", "si", "_ga", "_gl"}
)
TRACKING_PREFIXES = ("utm_",)

# A URL with a scheme, or a bare host starting with www.
_URL = re.compile(r"(?:\bhttps?://|\bwww\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)
_URL_TRAILING = ".,;:!?'\""
# Everything but the characters `normalise_text` keeps from ASCII text.
_NOT_ASCII_ALNUM = re.compile(r"[^0-9a-z]+")

KEY_BYTES = 16
# Key of a row whose title and description normalise to nothing. Such rows are
# never marked as duplicates, because they carry no content to compare.
EMPTY_KEY = bytes(KEY_BYTES)

# Reasons in the duplicates file.
EXACT = "exact"
NEAR = "near"


def normalise_url(url: str) -> str:
    """Return `url` as host and path: no scheme, `www.`, fragment, trailing slash
    or tracking parameters. Other query parameters stay, in their order."""
    url = url.rstrip(_URL_TRAILING)
    parts = urlsplit(url if "://" in url else "http://" + url)
    host = (parts.hostname or "").lower()
    if host.startswith("www."):
        host = host[4:]
    path = parts.path.rstrip("/")
    query = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name.lower() not in TRACKING_PARAMETERS
        and not name.lower().startswith(TRACKING_PREFIXES)
    ]
    normalised = host + path
    if query:
        normalised += "?" + urlencode(query)
    return normalised


def normalise_text(text: str | None) -> str:
    """Return `text` reduced to what identifies its content.

    Applies NFKC, reduces every URL with `normalise_url`, case-folds, and keeps
    only letters, digits and combining marks, so punctuation and spacing no
    longer count.
    """
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text)
    text = _URL.sub(lambda match: " " + normalise_url(match.group(0)) + " ", text)
    text = text.casefold()
    if text.isascii():
        # The same result as the loop below: ASCII has no combining marks, and
        # its letters and digits are [a-z0-9] once case-folded.
        return _NOT_ASCII_ALNUM.sub("", text)
    return "".join(
        char
        for char in text
        if char.isalnum() or unicodedata.category(char).startswith("M")
    )


def content_digest(title: str | None, description: str | None) -> bytes:
    """Return the sha256 digest of normalised title and description."""
    return _normalised_digest(normalise_text(title), normalise_text(description))


def _normalised_digest(title: str, description: str) -> bytes:
    joined = title + "\x1f" + description
    return hashlib.sha256(joined.encode("utf-8")).digest()


def content_key(title: str | None, description: str | None) -> str:
    """Return the content key as a hex string, as stored in an artifact's fitted_rows.txt."""
    return content_digest(title, description).hex()


def short_key(title: str | None, description: str | None) -> bytes:
    """Return the first KEY_BYTES bytes of the digest, or EMPTY_KEY for a row without text."""
    normalised_title = normalise_text(title)
    normalised_description = normalise_text(description)
    if not normalised_title and not normalised_description:
        return EMPTY_KEY
    return _normalised_digest(normalised_title, normalised_description)[:KEY_BYTES]


def created_sort_values(column) -> "object":
    """Return int64 sort values for a `created_on` Arrow column: earlier is smaller.

    Dates and timestamps sort by time. Text is parsed as a date or timestamp,
    the format inferred by polars. Missing or unparseable values sort last.
    """
    import numpy as np
    import polars as pl
    import pyarrow as pa

    last = np.iinfo(np.int64).max
    if column is None:
        return None
    series = pl.from_arrow(column)
    if isinstance(series, pl.DataFrame):
        series = series.to_series()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        series = series.str.strip_chars().str.to_datetime(strict=False, time_unit="us")
    if series.dtype == pl.Date:
        series = series.cast(pl.Datetime("us"))
    if not isinstance(series.dtype, pl.Datetime):
        return np.full(len(series), last, dtype=np.int64)
    if series.dtype.time_zone is not None:
        series = series.dt.replace_time_zone(None)
    values = series.dt.cast_time_unit("us").to_physical()
    return values.fill_null(last).to_numpy().astype(np.int64)


@dataclass
class ExactDuplicates:
    """The exact duplicates of one input, found by `screen_exact`.

    Arrays are indexed by row number, counting from 0 over all input files.
    `keys` contains each row's short key. `duplicate_of_row` is the row number of
    the kept row with the same key, or -1. `duplicate_of_history` is the
    position in the history of an earlier row with the same key, or -1.
    `kept_ids` maps the row number of each kept row that has duplicates to its
    id, as text. `file_rows` counts rows per input file.
    """

    keys: object
    created: object
    duplicate_of_row: object
    duplicate_of_history: object
    kept_ids: dict[int, str] = field(default_factory=dict)
    file_rows: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.keys)

    def skipped_rows(self):
        """Return the sorted row numbers that need no embedding."""
        import numpy as np

        return np.flatnonzero(
            (self.duplicate_of_row >= 0) | (self.duplicate_of_history >= 0)
        ).astype(np.int64)


def screen_exact(
    source,
    history_keys=None,
    history_positions=None,
    batch_size: int = 65536,
    on_texts=None,
) -> ExactDuplicates:
    """Read the key columns of `source` once and find its exact duplicates.

    `source` is a `tagcli.reader.InputSource`. `history_keys` is the sorted
    `S16` array of keys already in the history, or None, and
    `history_positions` gives each key's position in the history.

    Among rows with one key, the row with the earliest `created_on`, then the
    first in input order, is kept. When the history already contains the key,
    every row with it is a duplicate.

    `on_texts`, when given, is called with the raw title and description
    values of each chunk of rows, in input order, so another count over the
    texts needs no second read.
    """
    import numpy as np

    columns = ["title", "description"]
    has_created = "created_on" in source.columns
    if has_created:
        columns.append("created_on")

    key_chunks = []
    created_chunks = []
    file_rows = []
    for file in source.files:
        rows_in_file = 0
        for table in iter_columns(source, file, columns, batch_size):
            titles = table.column("title").to_pylist()
            descriptions = table.column("description").to_pylist()
            if on_texts is not None:
                on_texts(titles, descriptions)
            key_chunks.append(
                np.array(
                    [
                        short_key(_text(t), _text(d))
                        for t, d in zip(titles, descriptions)
                    ],
                    dtype=f"S{KEY_BYTES}",
                )
            )
            if has_created:
                created_chunks.append(created_sort_values(table.column("created_on")))
            rows_in_file += table.num_rows
        file_rows.append(rows_in_file)

    keys = np.concatenate(key_chunks) if key_chunks else np.zeros(0, f"S{KEY_BYTES}")
    rows = len(keys)
    if has_created and created_chunks:
        created = np.concatenate(created_chunks)
    else:
        created = np.zeros(rows, dtype=np.int64)

    duplicate_of_row = first_of_each_key(keys, created)
    duplicate_of_history = np.full(rows, -1, dtype=np.int64)

    if history_keys is not None and len(history_keys) and rows:
        positions = np.searchsorted(history_keys, keys)
        positions = np.minimum(positions, len(history_keys) - 1)
        found = (history_keys[positions] == keys) & (keys != EMPTY_KEY)
        duplicate_of_history[found] = history_positions[positions[found]]
        duplicate_of_row[found] = -1

    kept_with_copies = np.unique(duplicate_of_row[duplicate_of_row >= 0])
    kept_ids = _read_ids(source, kept_with_copies, file_rows, batch_size)
    return ExactDuplicates(
        keys=keys,
        created=created,
        duplicate_of_row=duplicate_of_row,
        duplicate_of_history=duplicate_of_history,
        kept_ids=kept_ids,
        file_rows=file_rows,
    )


def first_of_each_key(keys, created):
    """Return, per row, the row number of the first row with its key, or -1 for that row.

    First means the earliest `created` value, then the lowest row number.
    Rows with EMPTY_KEY are never duplicates.
    """
    import numpy as np

    rows = len(keys)
    duplicate_of_row = np.full(rows, -1, dtype=np.int64)
    row_numbers = np.arange(rows, dtype=np.int64)
    by_time = np.lexsort((row_numbers, created))
    order = by_time[np.argsort(keys[by_time], kind="stable")]
    sorted_keys = keys[order]
    starts = np.ones(rows, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = order[np.maximum.accumulate(np.where(starts, np.arange(rows), 0))]
    repeated = ~starts & (sorted_keys != EMPTY_KEY)
    duplicate_of_row[order[repeated]] = group_first[repeated]
    return duplicate_of_row


def _text(value) -> str:
    return "" if value is None else str(value)


def iter_columns(source, file, columns: list[str], batch_size: int):
    """Yield Arrow tables of `columns` from one file of `source`, in row order."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from tagcli.io import csv_options

    if source.format == "parquet":
        for batch in pq.ParquetFile(file).iter_batches(
            batch_size=batch_size, columns=columns
        ):
            yield pa.Table.from_batches([batch])
        return
    options = csv_options(source.columns, source.encoding, include=columns)
    for batch in pacsv.open_csv(file, **options):
        yield pa.Table.from_batches([batch])


def _read_ids(source, rows, file_rows: list[int], batch_size: int) -> dict[int, str]:
    """Return {row number: id as text} for the sorted row numbers `rows`.

    A second pass over the id column only, run when the input has duplicates:
    a kept row can come after its duplicates in input order, when its
    created_on is earlier.
    """
    import numpy as np

    if len(rows) == 0:
        return {}
    ids: dict[int, str] = {}
    offset = 0
    for file, count in zip(source.files, file_rows):
        wanted = rows[(rows >= offset) & (rows < offset + count)]
        if len(wanted):
            position = offset
            for table in iter_columns(source, file, ["id"], batch_size):
                end = position + table.num_rows
                inside = wanted[(wanted >= position) & (wanted < end)]
                if len(inside):
                    values = table.column("id").take(
                        np.asarray(inside - position, dtype=np.int64)
                    )
                    for row, value in zip(inside.tolist(), values.to_pylist()):
                        ids[row] = _text(value)
                position = end
        offset += count
    return ids


class DuplicateRun:
    """The duplicate filter of one `tag` run: screening, near search, history update.

    Call while holding the history's lock when `use_history` is set. Rows the
    run keeps go to a pending history segment that `commit()` adds to the
    history; `abort()` drops it.
    """

    def __init__(
        self,
        source,
        model_id: str,
        dimension: int,
        config,
        use_history: bool,
        tag_columns: list[str],
        on_texts=None,
    ) -> None:
        from tagcli.history import SegmentWriter, read_history
        from tagcli.near import DuplicateSplitter, VectorIndex

        settings = config.dedupe
        history = read_history(config.paths.state_dir) if use_history else None
        if history is not None:
            history.check_model(model_id, dimension)
            history_keys, history_positions = history.sorted_keys()
            index = history.load_index(dimension, settings.exact_search_max_rows)
            history_id = history.id_lookup()
        else:
            history_keys = history_positions = None
            index = VectorIndex(dimension, settings.exact_search_max_rows)
            history_id = None
        self.history = history
        self.exact = screen_exact(
            source, history_keys, history_positions, on_texts=on_texts
        )
        self.splitter = DuplicateSplitter(
            self.exact, index, history_id, settings.near_threshold, tag_columns
        )
        self.segment = (
            SegmentWriter(history, model_id, dimension) if history is not None else None
        )

    @property
    def exact_count(self) -> int:
        return self.splitter.exact_count

    @property
    def near_count(self) -> int:
        return self.splitter.near_count

    def split(self, batch):
        """Return (kept rows, duplicate rows) of a tagged batch; remember the kept ones."""
        kept, duplicates, history_part = self.splitter.split(batch)
        if self.segment is not None:
            self.segment.append(*history_part)
        return kept, duplicates

    def move_displaced(self, writer, review_writer, duplicates_writer):
        """Move displaced rows to the duplicates file; return a `displace.MovedRows`.

        Call after the last batch, before any writer commits, so that the
        rewrites stay out of the window between the output's rename and the
        history's.
        """
        from tagcli.displace import move_displaced_rows

        if self.segment is not None:
            # A displaced row stays in the history, under the id that was kept.
            self.segment.replace_ids(self.splitter.history_ids())
        return move_displaced_rows(
            self.splitter,
            writer,
            review_writer,
            duplicates_writer,
            self.splitter.tag_columns,
        )

    def commit(self) -> None:
        """Add this run's kept rows to the history. Call after the output is in place."""
        if self.segment is not None:
            self.history = self.segment.commit(self.splitter.index)
        self.splitter.index.close()

    def abort(self) -> None:
        if self.segment is not None:
            self.segment.abort()
        self.splitter.index.close()


@dataclass
class TrainingDuplicates:
    """Labeled rows without duplicates: positions kept, their embeddings, counts dropped."""

    kept: object
    embeddings: object
    exact: int
    near: int


def drop_training_duplicates(frame, embed, threshold: float) -> TrainingDuplicates:
    """Drop exact, then near duplicates from a labeled polars frame.

    `embed(frame)` returns the float32 embeddings of a frame's rows; only the
    rows left after the exact step are embedded, once. The first row by
    created_on, then row order, is kept. `kept` contains the sorted positions
    into `frame`, and `embeddings` their rows, in the same order.
    """
    import numpy as np

    from tagcli.near import VectorIndex, match_near

    titles = frame["title"].to_list()
    descriptions = frame["description"].to_list()
    keys = np.array(
        [short_key(t, d) for t, d in zip(titles, descriptions)], dtype=f"S{KEY_BYTES}"
    )
    if "created_on" in frame.columns:
        created = created_sort_values(frame["created_on"].to_arrow())
    else:
        created = np.zeros(frame.height, dtype=np.int64)
    unique = np.flatnonzero(first_of_each_key(keys, created) < 0)
    embeddings = embed(frame[unique.tolist()])

    # Compare in created_on order; rows without text are never near duplicates.
    order = np.lexsort((unique, created[unique]))
    order = order[keys[unique[order]] != EMPTY_KEY]
    index = VectorIndex(embeddings.shape[1], exact_limit=len(order) + 1)
    matches, _ = match_near(embeddings[order], index, threshold)
    is_near = np.zeros(len(unique), dtype=bool)
    is_near[order[matches >= 0]] = True
    return TrainingDuplicates(
        kept=unique[~is_near],
        embeddings=embeddings[~is_near],
        exact=frame.height - len(unique),
        near=int(is_near.sum()),
    )
