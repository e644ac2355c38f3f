"""`tagcli feedback`, feedback in `train` and `eval --feedback`, and `tagcli sample`."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import SAMPLE_BATCH, read_output, run_cli, write_config

TAGS = ["natural-language-processing", "computer-vision", "mlops", "other"]
FAST_TRAIN = {"c_grid": [3.0, 30.0]}


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, train=FAST_TRAIN)


def store_lines(tmp_path) -> list[dict]:
    store = tmp_path / "state" / "feedback" / "feedback.jsonl"
    return [json.loads(line) for line in store.read_text().splitlines()]


def test_feedback_is_stored(tmp_path, config):
    corrections = tmp_path / "fix.csv"
    corrections.write_text("id,tag,note\n17,mlops,serving post\n18,other,\n")

    result = run_cli("feedback", corrections, config=config)

    assert result.exit_code == 0, result.output
    assert "Recorded 2 correction(s)" in result.output
    lines = store_lines(tmp_path)
    assert [line["id"] for line in lines] == ["17", "18"]
    assert lines[0]["tag"] == "mlops"
    assert lines[0]["note"] == "serving post"
    assert lines[0]["source"] == str(corrections)


def test_feedback_from_jsonl_appends(tmp_path, config):
    first = tmp_path / "first.jsonl"
    first.write_text('{"id": 5, "tag": "mlops"}\n')
    second = tmp_path / "second.jsonl"
    second.write_text('{"id": "5", "tag": "other", "note": "changed my mind"}\n\n')

    assert run_cli("feedback", first, config=config).exit_code == 0
    result = run_cli("feedback", second, config=config)

    assert result.exit_code == 0, result.output
    assert "(1 id(s) corrected in all)" in result.output
    assert [line["tag"] for line in store_lines(tmp_path)] == ["mlops", "other"]


def test_concurrent_feedback_keeps_lines(tmp_path, config):
    import os
    import subprocess
    import sys

    files = []
    for run in range(4):
        path = tmp_path / f"fix{run}.csv"
        rows = "".join(f"{run}-{number},mlops,note {number}\n" for number in range(5000))
        path.write_text("id,tag,note\n" + rows)
        files.append(path)
    command = [sys.executable, "-m", "tagcli", "--config", str(config), "feedback"]

    runs = [
        subprocess.Popen(command + [str(path)], cwd=tmp_path, env=os.environ.copy())
        for path in files
    ]

    assert [run.wait(timeout=120) for run in runs] == [0, 0, 0, 0]
    ids = [line["id"] for line in store_lines(tmp_path)]
    assert len(ids) == 20000
    # Each run's rows arrive in one piece, in file order.
    for run in range(4):
        start = ids.index(f"{run}-0")
        assert ids[start : start + 5000] == [f"{run}-{n}" for n in range(5000)]


def test_unapproved_tag_is_rejected(tmp_path, config):
    corrections = tmp_path / "fix.csv"
    corrections.write_text("id,tag\n1,mlops\n2,robotics\n3,other\n")

    result = run_cli("feedback", corrections, config=config)

    assert result.exit_code == 3
    assert "data rows 2 ('robotics')" in result.output
    assert "not approved" in result.output
    assert "natural-language-processing, computer-vision, mlops, other" in result.output
    assert not (tmp_path / "state" / "feedback" / "feedback.jsonl").exists()


def test_feedback_survives_tag_history(tmp_path, small_model, config):
    corrections = tmp_path / "fix.csv"
    corrections.write_text("id,tag\n17,mlops\n")
    assert run_cli("feedback", corrections, config=config).exit_code == 0

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "tagged.parquet", "--model",
        small_model, config=config,
    )

    assert result.exit_code == 0, result.output
    assert (tmp_path / "state" / "index.json").exists()
    assert [line["id"] for line in store_lines(tmp_path)] == ["17"]


def test_empty_id_is_rejected(tmp_path, config):
    corrections = tmp_path / "fix.jsonl"
    corrections.write_text('{"id": "4", "tag": "mlops"}\n{"id": "", "tag": "other"}\n')

    result = run_cli("feedback", corrections, config=config)

    assert result.exit_code == 3
    assert "empty id (lines 2)" in result.output


def test_invalid_jsonl_names_line(tmp_path, config):
    corrections = tmp_path / "fix.jsonl"
    corrections.write_text('{"id": "4", "tag": "mlops"}\n{"id": "5", tag: other}\n')

    result = run_cli("feedback", corrections, config=config)

    assert result.exit_code == 3
    assert "line 2 is not valid JSON" in result.output


def test_missing_tag_column(tmp_path, config):
    corrections = tmp_path / "fix.csv"
    corrections.write_text("id,label\n1,mlops\n")

    result = run_cli("feedback", corrections, config=config)

    assert result.exit_code == 3
    assert "missing required column(s) tag" in result.output


def _tag_rows(tmp_path, data, model, config, name):
    output = tmp_path / f"{name}.csv"
    # --keep-duplicates: the second run must tag the rows the first one did.
    result = run_cli(
        "tag", data, "-o", output, "--model", model, "--overwrite",
        "--keep-duplicates", config=config,
    )
    assert result.exit_code == 0, result.output
    return read_output(output)


def test_feedback_changes_next_prediction(tmp_path, subset_csv, small_model, config):
    before = _tag_rows(tmp_path, subset_csv, small_model, config, "before")
    # The row the model is least sure of, moved to its least likely tag.
    row = before.with_columns(pl.col("confidence").cast(float)).sort("confidence")[0]
    row_id = row["id"].item()
    old_tag = row["tag"].item()
    probabilities = {tag: float(row[f"prob_{tag}"].item()) for tag in TAGS}
    new_tag = min(probabilities, key=probabilities.get)
    corrections = tmp_path / "fix.csv"
    corrections.write_text(f"id,tag,note\n{row_id},{new_tag},reviewed\n")

    recorded = run_cli("feedback", corrections, config=config)
    trained = run_cli("train", subset_csv, "-o", tmp_path / "model", config=config)
    after = _tag_rows(tmp_path, subset_csv, tmp_path / "model", config, "after")

    assert recorded.exit_code == 0, recorded.output
    assert trained.exit_code == 0, trained.output
    assert "1 row(s) corrected (1 with a new tag), 0 added" in trained.output
    assert new_tag != old_tag
    assert after.filter(pl.col("id") == row_id)["tag"].item() == new_tag
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["feedback"]["rows_corrected"] == 1
    assert manifest["training_data"]["tag_counts"][new_tag] == (
        pl.read_csv(subset_csv, infer_schema=False)
        .filter(pl.col("tag") == new_tag)
        .height
        + 1
    )


def test_new_rows_are_added_or_skipped(tmp_path, subset_csv, config):
    corrections = tmp_path / "fix.csv"
    corrections.write_text(
        "id,tag,title,description\n"
        "new-1,mlops,Feature store on Kafka,Serving features online with low latency\n"
        "new-2,other,,\n"
    )
    assert run_cli("feedback", corrections, config=config).exit_code == 0

    result = run_cli("train", subset_csv, "-o", tmp_path / "model", config=config)

    assert result.exit_code == 0, result.output
    assert "0 row(s) corrected (0 with a new tag), 1 added, 1 skipped" in result.output
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    rows = pl.read_csv(subset_csv, infer_schema=False).height
    assert manifest["training_data"]["rows"] == rows + 1


def test_no_feedback_option_ignores_store(tmp_path, subset_csv, config):
    corrections = tmp_path / "fix.csv"
    corrections.write_text("id,tag,title\nnew-1,mlops,Model registry\n")
    assert run_cli("feedback", corrections, config=config).exit_code == 0

    result = run_cli(
        "train", subset_csv, "-o", tmp_path / "model", "--no-feedback", config=config
    )

    assert result.exit_code == 0, result.output
    assert "Applied" not in result.output
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["feedback"] is None


def test_eval_feedback_reports_sources(tmp_path, subset_csv, small_model, config):
    subset = pl.read_csv(subset_csv, infer_schema=False)
    known = subset.row(0, named=True)
    corrections = tmp_path / "fix.csv"
    corrections.write_text(
        "id,tag,title,description\n"
        f"{known['id']},{known['tag']},,\n"
        "new-1,computer-vision,Segmenting cells,U-Net on microscope images\n"
        "gone-1,other,,\n"
    )
    assert run_cli("feedback", corrections, config=config).exit_code == 0
    report_path = tmp_path / "report.json"

    result = run_cli(
        "eval", "--feedback", "--model", small_model, "--json", report_path,
        config=config,
    )

    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["feedback"]["records"] == 3
    assert report["feedback"]["text_from_feedback"] == 1
    assert report["feedback"]["text_from_training_data"] == 1
    assert report["feedback"]["without_text"] == 1
    assert report["metrics"]["overall"]["rows"] == 2
    assert "1 joined by id" in result.output
    assert "Reliability" in result.output


def test_eval_feedback_without_store(tmp_path, small_model, config):
    result = run_cli("eval", "--feedback", "--model", small_model, config=config)

    assert result.exit_code == 3
    assert "no feedback recorded" in result.output


def test_eval_reports_calibration(tmp_path, small_model):
    report_path = tmp_path / "report.json"

    result = run_cli("eval", "--model", small_model, "--json", report_path)

    assert result.exit_code == 0, result.output
    calibration = json.loads(report_path.read_text())["calibration"]
    rows = sum(entry["rows"] for entry in calibration["bins"])
    assert len(calibration["bins"]) == 10
    assert rows == calibration["rows"]
    assert 0 <= calibration["ece"] <= 1
    assert "Expected calibration error" in result.output


@pytest.fixture(scope="module")
def tagged_batch(tmp_path_factory, small_model):
    output = tmp_path_factory.mktemp("tagged") / "batch.tagged.parquet"
    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", small_model, "--keep-duplicates"
    )
    assert result.exit_code == 0, result.output
    return output


def test_sample_mostly_low_confidence(tmp_path, tagged_batch):
    output = tmp_path / "sample.csv"

    result = run_cli("sample", "20", tagged_batch, "-o", output, "--seed", "7")

    assert result.exit_code == 0, result.output
    sample = read_output(output)
    tagged = pl.read_parquet(tagged_batch)
    reasons = sample["sample_reason"].to_list()
    low = sample.filter(pl.col("sample_reason") == "low confidence")
    random_rows = sample.filter(pl.col("sample_reason") != "low confidence")
    assert sample.height == 20
    assert sample["id"].n_unique() == 20
    assert reasons.count("low confidence") >= 15
    assert set(tagged["tag"].unique()) <= set(sample["tag"].to_list())
    max_low = low["confidence"].cast(float).max()
    lowest_rest = tagged.filter(
        ~pl.col("id").cast(pl.Utf8).is_in(sample["id"].to_list())
    )["confidence"].min()
    assert max_low <= lowest_rest
    # 25% of 20 rows, split over the predicted tags, is one row per tag.
    assert random_rows.height == tagged["tag"].n_unique()
    assert random_rows["sample_reason"].str.starts_with("random from tag ").all()


def test_sample_same_seed_same_rows(tmp_path, tagged_batch):
    first = tmp_path / "first.parquet"
    second = tmp_path / "second.parquet"
    third = tmp_path / "third.parquet"

    run_cli("sample", "12", tagged_batch, "-o", first, "--seed", "1")
    run_cli("sample", "12", tagged_batch, "-o", second, "--seed", "1")
    run_cli("sample", "12", tagged_batch, "-o", third, "--seed", "2")

    assert pl.read_parquet(first).equals(pl.read_parquet(second))
    assert not pl.read_parquet(first).equals(pl.read_parquet(third))


def test_sample_feeds_back(tmp_path, tagged_batch, config):
    sample_path = tmp_path / "sample.csv"
    run_cli("sample", "5", tagged_batch, "-o", sample_path)

    result = run_cli("feedback", sample_path, config=config)

    assert result.exit_code == 0, result.output
    assert "Recorded 5 correction(s)" in result.output


def test_sample_needs_tagged_columns(tmp_path):
    result = run_cli("sample", "5", SAMPLE_BATCH, "-o", tmp_path / "s.csv")

    assert result.exit_code == 3
    assert "missing column(s) tag, confidence" in result.output
