"""Unattended runs: SIGTERM, plain output off a terminal, stdin, --json, exit codes."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_BATCH, read_output, run_cli, write_config

from tagcli.cli import main


def tag_command(*arguments) -> list[str]:
    return [sys.executable, "-m", "tagcli", "tag", *[str(a) for a in arguments]]


def repeated_batch(folder: Path, copies: int) -> Path:
    """Write the sample batch `copies` times over into one Parquet file."""
    frame = pl.read_parquet(SAMPLE_BATCH)
    path = folder / "big.parquet"
    pl.concat([frame] * copies).write_parquet(path)
    return path


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


def wait_for_written_rows(folder: Path, process: subprocess.Popen) -> Path:
    """Wait until the run's hidden temporary output has data in it; return its path."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, "tagcli ended before it could be stopped"
        # The output and the review file each have a hidden temporary file;
        # the review file's stays empty while no row needs review.
        partials = [
            path
            for path in folder.glob(".*")
            if path.is_file() and path.stat().st_size > 0
        ]
        if partials:
            return partials[0]
        time.sleep(0.2)
    raise AssertionError("tagcli wrote no rows within 600 s")


@pytest.mark.parametrize("source", ["file-local", "stdin-local", "file-ray"])
def test_sigterm_leaves_no_output(tmp_path, small_model, source):
    data = repeated_batch(tmp_path, 15)
    config = write_config(tmp_path, ray={"batch_size": 50})
    out = tmp_path / "out"
    out.mkdir()
    spool = tmp_path / "spool"
    spool.mkdir()
    output = out / "tagged.parquet"
    executor = "ray" if source.endswith("ray") else "local"
    input_argument = "-" if source.startswith("stdin") else data
    command = tag_command(
        input_argument, "-o", output, "--model", small_model, "--executor", executor
    )
    command[3:3] = ["--config", str(config)]
    before = files_under(tmp_path) | {Path("stderr.txt")}
    env = dict(os.environ)
    if source.startswith("stdin"):
        # Only here: Ray puts its sockets under TMPDIR, and this path is too long.
        env["TMPDIR"] = str(spool)

    with data.open("rb") as stdin, (tmp_path / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen(
            command,
            stdin=stdin if source.startswith("stdin") else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
        try:
            partial = wait_for_written_rows(out, process)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    messages = (tmp_path / "stderr.txt").read_text()

    assert returncode == 143, messages
    assert "Stopped by SIGTERM" in messages
    assert not partial.exists()
    assert not output.exists()
    assert list(out.iterdir()) == []
    assert [path.name for path in spool.iterdir() if "stdin" in path.name] == []
    # No other file appeared either: no history or rejects file. The embedding
    # cache may keep what it stored before the signal, since those
    # embeddings are valid for the next run.
    cache_files = {path for path in files_under(tmp_path) if path.parts[0] == "state"}
    assert files_under(tmp_path) - cache_files == before


def test_stdout_to_file_has_no_ansi(tmp_path, small_model):
    output = tmp_path / "tagged.parquet"
    report = tmp_path / "report.txt"
    # FORCE_COLOR requests colour from rich, but a file on standard output gets none.
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    env.update(FORCE_COLOR="1", TERM="xterm-256color")

    with report.open("wb") as stdout:
        completed = subprocess.run(
            tag_command(SAMPLE_BATCH, "-o", output, "--model", small_model),
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            check=False,
        )
    text = report.read_bytes()

    assert completed.returncode == 0, completed.stderr
    assert b"read" in text
    assert b"200" in text
    assert b"\x1b[" not in text
    assert b"\x1b[" not in completed.stderr


def read_terminal(leader: int, chunks: list[bytes]) -> None:
    """Collect a pseudo-terminal's output until it closes.

    Runs beside the command, because a full terminal buffer blocks its writes.
    """
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)


def test_no_color_on_terminal(tmp_path, small_model):
    output = tmp_path / "tagged.parquet"
    leader, follower = pty.openpty()
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm-256color"}
    chunks: list[bytes] = []
    reader = threading.Thread(target=read_terminal, args=(leader, chunks))
    reader.start()

    completed = subprocess.run(
        tag_command(SAMPLE_BATCH, "-o", output, "--model", small_model),
        stdout=follower,
        stderr=follower,
        env=env,
        check=False,
    )
    os.close(follower)
    reader.join(timeout=60)
    os.close(leader)
    terminal = b"".join(chunks)

    assert completed.returncode == 0
    assert b"read" in terminal
    assert b"\x1b[" not in terminal


def empty_and_long_rows(folder: Path) -> Path:
    """Write a CSV of 4 rows: two to tag, one with no text, one of 400 words."""
    path = folder / "rows.csv"
    path.write_text(
        "id,title,description\n"
        "1,YOLO,Real-time object detection\n"
        "2,,\n"
        "3,Long,\"" + "transformer " * 400 + "\"\n"
        "4,BERT,Pretrained language model for text classification\n",
        encoding="utf-8",
    )
    return path


def json_line(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def tag_json(*arguments, config: Path | None = None):
    runner = CliRunner()
    prefix = ["--config", str(config)] if config else []
    return runner.invoke(
        main,
        prefix + ["tag", *[str(a) for a in arguments], "--json"],
        catch_exceptions=False,
    )


def test_empty_row_goes_to_rejects(tmp_path, small_model):
    source = empty_and_long_rows(tmp_path)
    output = tmp_path / "tagged.csv"

    result = tag_json(source, "-o", output, "--model", small_model)
    summary = json_line(result)
    tagged = read_output(output)
    rejects = read_output(tmp_path / "tagged.rejects.csv")

    assert result.exit_code == 4, result.output
    assert summary["exit_code"] == 4
    assert summary["rows_read"] == 4
    assert summary["rows_tagged"] == 3
    assert summary["rows_duplicate"] == 0
    assert summary["rows_rejected"] == 1
    assert summary["rows_truncated"] == 1
    assert summary["rejects"] == str(tmp_path / "tagged.rejects.csv")
    assert tagged["id"].to_list() == ["1", "3", "4"]
    assert rejects.columns == ["id", "title", "description", "reason"]
    assert rejects["id"].to_list() == ["2"]
    assert rejects["reason"].to_list() == ["empty_text"]


def test_long_text_rejected_by_policy(tmp_path, small_model):
    source = empty_and_long_rows(tmp_path)
    config = write_config(tmp_path, rows={"empty_text": "tag", "long_text": "reject"})
    output = tmp_path / "tagged.parquet"

    result = tag_json(source, "-o", output, "--model", small_model, config=config)
    summary = json_line(result)
    rejects = read_output(tmp_path / "tagged.rejects.parquet")

    assert result.exit_code == 4, result.output
    assert summary["rows_tagged"] == 3
    assert summary["rows_rejected"] == 1
    assert summary["rows_truncated"] == 0
    assert read_output(output)["id"].to_list() == ["1", "2", "4"]
    assert rejects["id"].to_list() == ["3"]
    assert rejects["reason"].to_list() == ["text_too_long"]


def test_tag_policy_writes_no_rejects(tmp_path, small_model):
    source = empty_and_long_rows(tmp_path)
    config = write_config(tmp_path, rows={"empty_text": "tag"})
    output = tmp_path / "tagged.csv"

    result = tag_json(source, "-o", output, "--model", small_model, config=config)

    assert result.exit_code == 0, result.output
    assert json_line(result)["rows_tagged"] == 4
    assert read_output(output).height == 4
    assert not (tmp_path / "tagged.rejects.csv").exists()


def test_ray_path_rejects_like_local(tmp_path, small_model, ray_local):
    source = empty_and_long_rows(tmp_path)
    config = write_config(tmp_path, rows={"long_text": "reject"})
    outputs = {}
    for executor in ("local", "ray"):
        output = tmp_path / f"{executor}.parquet"
        result = tag_json(
            source,
            "-o",
            output,
            "--model",
            small_model,
            "--executor",
            executor,
            # The second run would find the first run's rows in the history.
            "--no-history",
            config=config,
        )
        assert result.exit_code == 4, result.output
        outputs[executor] = (
            read_output(output),
            read_output(tmp_path / f"{executor}.rejects.parquet"),
        )

    local_tagged, local_rejects = outputs["local"]
    ray_tagged, ray_rejects = outputs["ray"]
    assert ray_tagged["id"].to_list() == local_tagged["id"].to_list() == ["1", "4"]
    assert ray_tagged["tag"].to_list() == local_tagged["tag"].to_list()
    assert ray_rejects.to_dicts() == local_rejects.to_dicts()
    assert sorted(ray_rejects["reason"].to_list()) == ["empty_text", "text_too_long"]


def test_existing_rejects_needs_overwrite(tmp_path, small_model):
    source = empty_and_long_rows(tmp_path)
    output = tmp_path / "tagged.csv"
    stale = tmp_path / "tagged.rejects.csv"
    stale.write_text("id,reason\nold,empty_text\n")

    rejected = run_cli("tag", source, "-o", output, "--model", small_model)

    assert rejected.exit_code == 2
    assert str(stale) in rejected.output
    assert "--overwrite" in rejected.output
    assert not output.exists()


def test_overwrite_removes_stale_rejects(tmp_path, small_model):
    output = tmp_path / "tagged.parquet"
    stale = tmp_path / "tagged.rejects.parquet"
    stale.write_text("left by an earlier run")

    result = run_cli(
        "tag", SAMPLE_BATCH, "-o", output, "--model", small_model, "--overwrite"
    )

    assert result.exit_code == 0, result.output
    assert read_output(output).height == 200
    assert not stale.exists()


def test_header_only_is_quiet_day(tmp_path, small_model):
    source = tmp_path / "quiet.csv"
    source.write_text("id,title,description\n")
    output = tmp_path / "tagged.parquet"

    result = tag_json(source, "-o", output, "--model", small_model)
    summary = json_line(result)
    tagged = read_output(output)

    assert result.exit_code == 0, result.output
    assert "no data rows" in result.output
    assert summary["rows_read"] == 0
    assert summary["rows_tagged"] == 0
    assert tagged.height == 0
    assert tagged.columns[:5] == ["id", "title", "description", "tag", "confidence"]


def test_parquet_folder_with_null_column(tmp_path, small_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "dump"
    folder.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": ["1", "2"],
                "title": ["YOLO object detection", "BERT text classifier"],
                "description": pa.array([None, None], pa.null()),
            }
        ),
        folder / "a.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": ["3"],
                "title": ["Kubeflow"],
                "description": ["Deploy and monitor models in production"],
            }
        ),
        folder / "b.parquet",
    )
    output = tmp_path / "tagged.parquet"

    result = run_cli("tag", folder, "-o", output, "--model", small_model)
    tagged = read_output(output)

    assert result.exit_code == 0, result.output
    assert tagged["id"].to_list() == ["1", "2", "3"]
    assert tagged["description"].to_list() == [
        None,
        None,
        "Deploy and monitor models in production",
    ]
    assert tagged.schema["description"] == pl.String


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_stdin_matches_file_input(tmp_path, small_model, monkeypatch, fmt):
    source = tmp_path / f"batch.{fmt}"
    frame = pl.read_parquet(SAMPLE_BATCH).head(20)
    if fmt == "csv":
        frame.write_csv(source)
    else:
        frame.write_parquet(source)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spool))

    # --no-history: the second run would find the first run's rows in the history.
    from_file = run_cli(
        "tag",
        source,
        "-o",
        tmp_path / "file.csv",
        "--model",
        small_model,
        "--no-history",
    )
    from_stdin = CliRunner().invoke(
        main,
        [
            "tag",
            "-",
            "-o",
            str(tmp_path / "stdin.csv"),
            "--model",
            str(small_model),
            "--no-history",
        ],
        input=source.read_bytes(),
        catch_exceptions=False,
    )

    assert from_file.exit_code == 0, from_file.output
    assert from_stdin.exit_code == 0, from_stdin.output
    assert "standard input" in from_stdin.output
    file_tags = read_output(tmp_path / "file.csv")
    stdin_tags = read_output(tmp_path / "stdin.csv")
    assert stdin_tags["id"].to_list() == file_tags["id"].to_list()
    assert stdin_tags["tag"].to_list() == file_tags["tag"].to_list()
    assert list(spool.iterdir()) == []


