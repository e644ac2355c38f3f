"""The SQLite embedding cache, and `tagcli tag` using it in-process and on Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import SAMPLE_BATCH, SAMPLE_CSV, read_output, run_cli, write_config

from tagcli.cache import CACHE_FILE, EmbeddingCache
from tagcli.config import load_config
from tagcli.model import load_artifact
from tagcli.pipeline import TagOptions, tag
from tagcli.text import compose_text

REPO = Path(__file__).resolve().parent.parent


def unit_vectors(rows: int, dimension: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(
        np.float32
    )


def test_store_then_lookup(tmp_path):
    vectors = unit_vectors(3)
    with EmbeddingCache(tmp_path, "model-a", "backend-a", max_rows=10) as cache:
        cache.store(["one", "two", "three"], vectors)
        found_vectors, found = cache.lookup(["two", "four", "one"])

    assert found.tolist() == [True, False, True]
    assert np.array_equal(found_vectors[0], vectors[1])
    assert np.array_equal(found_vectors[2], vectors[0])
    assert not found_vectors[1].any()
    assert cache.stats.hits == 2
    assert cache.stats.misses == 1
    assert cache.stats.written == 3


def test_lookup_of_nothing_cached(tmp_path):
    with EmbeddingCache(tmp_path, "model-a", "backend-a", max_rows=10) as cache:
        vectors, found = cache.lookup(["never stored"])

    assert vectors is None
    assert found.tolist() == [False]


def test_keys_separate_model_and_backend(tmp_path):
    with EmbeddingCache(tmp_path, "model-a", "backend-a", max_rows=10) as cache:
        cache.store(["shared text"], unit_vectors(1))
    other_model = EmbeddingCache(tmp_path, "model-b", "backend-a", max_rows=10)
    other_backend = EmbeddingCache(tmp_path, "model-a", "backend-b", max_rows=10)
    same = EmbeddingCache(tmp_path, "model-a", "backend-a", max_rows=10)

    assert not other_model.lookup(["shared text"])[1].any()
    assert not other_backend.lookup(["shared text"])[1].any()
    assert same.lookup(["shared text"])[1].all()
    for cache in (other_model, other_backend, same):
        cache.close()


def test_trimming_drops_least_recently_used(tmp_path):
    with EmbeddingCache(tmp_path, "model-a", "backend-a", max_rows=3) as cache:
        cache.store(["a", "b"], unit_vectors(2))
        cache.store(["c"], unit_vectors(1, seed=2))
        # "a" is now the most recently used, so "b" is the oldest.
        cache.lookup(["a"])
        cache.store(["d"], unit_vectors(1, seed=1))
        _, found = cache.lookup(["a", "b", "c", "d"])
        count = cache.count()

    assert count == 3
    assert found.tolist() == [True, False, True, True]
    assert cache.stats.trimmed == 1


def test_two_processes_write_at_once(tmp_path):
    writer = (
        "import sys\n"
        "import numpy as np\n"
        "from tagcli.cache import EmbeddingCache\n"
        "name = sys.argv[2]\n"
        "with EmbeddingCache(sys.argv[1], 'model', 'backend', 100000) as cache:\n"
        "    for batch in range(40):\n"
        "        texts = [f'{name}-{batch}-{i}' for i in range(25)]\n"
        "        cache.store(texts, np.ones((25, 8), np.float32))\n"
        "        cache.lookup(texts)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", writer, str(tmp_path), name],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("first", "second")
    ]
    errors = [process.communicate(timeout=300)[1] for process in writers]

    assert [process.returncode for process in writers] == [0, 0], errors
    with EmbeddingCache(tmp_path, "model", "backend", 100000) as cache:
        assert cache.count() == 2 * 40 * 25


def tag_summary(input_path, output, config, model, executor="local", **options):
    """Run `tag` without the history, which would drop every re-tagged row."""
    settings = dict(
        model_dir=model,
        executor=executor,
        overwrite=True,
        show_progress=False,
        no_history=True,
    )
    settings.update(options)
    return tag(input_path, output, config, TagOptions(**settings))


def cache_rows(state_dir: Path) -> int:
    with EmbeddingCache(state_dir, "any", "any", max_rows=1) as cache:
        return cache.count()


def embedded_rows(summary) -> int:
    """Rows a run classified: exact duplicates and rejected rows are not embedded."""
    return summary.rows_read - summary.rows_duplicate_exact - summary.rows_rejected


def test_second_run_embeds_nothing(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))

    first = tag_summary(SAMPLE_BATCH, tmp_path / "first.parquet", config, small_model)
    second = tag_summary(SAMPLE_BATCH, tmp_path / "second.parquet", config, small_model)

    assert first.cached_rows == 0
    assert embedded_rows(second) > 0
    assert second.cached_rows == embedded_rows(second)
    assert cache_rows(tmp_path / "state") == embedded_rows(first)
    assert read_output(tmp_path / "first.parquet").equals(
        read_output(tmp_path / "second.parquet")
    )


@pytest.mark.usefixtures("ray_local")
def test_cached_rerun_on_ray_reports_rows(tmp_path, small_model):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    options = ["--model", small_model, "--executor", "ray", "--no-history"]

    first = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "a.csv", *options, config=config
    )
    second = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "b.csv", *options, config=config
    )

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "0 row(s) from the embedding cache" in first.output
    rows = cache_rows(tmp_path / "state")
    assert f"{rows} row(s) from the embedding cache" in second.output
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_no_cache_leaves_state_untouched(tmp_path, small_model):
    config = write_config(tmp_path, paths={"state_dir": "state"})

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", small_model,
        "--no-cache", "--no-history", config=config,
    )

    assert result.exit_code == 0, result.output
    assert not (tmp_path / "state" / CACHE_FILE).exists()
    assert "from the embedding cache" not in result.output


def test_cache_key_uses_manifest_backend(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    manifest = json.loads((small_model / "manifest.json").read_text())
    model_id = manifest["embedding"]["model_id"]
    output = tmp_path / "out.parquet"

    tag_summary(SAMPLE_BATCH, output, config, small_model, keep_duplicates=True)

    tagged = read_output(output)
    texts = [
        compose_text(title, description)
        for title, description in zip(tagged["title"], tagged["description"])
    ]
    state = tmp_path / "state"
    with EmbeddingCache(state, model_id, "onnx-int8", max_rows=10**6) as cache:
        assert cache.lookup(texts)[1].all()
    with EmbeddingCache(state, model_id, "torch", max_rows=10**6) as cache:
        assert not cache.lookup(texts)[1].any()


def test_tag_trims_to_cache_max_rows(tmp_path, small_model):
    config = load_config(
        write_config(
            tmp_path,
            paths={"state_dir": "state"},
            embedding={"cache_max_rows": 50},
        )
    )

    summary = tag_summary(SAMPLE_BATCH, tmp_path / "out.parquet", config, small_model)

    assert embedded_rows(summary) > 50
    assert cache_rows(tmp_path / "state") == 50


@pytest.mark.usefixtures("ray_local")
def test_partly_cached_run_on_ray(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).drop("tag").head(300)
    # Every third row is cached first, so cached and embedded rows interleave.
    seen = tmp_path / "seen.parquet"
    frame.gather_every(3).write_parquet(seen)
    full = tmp_path / "full.parquet"
    frame.write_parquet(full)
    first = tag_summary(seen, tmp_path / "seen.tagged.parquet", config, small_model)

    partly = tag_summary(full, tmp_path / "partly.parquet", config, small_model, "ray")
    uncached = tag_summary(
        full, tmp_path / "uncached.parquet", config, small_model, "ray", use_cache=False
    )
    cached = tag_summary(full, tmp_path / "cached.parquet", config, small_model, "ray")

    assert partly.cached_rows >= embedded_rows(first)
    assert partly.cached_rows < embedded_rows(partly)
    assert partly.workers >= 1
    assert uncached.cached_rows is None
    assert cached.cached_rows == embedded_rows(cached)
    # onnx-int8 embeddings depend on which texts share an encoder batch, so
    # the reference is the head applied to the vectors in the cache, which
    # both runs used: partly stored its new ones, and cached read them all.
    uncached_rows = read_output(tmp_path / "uncached.parquet")
    artifact = load_artifact(small_model, config.tags.approved)
    model_id = artifact.manifest["embedding"]["model_id"]
    for name in ("partly.parquet", "cached.parquet"):
        tagged = read_output(tmp_path / name)
        assert tagged.columns == uncached_rows.columns
        assert tagged["id"].to_list() == uncached_rows["id"].to_list()
        texts = [
            compose_text(title, description)
            for title, description in zip(tagged["title"], tagged["description"])
        ]
        with EmbeddingCache(tmp_path / "state", model_id, "onnx-int8", 10**6) as cache:
            vectors, found = cache.lookup(texts)
        assert found.all()
        probabilities = artifact.head.predict_proba(vectors, texts)
        expected_tags = [artifact.tags[i] for i in probabilities.argmax(axis=1)]
        assert tagged["tag"].to_list() == expected_tags
        difference = np.abs(tagged["confidence"].to_numpy() - probabilities.max(axis=1))
        assert difference.max() < 1e-6


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_cached_rows_feed_duplicates_and_history(
    tmp_path, small_model, executor, request
):
    if executor == "ray":
        request.getfixturevalue("ray_local")
    # The first run fills the cache without a history. The second, with the
    # history on, takes every embedding from the cache: its near duplicates
    # and history must match a run that embedded every row.
    # The sample has no pair at the default 0.95; 0.85 finds a few.
    near = {"near_threshold": 0.85}
    cached_config = load_config(
        write_config(tmp_path, paths={"state_dir": "a"}, dedupe=near)
    )
    tag_summary(SAMPLE_CSV, tmp_path / "fill.parquet", cached_config, small_model)
    options = dict(no_history=False)
    cached = tag_summary(
        SAMPLE_CSV, tmp_path / "cached.parquet", cached_config, small_model,
        executor, **options,
    )
    fresh_config = load_config(
        write_config(tmp_path, paths={"state_dir": "b"}, dedupe=near)
    )
    fresh = tag_summary(
        SAMPLE_CSV, tmp_path / "fresh.parquet", fresh_config, small_model,
        executor, use_cache=False, **options,
    )

    assert cached.cached_rows == embedded_rows(cached)
    assert cached.rows_duplicate_near > 0
    assert cached.rows_duplicate_exact == fresh.rows_duplicate_exact
    assert cached.rows_duplicate_near == fresh.rows_duplicate_near
    assert cached.history_rows == fresh.history_rows
    assert (
        cached.rows_written + cached.rows_duplicate + cached.rows_rejected
        == cached.rows_read
    )
    kept = read_output(tmp_path / "cached.parquet")
    assert kept["id"].to_list() == read_output(tmp_path / "fresh.parquet")["id"].to_list()
    assert "__embedding" not in kept.columns
    assert "__cached" not in kept.columns


def test_corrupt_cache_names_file_and_fix(tmp_path, small_model):
    state = tmp_path / "state"
    state.mkdir()
    (state / CACHE_FILE).write_bytes(b"this is not an SQLite database" * 100)
    config = write_config(tmp_path, paths={"state_dir": "state"})

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", small_model,
        "--no-history", config=config,
    )

    assert result.exit_code == 3
    assert str(state / CACHE_FILE) in result.output
    assert "--no-cache" in result.output
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.usefixtures("ray_local")
def test_remote_reader_in_other_process(tmp_path):
    import ray

    from tagcli.cache_service import RemoteCacheReader, start_cache_service
    from tagcli.cached_tagging import CacheSpec

    vectors = unit_vectors(3)
    with EmbeddingCache(tmp_path / "state", "model-a", "onnx-int8", max_rows=100) as cache:
        cache.store(["first", "second"], vectors[:2])
    spec = CacheSpec(tmp_path / "state" / CACHE_FILE, "model-a", "onnx-int8")
    service = start_cache_service(spec)

    @ray.remote(num_cpus=0)
    def look_up_elsewhere(handle, texts):
        # Only the actor handle reaches this worker process, not the file path.
        embeddings, found, _ = RemoteCacheReader(handle).lookup_with_tokens(texts)
        return os.getpid(), embeddings, found

    worker_pid, embeddings, found = ray.get(
        look_up_elsewhere.remote(service, ["second", "unknown", "first"])
    )

    assert worker_pid != os.getpid()
    assert found.tolist() == [True, False, True]
    assert np.allclose(embeddings[0], vectors[1], atol=1e-3)
    assert np.allclose(embeddings[2], vectors[0], atol=1e-3)
    ray.kill(service)
