"""The history of content already tagged: keys, ids and embeddings of earlier runs.

Layout of the state folder (`[paths] state_dir`):

    index.json           the committed state: segment files, row count, model
    segments/*.arrow     append-only Arrow IPC files: key, id, vector (float16)
    near-*.faiss         the IVF-PQ index over every history vector, once there
                         are more than `[dedupe] exact_search_max_rows`: PQ
                         codes of a few dozen bytes per vector
    lock                 the flock that lets one run at a time use the history

Above `[dedupe] exact_search_max_rows` rows a run keeps in memory the
history's PQ codes and 16-byte keys, and reads the float16 vectors of search
candidates back from the segment files (`tagcli.vector_store`). Ids are read
from the segments only for rows that a duplicate points to.

A run writes its rows to a new segment file and commits it by one atomic
rename of index.json. A run killed at any moment leaves index.json as it was,
so the history is unchanged. Files such a run left behind are not listed in
index.json, so they are ignored until the next commit removes them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tagcli.errors import EXIT_LOCKED, EXIT_USAGE, TagcliError

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
LOCK_FILE = "lock"
SEGMENTS_FOLDER = "segments"
HISTORY_FORMAT = 1
# A saved IVF index is rebuilt once the history has grown past this multiple
# of the rows it was trained on, so its cells stay about sqrt(rows) in number.
RETRAIN_GROWTH = 4


@contextmanager
def history_lock(state_dir: Path, timeout_seconds: float):
    """Hold the history's lock for the duration of the block.

    Waits up to `timeout_seconds` for another run to release it, then raises
    TagcliError with exit code EXIT_LOCKED. The lock is an flock, so the
    kernel releases it when a holder dies, however it dies. A state folder
    that this call created is removed again when no history was committed in
    it, so a failed first run leaves no files behind.
    """
    state_dir = Path(state_dir)
    created = not state_dir.exists()
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = _acquire(state_dir, timeout_seconds)
    try:
        yield
    finally:
        if created and not (state_dir / INDEX_FILE).exists():
            _remove_empty_state(state_dir)
        handle.close()


def _acquire(state_dir: Path, timeout_seconds: float):
    """Return the open lock file once this process holds its flock."""
    path = state_dir / LOCK_FILE
    deadline = time.monotonic() + timeout_seconds
    waiting_logged = False
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
        else:
            # A run that removed its empty state folder unlinked the file this
            # lock was taken on; only a lock on the current file counts.
            if (
                path.exists()
                and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            ):
                return handle
            handle.close()
            state_dir.mkdir(parents=True, exist_ok=True)
            continue
        if time.monotonic() >= deadline:
            raise TagcliError(
                f"{state_dir}: the history is locked by another tagcli run; "
                f"waited {timeout_seconds:g} s. Retry when it has finished, "
                "raise [dedupe] lock_timeout_seconds, or pass --no-history.",
                exit_code=EXIT_LOCKED,
            )
        if not waiting_logged:
            log.warning(
                "%s: the history is locked by another run; waiting up to %g s",
                state_dir,
                timeout_seconds,
            )
            waiting_logged = True
        time.sleep(0.2)


def _remove_empty_state(state_dir: Path) -> None:
    """Remove the lock file and empty folders of a state folder with no history."""
    (state_dir / LOCK_FILE).unlink(missing_ok=True)
    for folder in (state_dir / SEGMENTS_FOLDER, state_dir):
        try:
            folder.rmdir()
        except OSError:
            # Not empty or already gone: another run is using it.
            pass


@dataclass
class History:
    """The committed history in `state_dir`, as index.json lists it."""

    state_dir: Path
    segments: list[dict] = field(default_factory=list)
    embedding_model: str | None = None
    dimension: int | None = None
    near_index: dict | None = None

    @property
    def rows(self) -> int:
        return sum(segment["rows"] for segment in self.segments)

    def size_bytes(self) -> int:
        """Return the bytes of the committed files: index, segments and IVF index."""
        files = [self.state_dir / INDEX_FILE]
        files += [self._segment_path(segment) for segment in self.segments]
        if self.near_index:
            files.append(self.state_dir / self.near_index["file"])
        return sum(path.stat().st_size for path in files if path.exists())

    def _segment_path(self, segment: dict) -> Path:
        return self.state_dir / SEGMENTS_FOLDER / segment["file"]

    def check_model(self, model_id: str, dimension: int) -> None:
        """Raise TagcliError when the history's vectors come from another model."""
        if self.rows == 0 or self.embedding_model is None:
            return
        if self.embedding_model != model_id or self.dimension != dimension:
            raise TagcliError(
                f"{self.state_dir}: the history contains embeddings of "
                f"{self.embedding_model!r} ({self.dimension} dimensions), but this "
                f"model embeds with {model_id!r} ({dimension}). Clear it with "
                "`tagcli history --clear`, or set [paths] state_dir to another folder.",
                exit_code=EXIT_USAGE,
            )

    def read_segment(self, segment: dict, columns: list[str]):
        """Return the columns of one segment as an Arrow table (memory-mapped)."""
        import pyarrow as pa

        with pa.memory_map(str(self._segment_path(segment))) as source:
            return pa.ipc.open_file(source).read_all().select(columns)

    def sorted_keys(self):
        """Return (keys sorted, their history positions) as numpy arrays."""
        import numpy as np

        from tagcli.dedupe import KEY_BYTES

        # From the raw buffers, not one Python bytes object per history row.
        chunks = [
            np.frombuffer(
                chunk.buffers()[1],
                dtype=f"S{KEY_BYTES}",
                count=len(chunk),
                offset=chunk.offset * KEY_BYTES,
            )
            for s in self.segments
            for chunk in self.read_segment(s, ["key"]).column("key").chunks
        ]
        keys = (
            np.concatenate(chunks).astype(f"S{KEY_BYTES}")
            if chunks
            else np.zeros(0, f"S{KEY_BYTES}")
        )
        order = np.argsort(keys, kind="stable")
        return keys[order], order.astype(np.int64)

    def id_lookup(self):
        """Return a function from history position to id.

        Each segment's id column is memory-mapped when first needed and kept
        as an Arrow array, so only the pages of the ids looked up are read.
        """
        import numpy as np

        starts = np.cumsum([0] + [s["rows"] for s in self.segments])
        cache: dict[int, object] = {}

        def history_id(position: int) -> str:
            number = int(np.searchsorted(starts, position, side="right")) - 1
            if number not in cache:
                table = self.read_segment(self.segments[number], ["id"])
                cache[number] = table.column("id")
            return cache[number][position - int(starts[number])].as_py()

        return history_id

    def vectors(self, segment: dict):
        """Return a segment's vectors as a float32 (rows, dimension) array."""
        import numpy as np

        batches = list(self.iter_vectors(segment))
        if not batches:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.concatenate(batches)

    def iter_vectors(self, segment: dict):
        """Yield a segment's vectors as float32 arrays, one per record batch.

        Reads the file without a memory map, so only the batch being yielded
        is in memory.
        """
        import pyarrow as pa

        with pa.OSFile(str(self._segment_path(segment))) as source:
            reader = pa.ipc.open_file(source)
            for number in range(reader.num_record_batches):
                column = reader.get_batch(number).column("vector")
                flat = column.flatten().to_numpy(zero_copy_only=False)
                yield flat.reshape(len(column), self.dimension).astype("float32")

    def load_index(self, dimension: int, exact_limit: int):
        """Return a VectorIndex holding every history vector, in history order.

        Up to `exact_limit` rows the vectors are loaded for exact search.
        Above, the index keeps PQ codes in memory and reads the exact vectors
        from the segment files. It uses the saved IVF-PQ index when it is
        there and the history has not outgrown it, adding the rows committed
        after it was saved. A saved index of another kind (the float16 IVF
        index of earlier versions) is rebuilt; the next commit saves the new
        one in its place.
        """
        from tagcli.near import IVF_KIND, VectorIndex, train_ivf
        from tagcli.vector_store import VectorStore

        index = VectorIndex(dimension, exact_limit)
        total = self.rows
        if total <= exact_limit:
            for segment in self.segments:
                index.add(self.vectors(segment))
            return index

        store = VectorStore(dimension)
        for segment in self.segments:
            rows = store.add_segment(self._segment_path(segment))
            if rows != segment["rows"]:
                raise TagcliError(
                    f"{self._segment_path(segment)}: contains {rows} vectors but "
                    f"index.json lists {segment['rows']} rows; clear the history "
                    "with `tagcli history --clear`."
                )

        saved = self.near_index
        if saved and saved.get("kind") != IVF_KIND:
            log.info(
                "Rebuilding the near-duplicate index of %s with compressed codes "
                "(the saved one stores float16 vectors)",
                self.state_dir,
            )
            saved = None
        faiss_index = None
        if saved and total <= RETRAIN_GROWTH * saved["trained_rows"]:
            faiss_index = _read_faiss_index(self.state_dir / saved["file"])
            trained_rows = saved["trained_rows"]
            if faiss_index.ntotal > total:
                log.warning(
                    "%s contains %d vectors, more than the %d history rows. "
                    "Rebuilding it",
                    saved["file"],
                    faiss_index.ntotal,
                    total,
                )
                faiss_index = None
        if faiss_index is None:
            log.info("Training the near-duplicate IVF index on %d history rows", total)
            faiss_index = train_ivf(self._training_sample(), dimension)
            trained_rows = total

        skip = faiss_index.ntotal
        for segment in self.segments:
            if skip >= segment["rows"]:
                skip -= segment["rows"]
                continue
            for vectors in self.iter_vectors(segment):
                if skip >= len(vectors):
                    skip -= len(vectors)
                    continue
                faiss_index.add(vectors[skip:])
                skip = 0
        index.use_compressed(faiss_index, store, trained_rows)
        return index

    def _training_sample(self, limit: int = 1_000_000):
        """Return up to `limit` history vectors drawn evenly from every segment."""
        import numpy as np

        from tagcli.near import TRAINING_VECTORS_PER_CELL

        cells = int(self.rows**0.5)
        wanted = min(limit, cells * TRAINING_VECTORS_PER_CELL)
        fraction = min(1.0, wanted / max(1, self.rows))
        rng = np.random.default_rng(0)
        parts = []
        for segment in self.segments:
            for vectors in self.iter_vectors(segment):
                take = int(rng.binomial(len(vectors), fraction))
                if take:
                    chosen = rng.choice(len(vectors), take, replace=False)
                    parts.append(vectors[np.sort(chosen)])
        return np.concatenate(parts)