def test_stdin_needs_output(small_model):
    result = CliRunner().invoke(
        main, ["tag", "-", "--model", str(small_model)], input=b"id,title,description\n"
    )

    assert result.exit_code == 2
    assert "pass -o" in result.output


def test_json_line_on_failure(tmp_path, small_model):
    missing = tmp_path / "missing.csv"

    result = tag_json(missing, "-o", tmp_path / "o.csv", "--model", small_model)
    summary = json_line(result)

    assert result.exit_code == 3
    assert summary["command"] == "tag"
    assert summary["exit_code"] == 3
    assert str(missing) in summary["error"]
    assert "file not found" in summary["error"]


def test_help_lists_each_command_codes():
    tag_help = run_cli("tag", "--help").output
    train_help = run_cli("train", "--help").output
    eval_help = run_cli("eval", "--help").output

    assert "4    partial success" in tag_help
    assert "143  stopped by SIGTERM" in tag_help
    assert "4    partial success" not in train_help
    assert "4    partial success" not in eval_help
    assert "143  stopped by SIGTERM" in train_help


def test_train_overwrite_replaces_artifact(tmp_path, subset_csv):
    config = write_config(tmp_path, train={"c_grid": [3.0], "cv_folds": 2})
    target = tmp_path / "model"
    first = run_cli("train", subset_csv, "--output", target, config=config)
    rejected = run_cli("train", subset_csv, "--output", target, config=config)
    manifest = json.loads((target / "manifest.json").read_text())

    replaced = CliRunner().invoke(
        main,
        ["--config", str(config), "train", str(subset_csv), "--output", str(target)]
        + ["--overwrite", "--seed", "7", "--json"],
        catch_exceptions=False,
    )
    summary = json_line(replaced)
    new_manifest = json.loads((target / "manifest.json").read_text())

    assert first.exit_code == 0, first.output
    assert rejected.exit_code == 2
    assert "pass --overwrite" in rejected.output
    assert manifest["training_data"]["seed"] == 42
    assert replaced.exit_code == 0, replaced.output
    assert summary["command"] == "train"
    assert summary["exit_code"] == 0
    assert summary["artifact"] == str(target)
    assert new_manifest["training_data"]["seed"] == 7
    assert [path.name for path in tmp_path.glob(".model*")] == []


