"""Near duplicates found out of `created_on` order, across the batches of one run.

`DuplicateSplitter` compares each batch with the rows kept before it, and
sorts only the rows of one batch by `created_on`. A row B of a later batch
can near-match a row A kept earlier in the run although B was created
strictly earlier. B is then kept and A is displaced: A becomes a near
duplicate of B. History rows are never displaced, because their content is
already published.

`Displacements` records this as a union-find over near-duplicate index
positions: each displaced position points to the position that displaced
it. The representative of A's set is the row kept for it, so a later match
on A's embedding resolves to that row, and chains (C displaces B, which
displaced A) resolve to C.

A displaced row is already in the staged output, and maybe in the review
file. `move_displaced_rows` runs once after the last batch and before the
commit. It streams the staged files, drops the displaced rows from the
output and review files, appends them to the duplicates file, and re-points
the duplicate rows whose `duplicate_of` named a row that is no longer kept.
A re-pointed row keeps the `reason` and `similarity` of its own match. A
displaced row gets `reason` near and its cosine to the row that displaced
it. Rows are identified by their position in each file, never by id, because
input ids can repeat. The run keeps 17 bytes here per kept row (input row
number, output position, truncated flag) and 16 per duplicate row (the row
it names), up to twice that while the arrays grow. Only rows involved in a
displacement take more.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tagcli.dedupe import NEAR


class GrowingArray:
    """A numpy array that grows by appending, with amortised doubling."""

    def __init__(self, dtype) -> None:
        import numpy as np

        self._data = np.zeros(1024, dtype=dtype)
        self.size = 0

    def extend(self, values) -> None:
        import numpy as np

        values = np.asarray(values, dtype=self._data.dtype)
        needed = self.size + len(values)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : needed] = values
        self.size = needed

    @property
    def values(self):
        return self._data[: self.size]


class DisplacementMarks:
    """The `displaces` callback of `match_near` for one batch.

    Marks each candidate whose index match resolves to a row kept earlier in
    this run that was created strictly later. It stores the index matches and
    similarities, which `Displacements.settle` reads after `match_near`.
    """

    def __init__(self, displacements: Displacements, rows) -> None:
        self.displacements = displacements
        self.rows = rows
        self.matches = None
        self.scores = None
        self.marked = None

    def __call__(self, matches, scores):
        import numpy as np

        self.matches = matches
        self.scores = scores
        self.marked = np.zeros(len(matches), dtype=bool)
        # History rows always win, so only matches on this run's rows count.
        for k in np.flatnonzero(matches >= self.displacements.history_rows):
            root = self.displacements.find(int(matches[k]))
            self.marked[k] = self.displacements.created_before(int(self.rows[k]), root)
        return self.marked


@dataclass
class LateDuplicate:
    """A marked candidate that `settle` turned into a duplicate after all.

    It was kept by `match_near` and added to the index, but the row it
    matched had meanwhile been displaced by an earlier-created row of the same
    batch. `k` is its place among the batch's candidates.
    """

    k: int
    root: int
    similarity: float


class Displacements:
    """Union-find over index positions, plus where each kept row of the run was written.

    Positions are those of `VectorIndex`: history rows first, then the rows
    kept in this run, in the order they were added. `created` contains the
    `created_on` sort value of each input row (see `dedupe.created_sort_values`).

    The caller must write every kept, non-rejected row of a batch to the
    output, and every duplicate row to the duplicates file, in batch order,
    because output and duplicates-file positions are counted here.
    """

    def __init__(self, history_rows: int, created) -> None:
        import numpy as np

        self.history_rows = history_rows
        self.created = created
        # Per position kept in this run (minus history_rows): input row
        # number, output position (-1 when never written) and truncated flag.
        self._rows = GrowingArray(np.int64)
        self._output = GrowingArray(np.int64)
        self._truncated = GrowingArray(bool)
        # Displaced position -> the position that displaced or absorbed it.
        self.parent: dict[int, int] = {}
        # Displaced position -> cosine similarity to the row that displaced it.
        self.similarity: dict[int, float] = {}
        # Embeddings of rows that displaced another, needed for that cosine
        # when a later row displaces them through a match on another row.
        self._vectors: dict[int, object] = {}
        # Input row number of each exact-kept row (a row with exact copies)
        # -> its own position if kept, else the position of the row it duplicates.
        self._exact_position: dict[int, int] = {}
        # Per duplicates-file row: the position its duplicate_of named (-1
        # for none or a history row), and the exact-kept row it copies (-1).
        self._duplicate_targets = GrowingArray(np.int64)
        self._duplicate_exact_rows = GrowingArray(np.int64)
        self.output_rows = 0
        self.duplicate_rows = 0
        self.displaced_rows = 0

    def find(self, position: int) -> int:
        """Return the representative of `position`: the position of the row kept for it.

        Compresses the path on the way.
        """
        root = position
        while root in self.parent:
            root = self.parent[root]
        while position != root:
            following = self.parent[position]
            self.parent[position] = root
            position = following
        return root

    def row_of(self, position: int) -> int:
        """Return the input row number of a position kept in this run."""
        return int(self._rows.values[position - self.history_rows])

    def created_before(self, row: int, position: int) -> bool:
        """Return whether input `row` was created strictly before the row at `position`.

        Always False for a history position, because history rows always win.
        """
        if position < self.history_rows:
            return False
        return bool(self.created[row] < self.created[self.row_of(position)])

    def marks(self, rows) -> DisplacementMarks:
        """Return the `match_near` callback for candidates with input row numbers `rows`."""
        return DisplacementMarks(self, rows)

    def add_kept(self, rows, truncated) -> None:
        """Record the rows `match_near` added to the index, in order; output positions follow."""
        import numpy as np

        self._rows.extend(rows)
        self._output.extend(np.full(len(rows), -1, dtype=np.int64))
        self._truncated.extend(truncated)

    def settle(self, marks: DisplacementMarks, matches, first_new: int, vectors):
        """Apply the displacements of marked candidates that `match_near` kept.

        Candidates are taken in the batch's `created_on` order. A second
        candidate that matches a row the first one just displaced is compared
        with the first one instead. Created no earlier, it becomes that row's
        duplicate and is returned as a `LateDuplicate`, and its index position
        resolves to that row from then on.
        """
        import numpy as np

        kept = matches < 0
        positions = np.full(len(matches), -1, dtype=np.int64)
        positions[kept] = first_new + np.arange(int(kept.sum()))
        late = []
        if marks.marked is None:
            return late
        for k in np.flatnonzero(marks.marked & kept):
            matched = int(marks.matches[k])
            root = self.find(matched)
            own = int(positions[k])
            if self.created_before(int(marks.rows[k]), root):
                if root == matched:
                    similarity = float(marks.scores[k])
                else:
                    # A root that is not the matched row displaced it earlier,
                    # so its embedding was stored then.
                    similarity = float(vectors[k] @ self._vectors[root])
                self.parent[root] = own
                self.similarity[root] = similarity
                self._vectors[own] = np.array(vectors[k], dtype=np.float32)
                self.displaced_rows += 1
            else:
                self.parent[own] = root
                late.append(LateDuplicate(int(k), root, float(marks.scores[k])))
        return late

    def add_batch(self, kept_positions, output_positions, duplicate_targets, exact_rows):
        """Record where one batch's rows went.

        `kept_positions` are the batch's index positions and
        `output_positions` their output positions (-1 when not written).
        `duplicate_targets` and `exact_rows` have one entry per row written to
        the duplicates file, in order.
        """
        import numpy as np

        offset = np.asarray(kept_positions, dtype=np.int64) - self.history_rows
        self._output.values[offset] = output_positions
        self.output_rows += int((np.asarray(output_positions) >= 0).sum())
        self._duplicate_targets.extend(duplicate_targets)
        self._duplicate_exact_rows.extend(exact_rows)
        self.duplicate_rows += len(duplicate_targets)

    def note_exact_kept(self, row: int, position: int) -> None:
        """Record the position whose representative is kept for exact-kept input `row`."""
        self._exact_position[row] = position

    def plan(self, id_at) -> DisplacementPlan:
        """Return what the commit-time pass changes; `id_at(position)` returns an id."""
        import numpy as np

        displaced = [
            position
            for position in self.parent
            if position >= self.history_rows
            and self._output.values[position - self.history_rows] >= 0
        ]
        output = np.array(
            [self._output.values[p - self.history_rows] for p in displaced],
            dtype=np.int64,
        )
        order = np.argsort(output, kind="stable")
        displaced = [displaced[i] for i in order]
        plan = DisplacementPlan(
            output_positions=output[order],
            duplicate_of=[id_at(self.find(p)) for p in displaced],
            similarity=np.array(
                [self.similarity[p] for p in displaced], dtype=np.float64
            ),
            truncated_rows=int(
                sum(bool(self._truncated.values[p - self.history_rows]) for p in displaced)
            ),
        )
        plan.repointed = self._repointed(id_at)
        return plan

    def _repointed(self, id_at) -> dict[int, str]:
        """Return {duplicates-file position: final id} for rows naming a row no longer kept."""
        import numpy as np

        repointed: dict[int, str] = {}
        targets = self._duplicate_targets.values
        moved = np.fromiter(self.parent, dtype=np.int64, count=len(self.parent))
        for d in np.flatnonzero(np.isin(targets, moved)):
            repointed[int(d)] = id_at(self.find(int(targets[d])))

        # Exact-kept rows that are no longer kept themselves, and the id of the
        # row kept for each. There is one entry per group of exact copies.
        final_ids: dict[int, str] = {}
        for row, position in self._exact_position.items():
            root = self.find(position)
            own = position >= self.history_rows and self.row_of(position) == row
            if root != position or not own:
                final_ids[row] = id_at(root)
        if not final_ids:
            return repointed

        exact_rows = self._duplicate_exact_rows.values
        moved_rows = np.fromiter(final_ids, dtype=np.int64, count=len(final_ids))
        for d in np.flatnonzero(np.isin(exact_rows, moved_rows)):
            repointed[int(d)] = final_ids[int(exact_rows[d])]
        return repointed

    def history_ids(self, id_at) -> dict[int, str]:
        """Return {segment position: final id} for this run's positions that are no longer kept.

        The displaced content stays in the history, so a later run still
        finds its copies, but under the id that was kept.
        """
        return {
            position - self.history_rows: id_at(self.find(position))
            for position in self.parent
            if position >= self.history_rows
        }


@dataclass
class DisplacementPlan:
    """Displaced rows sorted by output position, their duplicate columns, and re-pointed rows."""

    output_positions: object
    duplicate_of: list[str]
    similarity: object
    truncated_rows: int = 0
    repointed: dict[int, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return len(self.output_positions) == 0 and not self.repointed


@dataclass
class MovedRows:
    """Counts of the output rows that moved to the duplicates file."""

    rows: int = 0
    tag_counts: Counter = field(default_factory=Counter)
    review_rows: int = 0
    truncated_rows: int = 0
    out_of_distribution: int = 0
    distance_sum: float = 0.0


def move_displaced_rows(
    splitter, writer, review_writer, duplicates_writer, tag_columns: list[str]
) -> MovedRows:
    """Move displaced rows from the staged output and review files to the duplicates file.

    Runs after the last batch and before any commit. Does nothing unless a row
    was displaced or a duplicate row names a row that is no longer kept.
    Streams each staged file once, one record batch at a time.
    """
    from tagcli.monitor import REVIEW_COLUMN

    plan = splitter.displacement_plan()
    moved = MovedRows(truncated_rows=plan.truncated_rows)
    if plan.empty:
        return moved

    review_positions = []
    if len(plan.output_positions):
        review_positions = _drop_from_output(
            writer, plan, duplicates_writer, tag_columns, moved, REVIEW_COLUMN
        )
        writer.discount_rows(moved.rows)
    if review_positions:
        import numpy as np

        dropped = _rewrite_files(
            review_writer,
            drop_positions=np.array(review_positions, dtype=np.int64),
        )
        review_writer.discount_rows(dropped)
    if plan.repointed:
        _repoint_duplicates(duplicates_writer, plan.repointed)
    return moved


def _drop_from_output(writer, plan, duplicates_writer, tag_columns, moved, review_name):
    """Rewrite the staged output without the displaced rows; return their review positions.

    The displaced rows go to `duplicates_writer` with the duplicate columns.
    Their review positions count the rows that precede them in the review
    file, which contains the output rows flagged `needs_review`, in order.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from tagcli.monitor import DISTANCE_COLUMN, OOD_COLUMN

    positions = plan.output_positions
    review_positions: list[int] = []
    offset = 0
    reviewed = 0

    def on_table(table):
        nonlocal offset, reviewed
        start = offset
        offset += table.num_rows
        low, high = np.searchsorted(positions, [start, offset])
        local = positions[low:high] - start
        review = table.column(review_name).fill_null(False).to_numpy(
            zero_copy_only=False
        )
        reviewed_before = reviewed + np.cumsum(review) - review
        for i in local:
            if review[i]:
                review_positions.append(int(reviewed_before[i]))
        reviewed += int(review.sum())
        if len(local) == 0:
            return table

        dropped = table.take(pa.array(local))
        moved.rows += dropped.num_rows
        moved.tag_counts.update(dropped.column("tag").to_pylist())
        moved.review_rows += int(review[local].sum())
        moved.out_of_distribution += int(
            pc.sum(dropped.column(OOD_COLUMN).cast("int64")).as_py() or 0
        )
        moved.distance_sum += float(
            pc.sum(dropped.column(DISTANCE_COLUMN)).as_py() or 0
        )
        duplicates_writer.write(
            _as_duplicates(
                dropped,
                tag_columns,
                plan.duplicate_of[low:high],
                plan.similarity[low:high],
            )
        )

        keep = np.ones(table.num_rows, dtype=bool)
        keep[local] = False
        return table.filter(pa.array(keep))

    _rewrite_files(writer, on_table=on_table)
    return review_positions


