"""Embeddings of texts seen before, kept in SQLite in the state folder.

A row's key is the sha256 of the model id, the backend name and the text, so
a cache shared by several models or backends never hands one model's vector to
another. The backend name is the one the artifact's manifest records ("torch"
or "onnx-int8"). Lookups and writes go one batch at a time, so memory does not grow
with the input. Beyond `max_rows` entries the least recently used are deleted.

Two processes may use the same file at once: the database runs in WAL mode
(readers do not block the writer) and waits up to `BUSY_TIMEOUT_S` for the
write lock before failing.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from tagcli.errors import TagcliError

log = logging.getLogger(__name__)

CACHE_FILE = "embeddings.sqlite"
BUSY_TIMEOUT_S = 60.0
# Keys per SELECT, well below SQLite's limit on the bound parameters of one
# statement (SQLITE_MAX_VARIABLE_NUMBER).
LOOKUP_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key BLOB PRIMARY KEY,
    dimension INTEGER NOT NULL,
    vector BLOB NOT NULL,
    last_used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS embeddings_last_used ON embeddings (last_used);
"""


def cache_key(model_id: str, backend: str, text: str) -> bytes:
    """Return the 32-byte sha256 of model id, backend and text, separated by NUL."""
    payload = "\x00".join((model_id, backend, text)).encode("utf-8")
    return hashlib.sha256(payload).digest()


@dataclass
class CacheStats:
    """Counts of one open cache: texts found and missing, rows written and trimmed."""

    hits: int = 0
    misses: int = 0
    written: int = 0
    trimmed: int = 0


