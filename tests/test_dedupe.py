"""Duplicates: normalised keys, exact and near duplicates in `tag` and `train`, the history.

Runs use real files, the bundled embedding model and, for the Ray path, the
session's local Ray instance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import read_output, run_cli, write_config

from tagcli.dedupe import content_key, normalise_text, normalise_url
from tagcli.history import history_lock, read_history
from tagcli.near import VectorIndex

# Sample rows that are different items about one topic each: GitHub Actions
# for ML (2387, 1506, 580) and NLP talks by Rasa (989, 255). Their cosine
# similarities are 0.82 to 0.85, below the near threshold.
SAME_TOPIC_IDS = ["2387", "1506", "580", "989", "255"]
OTHER_IDS = ["6", "7", "9", "15"]


def sample_rows(sample_frame, ids: list[str]) -> pl.DataFrame:
    rows = sample_frame.filter(pl.col("id").is_in(ids)).drop("tag")
    return rows.sort(pl.col("id").cast(pl.Int64))


@pytest.fixture
def duplicate_batch(tmp_path, sample_frame) -> Path:
    """A batch with exact copies, a near copy and same-topic rows, as Parquet.

    - 9001 repeats 6 with other case, spacing, punctuation and a tracking URL.
    - 9002 repeats 7 exactly but was created earlier, so 9002 is kept and 7 dropped.
    - 9003 is 9 with "(updated)" after the title: a near duplicate.
    """
    base = sample_rows(sample_frame, OTHER_IDS + SAME_TOPIC_IDS)
    base = base.with_columns(
        pl.when(pl.col("id") == "6")
        .then(pl.col("description") + " Code: https://github.com/example/yolo")
        .otherwise(pl.col("description"))
        .alias("description")
    )
    row6 = base.filter(pl.col("id") == "6").row(0, named=True)
    row7 = base.filter(pl.col("id") == "7").row(0, named=True)
    row9 = base.filter(pl.col("id") == "9").row(0, named=True)
    copies = pl.DataFrame(
        [
            {
                "id": "9001",
                "created_on": "2020-03-01 10:00:00",
                "title": "  " + row6["title"].upper() + "!!",
                "description": row6["description"].replace(
                    "https://github.com/example/yolo",
                    "http://www.GitHub.com/example/yolo/?utm_source=twitter#readme",
                ),
            },
            {
                "id": "9002",
                "created_on": "2019-01-01 00:00:00",
                "title": row7["title"],
                "description": row7["description"],
            },
            {
                "id": "9003",
                "created_on": "2020-03-02 10:00:00",
                "title": row9["title"] + " (updated)",
                "description": row9["description"],
            },
        ]
    )
    path = tmp_path / "batch.parquet"
    pl.concat([base, copies]).write_parquet(path)
    return path


def tag_batch(batch: Path, output: Path, model: Path, config: Path, *extra: str):
    return run_cli("tag", batch, "-o", output, "--model", model, *extra, config=config)


def check_duplicates_of_batch(output: Path, duplicates_file: Path) -> None:
    tagged = read_output(output)
    duplicates = read_output(duplicates_file)
    by_id = {row["id"]: row for row in duplicates.iter_rows(named=True)}

    assert sorted(by_id) == ["7", "9001", "9003"]
    assert by_id["9001"]["duplicate_of"] == "6"
    assert by_id["9001"]["reason"] == "exact"
    assert float(by_id["9001"]["similarity"]) == 1.0
    assert by_id["7"]["duplicate_of"] == "9002"
    assert by_id["7"]["reason"] == "exact"
    assert by_id["9003"]["duplicate_of"] == "9"
    assert by_id["9003"]["reason"] == "near"
    assert float(by_id["9003"]["similarity"]) >= 0.95
    assert duplicates.columns == [
        "id",
        "created_on",
        "title",
        "description",
        "duplicate_of",
        "reason",
        "similarity",
    ]
    for same_topic in SAME_TOPIC_IDS:
        assert same_topic in tagged["id"].to_list()
    assert tagged.height == 12 - 3
    assert tagged["tag"].null_count() == 0


def test_normalise_ignores_case_spacing_punctuation():
    assert normalise_text("Hello,  World!") == normalise_text("hello world")
    assert normalise_text("ＦＵＬＬ width") == normalise_text("full width")
    assert content_key("A title", "Text.") == content_key(" a TITLE ", "text")
    assert content_key("A title", "Text") != content_key("Another title", "Text")


def test_normalise_url_drops_tracking_parts():
    expected = "example.com/post"
    assert normalise_url("https://www.example.com/post/") == expected
    assert normalise_url("http://example.com/post?utm_source=x&fbclid=1") == expected
    assert normalise_url("https://example.com/post#comments") == expected
    assert normalise_url("www.example.com/post?gclid=5&ref=hn") == expected
    assert normalise_url("https://example.com/post?page=2") == "example.com/post?page=2"


def test_key_keeps_title_and_description_apart():
    assert content_key("ab", "c") != content_key("a", "bc")


def test_exact_and_near_in_one_batch(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    output = tmp_path / "tagged.parquet"

    result = tag_batch(
        duplicate_batch, output, small_model, config, "--executor", "local"
    )

    assert result.exit_code == 0, result.output
    check_duplicates_of_batch(output, tmp_path / "tagged.duplicates.parquet")


@pytest.mark.usefixtures("ray_local")
def test_exact_and_near_on_ray(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    output = tmp_path / "tagged.parquet"

    result = tag_batch(
        duplicate_batch, output, small_model, config, "--executor", "ray"
    )

    assert result.exit_code == 0, result.output
    assert "on Ray" in result.output
    check_duplicates_of_batch(output, tmp_path / "tagged.duplicates.parquet")


@pytest.mark.usefixtures("ray_local")
def test_csv_folder_on_ray_numbers_rows(tmp_path, small_model, duplicate_batch):
    rows = pl.read_parquet(duplicate_batch)
    folder = tmp_path / "dump"
    folder.mkdir()
    rows.head(5).write_csv(folder / "a.csv")
    rows.slice(5).write_csv(folder / "b.csv")
    config = write_config(tmp_path, paths={"state_dir": "state"})
    output = tmp_path / "tagged.csv"

    result = tag_batch(folder, output, small_model, config, "--executor", "ray")

    assert result.exit_code == 0, result.output
    check_duplicates_of_batch(output, tmp_path / "tagged.duplicates.csv")


def test_empty_input_writes_no_duplicates(tmp_path, small_model, duplicate_batch):
    pl.read_parquet(duplicate_batch).head(0).write_parquet(tmp_path / "empty.parquet")
    config = write_config(tmp_path, paths={"state_dir": "state"})

    result = tag_batch(
        tmp_path / "empty.parquet", tmp_path / "out.parquet", small_model, config
    )

    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out.parquet").height == 0
    assert not (tmp_path / "out.duplicates.parquet").exists()
    assert "Duplicates written" not in result.output


def test_no_duplicates_removes_stale_file(tmp_path, small_model, sample_frame):
    rows = sample_rows(sample_frame, OTHER_IDS)
    rows.write_parquet(tmp_path / "unique.parquet")
    stale = tmp_path / "out.duplicates.parquet"
    stale.write_text("from an earlier run")
    config = write_config(tmp_path, paths={"state_dir": "state"})

    result = tag_batch(
        tmp_path / "unique.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--overwrite",
    )

    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out.parquet").height == len(OTHER_IDS)
    assert not stale.exists()


def test_folder_and_file_sidecars_differ(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})

    to_file = tag_batch(
        duplicate_batch, tmp_path / "fold.parquet", small_model, config, "--no-history"
    )
    to_folder = tag_batch(
        duplicate_batch, f"{tmp_path / 'fold'}/", small_model, config, "--no-history"
    )

    assert to_file.exit_code == 0, to_file.output
    assert to_folder.exit_code == 0, to_folder.output
    check_duplicates_of_batch(
        tmp_path / "fold.parquet", tmp_path / "fold.duplicates.parquet"
    )
    folder_duplicates = read_output(tmp_path / "fold-duplicates.parquet")
    assert folder_duplicates.height == 3


def test_history_of_other_model_is_rejected(tmp_path):
    from tagcli.errors import TagcliError
    from tagcli.history import History

    history = History(
        state_dir=tmp_path,
        segments=[{"file": "one.arrow", "rows": 1}],
        embedding_model="some-other-model",
        dimension=384,
    )

    with pytest.raises(TagcliError) as raised:
        history.check_model("sentence-transformers/all-MiniLM-L6-v2", 384)

    assert raised.value.exit_code == 2
    assert "tagcli history --clear" in str(raised.value)


def summary_counts(output: str) -> dict[str, int]:
    """Return the counts of the summary table printed by `tag`."""
    counts = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[1].isdigit():
            counts[cells[0]] = int(cells[1])
    return counts


def test_counts_add_up(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})

    result = tag_batch(
        duplicate_batch,
        tmp_path / "tagged.csv",
        small_model,
        config,
        "--executor",
        "local",
    )

    assert result.exit_code == 0, result.output
    counts = summary_counts(result.output)
    assert counts["read"] == 12
    assert counts["tagged"] == 9
    assert counts["duplicates"] == 3
    assert counts["exact"] == 2
    assert counts["near"] == 1
    assert counts["rejected"] == 0
    assert (
        counts["tagged"] + counts["duplicates"] + counts["rejected"] == counts["read"]
    )
    assert read_output(tmp_path / "tagged.duplicates.csv").height == 3


def test_second_run_tags_nothing_new(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    first = tag_batch(duplicate_batch, tmp_path / "first.parquet", small_model, config)
    assert first.exit_code == 0, first.output
    kept_first = read_output(tmp_path / "first.parquet")["id"].to_list()

    second = tag_batch(
        duplicate_batch, tmp_path / "second.parquet", small_model, config
    )

    assert second.exit_code == 0, second.output
    assert "History: 9 rows added, 9 in total." in first.output
    assert "History: 0 rows added, 9 in total." in second.output
    assert read_output(tmp_path / "second.parquet").height == 0
    duplicates = read_output(tmp_path / "second.duplicates.parquet")
    assert duplicates.height == 12
    by_id = {row["id"]: row for row in duplicates.iter_rows(named=True)}
    for kept in kept_first:
        assert by_id[kept]["duplicate_of"] == kept
        assert by_id[kept]["reason"] == "exact"
    # Rows the first run dropped match the rows it kept, again.
    assert by_id["9001"]["duplicate_of"] == "6"
    assert by_id["7"]["duplicate_of"] == "9002"
    assert by_id["9003"]["duplicate_of"] == "9"
    assert by_id["9003"]["reason"] == "near"
    assert read_history(tmp_path / "state").rows == len(kept_first)


def test_near_copy_of_history_row(tmp_path, small_model, sample_frame):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    first_batch = sample_rows(sample_frame, OTHER_IDS)
    first_batch.write_parquet(tmp_path / "first.parquet")
    edited = first_batch.head(1).with_columns(
        pl.lit("5000").alias("id"),
        (pl.col("title") + " (updated)").alias("title"),
    )
    topical = sample_rows(sample_frame, SAME_TOPIC_IDS)
    pl.concat([edited, topical]).write_parquet(tmp_path / "second.parquet")

    first = tag_batch(
        tmp_path / "first.parquet", tmp_path / "a.parquet", small_model, config
    )
    second = tag_batch(
        tmp_path / "second.parquet", tmp_path / "b.parquet", small_model, config
    )

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    duplicates = read_output(tmp_path / "b.duplicates.parquet")
    assert duplicates["id"].to_list() == ["5000"]
    assert duplicates["reason"].to_list() == ["near"]
    assert duplicates["duplicate_of"].to_list() == [first_batch["id"][0]]
    assert (
        read_output(tmp_path / "b.parquet")["id"].to_list() == topical["id"].to_list()
    )


def test_no_history_reads_and_writes_nothing(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    first = tag_batch(duplicate_batch, tmp_path / "a.parquet", small_model, config)
    assert first.exit_code == 0, first.output
    index_before = (tmp_path / "state" / "index.json").read_bytes()

    second = tag_batch(
        duplicate_batch, tmp_path / "b.parquet", small_model, config, "--no-history"
    )

    assert second.exit_code == 0, second.output
    assert read_output(tmp_path / "b.parquet").height == 9
    assert read_output(tmp_path / "b.duplicates.parquet").height == 3
    assert (tmp_path / "state" / "index.json").read_bytes() == index_before


def test_history_command_shows_and_clears(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    tagged = tag_batch(duplicate_batch, tmp_path / "a.parquet", small_model, config)
    assert tagged.exit_code == 0, tagged.output

    shown = run_cli("history", config=config)
    declined = CliRunnerWithInput("n\n").invoke("history", "--clear", config=config)
    after_decline = read_history(tmp_path / "state").rows
    no_answer = CliRunnerWithInput("").invoke("history", "--clear", config=config)
    after_no_answer = read_history(tmp_path / "state").rows
    cleared = run_cli("history", "--clear", "--yes", config=config)

    assert shown.exit_code == 0, shown.output
    assert "rows: 9" in shown.output
    assert str(tmp_path / "state") in shown.output
    assert "bytes: " in shown.output
    assert declined.exit_code == 2
    assert "nothing was cleared" in declined.output
    assert after_decline == 9
    assert no_answer.exit_code == 2
    assert "--yes" in no_answer.output
    assert "Aborted" not in no_answer.output
    assert after_no_answer == 9
    assert cleared.exit_code == 0, cleared.output
    assert read_history(tmp_path / "state").rows == 0
    assert list((tmp_path / "state" / "segments").iterdir()) == []
    # Clearing the history leaves the embedding cache in the same folder.
    assert (tmp_path / "state" / "embeddings.sqlite").exists()


def test_history_commit_keeps_cache(tmp_path, small_model, duplicate_batch):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    first = tag_batch(duplicate_batch, tmp_path / "first.parquet", small_model, config)
    assert first.exit_code == 0, first.output

    again = run_cli(
        "tag", duplicate_batch, "-o", tmp_path / "again.parquet", "--model",
        small_model, "--no-history", "--json", config=config,
    )

    assert again.exit_code == 0, again.output
    assert (tmp_path / "state" / "embeddings.sqlite").exists()
    lines = [line for line in again.output.splitlines() if line.startswith("{")]
    summary = json.loads(lines[0])
    assert summary["rows_tagged"] == 9
    # Every embedded row, the near duplicate included, comes from the cache.
    assert summary["rows_cached"] == summary["rows_read"] - summary["rows_duplicate_exact"]


class CliRunnerWithInput:
    """Invoke the real command with text on standard input, for confirmations."""

    def __init__(self, text: str) -> None:
        self.text = text

    def invoke(self, *args: str, config: Path):
        from click.testing import CliRunner

        from tagcli.cli import main

        arguments = ["--config", str(config), *args]
        return CliRunner().invoke(main, arguments, input=self.text)


def test_locked_history_exits_75(tmp_path, small_model, duplicate_batch):
    config = write_config(
        tmp_path, paths={"state_dir": "state"}, dedupe={"lock_timeout_seconds": 0.5}
    )

    with history_lock(tmp_path / "state", 1):
        result = tag_batch(duplicate_batch, tmp_path / "a.parquet", small_model, config)

    assert result.exit_code == 75
    assert "locked by another tagcli run" in result.output
    assert "lock_timeout_seconds" in result.output
    assert not (tmp_path / "a.parquet").exists()
    assert list(tmp_path.glob(".*.partial")) == []
    assert not (tmp_path / "a.duplicates.parquet").exists()


def test_killed_run_leaves_history_unchanged(tmp_path, small_model, sample_frame):
    config = write_config(
        tmp_path, paths={"state_dir": "state"}, ray={"batch_size": 16}
    )
    first_rows = sample_rows(sample_frame, OTHER_IDS)
    first_rows.write_parquet(tmp_path / "first.parquet")
    first = tag_batch(
        tmp_path / "first.parquet", tmp_path / "a.parquet", small_model, config
    )
    assert first.exit_code == 0, first.output
    state = tmp_path / "state"
    index_before = (state / "index.json").read_bytes()
    segments_before = sorted(path.name for path in (state / "segments").iterdir())
    # 300 distinct rows in batches of 16: the run writes its pending history
    # segment after the first batch, long before it finishes.
    sample_frame.drop("tag").slice(100, 300).write_parquet(tmp_path / "big.parquet")

    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tagcli",
            "--config",
            str(config),
            "tag",
            str(tmp_path / "big.parquet"),
            "-o",
            str(tmp_path / "b.parquet"),
            "--model",
            str(small_model),
            "--executor",
            "local",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        pending: list[Path] = []
        while time.monotonic() < deadline and not pending and job.poll() is None:
            time.sleep(0.2)
            pending = list((state / "segments").glob(".*.partial"))
        assert pending, "the run never started its history segment"
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()

    assert job.returncode == -signal.SIGKILL
    assert (state / "index.json").read_bytes() == index_before
    assert read_history(state).rows == 4
    assert not (tmp_path / "b.parquet").exists()

    again = tag_batch(
        tmp_path / "first.parquet", tmp_path / "c.parquet", small_model, config
    )
    assert again.exit_code == 0, again.output
    assert read_output(tmp_path / "c.parquet").height == 0
    assert (
        sorted(path.name for path in (state / "segments").iterdir()) == segments_before
    )
    assert json.loads((state / "index.json").read_text())["rows"] == 4


def test_history_beyond_exact_search_uses_ivf(tmp_path, small_model, sample_frame):
    config = write_config(
        tmp_path,
        paths={"state_dir": "state"},
        dedupe={"exact_search_max_rows": 64},
    )
    rows = sample_frame.drop("tag").head(150)
    rows.write_parquet(tmp_path / "batch.parquet")
    first = tag_batch(
        tmp_path / "batch.parquet", tmp_path / "a.parquet", small_model, config
    )
    assert first.exit_code == 0, first.output
    history = read_history(tmp_path / "state")
    assert history.near_index is not None
    assert (tmp_path / "state" / history.near_index["file"]).exists()

    near_copies = rows.head(20).with_columns(
        (pl.col("id") + "-copy").alias("id"),
        (pl.col("title") + " (updated)").alias("title"),
    )
    near_copies.write_parquet(tmp_path / "copies.parquet")
    second = tag_batch(
        tmp_path / "copies.parquet", tmp_path / "b.parquet", small_model, config
    )

    assert second.exit_code == 0, second.output
    duplicates = read_output(tmp_path / "b.duplicates.parquet")
    kept_first = set(read_output(tmp_path / "a.parquet")["id"].to_list())
    assert duplicates.height + read_output(tmp_path / "b.parquet").height == 20
    copies_of_kept = [i for i in rows.head(20)["id"].to_list() if i in kept_first]
    assert duplicates.height >= len(copies_of_kept)
    assert set(duplicates["reason"].to_list()) == {"near"}


def test_vector_index_ivf_finds_planted_copies():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(5000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(32, exact_limit=1000)
    index.add(vectors)
    planted = vectors[::250] + rng.normal(scale=0.03, size=(20, 32)).astype(np.float32)
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)

    similarity, position = index.search(planted)

    assert index.faiss_index is not None
    assert position.tolist() == list(range(0, 5000, 250))
    assert (similarity > 0.95).all()


def test_train_drops_duplicates_before_split(tmp_path, subset_csv):
    frame = pl.read_csv(subset_csv, infer_schema=False)
    copies = frame.head(6).with_columns(
        (pl.col("id") + "0000").alias("id"),
        pl.col("title").str.to_uppercase().alias("title"),
    )
    near = frame.slice(6, 2).with_columns(
        (pl.col("id") + "0000").alias("id"),
        (pl.col("title") + " (updated)").alias("title"),
    )
    data = tmp_path / "labeled.csv"
    pl.concat([frame, copies, near]).write_csv(data)
    config = write_config(tmp_path, train={"c_grid": [10.0]})

    result = run_cli("train", data, "--output", tmp_path / "model", config=config)

    assert result.exit_code == 0, result.output
    assert (
        "Dropped 8 duplicate row(s) before the split (6 exact, 2 near)" in result.output
    )
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["training_data"]["rows_read"] == frame.height + 8
    assert manifest["training_data"]["rows"] == frame.height
    assert manifest["training_data"]["duplicates_dropped"] == {"exact": 6, "near": 2}
    validation = pl.read_parquet(tmp_path / "model" / "validation.parquet")
    assert not any(i.endswith("0000") for i in validation["id"].to_list())


def test_history_index_rebuilt_from_segments(tmp_path):
    from tagcli.history import SegmentWriter

    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = np.array([i.to_bytes(16, "big") for i in range(3000)], dtype="S16")
    ids = [f"row-{i}" for i in range(3000)]
    with history_lock(tmp_path / "state", 1):
        for start in (0, 1000, 2000):
            writer = SegmentWriter(read_history(tmp_path / "state"), "model", 16)
            writer.append(
                keys[start : start + 1000],
                ids[start : start + 1000],
                vectors[start : start + 1000],
            )
            writer.commit()
    history = read_history(tmp_path / "state")

    index = history.load_index(16, exact_limit=500)
    similarity, position = index.search(vectors[::300])
    sorted_keys, positions = history.sorted_keys()

    assert history.rows == 3000
    assert len(history.segments) == 3
    assert index.faiss_index is not None
    assert index.size == 3000
    assert position.tolist() == list(range(0, 3000, 300))
    assert (similarity > 0.99).all()
    assert history.id_lookup()(2345) == "row-2345"
    assert sorted_keys.tolist() == sorted(keys.tolist())
    assert positions[0] == 0


def test_clear_empty_history_asks_nothing(tmp_path):
    config = write_config(tmp_path, paths={"state_dir": "state"})

    # No input on standard input: a confirmation prompt would fail with exit 2.
    result = CliRunnerWithInput("").invoke("history", "--clear", config=config)

    assert result.exit_code == 0, result.output
    assert "empty; nothing to clear" in result.output