def _as_duplicates(table, tag_columns, duplicate_of, similarity):
    """Turn output rows into duplicates-file rows: input columns plus the duplicate columns."""
    import pyarrow as pa

    table = table.drop_columns([name for name in tag_columns if name in table.column_names])
    table = table.append_column("duplicate_of", pa.array(duplicate_of, pa.string()))
    table = table.append_column(
        "reason", pa.array([NEAR] * table.num_rows, pa.string())
    )
    return table.append_column("similarity", pa.array(similarity, pa.float64()))


def _repoint_duplicates(duplicates_writer, repointed: dict[int, str]) -> None:
    """Rewrite the staged duplicates file with new `duplicate_of` values at some positions."""
    import numpy as np
    import pyarrow as pa

    positions = np.array(sorted(repointed), dtype=np.int64)
    offset = 0

    def on_table(table):
        nonlocal offset
        start = offset
        offset += table.num_rows
        low, high = np.searchsorted(positions, [start, offset])
        if low == high:
            return table
        values = table.column("duplicate_of").to_pylist()
        for position in positions[low:high]:
            values[int(position) - start] = repointed[int(position)]
        index = table.column_names.index("duplicate_of")
        return table.set_column(
            index, "duplicate_of", pa.array(values, table.schema.field(index).type)
        )

    _rewrite_files(duplicates_writer, on_table=on_table)