class EmbeddingCache:
    """Embeddings of one model and backend, stored in `state_dir/embeddings.sqlite`.

    Use as a context manager, or call `close`. Vectors are float32 and come
    back as they went in (the encoder's output is already L2-normalised).
    """

    def __init__(
        self, state_dir: Path, model_id: str, backend: str, max_rows: int
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.path = Path(state_dir) / CACHE_FILE
        self.model_id = model_id
        self.backend = backend
        self.max_rows = max_rows
        self.stats = CacheStats()
        self._last_stamp = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None
            )
            self._set_up_database()
        except (OSError, sqlite3.Error) as error:
            raise TagcliError(
                f"{self.path}: cannot open the embedding cache: {error}. Fix the "
                "permissions of [paths] state_dir, point it elsewhere, or pass "
                "--no-cache."
            ) from error

    def _set_up_database(self) -> None:
        """Switch to WAL and create the tables, retrying while another process does the same.

        SQLite can return "database is locked" at once, without waiting for the
        busy timeout, when two connections switch a new file to WAL together.
        """
        for attempt in range(50):
            try:
                self._connection.execute("PRAGMA journal_mode=WAL")
                self._connection.execute("PRAGMA synchronous=NORMAL")
                self._connection.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or attempt == 49:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def keys(self, texts: list[str]) -> list[bytes]:
        return [cache_key(self.model_id, self.backend, text) for text in texts]

    def lookup(self, texts: list[str]):
        """Return (embeddings, found) for `texts`, as `assemble` returns them.

        Found rows are marked as used now, for the least-recently-used trimming.
        """
        keys = self.keys(texts)
        vectors = select_vectors(self._connection, self.path, keys)
        embeddings, found = assemble(keys, vectors)
        self.stats.hits += int(found.sum())
        self.stats.misses += len(keys) - int(found.sum())
        if vectors:
            self._touch(list(vectors))
        return embeddings, found

    def store(self, texts: list[str], embeddings) -> None:
        """Write the embeddings of `texts`, then trim the cache to `max_rows`."""
        import numpy as np

        if not texts:
            return
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        now = self._stamp()
        rows = [
            (key, embeddings.shape[1], embeddings[row].tobytes(), now)
            for row, key in enumerate(self.keys(texts))
        ]
        with self._transaction():
            self._connection.executemany(
                "INSERT OR REPLACE INTO embeddings (key, dimension, vector, last_used) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
            self.stats.written += len(rows)
            self._trim()

    def count(self) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def _stamp(self) -> int:
        """Return a last_used value in ns that grows with every call in this process."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _touch(self, keys: list[bytes]) -> None:
        now = self._stamp()
        with self._transaction():
            self._connection.executemany(
                "UPDATE embeddings SET last_used = ? WHERE key = ?",
                [(now, key) for key in keys],
            )

    def _trim(self) -> None:
        """Delete the least recently used rows beyond `max_rows` in the transaction."""
        excess = self.count() - self.max_rows
        if excess <= 0:
            return
        self._connection.execute(
            "DELETE FROM embeddings WHERE key IN "
            "(SELECT key FROM embeddings ORDER BY last_used LIMIT ?)",
            (excess,),
        )
        self.stats.trimmed += excess
        log.debug("Trimmed %d least recently used rows from %s", excess, self.path)

    def _transaction(self):
        return _Transaction(self._connection, self.path)


class CacheReader:
    """Read-only lookups in an embedding cache file, as embedding workers do them.

    It never marks rows as used: the driver does that when it stores the
    embeddings of each tagged batch. A missing file finds nothing, which is
    the case on a Ray node that does not share the driver's state folder.
    """

    def __init__(self, path: Path, model_id: str, backend: str) -> None:
        self.path = Path(path)
        self.model_id = model_id
        self.backend = backend
        self._connection = None
        if not self.path.exists():
            return
        try:
            self._connection = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                check_same_thread=False,
            )
        except sqlite3.Error as error:
            raise cache_error(self.path, error) from error

    def lookup(self, texts: list[str]):
        """Return (embeddings, found) for `texts`, as `assemble` returns them."""
        keys = [cache_key(self.model_id, self.backend, text) for text in texts]
        if self._connection is None:
            return assemble(keys, {})
        return assemble(keys, select_vectors(self._connection, self.path, keys))


def select_vectors(connection, path: Path, keys: list[bytes]) -> dict[bytes, bytes]:
    """Return the stored float32 vector bytes of each key that the cache contains."""
    vectors: dict[bytes, bytes] = {}
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[start : start + LOOKUP_CHUNK]
        placeholders = ",".join("?" * len(chunk))
        try:
            rows = connection.execute(
                f"SELECT key, vector FROM embeddings WHERE key IN ({placeholders})",
                chunk,
            ).fetchall()
        except sqlite3.Error as error:
            raise cache_error(path, error) from error
        vectors.update(rows)
    return vectors


def assemble(keys: list[bytes], vectors: dict[bytes, bytes]):
    """Return (embeddings, found): one row per key from `vectors`.

    `embeddings` has shape (len(keys), dimension) with zeros where `found` (a
    bool array) is False. It is None when no key was found.
    """
    import numpy as np

    found = np.array([key in vectors for key in keys], dtype=bool)
    if not vectors:
        return None, found
    dimension = len(next(iter(vectors.values()))) // 4
    embeddings = np.zeros((len(keys), dimension), dtype=np.float32)
    for row, key in enumerate(keys):
        vector = vectors.get(key)
        if vector is not None:
            embeddings[row] = np.frombuffer(vector, dtype=np.float32)
    return embeddings, found


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error.

    IMMEDIATE takes the write lock at the start, so a second writer waits in
    the busy timeout instead of failing when it upgrades a read lock.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.connection = connection
        self.path = path

    def __enter__(self) -> None:
        try:
            self.connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise cache_error(self.path, error) from error

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            try:
                self.connection.execute("COMMIT")
            except sqlite3.Error as error:
                raise cache_error(self.path, error) from error
            return
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise cache_error(self.path, exc) from exc


def cache_error(path: Path, error: sqlite3.Error) -> TagcliError:
    """Return the TagcliError for a failed cache read or write, with what to do."""
    hint = ""
    if "locked" in str(error):
        hint = f" Another run held the write lock for over {BUSY_TIMEOUT_S:g} s."
    return TagcliError(
        f"{path}: embedding cache failed: {error}.{hint} Retry, point [paths] "
        "state_dir at another folder, or pass --no-cache."
    )
