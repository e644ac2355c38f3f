"""`tagcli eval`: metrics, slices, the confusion matrix, JSON and the leak warning."""

from __future__ import annotations

import json

import polars as pl
from conftest import run_cli, write_config

from tagcli.evaluate import compute_metrics

TAGS = ["natural-language-processing", "computer-vision", "mlops", "other"]


def test_eval_file_writes_json(tmp_path, small_model, sample_frame):
    holdout = tmp_path / "holdout.csv"
    sample_frame.tail(120).write_csv(holdout)
    report_path = tmp_path / "report.json"

    result = run_cli("eval", holdout, "--model", small_model, "--json", report_path)

    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    assert metrics["overall"]["rows"] == 120
    assert set(metrics["per_tag"]) == set(TAGS)
    supports = sum(scores["support"] for scores in metrics["per_tag"].values())
    assert supports == 120
    matrix = metrics["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == 120
    assert set(metrics["slices"]) == {"short_text", "nlp_llm_transformers"}
    assert "Per tag" in result.output
    assert "Confusion matrix" in result.output


def test_json_to_stdout_is_parseable(small_model):
    result = run_cli("eval", "--model", small_model, "--json", "-")

    assert result.exit_code == 0, result.output
    start = result.stdout.index("{")
    report = json.loads(result.stdout[start:])
    assert report["metrics"]["overall"]["f1"] is not None


def test_default_set_warns_when_refit_on_all(small_model):
    result = run_cli("eval", "--model", small_model)

    assert result.exit_code == 0, result.output
    assert "data leak" in result.output
    assert "validation split included" in result.output
    assert "validation F1 measured before the refit" in result.output


def test_default_set_is_clean_without_refit(tmp_path, subset_csv):
    config = write_config(tmp_path, train={"refit_on_all": False, "c_grid": [10.0]})
    trained = run_cli(
        "train", subset_csv, "--output", tmp_path / "model", config=config
    )
    assert trained.exit_code == 0, trained.output

    result = run_cli(
        "eval",
        "--model",
        tmp_path / "model",
        "--json",
        tmp_path / "r.json",
        config=config,
    )

    assert result.exit_code == 0, result.output
    assert "data leak" not in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["leak"] == {"overlapping_rows": 0, "fitted_on": "train_split"}


def test_training_rows_count_as_leak(tmp_path, small_model, subset_csv):
    report_path = tmp_path / "r.json"
    result = run_cli("eval", subset_csv, "--model", small_model, "--json", report_path)

    rows = pl.read_csv(subset_csv).height
    assert f"{rows} of {rows} evaluation rows" in result.output
    assert json.loads(report_path.read_text())["leak"]["overlapping_rows"] == rows


def test_slices_select_by_text_and_tag():
    titles = [
        "BERT for search",
        "Tiny",
        "Transformers for video",
        "A long description here",
    ]
    descriptions = [
        "Fine-tune BERT to rank documents for a query",
        "",
        "Vision transformers find objects in each frame of video",
        "Feature stores and pipelines for deploying many models",
    ]
    y_true = ["natural-language-processing", "other", "computer-vision", "mlops"]
    y_pred = ["natural-language-processing", "mlops", "computer-vision", "mlops"]

    metrics = compute_metrics(titles, descriptions, y_true, y_pred, TAGS)

    assert metrics["slices"]["nlp_llm_transformers"]["rows"] == 1
    assert metrics["slices"]["short_text"]["rows"] == 1
    assert metrics["slices"]["short_text"]["f1"] == 0.0
    assert metrics["overall"]["rows"] == 4
    assert metrics["per_tag"]["other"]["recall"] == 0.0
    assert metrics["confusion_matrix"]["matrix"][3][2] == 1


def test_no_refit_option_keeps_split_head(tmp_path, subset_csv):
    trained = run_cli(
        "train", subset_csv, "--no-refit", "--output", tmp_path / "model", "--seed", "3"
    )
    assert trained.exit_code == 0, trained.output
    assert "head fitted on the training split" in trained.output

    result = run_cli(
        "eval", "--model", tmp_path / "model", "--json", tmp_path / "r.json"
    )

    assert result.exit_code == 0, result.output
    assert "data leak" not in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["leak"]["fitted_on"] == "train_split"
    assert report["leak"]["overlapping_rows"] == 0

    leaked = run_cli("eval", subset_csv, "--model", tmp_path / "model")

    assert leaked.exit_code == 0, leaked.output
    assert "data leak" in leaked.output
    assert "the training split" in leaked.output
    assert "refit_on_all = false" not in leaked.output
    assert "before the refit" not in leaked.output