def _rewrite_files(writer, drop_positions=None, on_table=None) -> int:
    """Stream a writer's staged files, in row order, through a filter; return the rows dropped.

    Either `drop_positions` (sorted row positions over all files) are left
    out, or `on_table(table)` returns each table as it should be written.
    Each file is replaced by its rewritten version; a part file left without
    rows is removed, unless it is the only one.
    """
    import numpy as np
    import pyarrow as pa

    paths = writer.staged_files()
    schema = writer.schema
    fmt = writer.format
    offset = 0
    dropped = 0
    remaining = list(paths)
    for path in paths:
        temporary = path.with_name(f".{path.name}.rewrite.partial")
        sink = None
        rows_out = 0
        try:
            for table in _read_staged(path, fmt, schema):
                if on_table is not None:
                    result = on_table(table)
                else:
                    low, high = np.searchsorted(
                        drop_positions, [offset, offset + table.num_rows]
                    )
                    keep = np.ones(table.num_rows, dtype=bool)
                    keep[drop_positions[low:high] - offset] = False
                    result = table.filter(pa.array(keep))
                offset += table.num_rows
                dropped += table.num_rows - result.num_rows
                if sink is None:
                    sink = _open_staged_writer(temporary, fmt, schema)
                sink.write_table(result.select(schema.names).cast(schema))
                rows_out += result.num_rows
            if sink is None:
                sink = _open_staged_writer(temporary, fmt, schema)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        finally:
            if sink is not None:
                sink.close()
        if rows_out == 0 and len(remaining) > 1:
            temporary.unlink()
            path.unlink()
            remaining.remove(path)
        else:
            os.replace(temporary, path)
    return dropped