def _read_faiss_index(path: Path):
    """Read a saved faiss IVF index and set its probes per query."""
    import faiss

    from tagcli.near import IVF_PROBES

    index = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(IVF_PROBES, ivf.nlist)
    return index


def read_history(state_dir: Path) -> History:
    """Read index.json in `state_dir`; a missing folder or file is an empty history."""
    state_dir = Path(state_dir)
    path = state_dir / INDEX_FILE
    if not path.exists():
        return History(state_dir=state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TagcliError(
            f"{path}: cannot read the history index ({error}); restore it or clear "
            "the history with `tagcli history --clear`."
        ) from error
    if data.get("format") != HISTORY_FORMAT:
        raise TagcliError(
            f"{path}: history format {data.get('format')!r} is not supported "
            f"(expected {HISTORY_FORMAT}); clear it with `tagcli history --clear`."
        )
    return History(
        state_dir=state_dir,
        segments=list(data.get("segments", [])),
        embedding_model=data.get("embedding_model"),
        dimension=data.get("dimension"),
        near_index=data.get("near_index"),
    )


class SegmentWriter:
    """Stream one run's kept rows to a new segment file, committed by `commit()`.

    The file is written under a hidden name in the segments folder. It becomes
    part of the history only when `commit` renames it and index.json lists it.
    """

    def __init__(self, history: History, model_id: str, dimension: int) -> None:
        self.history = history
        self.model_id = model_id
        self.dimension = dimension
        folder = history.state_dir / SEGMENTS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.arrow"
        self._pending = folder / f".{self.name}.partial"
        self._writer = None
        self._sink = None
        self._closed = False
        self.rows = 0

    def _schema(self):
        import pyarrow as pa

        from tagcli.dedupe import KEY_BYTES

        return pa.schema(
            [
                pa.field("key", pa.binary(KEY_BYTES)),
                pa.field("id", pa.string()),
                pa.field("vector", pa.list_(pa.float16(), self.dimension)),
            ]
        )

    def append(self, keys, ids: list[str], vectors) -> None:
        """Append kept rows: short keys (S16 array), ids and float32 vectors."""
        import numpy as np
        import pyarrow as pa

        if len(ids) == 0:
            return
        if self._writer is None:
            self._sink = pa.OSFile(str(self._pending), "wb")
            self._writer = pa.ipc.new_file(self._sink, self._schema())
        flat = pa.array(np.asarray(vectors, dtype=np.float16).reshape(-1))
        table = pa.table(
            {
                # From the raw buffer: numpy drops trailing zero bytes of S16 items.
                "key": pa.FixedSizeBinaryArray.from_buffers(
                    self._schema()[0].type,
                    len(ids),
                    [None, pa.py_buffer(np.ascontiguousarray(keys).tobytes())],
                ),
                "id": pa.array(ids, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, self.dimension),
            },
            schema=self._schema(),
        )
        self._writer.write_table(table)
        self.rows += len(ids)

    def commit(self, index=None) -> History:
        """Add the segment to the history by one rename of index.json; return the new history.

        `index` is the run's VectorIndex, which contains the history's vectors
        and this run's, in history order. An IVF index is saved too.
        """
        history = self.history
        segments = list(history.segments)
        keep_files = {INDEX_FILE, LOCK_FILE}
        if self._writer is not None:
            self._close()
            _fsync(self._pending)
            os.replace(self._pending, self._pending.parent / self.name)
            segments.append({"file": self.name, "rows": self.rows})

        near_index = None
        if index is not None and index.faiss_index is not None:
            import faiss

            from tagcli.near import IVF_KIND

            near_name = f"near-{uuid.uuid4().hex[:12]}.faiss"
            staging = history.state_dir / f".{near_name}.partial"
            faiss.write_index(index.faiss_index, str(staging))
            _fsync(staging)
            os.replace(staging, history.state_dir / near_name)
            near_index = {
                "file": near_name,
                "kind": IVF_KIND,
                "rows": index.size,
                "trained_rows": index.trained_rows,
            }
            keep_files.add(near_name)
        elif history.near_index and self.rows == 0:
            near_index = history.near_index
            keep_files.add(near_index["file"])

        data = {
            "format": HISTORY_FORMAT,
            "embedding_model": self.model_id if segments else None,
            "dimension": self.dimension if segments else None,
            "rows": sum(segment["rows"] for segment in segments),
            "segments": segments,
            "near_index": near_index,
        }
        write_index(history.state_dir, data)
        remove_unlisted(history.state_dir, keep_files, segments)
        return read_history(history.state_dir)

    def replace_ids(self, ids: dict[int, str]) -> None:
        """Rewrite the pending segment with new ids at some row positions; then only commit.

        Copies the whole file once, so it is meant for a few ids per run.
        """
        if not ids or self._writer is None:
            return
        from tagcli.displace import replace_ipc_strings

        self._close()
        replace_ipc_strings(self._pending, "id", ids)

    def _close(self) -> None:
        if not self._closed:
            self._writer.close()
            self._sink.close()
            self._closed = True

    def abort(self) -> None:
        if self._writer is not None:
            self._close()
        self._pending.unlink(missing_ok=True)


def write_index(state_dir: Path, data: dict) -> None:
    """Replace index.json by one atomic rename, after the new content is on disk."""
    staging = state_dir / f".{INDEX_FILE}.{os.getpid()}.partial"
    staging.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    _fsync(staging)
    os.replace(staging, state_dir / INDEX_FILE)
    _fsync(state_dir)


def remove_unlisted(
    state_dir: Path, keep_files: set[str], segments: list[dict]
) -> None:
    """Delete history files that index.json does not list: leftovers of killed or cleared runs.

    Only the history's own files count: saved near-duplicate indexes and
    staging files. The embedding cache and the feedback store share the
    folder and stay. Call only while holding the lock, so no other run is
    writing its files.
    """
    listed = {segment["file"] for segment in segments}
    for path in state_dir.iterdir():
        if (
            path.is_file()
            and path.name not in keep_files
            and _is_history_file(path.name)
        ):
            path.unlink(missing_ok=True)
    folder = state_dir / SEGMENTS_FOLDER
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name not in listed:
                path.unlink(missing_ok=True)


def _is_history_file(name: str) -> bool:
    """Return whether `name`, in the state folder, is a file the history writes."""
    if name.startswith("near-") and name.endswith(".faiss"):
        return True
    staged = (".near-", f".{INDEX_FILE}.")
    return name.startswith(staged) and name.endswith(".partial")


def clear_history(state_dir: Path, timeout_seconds: float) -> History:
    """Empty the history under its lock and return the new, empty history."""
    with history_lock(state_dir, timeout_seconds):
        write_index(
            Path(state_dir),
            {
                "format": HISTORY_FORMAT,
                "embedding_model": None,
                "dimension": None,
                "rows": 0,
                "segments": [],
                "near_index": None,
            },
        )
        remove_unlisted(Path(state_dir), {INDEX_FILE, LOCK_FILE}, [])
        return read_history(state_dir)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
