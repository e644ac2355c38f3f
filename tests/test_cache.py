"""The SQLite embedding cache, and `tagcli tag` using it in-process and on Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import SAMPLE_BATCH, SAMPLE_CSV, read_output, run_cli, write_config

from tagcli.cache import CACHE_FILE, EmbeddingCache
from tagcli.config import load_config
from tagcli.pipeline import TagOptions, tag

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


def tag_summary(input_path, output, config, model, executor="local", use_cache=True):
    options = TagOptions(
        model_dir=model,
        executor=executor,
        overwrite=True,
        show_progress=False,
        use_cache=use_cache,
    )
    return tag(input_path, output, config, options)


def cache_rows(state_dir: Path) -> int:
    with EmbeddingCache(state_dir, "any", "any", max_rows=1) as cache:
        return cache.count()


def test_second_run_embeds_nothing(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    rows = pl.read_parquet(SAMPLE_BATCH).height

    first = tag_summary(SAMPLE_BATCH, tmp_path / "first.parquet", config, small_model)
    second = tag_summary(SAMPLE_BATCH, tmp_path / "second.parquet", config, small_model)

    assert first.cached_rows == 0
    assert second.cached_rows == rows
    assert cache_rows(tmp_path / "state") == rows
    assert read_output(tmp_path / "first.parquet").equals(
        read_output(tmp_path / "second.parquet")
    )


@pytest.mark.usefixtures("ray_local")
def test_cached_rerun_reports_nothing_embedded(tmp_path, small_model):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    options = ["--model", small_model, "--executor", "ray"]

    first = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "a.csv", *options, config=config
    )
    second = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "b.csv", *options, config=config
    )

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    # Every row came from the cache, so Ray never started.
    assert "embedded nothing, 200 row(s) from the embedding cache" in second.output
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_no_cache_leaves_state_untouched(tmp_path, small_model):
    config = write_config(tmp_path, paths={"state_dir": "state"})

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", small_model,
        "--no-cache", config=config,
    )

    assert result.exit_code == 0, result.output
    assert not (tmp_path / "state" / CACHE_FILE).exists()
    assert "from the embedding cache" not in result.output


def test_other_backend_misses_cache(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    other = tmp_path / "other-backend-model"
    shutil.copytree(small_model, other)
    manifest_path = other / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["embedding"]["backend"] = "onnx-int8"
    manifest_path.write_text(json.dumps(manifest))

    tag_summary(SAMPLE_BATCH, tmp_path / "a.parquet", config, small_model)
    summary = tag_summary(SAMPLE_BATCH, tmp_path / "b.parquet", config, other)

    assert summary.cached_rows == 0


def test_tag_trims_to_cache_max_rows(tmp_path, small_model):
    config = load_config(
        write_config(
            tmp_path,
            paths={"state_dir": "state"},
            embedding={"cache_max_rows": 50},
        )
    )

    summary = tag_summary(SAMPLE_BATCH, tmp_path / "out.parquet", config, small_model)

    assert summary.rows_written == pl.read_parquet(SAMPLE_BATCH).height
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
    tag_summary(seen, tmp_path / "seen.tagged.parquet", config, small_model)

    partly = tag_summary(full, tmp_path / "partly.parquet", config, small_model, "ray")
    uncached = tag_summary(
        full, tmp_path / "uncached.parquet", config, small_model, "ray", False
    )
    cached = tag_summary(full, tmp_path / "cached.parquet", config, small_model, "ray")

    assert partly.cached_rows == 100
    assert partly.workers >= 1
    assert cached.cached_rows == 300
    # Fully cached: no row went to Ray, so no actor was planned.
    assert cached.workers == 0
    expected = read_output(tmp_path / "uncached.parquet")
    for name in ("partly.parquet", "cached.parquet"):
        tagged = read_output(tmp_path / name)
        assert tagged.columns == expected.columns
        assert tagged["id"].to_list() == frame["id"].to_list()
        assert tagged["tag"].to_list() == expected["tag"].to_list()
        difference = (tagged["confidence"] - expected["confidence"]).abs().max()
        assert difference < 1e-5


def test_corrupt_cache_names_file_and_fix(tmp_path, small_model):
    state = tmp_path / "state"
    state.mkdir()
    (state / CACHE_FILE).write_bytes(b"this is not an SQLite database" * 100)
    config = write_config(tmp_path, paths={"state_dir": "state"})

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", small_model,
        config=config,
    )

    assert result.exit_code == 3
    assert str(state / CACHE_FILE) in result.output
    assert "--no-cache" in result.output
    assert not (tmp_path / "out.parquet").exists()
