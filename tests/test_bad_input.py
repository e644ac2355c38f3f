"""Bad and odd inputs: each works or fails with a message naming the file, row and fix."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import SAMPLE_BATCH, read_output, run_cli

HEADER = "id,title,description\n"


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def test_ragged_row_names_row_and_line(tmp_path, small_model):
    source = write_bytes(
        tmp_path / "ragged.csv",
        (HEADER + "1,YOLO,Detection\n2,BERT,Language,extra\n").encode(),
    )
    output = tmp_path / "out.csv"

    result = run_cli("tag", source, "-o", output, "--model", small_model)

    assert result.exit_code == 3
    assert str(source) in result.output
    assert "data row 2 (line 3) has 4 fields but the header has 3" in result.output
    assert not output.exists()


def test_non_utf8_suggests_encoding(tmp_path, small_model):
    rows = HEADER + "".join(f"{i},Title {i},Plain text\n" for i in range(500))
    data = rows.encode() + "501,Café résumé,Détection d'objets\n".encode("latin-1")
    source = write_bytes(tmp_path / "latin1.csv", data)
    output = tmp_path / "out.csv"

    result = run_cli("tag", source, "-o", output, "--model", small_model)

    assert result.exit_code == 3
    assert str(source) in result.output
    assert "line 502 is not valid utf-8" in result.output
    assert "--encoding cp1252" in result.output
    assert not output.exists()


def test_encoding_option_reads_cp1252(tmp_path, small_model):
    data = (HEADER + "1,Café detection,Find cafés in street photos\n").encode("cp1252")
    source = write_bytes(tmp_path / "cp1252.csv", data)
    output = tmp_path / "out.csv"

    result = run_cli(
        "tag", source, "-o", output, "--model", small_model, "--encoding", "cp1252"
    )

    assert result.exit_code == 0, result.output
    assert read_output(output)["title"].to_list() == ["Café detection"]


def test_unknown_encoding_is_usage_error(tmp_path, small_model):
    result = run_cli(
        "tag",
        SAMPLE_BATCH,
        "-o",
        tmp_path / "o.csv",
        "--model",
        small_model,
        "--encoding",
        "klingon",
    )

    assert result.exit_code == 2
    assert "unknown encoding 'klingon'" in result.output


def test_byte_order_mark_is_accepted(tmp_path, small_model):
    source = write_bytes(
        tmp_path / "bom.csv",
        b"\xef\xbb\xbf" + (HEADER + "7,BERT,Language model\n").encode(),
    )
    output = tmp_path / "out.csv"

    result = run_cli("tag", source, "-o", output, "--model", small_model)

    assert result.exit_code == 0, result.output
    assert read_output(output).columns[0] == "id"


def test_truncated_parquet(tmp_path, small_model):
    data = SAMPLE_BATCH.read_bytes()
    source = write_bytes(tmp_path / "cut.parquet", data[: len(data) // 2])

    result = run_cli("tag", source, "-o", tmp_path / "o.csv", "--model", small_model)

    assert result.exit_code == 3
    assert str(source) in result.output
    assert "not a readable Parquet file" in result.output


def test_labeled_header_without_rows(tmp_path, small_model):
    source = write_bytes(tmp_path / "empty.csv", b"id,title,description,tag\n")

    trained = run_cli("train", source, "--output", tmp_path / "m")
    evaluated = run_cli("eval", source, "--model", small_model)

    assert trained.exit_code == 3
    assert "no data rows" in trained.output
    assert evaluated.exit_code == 3
    assert "no data rows" in evaluated.output


def test_output_file_mode_follows_umask(tmp_path, small_model):
    output = tmp_path / "out.parquet"
    previous = os.umask(0o022)
    try:
        result = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)
    finally:
        os.umask(previous)

    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(output.stat().st_mode) == 0o644


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--workers", "-1")])
def test_option_errors_name_the_option(tmp_path, small_model, option, value):
    result = run_cli(
        "tag",
        SAMPLE_BATCH,
        "-o",
        tmp_path / "o.csv",
        "--model",
        small_model,
        option,
        value,
    )

    assert result.exit_code == 2
    assert option in result.output
    assert "tagcli.toml" not in result.output


def test_quiet_after_command(tmp_path, small_model):
    output = tmp_path / "out.parquet"

    result = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model, "-q")

    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert read_output(output).height == 200


def test_output_format_needs_folder_output(tmp_path, small_model):
    output = tmp_path / "out.parquet"

    result = run_cli(
        "tag",
        SAMPLE_BATCH,
        "-o",
        output,
        "--output-format",
        "csv",
        "--model",
        small_model,
    )

    assert result.exit_code == 2
    assert "--output-format applies to folder outputs only" in result.output
    assert not output.exists()


def test_zero_byte_parquet(tmp_path, small_model):
    source = write_bytes(tmp_path / "zero.parquet", b"")

    result = run_cli("tag", source, "-o", tmp_path / "o.csv", "--model", small_model)

    assert result.exit_code == 3
    assert (
        "the file is empty (0 bytes); a Parquet file needs at least a footer"
        in result.output
    )
