"""Re-tagging cached text: no model load, only new rows embedded, executor choice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import polars as pl
import pytest
from conftest import REPO, SAMPLE_BATCH, SAMPLE_CSV, read_output, write_config

from tagcli import lazy_backend
from tagcli.cache import CACHE_FILE
from tagcli.cached_tagging import CacheSpec
from tagcli.config import load_config
from tagcli.executor_choice import CachedRowCounter, executor_reason
from tagcli.pipeline import TagOptions, choose_executor, tag


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


def embedded_rows(summary) -> int:
    """Rows a run classified: exact duplicates and rejected rows are not embedded."""
    return summary.rows_read - summary.rows_duplicate_exact - summary.rows_rejected


def test_cached_rerun_loads_no_model(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    loads_before = lazy_backend.models_loaded

    first = tag_summary(SAMPLE_CSV, tmp_path / "first.parquet", config, small_model)
    loads_after_first = lazy_backend.models_loaded
    texts_after_first = lazy_backend.texts_embedded
    second = tag_summary(SAMPLE_CSV, tmp_path / "second.parquet", config, small_model)

    assert loads_after_first == loads_before + 1
    assert lazy_backend.models_loaded == loads_after_first
    assert lazy_backend.texts_embedded == texts_after_first
    assert first.cached_rows == 0
    assert second.cached_rows == embedded_rows(second) == embedded_rows(first)
    first_rows = read_output(tmp_path / "first.parquet")
    second_rows = read_output(tmp_path / "second.parquet")
    assert any(name.startswith("prob_") for name in first_rows.columns)
    assert second_rows.equals(first_rows)
    assert second.rows_truncated == first.rows_truncated
    assert second.rows_rejected == first.rows_rejected


def test_cached_rerun_imports_no_runtime(tmp_path, small_model):
    # A fresh process per run, so the modules the first run imported do not
    # hide what the cached run imports.
    config = write_config(tmp_path, paths={"state_dir": "state"})
    script = f"""
import logging
import sys
from pathlib import Path
from tagcli import lazy_backend
from tagcli.config import load_config
from tagcli.pipeline import TagOptions, tag
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
options = TagOptions(model_dir=Path({str(small_model)!r}), executor="local",
                     show_progress=False, no_history=True, overwrite=True)
summary = tag(Path({str(SAMPLE_BATCH)!r}), sys.argv[1],
              load_config(Path({str(config)!r})), options)
