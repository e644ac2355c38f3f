"""The cache file's last-use table, stored token counts, and files from before them."""

from __future__ import annotations

import sqlite3

import numpy as np
import polars as pl
import pytest
from conftest import SAMPLE_CSV, write_config

from tagcli.cache import CACHE_FILE, SCHEMA_VERSION, CacheReader, EmbeddingCache
from tagcli.config import Config, load_config
from tagcli.dedupe import normalise_text
from tagcli.lazy_backend import lazy_artifact_backend
from tagcli.model import load_artifact
from tagcli.pipeline import TagOptions, tag
from tagcli.text import compose_text

OLD_SCHEMA = """
CREATE TABLE embeddings (
    key BLOB PRIMARY KEY,
    dimension INTEGER NOT NULL,
    vector BLOB NOT NULL,
    last_used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX embeddings_last_used ON embeddings (last_used);
"""


def unit_vectors(rows: int, dimension: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(
        np.float32
    )


def write_old_file(folder, texts: list[str], stamps: list[int]) -> np.ndarray:
    """Write a cache file as tagcli wrote it before the usage table existed."""
    vectors = unit_vectors(len(texts))
    with EmbeddingCache(folder / "scratch", "model", "backend", 10) as scratch:
        keys = scratch.keys(texts)
    connection = sqlite3.connect(folder / CACHE_FILE)
    connection.executescript(OLD_SCHEMA)
    connection.executemany(
        "INSERT INTO embeddings VALUES (?, ?, ?, ?)",
        [
            (key, vectors.shape[1], vector.tobytes(), stamp)
            for key, vector, stamp in zip(keys, vectors, stamps)
        ],
    )
    connection.commit()
    connection.close()
    return vectors


def test_old_file_upgrades_keeping_last_use(tmp_path):
    vectors = write_old_file(tmp_path, ["a", "b", "c"], [30, 10, 20])

    with EmbeddingCache(tmp_path, "model", "backend", max_rows=3) as cache:
        connection = cache._connection
        stamps = [row[0] for row in connection.execute("SELECT last_used FROM usage")]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        table_info = connection.execute("PRAGMA table_info(embeddings)")
        columns = [row[1] for row in table_info]
        found_vectors, found = cache.lookup(["a", "b", "c"])

    assert sorted(stamps) == [10, 20, 30]
    assert version == SCHEMA_VERSION
    assert "tokens" in columns
    assert found.all()
    assert np.array_equal(found_vectors, vectors)


def test_old_file_trims_by_old_stamps(tmp_path):
    write_old_file(tmp_path, ["a", "b", "c"], [30, 10, 20])

    with EmbeddingCache(tmp_path, "model", "backend", max_rows=3) as cache:
        cache.store(["d"], unit_vectors(1, seed=1))
        _, present = cache.lookup(["a", "b", "c", "d"])

    assert present.tolist() == [True, False, True, True]


def test_old_file_opened_by_reader_first(tmp_path):
    write_old_file(tmp_path, ["a"], [1])

    reader = CacheReader(tmp_path / CACHE_FILE, "model", "backend")
    _, found, counts = reader.lookup_with_tokens(["a", "b"])
    reader.close()

    assert found.tolist() == [True, False]
    assert counts == [None, None]


def test_found_rows_keep_their_vector(tmp_path):
    first, second = unit_vectors(2)
    with EmbeddingCache(tmp_path, "model", "backend", max_rows=10) as cache:
        cache.store(["text"], first[None])
        cache.store(["text"], second[None], found=np.array([True]))
        cache.store(["text"], second[None])
        vectors, _ = cache.lookup(["text"])

    assert np.array_equal(vectors[0], first)
    assert cache.stats.written == 1


def test_found_rows_count_as_used(tmp_path):
    with EmbeddingCache(tmp_path, "model", "backend", max_rows=2) as cache:
        cache.store(["a", "b"], unit_vectors(2))
        # Marks "a" as used after "b", as the driver does for a cached row.
        cache.store(["a"], unit_vectors(1), found=np.array([True]))
        cache.store(["c"], unit_vectors(1, seed=2))
        _, present = cache.lookup(["a", "b", "c"])

    assert present.tolist() == [True, False, True]


def test_token_counts_round_trip(tmp_path):
    with EmbeddingCache(tmp_path, "model", "backend", max_rows=10) as cache:
        cache.store(["one", "two"], unit_vectors(2), token_counts=[3, None])
    reader = CacheReader(tmp_path / CACHE_FILE, "model", "backend")

    _, found, counts = reader.lookup_with_tokens(["two", "three", "one"])
    reader.close()

    assert found.tolist() == [True, False, True]
    assert counts == [None, None, 3]


def test_tag_stores_token_counts(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    options = TagOptions(
        model_dir=small_model, executor="local", show_progress=False, no_history=True
    )
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).drop("tag").head(60)
    dump = tmp_path / "dump.parquet"
    frame.write_parquet(dump)

    tag(dump, tmp_path / "out.parquet", config, options)

    artifact = load_artifact(small_model, Config().tags.approved)
    model_id = artifact.manifest["embedding"]["model_id"]
    texts = [
        compose_text(title, description)
        for title, description in zip(frame["title"], frame["description"])
    ]
    reader = CacheReader(tmp_path / "state" / CACHE_FILE, model_id, "onnx-int8")
    _, found, counts = reader.lookup_with_tokens(texts)
    reader.close()
    expected = lazy_artifact_backend(artifact, offline=True).count_tokens(texts)
    assert found.all()
    assert counts == expected


def test_cached_screening_uses_stored_counts(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    options = TagOptions(
        model_dir=small_model,
        executor="local",
        show_progress=False,
        no_history=True,
        overwrite=True,
    )
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).drop("tag").head(60)
    dump = tmp_path / "dump.parquet"
    frame.write_parquet(dump)
    first = tag(dump, tmp_path / "first.parquet", config, options)
    # A stored count over the limit must make the cached run truncate the row.
    connection = sqlite3.connect(tmp_path / "state" / CACHE_FILE)
    connection.execute(
        "UPDATE embeddings SET tokens = 10000 WHERE key = "
        "(SELECT key FROM embeddings LIMIT 1)"
    )
    connection.commit()
    connection.close()

    second = tag(dump, tmp_path / "second.parquet", config, options)

    embedded = first.rows_read - first.rows_duplicate_exact - first.rows_rejected
    assert second.cached_rows == embedded
    assert second.rows_truncated == first.rows_truncated + 1


@pytest.mark.parametrize(
    "text",
    [
        "Plain ASCII, with punctuation!",
        "See https://www.Example.com/page/?utm_source=x&id=7#top now",
        "Café naïve résumé",
        "東京 and ÅNGSTRÖM",
        "e\u0301 combining",
        "ﬁ ligature ①",
        "",
    ],
)
def test_normalise_matches_character_loop(text):
    assert normalise_text(text) == reference_normalise(text)


def test_normalise_matches_on_sample():
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False)
    for column in ("title", "description"):
        for value in frame[column].to_list():
            assert normalise_text(value) == reference_normalise(value)


def reference_normalise(text):
    """Normalise with the per-character loop for every text, ASCII or not."""
    import unicodedata

    from tagcli.dedupe import _URL, normalise_url

    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text)
    text = _URL.sub(lambda match: " " + normalise_url(match.group(0)) + " ", text)
    text = text.casefold()
    return "".join(
        char
        for char in text
        if char.isalnum() or unicodedata.category(char).startswith("M")
    )
