"""Embedding backends: the int8 ONNX export against torch, length grouping, mismatches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import REPO, SAMPLE_BATCH, SAMPLE_CSV, run_cli, write_config

from tagcli.backends import (
    ONNX_FILE,
    TOKENIZER_FILE,
    OnnxInt8Backend,
    TorchBackend,
    export_onnx_int8,
    length_grouped_batches,
    read_onnx_model,
)
from tagcli.embed import ModelSpec, embed_texts, load_encoder
from tagcli.model import MANIFEST_FILE
from tagcli.text import compose_text

# Rows of the sample data compared between backends: every length of text the
# data has, without the minute it takes to embed all 764 rows twice.
COMPARED_ROWS = 200


@pytest.fixture(scope="module")
def torch_encoder():
    return load_encoder(ModelSpec())


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, torch_encoder):
    folder = tmp_path_factory.mktemp("onnx-export")
    entry = export_onnx_int8(torch_encoder, folder)
    return folder, entry


@pytest.fixture(scope="module")
def onnx_backend(onnx_export):
    folder, entry = onnx_export
    return OnnxInt8Backend(read_onnx_model(folder, entry))


@pytest.fixture(scope="module")
def sample_texts() -> list[str]:
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).head(COMPARED_ROWS)
    return [
        compose_text(title, description)
        for title, description in zip(frame["title"], frame["description"])
    ]


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory, subset_csv) -> str:
    folder = tmp_path_factory.mktemp("torch-model")
    config = write_config(folder, train={"c_grid": [3.0]})
    result = run_cli(
        "train", subset_csv, "--output", folder / "model", "--backend", "torch",
        config=config,
    )
    assert result.exit_code == 0, result.output
    return folder / "model"


def test_export_files_and_entry(onnx_export):
    folder, entry = onnx_export

    assert (folder / ONNX_FILE).is_file()
    assert (folder / TOKENIZER_FILE).is_file()
    assert not (folder / "encoder-fp32.onnx").exists()
    # int8 weights: about a quarter of the 90 MB float32 export.
    assert (folder / ONNX_FILE).stat().st_size < 30 * 2**20
    assert entry["max_seq_length"] == 256
    assert entry["pooling"] == "mean"


def test_token_ids_match_transformers(onnx_backend, torch_encoder, sample_texts):
    long_text = " ".join(["tokenization"] * 400)
    texts = sample_texts[:50] + [
        "",
        long_text,
        "Café naïve résumé: ÜBER-long words, emojis 🚀 and CJK 漢字",
        "  leading and trailing spaces  ",
    ]
    expected = torch_encoder.tokenizer(
        texts, truncation=True, max_length=torch_encoder.max_seq_length
    )["input_ids"]

    actual = onnx_backend.token_ids(texts)

    assert actual == expected
    assert len(actual[-3]) == 256


def test_onnx_embeddings_close_to_torch(onnx_backend, torch_encoder, sample_texts):
    reference = torch_encoder.encode(sample_texts, normalize_embeddings=True)

    embeddings = onnx_backend.embed(sample_texts, batch_size=32)

    assert embeddings.shape == (len(sample_texts), 384)
    assert embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    cosine = (embeddings * reference).sum(axis=1)
    assert cosine.mean() > 0.985
    assert cosine.min() > 0.95


def test_onnx_batch_shapes_other_than_traced(onnx_backend, sample_texts):
    # The export was traced with a batch of 2; other batch and sequence sizes
    # must still run, and give nearly the same embedding for a text.
    texts = sample_texts[:7]
    batched = onnx_backend.embed(texts, batch_size=7)
    one_by_one = np.stack([onnx_backend.embed([text])[0] for text in texts])

    assert batched.shape == (7, 384)
    # NOTE: int8 activations share one scale per batch, so a text's embedding
    # moves slightly with the other texts in its batch.
    assert (batched * one_by_one).sum(axis=1).min() > 0.97


def test_empty_input_gives_empty_array(onnx_backend, torch_encoder):
    assert onnx_backend.embed([]).shape == (0, 384)
    assert TorchBackend(torch_encoder).embed([]).shape == (0, 384)


def test_length_grouped_batches_cover_each_once():
    lengths = [5, 9, 1, 9, 3, 7, 2]

    batches = length_grouped_batches(lengths, 3)

    positions = np.concatenate(batches).tolist()
    assert sorted(positions) == list(range(len(lengths)))
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert [lengths[i] for i in positions] == sorted(lengths, reverse=True)
    # Ties keep input order.
    assert positions[:2] == [1, 3]


def test_torch_grouping_keeps_input_order(torch_encoder, sample_texts):
    texts = sample_texts[:40]
    plain = torch_encoder.encode(texts, batch_size=8, normalize_embeddings=True)

    grouped = embed_texts(torch_encoder, texts, batch_size=8)

    cosine = (grouped * plain).sum(axis=1)
    assert cosine.min() > 0.9999


def test_onnx_artifact_records_backend(small_model):
    manifest = json.loads((small_model / MANIFEST_FILE).read_text())

    assert manifest["embedding"]["backend"] == "onnx-int8"
    assert manifest["embedding"]["onnx"]["file"] == ONNX_FILE
    assert ONNX_FILE in manifest["files"]
    assert TOKENIZER_FILE in manifest["files"]


def test_torch_artifact_has_no_export(torch_model, tmp_path):
    manifest = json.loads((torch_model / MANIFEST_FILE).read_text())
    assert manifest["embedding"]["backend"] == "torch"
    assert not (torch_model / ONNX_FILE).exists()

    output = tmp_path / "out.parquet"
    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", torch_model,
        "--executor", "local", "--backend", "torch",
    )

    assert result.exit_code == 0, result.output
    assert "with torch" in result.output
    assert pl.read_parquet(output).height == 200


def test_backend_mismatch_is_usage_error(torch_model, small_model, tmp_path):
    output = tmp_path / "out.parquet"

    on_torch_model = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", torch_model,
        "--backend", "onnx-int8",
    )
    on_onnx_model = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", small_model,
        "--backend", "torch",
    )
    evaluated = run_cli("eval", "--model", small_model, "--backend", "torch")

    assert on_torch_model.exit_code == 2
    assert "trained on torch embeddings" in on_torch_model.output
    assert "--backend torch" in on_torch_model.output
    assert on_onnx_model.exit_code == 2
    assert "trained on onnx-int8 embeddings" in on_onnx_model.output
    assert evaluated.exit_code == 2
    assert "trained on onnx-int8 embeddings" in evaluated.output
    assert not output.exists()


def test_config_backend_mismatch(torch_model, tmp_path):
    config = write_config(tmp_path, embedding={"backend": "onnx-int8"})

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", torch_model,
        config=config,
    )

    assert result.exit_code == 2
    assert "[embedding] backend" in result.output


def test_manifest_without_backend_means_torch(small_model, tmp_path):
    copy = tmp_path / "old-model"
    shutil.copytree(small_model, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    del manifest["embedding"]["backend"]
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))

    result = run_cli("tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", copy)

    assert result.exit_code == 2
    assert "trained on torch embeddings" in result.output


def test_unknown_backend_in_config(tmp_path):
    config = write_config(tmp_path, embedding={"backend": "tensorrt"})

    result = run_cli("tag", SAMPLE_BATCH, config=config)

    assert result.exit_code == 2
    assert "[embedding] backend" in result.output
    assert "tensorrt" in result.output


def test_changed_onnx_file_is_rejected(small_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(small_model, copy)
    with (copy / ONNX_FILE).open("r+b") as handle:
        handle.seek(-100, os.SEEK_END)
        handle.write(b"\0" * 10)

    result = run_cli("tag", SAMPLE_BATCH, "-o", tmp_path / "out.parquet", "--model", copy)

    assert result.exit_code == 3
    assert ONNX_FILE in result.output
    assert "does not match the manifest" in result.output


def test_onnx_tagging_imports_no_torch(small_model, tmp_path):
    script = f"""