def test_train_overwrite_keeps_other_folders(tmp_path, subset_csv):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "todo.txt").write_text("not a model")

    result = run_cli("train", subset_csv, "--output", target, "--overwrite")

    assert result.exit_code == 2
    assert "contains no model artifact" in result.output
    assert (target / "todo.txt").read_text() == "not a model"


def test_screen_texts_counts_tokens():
    from tagcli.embed import ModelSpec, load_encoder
    from tagcli.rows import RowPolicy, screen_texts

    encoder = load_encoder(ModelSpec())
    texts = ["", "short text", "word " * 254, "word " * 255]

    truncating = screen_texts(texts, encoder, RowPolicy())
    rejecting = screen_texts(texts, encoder, RowPolicy("tag", "reject"))

    # 254 words and [CLS] and [SEP] fill the 256 tokens exactly.
    assert truncating.reasons == ["empty_text", None, None, None]
    assert truncating.truncated_rows == [False, False, False, True]
    assert rejecting.reasons == [None, None, None, "text_too_long"]
    assert rejecting.truncated_rows == [False, False, False, False]


def test_local_ray_stays_on_loopback(ray_local):
    import ray

    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}

    assert addresses == {"127.0.0.1"}


def test_mapped_counts_follow_dropped_rows(tmp_path):
    from tagcli.config import Config
    from tagcli.train import count_mapped, load_labeled

    source = tmp_path / "labels.csv"
    source.write_text(
        "id,title,description,tag\n"
        "1,GAN art,Image synthesis,generative\n"
        "2,GAN faces,Face synthesis,generative\n"
        "3,Graph nets,Node classification,graph-learning\n"
        "4,YOLO,Object detection,computer-vision\n"
    )

    labeled = load_labeled(source, Config())
    remaining = labeled.frame.filter(labeled.frame["id"] != "2")

    assert labeled.mapped == {"generative": 2, "graph-learning": 1}
    assert count_mapped(remaining) == {"generative": 1, "graph-learning": 1}
    assert remaining["tag"].to_list() == ["other", "other", "computer-vision"]


