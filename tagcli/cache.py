"""Embeddings of texts seen before, kept in SQLite in the state folder.

A row's key is the sha256 of the model id, the backend name and the text, so
a cache shared by several models or backends never hands one model's vector to
another. The backend name is the one the artifact's manifest records ("torch"
or "onnx-int8"). Lookups and writes go one batch at a time, so memory does not grow
with the input. Beyond `max_rows` entries the least recently used are deleted.
The time of each row's last use is kept in its own small table (`usage`),
so marking the rows of a cached run as used rewrites rows of a 32-byte key
and a time, not the 1.6 KB rows that carry the vectors.

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

# `embeddings.last_used` is the time the row was written; `usage.last_used`,
# one row per key, is the time of its last use, which trimming orders by.
# `tokens` is the text's untruncated token count, special tokens included, so
# the `[rows]` screening of a cached text needs no tokenizer; NULL in rows
# written without it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key BLOB PRIMARY KEY,
    dimension INTEGER NOT NULL,
    vector BLOB NOT NULL,
    last_used INTEGER NOT NULL,
    tokens INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    key BLOB PRIMARY KEY,
    last_used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_last_used ON usage (last_used);
"""
# PRAGMA user_version of a file with the `usage` table filled and the
# `tokens` column. Files from before them (version 0) kept the last use in
# `embeddings.last_used`.
SCHEMA_VERSION = 1


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
                self._upgrade_schema()
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or attempt == 49:
                    raise
                time.sleep(0.1)

    def _upgrade_schema(self) -> None:
        """Add `usage` and `tokens` to an older file, keeping each row's last use."""
        version_query = "PRAGMA user_version"
        if self._connection.execute(version_query).fetchone()[0] >= SCHEMA_VERSION:
            return
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have upgraded the file while this one waited.
            if self._connection.execute(version_query).fetchone()[0] < SCHEMA_VERSION:
                if not _has_tokens_column(self._connection):
                    self._connection.execute(
                        "ALTER TABLE embeddings ADD COLUMN tokens INTEGER"
                    )
                self._connection.execute(
                    "INSERT OR IGNORE INTO usage (key, last_used) "
                    "SELECT key, last_used FROM embeddings"
                )
                self._connection.execute("DROP INDEX IF EXISTS embeddings_last_used")
                self._connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._connection.execute("COMMIT")
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise

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

    def store(
        self, texts: list[str], embeddings, found=None, token_counts=None
    ) -> None:
        """Write the embeddings of `texts` the cache lacks, mark all as used, then trim.

        `found` (a bool array, one entry per text) marks the texts whose
        embedding was read from this cache: only their last use is written.
        `token_counts` contains each text's token count, or None where unknown.
        A text already in the cache keeps its stored vector. A found text
        that another run trimmed in the meantime stays out of the cache until
        it is embedded again.
        """
        import numpy as np

        if not texts:
            return
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        now = self._stamp()
        keys = self.keys(texts)
        new_rows = range(len(keys)) if found is None else np.flatnonzero(~found)
        if token_counts is None:
            token_counts = [None] * len(keys)
        rows = [
            (
                keys[row],
                embeddings.shape[1],
                embeddings[row].tobytes(),
                now,
                token_counts[row],
            )
            for row in new_rows
        ]
        with self._transaction():
            changes_before = self._connection.total_changes
            self._connection.executemany(
                "INSERT OR IGNORE INTO embeddings "
                "(key, dimension, vector, last_used, tokens) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            written = self._connection.total_changes - changes_before
            self._mark_used(keys, now)
            self.stats.written += written
            if written:
                self._trim()

    def count(self) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def _stamp(self) -> int:
        """Return a last_used value in ns that grows with every call in this process."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _touch(self, keys: list[bytes]) -> None:
        with self._transaction():
            self._mark_used(keys, self._stamp())

    def _mark_used(self, keys: list[bytes], stamp: int) -> None:
        """Set the last use of `keys` to `stamp`, inside the open transaction."""
        self._connection.executemany(
            "INSERT INTO usage (key, last_used) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET last_used = excluded.last_used",
            [(key, stamp) for key in keys],
        )

    def _trim(self) -> None:
        """Delete the least recently used rows beyond `max_rows` in the transaction."""
        excess = self.count() - self.max_rows
        if excess <= 0:
            return
        oldest = self._connection.execute(
            "SELECT key FROM usage ORDER BY last_used LIMIT ?", (excess,)
        ).fetchall()
        self._connection.executemany("DELETE FROM embeddings WHERE key = ?", oldest)
        self._connection.executemany("DELETE FROM usage WHERE key = ?", oldest)
        self.stats.trimmed += len(oldest)
        log.debug("Trimmed %d least recently used rows from %s", len(oldest), self.path)

    def _transaction(self):
        return _Transaction(self._connection, self.path)


class CacheReader:
    """Read-only lookups in an embedding cache file, as embedding workers do them.

    It never marks rows as used: the driver does that when it stores the
    embeddings of each tagged batch. A missing file finds nothing.
    """

    def __init__(self, path: Path, model_id: str, backend: str) -> None:
        self.path = Path(path)
        self.model_id = model_id
        self.backend = backend
        self._connection = None
        self._has_tokens = False
        if not self.path.exists():
            return
        try:
            self._connection = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                check_same_thread=False,
            )
            self._has_tokens = _has_tokens_column(self._connection)
        except sqlite3.Error as error:
            raise cache_error(self.path, error) from error

    def lookup(self, texts: list[str]):
        """Return (embeddings, found) for `texts`, as `assemble` returns them."""
        embeddings, found, _ = self.lookup_with_tokens(texts)
        return embeddings, found

    def lookup_with_tokens(self, texts: list[str]):
        """Return (embeddings, found, token_counts) for `texts`.

        `embeddings` and `found` are as `assemble` returns them.
        `token_counts` has one entry per text: its stored token count, or None
        where the text is not found or its row has no count.
        """
        keys = [cache_key(self.model_id, self.backend, text) for text in texts]
        if self._connection is None:
            embeddings, found = assemble(keys, {})
            return embeddings, found, [None] * len(keys)
        rows = select_rows(self._connection, self.path, keys, self._has_tokens)
        vectors = {key: vector for key, (vector, _) in rows.items()}
        embeddings, found = assemble(keys, vectors)
        token_counts = [rows[key][1] if key in rows else None for key in keys]
        return embeddings, found, token_counts

    def contains(self, texts: list[str]):
        """Return a bool array, True for each text whose embedding is in the cache."""
        import numpy as np

        keys = [cache_key(self.model_id, self.backend, text) for text in texts]
        if self._connection is None:
            return np.zeros(len(keys), dtype=bool)
        present = select_keys(self._connection, self.path, keys)
        return np.array([key in present for key in keys], dtype=bool)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def select_keys(connection, path: Path, keys: list[bytes]) -> set[bytes]:
    """Return the keys that the cache contains, without reading their vectors."""
    present: set[bytes] = set()
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[start : start + LOOKUP_CHUNK]
        placeholders = ",".join("?" * len(chunk))
        try:
            rows = connection.execute(
                f"SELECT key FROM embeddings WHERE key IN ({placeholders})", chunk
            ).fetchall()
        except sqlite3.Error as error:
            raise cache_error(path, error) from error
        present.update(row[0] for row in rows)
    return present


def select_rows(
    connection, path: Path, keys: list[bytes], with_tokens: bool
) -> dict[bytes, tuple]:
    """Return (vector bytes, token count or None) of each key the cache contains."""
    tokens = "tokens" if with_tokens else "NULL"
    found: dict[bytes, tuple] = {}
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[start : start + LOOKUP_CHUNK]
        placeholders = ",".join("?" * len(chunk))
        try:
            rows = connection.execute(
                f"SELECT key, vector, {tokens} FROM embeddings "
                f"WHERE key IN ({placeholders})",
                chunk,
            ).fetchall()
        except sqlite3.Error as error:
            raise cache_error(path, error) from error
        found.update((key, (vector, count)) for key, vector, count in rows)
    return found


def _has_tokens_column(connection) -> bool:
    columns = connection.execute("PRAGMA table_info(embeddings)").fetchall()
    return any(column[1] == "tokens" for column in columns)


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
