"""The compressed near-duplicate search: PQ codes in memory, exact vectors on disk.

Runs `tagcli tag` on real files with the bundled embedding model and a
lowered `[dedupe] exact_search_max_rows`, so the search switches to the
faiss IVF-PQ index after a few dozen rows.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from conftest import read_output, run_cli, write_config

from tagcli.history import SegmentWriter, history_lock, read_history
from tagcli.near import IVF_KIND, IdList, VectorIndex, pq_subvectors
from tagcli.vector_store import VectorStore

# Sample rows that are different items about one topic (see test_dedupe.py):
# cosine similarities of 0.82 to 0.85 to each other, below the threshold.
SAME_TOPIC_IDS = ["2387", "1506", "580", "989", "255"]


def unit_vectors(rows: int, dimension: int, seed: int):
    vectors = np.random.default_rng(seed).normal(size=(rows, dimension))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def near_copies(vectors, seed: int, scale: float = 0.03):
    noise = np.random.default_rng(seed).normal(scale=scale, size=vectors.shape)
    noisy = vectors + noise
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    return noisy.astype(np.float32)


def tag(batch, output, model, config, *extra):
    # -v logs the switch to the compressed search, at INFO.
    arguments = ["-v", "tag", batch, "-o", output, "--model", model]
    arguments += ["--executor", "local", *extra]
    return run_cli(*arguments, config=config)


def updated_copies(rows: pl.DataFrame) -> pl.DataFrame:
    """Return `rows` reposted with " (updated)" after the title: near duplicates."""
    return rows.with_columns(
        (pl.col("id") + "-copy").alias("id"),
        (pl.col("title") + " (updated)").alias("title"),
    )


def test_vector_store_reads_back_appended_rows(tmp_path):
    vectors = unit_vectors(300, 24, seed=3)
    store = VectorStore(24, spill_dir=tmp_path)
    store.append(vectors[:100])
    store.append(vectors[100:])

    positions = np.array([299, 0, 150, 150, 99, 100])
    read = store.read(positions)
    store.close()

    assert store.size == 300
    np.testing.assert_array_equal(
        read, vectors[positions].astype(np.float16).astype(np.float32)
    )


def test_vector_store_rejects_position_outside(tmp_path):
    store = VectorStore(8, spill_dir=tmp_path)
    store.append(unit_vectors(5, 8, seed=4))

    with pytest.raises(IndexError, match="outside the store of 5 vectors"):
        store.read(np.array([5]))
    store.close()


def test_compressed_index_reports_exact_cosine(tmp_path):
    history = unit_vectors(4000, 64, seed=5)
    index = VectorIndex(64, exact_limit=1000, spill_dir=tmp_path)
    for start in range(0, len(history), 500):
        index.add(history[start : start + 500])
    planted = near_copies(history[::200], seed=6)

    similarity, position = index.search(planted)
    index.close()

    import faiss

    assert isinstance(index.faiss_index, faiss.IndexIVFPQ)
    assert index.faiss_index.code_size == pq_subvectors(64) == 8
    assert index._matrix is None
    assert position.tolist() == list(range(0, 4000, 200))
    # The exact cosine against the float16 copy on disk, not the PQ estimate.
    stored = history[::200].astype(np.float16).astype(np.float32)
    expected = (planted * stored).sum(axis=1)
    np.testing.assert_allclose(similarity, expected, rtol=0, atol=1e-5)


def test_compressed_index_unmatched_query_scores_low(tmp_path):
    index = VectorIndex(64, exact_limit=1000, spill_dir=tmp_path)
    index.add(unit_vectors(3000, 64, seed=7))
    unrelated = unit_vectors(50, 64, seed=8)

    similarity, position = index.search(unrelated)
    index.close()

    assert (position >= 0).all()
    assert (similarity < 0.9).all()


def test_id_list_returns_ids_across_chunks():
    ids = IdList()
    for start in range(0, 1000, 3):
        ids.extend(f"row-{i}" for i in range(start, min(start + 3, 1000)))
    ids.extend([])

    assert len(ids) == 1000
    assert ids[0] == "row-0"
    assert ids[457] == "row-457"
    assert ids[999] == "row-999"
    with pytest.raises(IndexError):
        ids[1000]


def test_history_vectors_read_from_segment_files(tmp_path):
    vectors = unit_vectors(3000, 32, seed=9)
    keys = np.array([i.to_bytes(16, "big") for i in range(3000)], dtype="S16")
    ids = [f"row-{i}" for i in range(3000)]
    state = tmp_path / "state"
    with history_lock(state, 1):
        for start in (0, 1200):
            writer = SegmentWriter(read_history(state), "model", 32)
            for part in range(start, start + 1200, 400):
                chosen = slice(part, part + 400)
                writer.append(keys[chosen], ids[chosen], vectors[chosen])
            writer.commit()
    history = read_history(state)

    index = history.load_index(32, exact_limit=500)
    positions = np.array([0, 399, 400, 1199, 1200, 2399])
    read = index.store.read(positions)
    index.close()

    assert index.size == 2400
    assert index.store._spill is None
    np.testing.assert_array_equal(
        read, vectors[positions].astype(np.float16).astype(np.float32)
    )


def test_older_float16_index_rebuilt_as_pq(tmp_path):
    import faiss

    vectors = unit_vectors(3000, 32, seed=10)
    keys = np.array([i.to_bytes(16, "big") for i in range(3000)], dtype="S16")
    ids = [f"row-{i}" for i in range(3000)]
    state = tmp_path / "state"
    with history_lock(state, 1):
        writer = SegmentWriter(read_history(state), "model", 32)
        writer.append(keys, ids, vectors)
        writer.commit()
        # The layout of earlier versions: an IVF index with float16 vectors,
        # listed in index.json without a "kind".
        old = faiss.index_factory(32, "IVF40,SQfp16", faiss.METRIC_INNER_PRODUCT)
        old.train(vectors)
        old.add(vectors)
        faiss.write_index(old, str(state / "near-old.faiss"))
        data = json.loads((state / "index.json").read_text())
        data["near_index"] = {
            "file": "near-old.faiss",
            "rows": 3000,
            "trained_rows": 3000,
        }
        (state / "index.json").write_text(json.dumps(data))

        history = read_history(state)
        index = history.load_index(32, exact_limit=500)
        similarity, position = index.search(near_copies(vectors[::300], seed=11))
        SegmentWriter(history, "model", 32).commit(index)
        index.close()
    saved = read_history(state).near_index

    assert isinstance(index.faiss_index, faiss.IndexIVFPQ)
    assert position.tolist() == list(range(0, 3000, 300))
    assert (similarity > 0.95).all()
    assert saved["kind"] == IVF_KIND
    assert saved["rows"] == 3000
    assert not (state / "near-old.faiss").exists()
    reloaded = faiss.read_index(str(state / saved["file"]))
    assert isinstance(reloaded, faiss.IndexIVFPQ)


def test_tag_finds_copy_after_switch_to_pq(tmp_path, small_model, sample_frame):
    config = write_config(
        tmp_path,
        paths={"state_dir": "state"},
        dedupe={"exact_search_max_rows": 64},
        ray={"batch_size": 32},
    )
    rows = sample_frame.drop("tag").filter(~pl.col("id").is_in(SAME_TOPIC_IDS))
    first_rows = rows.head(150)
    first_rows.write_parquet(tmp_path / "first.parquet")
    first = tag(tmp_path / "first.parquet", tmp_path / "a.parquet", small_model, config)
    assert first.exit_code == 0, first.output
    assert "switched to a compressed IVF-PQ index" in first.output
    history = read_history(tmp_path / "state")
    assert history.near_index["kind"] == IVF_KIND

    # Copies of kept history rows, then rows that match nothing in the history
    # or in the batch: same-topic items and sample rows not tagged before.
    kept_first = read_output(tmp_path / "a.parquet")["id"].to_list()
    originals = first_rows.filter(pl.col("id").is_in(kept_first[:10]))
    unmatched = pl.concat(
        [
            sample_frame.drop("tag").filter(pl.col("id").is_in(SAME_TOPIC_IDS)),
            rows.slice(200, 40),
        ]
    )
    pl.concat([updated_copies(originals), unmatched]).write_parquet(
        tmp_path / "second.parquet"
    )
    second = tag(
        tmp_path / "second.parquet", tmp_path / "b.parquet", small_model, config
    )

    assert second.exit_code == 0, second.output
    # The saved index is loaded, not trained again.
    assert "Training the near-duplicate IVF index" not in second.output
    duplicates = read_output(tmp_path / "b.duplicates.parquet")
    tagged = read_output(tmp_path / "b.parquet")
    by_id = {row["id"]: row for row in duplicates.iter_rows(named=True)}
    for original in originals["id"].to_list():
        copy = by_id[original + "-copy"]
        assert copy["duplicate_of"] == original
        assert copy["reason"] == "near"
        assert 0.95 <= copy["similarity"] <= 1.0
    assert sorted(tagged["id"].to_list()) == sorted(unmatched["id"].to_list())
    assert duplicates.height == originals.height


def test_tag_switches_to_pq_within_run(tmp_path, small_model, sample_frame):
    config = write_config(
        tmp_path,
        dedupe={"exact_search_max_rows": 64},
        ray={"batch_size": 32},
    )
    rows = sample_frame.drop("tag").head(120)
    originals = rows.slice(5, 6)
    # The copies come after 120 rows, so past the switch at 64 kept rows.
    pl.concat([rows, updated_copies(originals)]).write_parquet(
        tmp_path / "batch.parquet"
    )

    result = tag(
        tmp_path / "batch.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--no-history",
    )

    assert result.exit_code == 0, result.output
    assert "switched to a compressed IVF-PQ index" in result.output
    duplicates = read_output(tmp_path / "out.duplicates.parquet")
    tagged = read_output(tmp_path / "out.parquet")
    copies = duplicates.filter(pl.col("id").str.ends_with("-copy"))
    assert sorted(copies["duplicate_of"].to_list()) == sorted(originals["id"].to_list())
    assert set(copies["reason"].to_list()) == {"near"}
    assert tagged.height + duplicates.height == rows.height + originals.height
    for original in originals["id"].to_list():
        assert original in tagged["id"].to_list()
    assert not (tmp_path / "state" / "index.json").exists()