def test_input_format_needs_stdin(tmp_path, small_model):
    result = run_cli(
        "tag",
        SAMPLE_BATCH,
        "-o",
        tmp_path / "o.csv",
        "--model",
        small_model,
        "--input-format",
        "csv",
    )

    assert result.exit_code == 2
    assert "--input-format applies to standard input" in result.output
    assert not (tmp_path / "o.csv").exists()


def test_null_words_are_titles(tmp_path, small_model):
    source = tmp_path / "words.csv"
    source.write_text("id,title,description\n007,None,\n000042,NaN,\n3,null,\n")
    output = tmp_path / "tagged.parquet"

    result = tag_json(source, "-o", output, "--model", small_model)
    tagged = read_output(output)

    assert result.exit_code == 0, result.output
    assert json_line(result)["rows_rejected"] == 0
    assert tagged["id"].to_list() == ["007", "000042", "3"]
    assert tagged["title"].to_list() == ["None", "NaN", "null"]
    assert tagged["tag"].null_count() == 0


def test_sigterm_deferred_during_commit():
    from tagcli.signals import Terminated, install_sigterm_handler, sigterm_deferred

    original = signal.getsignal(signal.SIGTERM)
    install_sigterm_handler()
    try:
        with sigterm_deferred() as deferred:
            os.kill(os.getpid(), signal.SIGTERM)
            # Python runs a signal handler between bytecodes; give it time.
            time.sleep(0.05)
            reached_end_of_block = True

        assert reached_end_of_block
        assert deferred.received
        # After the block the raising handler is back.
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, original)
