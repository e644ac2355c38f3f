"""`tagcli tag` on a real local Ray instance: columns, formats, probabilities, errors."""

from __future__ import annotations

import polars as pl
import pytest
from conftest import SAMPLE_BATCH, read_output, run_cli, write_config

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
        tagged.columns
        == source.columns
        + ["tag", "confidence"]
        + PROBABILITY_COLUMNS
        + ["centroid_distance", "out_of_distribution", "needs_review"]
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

    rejected = run_cli("tag", SAMPLE_BATCH, "-o", output, "--model", small_model)

    assert rejected.exit_code == 2
    assert "--overwrite" in rejected.output
    assert output.read_text() == "keep me"

    replaced = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", small_model, "--overwrite"
    )
    assert replaced.exit_code == 0, replaced.output
    assert read_output(output).height == pl.read_parquet(SAMPLE_BATCH).height


def test_output_may_not_replace_input(tmp_path, small_model):
    source = tmp_path / "same.parquet"
    source.write_bytes(SAMPLE_BATCH.read_bytes())
    folder = tmp_path / "dump"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(SAMPLE_BATCH.read_bytes())

    same_file = run_cli(
        "tag", source, "-o", source, "--model", small_model, "--overwrite"
    )
    inside_folder = run_cli(
        "tag", folder, "-o", folder / "out.parquet", "--model", small_model
    )
    folder_over_input = run_cli(
        "tag", folder / "a.parquet", "-o", f"{folder}/", "--model", small_model,
        "--overwrite",
    )

    assert same_file.exit_code == 2, same_file.output
    assert "would replace or sit inside the input" in same_file.output
    assert source.read_bytes() == SAMPLE_BATCH.read_bytes()
    assert inside_folder.exit_code == 2, inside_folder.output
    assert not (folder / "out.parquet").exists()
    assert folder_over_input.exit_code == 2, folder_over_input.output
    assert (folder / "a.parquet").read_bytes() == SAMPLE_BATCH.read_bytes()


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

    assert result.exit_code == 2
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


def test_missing_input_before_bad_model(tmp_path, small_model):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(small_model, copy)
    with (copy / "head.joblib").open("ab") as handle:
        handle.write(b"tampered")
    missing = tmp_path / "no_such_dump.csv"

    result = run_cli("tag", missing, "-o", tmp_path / "out.parquet", "--model", copy)

    assert result.exit_code == 3
    assert f"{missing}: file not found" in result.output
    assert "does not match the manifest" not in result.output


def test_local_and_ray_paths_agree(tmp_path, small_model):
    local = tmp_path / "local.parquet"
    on_ray = tmp_path / "ray.parquet"

    # Without --no-cache the second run would take every embedding from the
    # cache that the first run filled, and embed nothing on Ray.
    first = run_cli(
        "tag",
        SAMPLE_BATCH,
        "-o",
        local,
        "--model",
        small_model,
        "--executor",
        "local",
        "--no-history",
        "--no-cache",
    )
    second = run_cli(
        "tag",
        SAMPLE_BATCH,
        "-o",
        on_ray,
        "--model",
        small_model,
        "--executor",
        "ray",
        "--no-history",
        "--no-cache",
    )

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "in-process" in first.output
    assert "on Ray" in second.output
    local_rows = read_output(local)
    ray_rows = read_output(on_ray)
    assert local_rows.columns == ray_rows.columns
    floats = PROBABILITY_COLUMNS + ["confidence", "centroid_distance"]
    assert local_rows.drop(floats).equals(ray_rows.drop(floats))
    difference = local_rows.select(floats).to_numpy() - ray_rows.select(floats).to_numpy()
    assert abs(difference).max() < 1e-5


def test_auto_executor_uses_threshold(tmp_path, small_model):
    config = write_config(tmp_path, ray={"max_local_rows": 50})
    output = tmp_path / "tagged.parquet"

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", small_model, config=config
    )

    assert result.exit_code == 0, result.output
    assert "on Ray" in result.output


def test_folder_in_folder_out(tmp_path, small_model):
    source = pl.read_parquet(SAMPLE_BATCH)
    folder = tmp_path / "dump"
    folder.mkdir()
    source.head(120).write_parquet(folder / "a.parquet")
    source.tail(80).write_parquet(folder / "b.parquet")
    config = write_config(tmp_path, output={"rows_per_file": 70})
    output = tmp_path / "tagged"

    result = run_cli(
        "tag",
        folder,
        "-o",
        f"{output}/",
        "--model",
        small_model,
        "--executor",
        "ray",
        config=config,
    )

    assert result.exit_code == 0, result.output
    parts = sorted(output.iterdir())
    assert [part.name for part in parts] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    tagged = pl.concat([pl.read_parquet(part) for part in parts])
    assert tagged["id"].to_list() == source["id"].to_list()
    assert [pl.read_parquet(part).height for part in parts] == [70, 70, 60]


def test_folder_output_as_csv_parts(tmp_path, small_model):
    output = tmp_path / "tagged"

    result = run_cli(
        "tag",
        SAMPLE_BATCH,
        "-o",
        f"{output}/",
        "--output-format",
        "csv",
        "--model",
        small_model,
    )

    assert result.exit_code == 0, result.output
    assert [part.name for part in output.iterdir()] == ["part-00000.csv"]
    assert read_output(output / "part-00000.csv").height == 200


def local_tag_command(output, model) -> list[str]:
    """Return the argv of an in-process `tagcli tag` of the sample batch."""
    import sys

    return [
        sys.executable,
        "-m",
        "tagcli",
        "tag",
        str(SAMPLE_BATCH),
        "-o",
        str(output),
        "--model",
        str(model),
        "--executor",
        "local",
    ]


def test_plain_progress_lines_off_terminal(tmp_path, small_model):
    import subprocess

    output = tmp_path / "tagged.parquet"
    completed = subprocess.run(
        local_tag_command(output, small_model),
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert "tagged 200/200 rows" in completed.stderr
    assert "\x1b[" not in completed.stderr
    assert "\x1b[" not in completed.stdout


def test_progress_bar_on_terminal(tmp_path, small_model):
    import os
    import pty
    import subprocess

    import threading

    output = tmp_path / "tagged.parquet"
    leader, follower = pty.openpty()
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    chunks: list[bytes] = []

    def drain() -> None:
        # Read while the command runs: a full terminal buffer would block its writes.
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    completed = subprocess.run(
        local_tag_command(output, small_model),
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        check=False,
        env=env,
    )
    os.close(follower)
    reader.join(timeout=60)
    os.close(leader)
    terminal = b"".join(chunks)

    assert completed.returncode == 0
    assert b"tagging" in terminal
    assert b"tagged 200/200 rows" not in terminal
