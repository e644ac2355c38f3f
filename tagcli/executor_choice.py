"""Counting of the input rows already in the embedding cache, for `--executor auto`.

An input over `[ray] max_local_rows` rows would start Ray, but when most of
its texts are in the embedding cache, little is left to embed and Ray's
start-up costs more than the work. `CachedRowCounter` marks each input row
whose text the cache contains. It is fed by the exact-duplicate screening
pass, which reads every title and description anyway, or reads them itself
when that pass does not run (--keep-duplicates). The cache lookups only read
the keys and never mark rows as used.
"""

from __future__ import annotations

from tagcli.text import compose_text


class CachedRowCounter:
    """Per input row, in input order: is its composed text in the embedding cache?"""

    def __init__(self, cache_spec) -> None:
        self.cache_spec = cache_spec
        self._reader = None
        self._chunks: list = []
        self.rows = 0

    def add(self, titles: list, descriptions: list) -> None:
        """Look up the next rows of the input, from their raw title and description."""
        texts = [
            compose_text(_text(title), _text(description))
            for title, description in zip(titles, descriptions)
        ]
        if self._reader is None:
            self._reader = self.cache_spec.open_reader()
        self._chunks.append(self._reader.contains(texts))
        self.rows += len(texts)

    def read(self, source, batch_size: int = 65536) -> None:
        """Read the title and description of every row of `source` and look them up."""
        from tagcli.dedupe import iter_columns

        for file in source.files:
            for table in iter_columns(
                source, file, ["title", "description"], batch_size
            ):
                self.add(
                    table.column("title").to_pylist(),
                    table.column("description").to_pylist(),
                )

    def rows_to_embed(self, skipped_rows=None) -> int:
        """Return the rows whose text is not in the cache, less the `skipped_rows`.

        `skipped_rows` contains the row numbers that are never embedded (exact
        duplicates). Rows that the `[rows]` policy will reject still count.
        """
        import numpy as np

        cached = np.concatenate(self._chunks) if self._chunks else np.zeros(0, bool)
        missing = ~cached
        if skipped_rows is not None and len(skipped_rows):
            missing[np.asarray(skipped_rows, dtype=np.int64)] = False
        return int(missing.sum())

    @property
    def cached_rows(self) -> int:
        return int(sum(int(chunk.sum()) for chunk in self._chunks))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def cached_row_counter(
    requested: str, executor: str, address: str, cache_spec
) -> CachedRowCounter | None:
    """Return a counter when the cached rows could turn an "auto" Ray run local.

    That is the case for an "auto" run on no cluster that chose Ray for its
    row count, with the cache on (`cache_spec` is not None).
    """
    if requested != "auto" or executor != "ray" or address or cache_spec is None:
        return None
    return CachedRowCounter(cache_spec)


def executor_reason(
    requested: str,
    rows: int,
    address: str,
    max_local_rows: int,
    rows_to_embed: int | None = None,
) -> str:
    """Return why `choose_executor` picks its executor, for the log."""
    if requested != "auto":
        return f"--executor {requested}"
    if address:
        return f"a cluster address is set ({address})"
    if rows <= max_local_rows:
        return f"{rows} rows, at most [ray] max_local_rows ({max_local_rows})"
    if rows_to_embed is None:
        return f"{rows} rows, over [ray] max_local_rows ({max_local_rows})"
    comparison = "at most" if rows_to_embed <= max_local_rows else "over"
    return (
        f"{rows_to_embed} of {rows} rows need embedding after the embedding cache "
        f"and exact duplicates, {comparison} [ray] max_local_rows ({max_local_rows})"
    )


def _text(value) -> str:
    # Matches how classify_batch reads the title and description columns.
    return "" if value is None else str(value)
