"""The embedding cache in `tagcli tag`: workers look texts up, the driver stores.

Each embedding worker (a Ray actor, or the in-process loop) opens the cache
file read-only and embeds only the rows of a batch that the cache lacks. The
batch comes back with the `__embedding` column that the near-duplicate search
also reads, and a `__cached` marker. The driver then writes the embedding of
every tagged row to the cache, which adds the new ones and marks the found
ones as used, and drops the cache's columns before duplicates and writing.
Everything goes one batch at a time, so memory stays flat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tagcli.backends import recorded_backend
from tagcli.cache import CACHE_FILE, CacheReader, EmbeddingCache
from tagcli.config import Config
from tagcli.model import Artifact
from tagcli.near import EMBEDDING_COLUMN

log = logging.getLogger(__name__)

# Marks each row whose embedding came from the cache; the driver drops it.
CACHED_COLUMN = "__cached"
# Each row's token count, which the driver stores with a new embedding.
TOKENS_COLUMN = "__tokens"


@dataclass(frozen=True)
class CacheSpec:
    """The cache file, model id and backend, which a worker needs to read the cache."""

    path: Path
    model_id: str
    backend: str

    def open_reader(self) -> CacheReader:
        return CacheReader(self.path, self.model_id, self.backend)


class BatchLookup:
    """The cache's embeddings and token counts for the texts of one batch."""

    def __init__(self, reader, texts: list[str]) -> None:
        self.embeddings, self.found, self.token_counts = reader.lookup_with_tokens(
            texts
        )

    def take(self, rows: list[int]):
        """Return (embeddings, found) of `rows`, in the form `CacheReader.lookup` has."""
        import numpy as np

        positions = np.asarray(rows, dtype=np.int64)
        found = self.found[positions]
        if self.embeddings is None or not found.any():
            return None, found
        return self.embeddings[positions], found


def embed_with_cache(encoder, texts: list[str], batch_size: int, cached):
    """Return (embeddings, found): rows from `cached`, the others embedded.

    `cached` is (embeddings, found) for `texts`, as `CacheReader.lookup`
    returns them, or None without a cache. `found` is a bool array (True for
    rows from the cache), or None without a cache.
    """
    import numpy as np

    from tagcli.embed import embed_texts

    if cached is None:
        return embed_texts(encoder, texts, batch_size), None
    embeddings, found = cached
    if embeddings is None:
        return embed_texts(encoder, texts, batch_size), found
    missing = np.flatnonzero(~found)
    if len(missing):
        missing_texts = [texts[index] for index in missing]
        embeddings[missing] = embed_texts(encoder, missing_texts, batch_size)
    return embeddings, found


class TagCache:
    """The driver's side of the cache in one `tag` run: stores and counts."""

    def __init__(self, artifact: Artifact, config: Config) -> None:
        model_id = artifact.manifest["embedding"]["model_id"]
        backend = recorded_backend(artifact.manifest)
        self.cache = EmbeddingCache(
            config.paths.state_dir, model_id, backend, config.embedding.cache_max_rows
        )
        self.spec = CacheSpec(self.cache.path, model_id, backend)
        self.cached_rows = 0

    def absorb(self, batch, keep_embeddings: bool):
        """Store a classified batch's new embeddings and mark its tagged rows as used.

        Returns the batch without the cache marker, and without the
        `__embedding` column unless `keep_embeddings` is set.
        """
        import numpy as np

        from tagcli.text import compose_text

        cached = batch.column(CACHED_COLUMN).to_numpy(zero_copy_only=False)
        token_counts = batch.column(TOKENS_COLUMN).to_pylist()
        self.cached_rows += int(cached.sum())
        # Rejected rows and skipped exact duplicates have a null tag and a
        # zero vector, so they are not stored.
        tagged = np.flatnonzero(
            batch.column("tag").is_valid().to_numpy(zero_copy_only=False)
        )
        if len(tagged):
            column = batch.column(EMBEDDING_COLUMN).combine_chunks()
            dimension = column.type.list_size
            vectors = column.flatten().to_numpy().reshape(-1, dimension)
            titles = batch.column("title").to_pylist()
            descriptions = batch.column("description").to_pylist()
            texts = [
                compose_text(_text(titles[row]), _text(descriptions[row]))
                for row in tagged
            ]
            self.cache.store(
                texts,
                vectors[tagged],
                cached[tagged],
                [token_counts[row] for row in tagged],
            )

        batch = batch.drop_columns([CACHED_COLUMN, TOKENS_COLUMN])
        if not keep_embeddings:
            batch = batch.drop_columns([EMBEDDING_COLUMN])
        return batch

    def close(self) -> None:
        stats = self.cache.stats
        log.info(
            "Embedding cache %s: %d rows from the cache, %d stored, %d trimmed",
            self.cache.path,
            self.cached_rows,
            stats.written,
            stats.trimmed,
        )
        self.cache.close()


def tag_cache_spec(
    artifact: Artifact, config: Config, use_cache: bool
) -> CacheSpec | None:
    """Return the run's CacheSpec without opening the cache, or None when it is off."""
    if not use_cache or config.embedding.cache_max_rows == 0:
        return None
    return CacheSpec(
        Path(config.paths.state_dir) / CACHE_FILE,
        artifact.manifest["embedding"]["model_id"],
        recorded_backend(artifact.manifest),
    )


def open_tag_cache(artifact: Artifact, config: Config, use_cache: bool):
    """Return the run's TagCache, or None when --no-cache or a zero size turns it off."""
    if not use_cache or config.embedding.cache_max_rows == 0:
        return None
    return TagCache(artifact, config)


def _text(value) -> str:
    # Matches how classify_batch reads the title and description columns.
    return "" if value is None else str(value)