def _read_staged(path: Path, fmt: str, schema):
    """Yield Arrow tables of a staged output file, with the types it was written with."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
            yield pa.Table.from_batches([batch])
        return
    # pyarrow's CSVWriter (checked with pyarrow 26) quotes every string and
    # writes null as an empty field, so these options read back what it wrote.
    convert = pacsv.ConvertOptions(
        column_types=schema,
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    for batch in pacsv.open_csv(path, convert_options=convert):
        yield pa.Table.from_batches([batch], schema=batch.schema)


def _open_staged_writer(temporary: Path, fmt: str, schema):
    """Open a writer with the options `writer.FileWriter` uses, so rewritten files match."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pq.ParquetWriter(temporary, schema)
    return pacsv.CSVWriter(temporary, schema)


def replace_ipc_strings(path: Path, column: str, values: dict[int, str]) -> None:
    """Rewrite an Arrow IPC file with new values of a string `column` at some row positions.

    Streams one record batch at a time into a file beside `path`, then renames
    it onto `path`.
    """
    import pyarrow as pa

    import numpy as np

    temporary = path.with_name(f".{path.name}.rewrite.partial")
    positions = np.array(sorted(values), dtype=np.int64)
    offset = 0
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        with pa.OSFile(str(temporary), "wb") as sink:
            with pa.ipc.new_file(sink, reader.schema) as writer:
                for number in range(reader.num_record_batches):
                    batch = reader.get_batch(number)
                    end = offset + batch.num_rows
                    low, high = np.searchsorted(positions, [offset, end])
                    inside = positions[low:high].tolist()
                    if inside:
                        index = batch.schema.get_field_index(column)
                        strings = batch.column(index).to_pylist()
                        for position in inside:
                            strings[position - offset] = values[position]
                        batch = batch.set_column(
                            index,
                            batch.schema.field(index),
                            pa.array(strings, batch.schema.field(index).type),
                        )
                    writer.write_batch(batch)
                    offset = end
    os.replace(temporary, path)
