"""Near duplicates: cosine search over embeddings, and the split of tagged batches.

`VectorIndex` finds, for each query, the most similar vector it contains. Up
to `exact_limit` vectors it searches exactly with numpy, holding them as a
float32 matrix. Above, it keeps in memory only a faiss IVF index with
product-quantisation codes: inverted lists over k-means cells, and per vector
a code of `dimension / 8` bytes (48 for 384 dimensions) and an 8-byte id. The
codes find `RERANK_CANDIDATES` candidates per query; their float16 vectors are
read back from disk (`tagcli.vector_store`) and the reported similarity is
their exact cosine with the query. Search cost grows with the square root of
the vectors contained, not linearly.

`DuplicateSplitter` turns each tagged batch into kept rows and duplicate rows,
using the exact duplicates from the screening pass and the near-duplicate
search. It keeps the ids of the run's kept rows in Arrow string arrays, a few
bytes per row.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right

from tagcli.dedupe import EMPTY_KEY, EXACT, NEAR
from tagcli.displace import Displacements
from tagcli.rows import REJECT_MARKER, TRUNCATED_MARKER

log = logging.getLogger(__name__)

# Cells searched per query. The near copies planted by bench/near_dup_search.py
# were all found at 16 against 1,000,000 synthetic vectors.
IVF_PROBES = 16
# faiss warns when k-means gets fewer than 39 training vectors per cell.
TRAINING_VECTORS_PER_CELL = 64
# Training vectors for the PQ codes (20 for each of the 256 centroids per
# sub-vector) and k-means iterations per sub-vector. faiss defaults to 39 and
# 25. The codes only choose RERANK_CANDIDATES candidates, which the exact
# cosine then ranks, so coarser codes cost little. Training 48 sub-vectors
# took 2.2 s on one thread here, for 20,001 vectors of 384 dimensions.
PQ_TRAINING_VECTORS = 20 * 256
PQ_TRAINING_ITERATIONS = 10
# Query rows per numpy matrix product: 256 x 20,000 float32 is 20 MB.
QUERY_CHUNK = 256
# Candidates per query that the compressed search reads back from disk to
# compute their exact cosine. The best of them is the query's match.
RERANK_CANDIDATES = 8
# Values per product-quantisation sub-vector. Each sub-vector is coded in one
# byte once the index is trained on 1,024 vectors or more.
VALUES_PER_SUBVECTOR = 8
# The faiss index kind saved in the state folder, as index.json names it.
IVF_KIND = "ivf-pq"

ROW_COLUMN = "__row"
EMBEDDING_COLUMN = "__embedding"
DUPLICATE_COLUMNS = ("duplicate_of", "reason", "similarity")


class VectorIndex:
    """Inner-product search over L2-normalised float vectors, so scores are cosines.

    Positions count from 0 in the order vectors were added. Past `exact_limit`
    vectors the numpy matrix is replaced by a faiss IVF-PQ index trained on
    the vectors held at that moment, and the vectors go to a `VectorStore` on
    disk (a temporary file in `spill_dir`, or `tempfile`'s folder).
    """

    def __init__(
        self, dimension: int, exact_limit: int = 20000, spill_dir=None
    ) -> None:
        self.dimension = dimension
        self.exact_limit = exact_limit
        self.spill_dir = spill_dir
        self.size = 0
        self.trained_rows = 0
        self.faiss_index = None
        self.store = None
        # Rows 0 to size - 1 are the exact vectors, until the switch. The
        # buffer doubles when full, so earlier rows are copied only then, not
        # on every batch.
        self._matrix = None

    def add(self, vectors) -> None:
        import numpy as np

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) == 0:
            return
        if self.faiss_index is not None:
            self.faiss_index.add(vectors)
            self.store.append(vectors)
            self.size += len(vectors)
            return
        if self.size + len(vectors) > self.exact_limit:
            matrix = np.concatenate([self._exact_matrix(), vectors])
            self._matrix = None
            self.size = len(matrix)
            self._compress(matrix)
            return
        self._reserve(self.size + len(vectors))
        self._matrix[self.size : self.size + len(vectors)] = vectors
        self.size += len(vectors)

    def use_compressed(self, faiss_index, store, trained_rows: int) -> None:
        """Search with `faiss_index` and the exact vectors in `store` from now on.

        Both must contain the same vectors in the same order. Used to load a
        history whose vectors are already on disk.
        """
        if faiss_index.ntotal != store.size:
            raise ValueError(
                f"the faiss index contains {faiss_index.ntotal} vectors but the "
                f"vector store {store.size}"
            )
        self.faiss_index = faiss_index
        self.store = store
        self.trained_rows = trained_rows
        self.size = store.size
        self._matrix = None

    def search(self, queries):
        """Return (similarity, position) of each query's most similar vector.

        Both are arrays of len(queries); an empty index gives similarity -inf
        and position -1. The similarity is the exact cosine (against the
        float16 copy on disk once the index is compressed).
        """
        import numpy as np

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        similarity = np.full(len(queries), -np.inf, dtype=np.float32)
        position = np.full(len(queries), -1, dtype=np.int64)
        if self.size == 0 or len(queries) == 0:
            return similarity, position
        if self.faiss_index is not None:
            for start in range(0, len(queries), QUERY_CHUNK):
                part = slice(start, start + QUERY_CHUNK)
                similarity[part], position[part] = self._search_compressed(
                    queries[part]
                )
            return similarity, position
        matrix = self._exact_matrix()
        for start in range(0, len(queries), QUERY_CHUNK):
            scores = queries[start : start + QUERY_CHUNK] @ matrix.T
            best = scores.argmax(axis=1)
            similarity[start : start + len(best)] = scores[np.arange(len(best)), best]
            position[start : start + len(best)] = best
        return similarity, position

    def _search_compressed(self, queries):
        """Find candidates with the PQ codes, then rank them by exact cosine."""
        import numpy as np

        _, candidates = self.faiss_index.search(queries, RERANK_CANDIDATES)
        found = candidates >= 0
        similarity = np.full(len(queries), -np.inf, dtype=np.float32)
        position = np.full(len(queries), -1, dtype=np.int64)
        if not found.any():
            return similarity, position

        # Read each distinct candidate once, then score every (query, candidate).
        unique = np.unique(candidates[found])
        vectors = self.store.read(unique)
        slots = np.searchsorted(unique, np.where(found, candidates, unique[0]))
        scores = np.einsum("qd,qkd->qk", queries, vectors[slots])
        scores[~found] = -np.inf
        best = scores.argmax(axis=1)
        rows = np.arange(len(queries))
        similarity[:] = scores[rows, best]
        hit = np.isfinite(similarity)
        position[hit] = candidates[rows, best][hit]
        return similarity, position

    def _exact_matrix(self):
        import numpy as np

        if self._matrix is None:
            return np.zeros((0, self.dimension), np.float32)
        return self._matrix[: self.size]

    def _reserve(self, rows: int) -> None:
        """Grow the exact buffer to at least `rows` rows, at most `exact_limit`."""
        import numpy as np

        capacity = 0 if self._matrix is None else len(self._matrix)
        if rows <= capacity:
            return
        capacity = min(max(rows, 2 * capacity, 1024), max(rows, self.exact_limit))
        grown = np.empty((capacity, self.dimension), dtype=np.float32)
        if self._matrix is not None:
            grown[: self.size] = self._matrix[: self.size]
        self._matrix = grown

    def _compress(self, vectors) -> None:
        """Replace the numpy matrix by an IVF-PQ index and `vectors` written to disk."""
        from tagcli.vector_store import VectorStore

        index = train_ivf(vectors, self.dimension)
        store = VectorStore(self.dimension, self.spill_dir)
        # In blocks, because faiss computes every added vector's residual at
        # once: a copy of the whole matrix at the memory peak of the switch.
        for start in range(0, len(vectors), QUERY_CHUNK):
            index.add(vectors[start : start + QUERY_CHUNK])
            store.append(vectors[start : start + QUERY_CHUNK])
        self.use_compressed(index, store, trained_rows=len(vectors))
        log.info(
            "Near-duplicate search switched to a compressed IVF-PQ index at %d vectors",
            self.size,
        )

    def close(self) -> None:
        """Delete the temporary file of vectors written to disk, if any."""
        if self.store is not None:
            self.store.close()


def train_ivf(sample, dimension: int):
    """Return an empty faiss IVF-PQ index trained on `sample`, for inner products.

    The number of cells is about the square root of the sample size, so a
    query compares against about 2 x sqrt(N) x IVF_PROBES codes, not N. Each
    vector's residual to its cell centroid is coded in `pq_subvectors(dimension)`
    bytes, with 256 centroids per sub-vector. A sample of under 1,024 vectors
    gets fewer centroids (sample / 4, rounded down to a power of 2), because
    k-means needs more training vectors than centroids.
    """
    import faiss
    import numpy as np

    cells = max(1, int(math.sqrt(len(sample))))
    cells = max(1, min(cells, len(sample) // TRAINING_VECTORS_PER_CELL))
    limit = max(cells * TRAINING_VECTORS_PER_CELL, PQ_TRAINING_VECTORS)
    if len(sample) > limit:
        chosen = np.random.default_rng(0).choice(len(sample), limit, replace=False)
        sample = sample[np.sort(chosen)]
    bits = min(8, max(1, int(math.log2(max(2, len(sample)))) - 2))
    index = faiss.index_factory(
        dimension,
        f"IVF{cells},PQ{pq_subvectors(dimension)}x{bits}",
        faiss.METRIC_INNER_PRODUCT,
    )
    # faiss prints a warning to stderr when k-means gets fewer than this many
    # vectors per centroid. The choice of `bits` above keeps at least 4.
    index.pq.cp.min_points_per_centroid = 4
    index.pq.cp.niter = PQ_TRAINING_ITERATIONS
    index.pq.cp.max_points_per_centroid = PQ_TRAINING_VECTORS // 256
    # index_factory turns on polysemous training, for Hamming-distance
    # filtering that this search does not use. It took 20 s on 3,000 vectors.
    index.do_polysemous_training = False
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = min(IVF_PROBES, cells)
    return index


def pq_subvectors(dimension: int) -> int:
    """Return the PQ sub-vectors per vector.

    That is the largest divisor of `dimension` up to dimension / 8.
    """
    target = max(1, dimension // VALUES_PER_SUBVECTOR)
    return max(m for m in range(1, target + 1) if dimension % m == 0)


class IdList:
    """Ids appended in order, in Arrow string arrays: bytes and an offset per id.

    Replaces a Python list of str, which costs about 57 bytes per id over its
    text in CPython 3.11 (object header and list pointer).
    """

    # Chunks are merged into one array once there are this many.
    MAX_CHUNKS = 256

    def __init__(self) -> None:
        self._chunks: list = []
        self._starts: list[int] = [0]

    def __len__(self) -> int:
        return self._starts[-1]

    def extend(self, ids) -> None:
        import pyarrow as pa

        chunk = pa.array(list(ids), pa.string())
        if len(chunk) == 0:
            return
        self._chunks.append(chunk)
        self._starts.append(self._starts[-1] + len(chunk))
        if len(self._chunks) >= self.MAX_CHUNKS:
            self._chunks = [pa.concat_arrays(self._chunks)]
            self._starts = [0, self._starts[-1]]

    def __getitem__(self, position: int) -> str:
        if not 0 <= position < len(self):
            raise IndexError(f"id position {position} outside 0..{len(self) - 1}")
        chunk = bisect_right(self._starts, position) - 1
        return self._chunks[chunk][position - self._starts[chunk]].as_py()


class DuplicateSplitter:
    """Split tagged batches into kept rows and duplicate rows, in stream order.

    `exact` is the `ExactDuplicates` of the input. `tag_columns` are the
    columns the tagger added, left out of the duplicates file. `index`
    contains the history's vectors and receives the vectors of every row kept
    in this run, so later batches are compared with earlier ones.
    `history_id(position)` returns the id of a history row.

    Within a batch, rows are compared in the order of created_on, then row
    number. A row of a later batch that near-matches a row kept earlier in
    the run, and was created strictly earlier, is kept and displaces it (see
    `tagcli.displace`): the caller then runs `displace.move_displaced_rows`
    before committing its files.
    """

    def __init__(
        self,
        exact,
        index: VectorIndex,
        history_id,
        threshold: float,
        tag_columns: list[str],
    ):
        import numpy as np

        self.exact = exact
        self.tag_columns = tag_columns
        self.index = index
        self.history_id = history_id
        self.history_rows = index.size
        self.threshold = threshold
        # Ids of the rows kept in this run, by their position in `index`
        # minus `history_rows`.
        self.kept_ids = IdList()
        self.exact_count = 0
        self.near_count = 0
        self.displacements = Displacements(self.history_rows, exact.created)
        self._rows_with_copies = np.fromiter(
            exact.kept_ids, dtype=np.int64, count=len(exact.kept_ids)
        )

    def split(self, batch):
        """Return (kept, duplicates, history_part) for one batch.

        `kept` has the batch's columns without the internal ones.
        `duplicates` has the input columns plus DUPLICATE_COLUMNS.
        `history_part` is (keys, ids, float32 vectors) of the kept rows that
        have content, for the history.
        """
        import numpy as np

        rows = batch.column(ROW_COLUMN).to_numpy()
        keys = self.exact.keys[rows]
        ids = [_text(value) for value in batch.column("id").to_pylist()]
        duplicate_of = [None] * len(rows)
        reason = [None] * len(rows)
        similarity = np.full(len(rows), np.nan)

        of_row = self.exact.duplicate_of_row[rows]
        of_history = self.exact.duplicate_of_history[rows]
        for i in np.flatnonzero((of_row >= 0) | (of_history >= 0)):
            if of_history[i] >= 0:
                duplicate_of[i] = self.history_id(int(of_history[i]))
            else:
                duplicate_of[i] = self.exact.kept_ids[int(of_row[i])]
            reason[i] = EXACT
            similarity[i] = 1.0
            self.exact_count += 1

        is_candidate = (of_row < 0) & (of_history < 0) & (keys != EMPTY_KEY)
        rejected = np.zeros(len(rows), dtype=bool)
        if REJECT_MARKER in batch.column_names:
            # Rejected rows go to the rejects file: neither compared nor remembered.
            rejected = batch.column(REJECT_MARKER).is_valid()
            rejected = rejected.to_numpy(zero_copy_only=False)
            is_candidate &= ~rejected
        candidates = np.flatnonzero(is_candidate)
        order = np.lexsort((rows[candidates], self.exact.created[rows[candidates]]))
        candidates = candidates[order]
        vectors = embedding_matrix(batch, candidates, self.index.dimension)
        first_new = self.index.size
        marks = self.displacements.marks(rows[candidates])
        matches, scores = match_near(
            vectors, self.index, self.threshold, displaces=marks
        )
        kept_here = np.flatnonzero(matches < 0)
        self.kept_ids.extend(ids[i] for i in candidates[kept_here])
        kept_rows = candidates[kept_here]
        self.displacements.add_kept(rows[kept_rows], _truncated(batch)[kept_rows])
        displaced_before = self.displacements.displaced_rows
        late = self.displacements.settle(marks, matches, first_new, vectors)
        self.near_count += self.displacements.displaced_rows - displaced_before
        # Index position each near duplicate names, to re-point it if that
        # row is displaced later.
        targets = np.full(len(rows), -1, dtype=np.int64)
        for k, position, score in _near_matches(late, matches, scores):
            i = candidates[k]
            root = self.displacements.find(position)
            duplicate_of[i] = self._id_at(root)
            reason[i] = NEAR
            similarity[i] = score
            targets[i] = root
            self.near_count += 1
        kept_vectors = vectors[kept_here]

        is_duplicate = np.array([value is not None for value in reason], dtype=bool)
        self._record_positions(
            rows, first_new, kept_rows, is_duplicate, rejected, targets, of_row
        )
        kept = _drop_internal(batch.filter(~is_duplicate))
        duplicates = _duplicate_table(
            batch, is_duplicate, duplicate_of, reason, similarity, self.tag_columns
        )
        history_part = (keys[kept_rows], [ids[i] for i in kept_rows], kept_vectors)
        return kept, duplicates, history_part

    def _record_positions(
        self, rows, first_new, kept_rows, is_duplicate, rejected, targets, of_row
    ) -> None:
        """Tell `displacements` where this batch's rows go: output and duplicates file."""
        import numpy as np

        to_output = ~is_duplicate & ~rejected
        output = self.displacements.output_rows + np.cumsum(to_output) - 1
        kept_output = np.where(to_output[kept_rows], output[kept_rows], -1)
        positions = first_new + np.arange(len(kept_rows), dtype=np.int64)
        written = np.flatnonzero(is_duplicate)
        self.displacements.add_batch(
            positions, kept_output, targets[written], of_row[written]
        )
        # Rows with exact copies: the duplicates file names them, so record
        # which position they resolve to.
        has_copies = np.isin(rows, self._rows_with_copies)
        for k in np.flatnonzero(has_copies[kept_rows]):
            row = int(rows[kept_rows[k]])
            self.displacements.note_exact_kept(row, int(positions[k]))
        for i in np.flatnonzero(has_copies & (targets >= 0)):
            self.displacements.note_exact_kept(int(rows[i]), int(targets[i]))

    def displacement_plan(self):
        """Return the `displace.DisplacementPlan` of the rows split so far."""
        return self.displacements.plan(self._id_at)

    def history_ids(self) -> dict[int, str]:
        """Return {position in this run's history segment: kept id} for rows no longer kept."""
        return self.displacements.history_ids(self._id_at)

    def _id_at(self, position: int) -> str:
        if position < self.history_rows:
            return self.history_id(position)
        return self.kept_ids[position - self.history_rows]


def match_near(vectors, index: VectorIndex, threshold: float, displaces=None):
    """Compare `vectors`, in order, with `index` and with the earlier kept ones among them.

    Returns (matches, scores): for each vector, the index position of its most
    similar earlier vector when the cosine similarity is at least `threshold`,
    else -1 (kept), and that similarity (NaN when kept). Kept vectors are
    added to `index` in order, so a match inside `vectors` gets the position
    it has there.

    `displaces(matches, scores)`, when given, receives the matches found in
    `index` and returns a bool mask of rows to keep although they match there.
    Such a row still becomes a duplicate of an earlier row of `vectors` that
    it is more similar to.
    """
    import numpy as np

    best, position = index.search(vectors)
    first_new = index.size
    matches = np.where(best >= threshold, position, -1).astype(np.int64)
    scores = np.where(best >= threshold, best, np.nan).astype(np.float64)
    kept = matches < 0
    if displaces is not None:
        kept |= displaces(matches.copy(), scores.copy())

    # Pairs inside `vectors` at or above the threshold, earlier row first.
    # Only rows in such a pair need the greedy pass, in order, because a row
    # can match only an earlier row that was itself kept.
    within = vectors @ vectors.T
    close = np.tril(within >= threshold, k=-1)
    in_batch_match = np.full(len(vectors), -1, dtype=np.int64)
    for k in np.flatnonzero(close.any(axis=1)):
        earlier = np.flatnonzero(close[k, :k] & kept[:k])
        if len(earlier) == 0:
            continue
        j = int(earlier[within[k, earlier].argmax()])
        if np.isnan(scores[k]) or within[k, j] > scores[k]:
            in_batch_match[k] = j
            scores[k] = float(within[k, j])
            kept[k] = False

    # A kept row's position in `index` is first_new plus its rank among the kept.
    rank = np.cumsum(kept) - 1
    inside = np.flatnonzero(in_batch_match >= 0)
    matches[inside] = first_new + rank[in_batch_match[inside]]
    matches[kept] = -1
    scores[kept] = np.nan
    index.add(vectors[kept])
    return matches, scores


def embedding_matrix(batch, rows, dimension: int):
    """Return the float32 embeddings of `rows` of `batch` as a (len(rows), dimension) array."""
    import numpy as np

    if len(rows) == 0:
        return np.zeros((0, dimension), dtype=np.float32)
    column = batch.column(EMBEDDING_COLUMN).take(np.asarray(rows, dtype=np.int64))
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(len(rows), dimension), dtype=np.float32)