import sys
from pathlib import Path
from tagcli.config import load_config
from tagcli.pipeline import TagOptions, tag
options = TagOptions(model_dir=Path({str(small_model)!r}), executor="local",
                     show_progress=False)
summary = tag(Path({str(SAMPLE_BATCH)!r}), {str(tmp_path / "out.parquet")!r},
              load_config(None), options)
print(summary.rows_written)
print(sorted(name for name in ("torch", "sentence_transformers", "transformers")
             if name in sys.modules))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    rows, imported = result.stdout.strip().splitlines()
    assert rows == "200"
    assert imported == "[]"


def test_onnx_token_counts_for_screening(onnx_backend, torch_encoder):
    from tagcli.rows import RowPolicy, screen_texts

    texts = ["A short text", " ".join(["tokenization"] * 400), ""]

    counts = onnx_backend.count_tokens(texts)
    screening = screen_texts(texts, onnx_backend, RowPolicy())

    assert counts == TorchBackend(torch_encoder).count_tokens(texts)
    assert counts[1] > 256
    assert onnx_backend.max_seq_length == 256
    assert screening.truncated_rows == [False, True, False]
    assert screening.reasons == [None, None, "empty_text"]


def test_onnxruntime_telemetry_is_off(onnx_backend):
    # The onnxruntime wheel's telemetry client must not start in tagcli.
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
