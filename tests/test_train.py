"""`tagcli train`: the artifact, its manifest, tag mapping, validation and determinism."""

from __future__ import annotations

import json

import joblib
import polars as pl
import pytest
from conftest import run_cli, write_config

from tagcli.backends import load_artifact_backend
from tagcli.model import HEAD_FILE, MANIFEST_FILE, load_artifact, sha256_file


def test_manifest_records_training(small_model, subset_csv):
    manifest = json.loads((small_model / MANIFEST_FILE).read_text())

    assert manifest["tags"]["approved"] == [
        "natural-language-processing",
        "computer-vision",
        "mlops",
        "other",
    ]
    assert "all-MiniLM-L6-v2" in manifest["embedding"]["model_id"]
    assert manifest["embedding"]["dimension"] == 384
    assert manifest["training_data"]["sha256"] == sha256_file(subset_csv)
    assert manifest["files"][HEAD_FILE] == sha256_file(small_model / HEAD_FILE)
    assert manifest["head"]["fitted_on"] == "all_rows"
    assert manifest["head"]["C"] in (3.0, 30.0)
    assert manifest["package_versions"]["scikit-learn"][0].isdigit()
    assert manifest["created_at"].endswith("+00:00")
    overall = manifest["validation_metrics"]["overall"]
    assert overall["rows"] == manifest["training_data"]["validation_rows"]
    assert 0.0 <= overall["f1"] <= 1.0


def test_head_predicts_only_approved_tags(small_model):
    head = joblib.load(small_model / HEAD_FILE)
    assert set(head.classifier.classes_) <= set(head.tags)


def test_unapproved_tags_map_to_fallback(tmp_path, sample_frame):
    frame = sample_frame.head(160).with_columns(
        pl.when(pl.col("tag") == "other")
        .then(pl.lit("graph-learning"))
        .otherwise(pl.col("tag"))
        .alias("tag")
    )
    renamed = frame.filter(pl.col("tag") == "graph-learning").height
    assert renamed > 0
    data = tmp_path / "old-tags.csv"
    frame.write_csv(data)

    result = run_cli("train", data, "--output", tmp_path / "model")

    assert result.exit_code == 0, result.output
    assert f"Mapped {renamed} row(s)" in result.output
    assert f"graph-learning: {renamed}" in result.output
    manifest = json.loads((tmp_path / "model" / MANIFEST_FILE).read_text())
    assert manifest["training_data"]["mapped_to_fallback"] == {
        "graph-learning": renamed
    }
    head = joblib.load(tmp_path / "model" / HEAD_FILE)
    assert "graph-learning" not in head.classifier.classes_


def test_missing_column_names_file_and_column(tmp_path, sample_frame):
    data = tmp_path / "no-tag.csv"
    sample_frame.drop("tag").head(20).write_csv(data)

    result = run_cli("train", data, "--output", tmp_path / "model")

    assert result.exit_code == 3
    assert str(data) in result.output
    assert "missing required column(s) tag" in result.output
    assert not (tmp_path / "model").exists()


def test_empty_tag_names_rows(tmp_path, sample_frame):
    frame = (
        sample_frame.head(40)
        .with_row_index("n")
        .with_columns(
            pl.when(pl.col("n") == 4)
            .then(pl.lit(""))
            .otherwise(pl.col("tag"))
            .alias("tag")
        )
        .drop("n")
    )
    data = tmp_path / "empty-tag.csv"
    frame.write_csv(data)

    result = run_cli("train", data, "--output", tmp_path / "model")

    assert result.exit_code == 3
    assert "have an empty tag" in result.output
    assert "data rows 5" in result.output


def test_single_class_is_rejected(tmp_path, sample_frame):
    data = tmp_path / "one-class.csv"
    sample_frame.filter(pl.col("tag") == "mlops").write_csv(data)

    result = run_cli("train", data, "--output", tmp_path / "model")

    assert result.exit_code == 3
    assert "only one class ('mlops')" in result.output


def test_existing_output_folder_is_not_overwritten(tmp_path, subset_csv):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    result = run_cli("train", subset_csv, "--output", target)

    assert result.exit_code == 2
    assert "exists and is not empty" in result.output
    assert (target / "keep.txt").read_text() == "mine"


def test_versioned_folders_and_newest_default(tmp_path, subset_csv):
    config = write_config(
        tmp_path, train={"c_grid": [10.0]}, paths={"models_dir": "models"}
    )

    first = run_cli("train", subset_csv, config=config)
    second = run_cli("train", subset_csv, "--seed", "7", config=config)

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    folders = sorted((tmp_path / "models").iterdir())
    assert len(folders) == 2
    newest_manifest = json.loads((folders[-1] / MANIFEST_FILE).read_text())
    assert newest_manifest["training_data"]["seed"] == 7

    evaluated = run_cli("eval", "--json", tmp_path / "eval.json", config=config)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model"] == str(folders[-1])


def test_same_seed_gives_same_predictions(tmp_path, subset_csv, small_model):
    config = write_config(tmp_path, train={"c_grid": [3.0, 30.0]})
    result = run_cli("train", subset_csv, "--output", tmp_path / "again", config=config)
    assert result.exit_code == 0, result.output

    first = json.loads((small_model / MANIFEST_FILE).read_text())
    second = json.loads((tmp_path / "again" / MANIFEST_FILE).read_text())
    assert first["validation_metrics"] == second["validation_metrics"]
    assert first["files"] == second["files"]

    texts = ["A transformer for translation", "Detect objects in drone video"]
    artifact = load_artifact(small_model, first["tags"]["approved"])
    embeddings = load_artifact_backend(artifact, offline=True).embed(texts)
    first_head = joblib.load(small_model / HEAD_FILE)
    second_head = joblib.load(tmp_path / "again" / HEAD_FILE)
    assert (
        first_head.predict_proba(embeddings, texts).tolist()
        == second_head.predict_proba(embeddings, texts).tolist()
    )


@pytest.mark.slow
def test_full_sample_trains_well(full_model):
    manifest = json.loads((full_model / MANIFEST_FILE).read_text())
    assert manifest["training_data"]["rows"] == 764
    assert manifest["validation_metrics"]["overall"]["f1"] >= 0.88
