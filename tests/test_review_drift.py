"""`tagcli tag` review queue and drift checks, on real models and real text."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import SAMPLE_BATCH, SAMPLE_CSV, read_output, run_cli, write_config
from offtopic import OFFTOPIC_ROWS

EXIT_DRIFT = 5


@pytest.fixture(scope="module")
def heldout_model(tmp_path_factory) -> tuple:
    """A model trained on the sample rows that are not in sample_data/batch.parquet.

    Its config's state folder is shared by the tests in this module, so they
    tag with --keep-duplicates: otherwise a batch tagged twice is dropped as
    duplicates of the history the first run recorded.
    """
    folder = tmp_path_factory.mktemp("heldout-model")
    batch_ids = pl.read_parquet(SAMPLE_BATCH)["id"].cast(pl.Utf8).to_list()
    training = pl.read_csv(SAMPLE_CSV, infer_schema=False).filter(
        ~pl.col("id").is_in(batch_ids)
    )
    data = folder / "train.csv"
    training.write_csv(data)
    config = write_config(folder, train={"c_grid": [10.0], "cv_folds": 3})
    result = run_cli("train", data, "--output", folder / "model", config=config)
    assert result.exit_code == 0, result.output
    return folder / "model", config


@pytest.fixture
def offtopic_csv(tmp_path):
    path = tmp_path / "offtopic.csv"
    pl.DataFrame(OFFTOPIC_ROWS).write_csv(path)
    return path


def test_sample_batch_shows_no_drift(tmp_path, heldout_model):
    model, config = heldout_model
    output = tmp_path / "tagged.parquet"

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", model, "--fail-on-drift",
        "--keep-duplicates", config=config,
    )

    assert result.exit_code == 0, result.output
    assert "Drift: no." in result.output
    tagged = read_output(output)
    assert tagged["out_of_distribution"].sum() / tagged.height < 0.1


def test_offtopic_batch_is_drifted(tmp_path, heldout_model, offtopic_csv):
    model, config = heldout_model
    output = tmp_path / "tagged.parquet"

    result = run_cli(
        "tag", offtopic_csv, "-o", output, "--model", model, "--fail-on-drift",
        "--keep-duplicates", config=config,
    )

    assert result.exit_code == EXIT_DRIFT, result.output
    assert "Drift: yes" in result.output
    assert "the batch has drifted" in result.output
    tagged = read_output(output)
    assert tagged.height == len(OFFTOPIC_ROWS)
    assert tagged["out_of_distribution"].to_list() == [True] * len(OFFTOPIC_ROWS)


def test_drift_without_flag_exits_zero(tmp_path, small_model, offtopic_csv):
    output = tmp_path / "tagged.csv"

    result = run_cli(
        "tag", offtopic_csv, "-o", output, "--model", small_model, "--keep-duplicates"
    )

    assert result.exit_code == 0, result.output
    assert "Drift: yes" in result.output
    assert output.exists()


def test_review_file_is_rows_below_threshold(tmp_path, heldout_model):
    model, config = heldout_model
    output = tmp_path / "tagged.parquet"
    threshold = json.loads((model / "manifest.json").read_text())["review"][
        "threshold"
    ]

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", model, "--keep-duplicates",
        config=config,
    )

    assert result.exit_code == 0, result.output
    tagged = read_output(output)
    review = read_output(tmp_path / "tagged.review.parquet")
    below = tagged.filter(pl.col("confidence") < threshold)
    assert threshold > 0
    assert below.height > 0
    assert tagged["needs_review"].to_list() == (
        tagged["confidence"] < threshold
    ).to_list()
    assert review.columns == tagged.columns
    assert review["id"].to_list() == below["id"].to_list()
    assert review.equals(below)


def test_numeric_threshold_from_config(tmp_path, small_model):
    config = write_config(tmp_path, review={"threshold": 0.9})
    output = tmp_path / "tagged.csv"

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", small_model, config=config
    )

    assert result.exit_code == 0, result.output
    tagged = read_output(output)
    review = read_output(tmp_path / "tagged.review.csv")
    expected = [
        row_id
        for row_id, confidence in zip(tagged["id"], tagged["confidence"].cast(float))
        if confidence < 0.9
    ]
    assert review["id"].to_list() == expected
    assert set(review["needs_review"].to_list()) <= {"true"}
    assert f"{len(expected)} row(s) with confidence below 0.900" in result.output


def test_folder_output_gets_review_file(tmp_path, small_model):
    config = write_config(tmp_path, review={"threshold": 0.95})
    output = tmp_path / "tagged"

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", f"{output}/", "--model", small_model, config=config
    )

    assert result.exit_code == 0, result.output
    review = pl.read_parquet(tmp_path / "tagged-review.parquet")
    tagged = pl.read_parquet(sorted(output.glob("part-*.parquet")))
    assert review.height == tagged.filter(pl.col("confidence") < 0.95).height


def test_existing_review_file_needs_overwrite(tmp_path, small_model):
    output = tmp_path / "tagged.parquet"
    (tmp_path / "tagged.review.parquet").write_text("keep me")

    result = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)

    assert result.exit_code == 2
    assert "tagged.review.parquet" in result.output
    assert "--overwrite" in result.output
    assert not output.exists()


def test_invalid_review_threshold(tmp_path, small_model):
    config = write_config(tmp_path, review={"threshold": "sometimes"})

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "o.csv", "--model", small_model,
        config=config,
    )

    assert result.exit_code == 2
    assert "[review] threshold" in result.output
    assert "'sometimes'" in result.output


def test_manifest_records_review_choice(heldout_model):
    model, _ = heldout_model
    manifest = json.loads((model / "manifest.json").read_text())

    review = manifest["review"]
    assert review["errors"] > 0
    assert review["errors_caught"] >= 0.8 * review["errors"]
    assert review["rows_queued"] <= review["rows"]
    assert manifest["calibration"]["temperature"] > 0
    assert set(manifest["drift"]["tag_shares"]) == set(manifest["tags"]["approved"])
    assert manifest["drift"]["distance_quantiles"]["0.99"] > 0