def _text(value) -> str:
    return "" if value is None else str(value)


def _near_matches(late, matches, scores):
    """Yield (candidate, index position, similarity) of each near duplicate of a batch.

    `late` are the candidates that `Displacements.settle` turned into
    duplicates; the others come from `match_near`.
    """
    import numpy as np

    for duplicate in late:
        yield duplicate.k, duplicate.root, duplicate.similarity
    for k in np.flatnonzero(matches >= 0):
        yield int(k), int(matches[k]), float(scores[k])


def _truncated(batch):
    """Return the truncated flag of each row of `batch` as a bool array."""
    import numpy as np

    if TRUNCATED_MARKER not in batch.column_names:
        return np.zeros(batch.num_rows, dtype=bool)
    column = batch.column(TRUNCATED_MARKER).fill_null(False)
    return column.to_numpy(zero_copy_only=False).astype(bool)


def _drop_internal(table):
    internal = [name for name in table.column_names if name.startswith("__")]
    return table.drop_columns(internal) if internal else table


def duplicate_schema(input_schema):
    """Return the duplicates file's schema: the input columns plus DUPLICATE_COLUMNS."""
    import pyarrow as pa

    fields = [field for field in input_schema if not field.name.startswith("__")]
    fields += [
        pa.field("duplicate_of", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("similarity", pa.float64()),
    ]
    return pa.schema(fields)


def _duplicate_table(batch, mask, duplicate_of, reason, similarity, tag_columns):
    import numpy as np
    import pyarrow as pa

    chosen = np.flatnonzero(mask)
    table = _drop_internal(batch.take(chosen))
    table = table.drop_columns([n for n in tag_columns if n in table.column_names])
    table = table.append_column(
        "duplicate_of", pa.array([duplicate_of[i] for i in chosen], pa.string())
    )
    table = table.append_column(
        "reason", pa.array([reason[i] for i in chosen], pa.string())
    )
    return table.append_column("similarity", pa.array(similarity[chosen], pa.float64()))