print(summary.cached_rows)
print(lazy_backend.models_loaded)
heavy = ("onnxruntime", "torch", "sentence_transformers", "transformers", "ray")
print(sorted(name for name in heavy if name in sys.modules))
"""

    def run(output):
        return subprocess.run(
            [sys.executable, "-c", script, str(output)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(REPO)},
            timeout=600,
        )

    first = run(tmp_path / "first.parquet")
    second = run(tmp_path / "second.parquet")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "Loaded the onnx-int8 embedding model" in first.stderr
    assert "Loaded the onnx-int8 embedding model" not in second.stderr
    first_cached, first_loads, first_modules = first.stdout.strip().splitlines()
    cached, loads, modules = second.stdout.strip().splitlines()
    assert first_cached == "0"
    assert first_loads == "1"
    assert "onnxruntime" in first_modules
    assert int(cached) > 0
    assert loads == "0"
    assert modules == "[]"


def test_half_cached_run_embeds_missing_rows(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).drop("tag").head(200)
    seen = tmp_path / "seen.parquet"
    frame.gather_every(2).write_parquet(seen)
    full = tmp_path / "full.parquet"
    frame.write_parquet(full)
    first = tag_summary(seen, tmp_path / "seen.tagged.parquet", config, small_model)
    texts_before = lazy_backend.texts_embedded

    partly = tag_summary(full, tmp_path / "full.tagged.parquet", config, small_model)

    embedded_now = lazy_backend.texts_embedded - texts_before
    assert partly.cached_rows == embedded_rows(first)
    assert embedded_now == embedded_rows(partly) - partly.cached_rows
    assert 0 < embedded_now < embedded_rows(partly)
    # The rows found in the cache keep the first run's tags and probabilities.
    earlier = read_output(tmp_path / "seen.tagged.parquet")
    now = read_output(tmp_path / "full.tagged.parquet")
    joined = earlier.join(now, on="id", suffix="_now")
    assert joined.height == earlier.height
    for name in [column for column in earlier.columns if column.startswith("prob_")]:
        assert joined[name].to_list() == joined[name + "_now"].to_list()
    assert joined["tag"].to_list() == joined["tag_now"].to_list()


def test_counter_marks_cached_rows(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).drop("tag").head(90)
    seen = tmp_path / "seen.csv"
    frame.head(30).write_csv(seen)
    full = tmp_path / "full.csv"
    frame.write_csv(full)
    first = tag_summary(seen, tmp_path / "seen.tagged.csv", config, small_model)
    model_id = load_model_id(small_model)
    spec = CacheSpec(tmp_path / "state" / CACHE_FILE, model_id, "onnx-int8")
    counter = CachedRowCounter(spec)

    counter.add(frame["title"].to_list(), frame["description"].to_list())

    assert counter.rows == 90
    assert counter.cached_rows == embedded_rows(first) == 30
    assert counter.rows_to_embed() == 60
    # Rows 30 and 31 as exact duplicates of earlier rows: never embedded.
    assert counter.rows_to_embed([30, 31]) == 58
    assert counter.rows_to_embed([0, 30]) == 59
    counter.close()


def test_counter_on_missing_cache(tmp_path):
    spec = CacheSpec(tmp_path / "state" / CACHE_FILE, "model", "onnx-int8")
    counter = CachedRowCounter(spec)

    counter.add(["a title", None], ["a description", "another"])

    assert counter.cached_rows == 0
    assert counter.rows_to_embed() == 2


@pytest.mark.parametrize("keep_duplicates", [False, True])
def test_auto_stays_local_when_cached(tmp_path, small_model, caplog, keep_duplicates):
    # 50 rows is below the sample batch's size, so auto would start Ray.
    config = load_config(
        write_config(
            tmp_path, paths={"state_dir": "state"}, ray={"max_local_rows": 50}
        )
    )
    options = dict(keep_duplicates=keep_duplicates)
    first = tag_summary(
        SAMPLE_BATCH, tmp_path / "first.parquet", config, small_model, **options
    )
    assert first.rows_read > 50

    with caplog.at_level(logging.INFO, logger="tagcli"):
        second = tag_summary(
            SAMPLE_BATCH, tmp_path / "second.parquet", config, small_model, "auto",
            **options,
        )

    assert second.executor == "local"
    assert second.workers == 1
    assert second.cached_rows == embedded_rows(second)
    choice = [r.message for r in caplog.records if "with executor" in r.message]
    assert len(choice) == 1
    assert "with executor local" in choice[0]
    assert f"0 of {second.rows_read} rows need embedding" in choice[0]


def test_auto_without_cache_names_limit(tmp_path, small_model, caplog):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))

    with caplog.at_level(logging.INFO, logger="tagcli"):
        summary = tag_summary(
            SAMPLE_BATCH, tmp_path / "out.parquet", config, small_model, "auto"
        )

    assert summary.executor == "local"
    choice = [r.message for r in caplog.records if "with executor" in r.message]
    assert len(choice) == 1
    assert "at most [ray] max_local_rows (100000)" in choice[0]


@pytest.mark.parametrize(
    ("requested", "address", "rows_to_embed", "expected"),
    [
        ("auto", "", 100, "local"),
        ("auto", "", 101, "ray"),
        ("auto", "", None, "ray"),
        ("auto", "127.0.0.1:6379", 0, "ray"),
        ("ray", "", 0, "ray"),
    ],
)
def test_choice_counts_rows_to_embed(requested, address, rows_to_embed, expected):
    chosen = choose_executor(requested, 500, address, 100, rows_to_embed)

    assert chosen == expected


def test_reason_names_rows_and_limit():
    cached = executor_reason("auto", 500, "", 100, 40)
    uncached = executor_reason("auto", 500, "", 100, 400)

    assert cached == (
        "40 of 500 rows need embedding after the embedding cache and exact "
        "duplicates, at most [ray] max_local_rows (100)"
    )
    assert uncached.endswith("over [ray] max_local_rows (100)")
    assert executor_reason("ray", 500, "", 100) == "--executor ray"
    assert "127.0.0.1:6379" in executor_reason("auto", 5, "127.0.0.1:6379", 100)


def load_model_id(model) -> str:
    import json

    return json.loads((model / "manifest.json").read_text())["embedding"]["model_id"]
