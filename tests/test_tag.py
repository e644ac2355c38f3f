"""`tagcli tag` on a real local Ray instance: columns, formats, probabilities, errors."""

from __future__ import annotations

import polars as pl
import pytest
from conftest import SAMPLE_BATCH, read_output, run_cli

TAGS = ["natural-language-processing", "computer-vision", "mlops", "other"]
PROBABILITY_COLUMNS = [f"prob_{tag}" for tag in TAGS]

pytestmark = pytest.mark.usefixtures("ray_local")


def test_parquet_in_parquet_out(tmp_path, small_model):
    output = tmp_path / "tagged.parquet"

    result = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)

    assert result.exit_code == 0, result.output
    source = pl.read_parquet(SAMPLE_BATCH)
    tagged = read_output(output)
    assert (
        tagged.columns == source.columns + ["tag", "confidence"] + PROBABILITY_COLUMNS
    )
    assert tagged.height == source.height
    assert tagged["id"].to_list() == source["id"].to_list()
    assert tagged["title"].to_list() == source["title"].to_list()
    assert set(tagged["tag"].unique().to_list()) <= set(TAGS)
    assert "read" in result.output
    assert str(source.height) in result.output


def test_probabilities_and_confidence(tmp_path, small_model):
    output = tmp_path / "tagged.parquet"
    run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)
    tagged = read_output(output)

    probabilities = tagged.select(PROBABILITY_COLUMNS).to_numpy()
    assert abs(probabilities.sum(axis=1) - 1.0).max() < 1e-9
    assert (tagged["confidence"].to_numpy() == probabilities.max(axis=1)).all()
    best = [TAGS[i] for i in probabilities.argmax(axis=1)]
    assert tagged["tag"].to_list() == best


def test_csv_text_columns_stay_as_written(tmp_path, small_model):
    source = tmp_path / "batch.csv"
    source.write_text(
        "id,title,description\n"
        '007,NaN,"A transformer that\nsummarises legal text"\n'
        "000042,null,Object detection on drone footage\n"
        "3,Feature store,\n",
        encoding="utf-8",
    )
    output = tmp_path / "tagged.csv"

    result = run_cli("tag", source, "-o", output, "--model", small_model)

    assert result.exit_code == 0, result.output
    tagged = read_output(output)
    assert tagged["id"].to_list() == ["007", "000042", "3"]
    assert tagged["title"].to_list() == ["NaN", "null", "Feature store"]
    assert tagged["description"][0] == "A transformer that\nsummarises legal text"
    assert set(tagged["tag"].to_list()) <= set(TAGS)


def test_format_follows_output_extension(tmp_path, small_model):
    output = tmp_path / "tagged.csv"

    result = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)

    assert result.exit_code == 0, result.output
    assert output.read_text().startswith(
        '"id","created_on","title","description","tag"'
    )


def test_existing_output_needs_overwrite(tmp_path, small_model):
    output = tmp_path / "tagged.parquet"
    output.write_text("keep me")

    refused = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)

    assert refused.exit_code == 2
    assert "--overwrite" in refused.output
    assert output.read_text() == "keep me"

    replaced = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", small_model, "--overwrite"
    )
    assert replaced.exit_code == 0, replaced.output
    assert read_output(output).height == pl.read_parquet(SAMPLE_BATCH).height


def test_input_tag_column_is_renamed(tmp_path, small_model, subset_csv):
    output = tmp_path / "tagged.csv"

    result = run_cli("tag", subset_csv, "-o", output, "--model", small_model)

    assert result.exit_code == 0, result.output
    tagged = read_output(output)
    assert "input_tag" in tagged.columns
    assert tagged.columns.count("tag") == 1
    assert "tag -> input_tag" in result.output


def test_missing_text_column(tmp_path, small_model):
    source = tmp_path / "batch.csv"
    source.write_text("id,title\n1,Only a title\n")
    output = tmp_path / "tagged.csv"

    result = run_cli("tag", source, "-o", output, "--model", small_model)

    assert result.exit_code == 3
    assert str(source) in result.output
    assert "missing required column(s) description" in result.output
    assert not output.exists()


def test_unsupported_output_extension(tmp_path, small_model):
    output = tmp_path / "tagged.xlsx"

    result = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)

    assert result.exit_code == 3
    assert "unsupported output format '.xlsx'" in result.output
    assert not output.exists()


def test_changed_head_is_rejected(tmp_path, small_model):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(small_model, copy)
    with (copy / "head.joblib").open("ab") as handle:
        handle.write(b"tampered")

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", copy
    )

    assert result.exit_code == 3
    assert "does not match the manifest" in result.output
    assert not (tmp_path / "out.parquet").exists()
