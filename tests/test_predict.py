"""`tagcli predict`: one item, a JSON-lines stream through a real pipe, duplicates."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time

import numpy as np
from click.testing import CliRunner
import polars as pl
import pytest
from conftest import SAMPLE_CSV, run_cli, write_config

from tagcli.backends import OnnxInt8Backend
from tagcli.cli import main
from tagcli.config import load_config
from tagcli.history import INDEX_FILE
from tagcli.predict import Item, Predictor, StreamDuplicates

TAGS = ["natural-language-processing", "computer-vision", "mlops", "other"]
# Generous: the first reply waits for Python, torch and the model to load on
# a busy machine. No test asserts a latency.
REPLY_TIMEOUT_S = 180
HEAVY_MODULES = (
    "torch",
    "ray",
    "sentence_transformers",
    "sklearn",
    "onnxruntime",
    "faiss",
)


def item_line(item_id, title, description) -> str:
    return json.dumps({"id": item_id, "title": title, "description": description})


class LineReader:
    """Reads whole lines from a subprocess's stdout, failing after a timeout."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.selector = selectors.DefaultSelector()
        self.selector.register(process.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def read_line(self, timeout: float = REPLY_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"no reply within {timeout} s; got {self.buffer!r}"
            if not self.selector.select(left):
                continue
            chunk = os.read(self.process.stdout.fileno(), 65536)
            assert chunk, f"stdout closed; stderr: {self.process.stderr.read()!r}"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8")

    def has_pending_output(self, wait: float) -> bool:
        return bool(self.buffer) or bool(self.selector.select(wait))


def start_predict(model) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tagcli", "predict", "--model", str(model)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )


def test_stream_answers_each_line_before_next(small_model):
    items = [
        (1, "BERT for legal text", "Fine-tuning a transformer on contracts"),
        (2, "YOLO on drones", "Real-time object detection from aerial video"),
        (3, "Feature store", "Serving features to models in production"),
    ]
    process = start_predict(small_model)
    reader = LineReader(process)
    try:
        for item_id, title, description in items:
            line = item_line(item_id, title, description) + "\n"
            process.stdin.write(line.encode())
            process.stdin.flush()

            # stdin stays open: the reply must come while predict still waits
            # for more input, as under `tail -f`.
            reply = json.loads(reader.read_line())
            assert reply["id"] == item_id
            assert reply["tag"] in TAGS
            assert process.poll() is None

            # Nothing else arrives before the next line is written.
            assert not reader.has_pending_output(wait=0.5)
        process.stdin.close()
        assert process.wait(timeout=REPLY_TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_ends_stream_after_replies(small_model):
    import signal

    process = start_predict(small_model)
    reader = LineReader(process)
    try:
        process.stdin.write((item_line(1, "BERT", "Transformers for text") + "\n").encode())
        process.stdin.flush()
        reply = json.loads(reader.read_line())

        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=REPLY_TIMEOUT_S)
        stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert reply["id"] == 1
    assert code == 143
    assert "every line read before it has its output line" in stderr
    assert "no output was written" not in stderr


def test_malformed_lines_do_not_stop_stream(small_model):
    lines = [
        item_line("a", "Image segmentation", "U-Net for medical scans"),
        "{not json",
        json.dumps({"id": "b", "title": "Only a title"}),
        json.dumps({"id": "c", "title": 42, "description": "text"}),
        json.dumps(["id", "title", "description"]),
        json.dumps({"id": None, "title": "t", "description": "d"}),
        item_line("d", "", None),
        "",
        item_line("e", "Kubeflow pipelines", "Orchestrating ML workflows"),
    ]
    process = start_predict(small_model)
    reader = LineReader(process)
    try:
        replies = []
        for line in lines:
            process.stdin.write((line + "\n").encode())
            process.stdin.flush()
            if line:
                replies.append(json.loads(reader.read_line()))
        process.stdin.close()
        exit_code = process.wait(timeout=REPLY_TIMEOUT_S)
        stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert exit_code == 4, stderr
    assert "Rejected 6 of 8 line(s)" in stderr
    assert [reply.get("id") for reply in replies] == [
        "a", None, "b", "c", None, None, "d", "e",
    ]
    assert replies[0]["tag"] in TAGS
    assert replies[-1]["tag"] in TAGS
    errors = {reply["line"]: reply["error"] for reply in replies if "error" in reply}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7]
    assert errors[2].startswith("line 2: invalid JSON")
    assert "missing field(s) description" in errors[3]
    assert "title must be a string or null, got the number 42" in errors[4]
    assert "expected a JSON object" in errors[5]
    assert "id must be a string or an integer, got null" in errors[6]
    assert "both empty" in errors[7]


def test_invalid_utf8_line_is_rejected(small_model):
    stream = b'{"id": 1, "title": "caf\xe9", "description": "x"}\n' + (
        item_line(2, "Speech recognition", "Whisper on call audio") + "\n"
    ).encode()

    result = subprocess.run(
        [sys.executable, "-m", "tagcli", "predict", "--model", str(small_model)],
        input=stream,
        capture_output=True,
        env=dict(os.environ),
        timeout=REPLY_TIMEOUT_S,
    )

    replies = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 4
    assert replies[0]["line"] == 1
    assert "not valid UTF-8" in replies[0]["error"]
    assert replies[1]["id"] == 2


def test_single_item_output(small_model):
    result = run_cli(
        "predict",
        "--model",
        small_model,
        "--id",
        "42",
        "--title",
        "Object detection",
        "--description",
        "Bounding boxes for cars in street images",
    )

    assert result.exit_code == 0, result.output
    reply = json.loads(result.output)
    assert reply["id"] == "42"
    assert list(reply["probabilities"]) == TAGS
    assert abs(sum(reply["probabilities"].values()) - 1.0) < 1e-9
    assert reply["confidence"] == max(reply["probabilities"].values())
    assert reply["tag"] == max(reply["probabilities"], key=reply["probabilities"].get)
    assert reply["duplicate_of"] is None
    manifest = json.loads((small_model / "manifest.json").read_text())
    below = reply["confidence"] < manifest["review"]["threshold"]
    assert reply["needs_review"] is below


def test_single_item_option_errors(small_model):
    id_only = run_cli("predict", "--model", small_model, "--id", "1")
    empty = run_cli("predict", "--model", small_model, "--title", " ")

    assert id_only.exit_code == 2
    assert "--id applies to one item" in id_only.output
    assert empty.exit_code == 3
    assert "both empty" in empty.output


def test_stream_marks_duplicates(small_model):
    lines = [
        item_line(1, "Graph neural networks", "Message passing for molecules"),
        item_line(2, "GRAPH  neural networks", "message passing for molecules"),
        item_line(3, "Graph neural networks.", "Message passing for molecules!"),
        item_line(4, "MLflow tracking", "Logging experiments and model versions"),
    ]

    result = CliRunner().invoke(
        main, ["predict", "--model", str(small_model)], input="\n".join(lines)
    )

    replies = [json.loads(line) for line in result.output.splitlines()]
    assert result.exit_code == 0, result.output
    assert [reply["id"] for reply in replies] == [1, 2, 3, 4]
    assert replies[0]["duplicate_of"] is None
    # Same text but for case and spacing: the content keys match.
    assert replies[1]["duplicate_of"] == 1
    # Punctuation differs, so only the embeddings' cosine similarity matches.
    assert replies[2]["duplicate_of"] == 1
    assert replies[3]["duplicate_of"] is None


def test_needs_review_follows_threshold(tmp_path, small_model):
    (tmp_path / "every").mkdir()
    (tmp_path / "none").mkdir()
    every_row = write_config(tmp_path / "every", review={"threshold": 1.0})
    no_row = write_config(tmp_path / "none", review={"threshold": 0.0})
    item = ["--title", "Diffusion models for images"]

    flagged = run_cli("predict", "--model", small_model, *item, config=every_row)
    unflagged = run_cli("predict", "--model", small_model, *item, config=no_row)

    assert flagged.exit_code == 0, flagged.output
    assert unflagged.exit_code == 0, unflagged.output
    assert json.loads(flagged.output)["needs_review"] is True
    assert json.loads(unflagged.output)["needs_review"] is False


def test_stream_finds_history_duplicates(tmp_path, small_model):
    config = write_config(tmp_path, paths={"state_dir": "state"})
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).head(30)
    dump = tmp_path / "dump.csv"
    frame.select("id", "title", "description").write_csv(dump)
    tagged = run_cli(
        "tag", dump, "-o", tmp_path / "out.csv", "--model", small_model, config=config
    )
    assert tagged.exit_code == 0, tagged.output
    index = tmp_path / "state" / INDEX_FILE
    index_before = index.read_bytes()
    kept = pl.read_csv(tmp_path / "out.csv", infer_schema=False).row(0, named=True)
    lines = [
        # Same text as a row `tag` kept, but for case and spacing.
        item_line("a", kept["title"].upper(), "  " + kept["description"]),
        item_line("b", "Quantum annealing schedules", "Ising spin glass hardware"),
    ]

    command = ["--config", str(config), "predict", "--model", str(small_model)]
    result = CliRunner().invoke(main, command, input="\n".join(lines))
    without = CliRunner().invoke(
        main, command + ["--no-history"], input="\n".join(lines)
    )

    assert result.exit_code == 0, result.output
    replies = [json.loads(line) for line in result.output.splitlines()]
    # History ids are strings, as `tag` stores them.
    assert replies[0]["duplicate_of"] == kept["id"]
    assert replies[1]["duplicate_of"] is None
    assert without.exit_code == 0, without.output
    replies = [json.loads(line) for line in without.output.splitlines()]
    assert replies[0]["duplicate_of"] is None
    # predict reads the history and never writes it.
    assert index.read_bytes() == index_before


def test_predictor_uses_artifact_backend(tmp_path, small_model):
    config = load_config(write_config(tmp_path, paths={"state_dir": "state"}))

    predictor = Predictor(config, small_model)

    assert isinstance(predictor.encoder, OnnxInt8Backend)


def test_predict_rejects_other_backend(tmp_path, small_model):
    config = write_config(
        tmp_path, paths={"state_dir": "state"}, embedding={"backend": "torch"}
    )

    result = run_cli(
        "predict", "--model", small_model, "--title", "Pose estimation", config=config
    )

    assert result.exit_code == 2
    assert "--backend onnx-int8" in result.output


def test_help_and_version_import_no_heavy_package():
    probe = (
        "import json, runpy, sys\n"
        "sys.argv = ['tagcli'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('tagcli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = {HEAVY_MODULES!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(json.dumps(loaded), file=sys.stderr)\n"
    )
    for option in ("--help", "--version", "predict --help"):
        result = subprocess.run(
            [sys.executable, "-c", probe, *option.split()],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stderr.strip().splitlines()[-1])
        assert loaded == [], f"tagcli {option} imported {loaded}"


# The stream tests below have no history, so the item is never read.
ANY_ITEM = Item(None, "title", "description")


def test_duplicates_window_drops_oldest():
    duplicates = StreamDuplicates(threshold=0.95, window=2)
    vectors = np.eye(3, dtype=np.float32)

    duplicates.add("first", "key-1", vectors[0])
    duplicates.add("second", "key-2", vectors[1])
    duplicates.add("third", "key-3", vectors[2])

    assert duplicates.find(ANY_ITEM, "key-1", vectors[0]) is None
    assert duplicates.find(ANY_ITEM, "key-2", np.zeros(3, np.float32)) == "second"
    assert duplicates.find(ANY_ITEM, "other", vectors[2]) == "third"


def test_duplicates_threshold_is_inclusive():
    duplicates = StreamDuplicates(threshold=0.8, window=10)
    duplicates.add("base", "key-1", np.array([1.0, 0.0], np.float32))

    at_threshold = np.array([0.8, 0.6], np.float32)
    below = np.array([0.7, np.sqrt(1 - 0.49)], np.float32)

    assert duplicates.find(ANY_ITEM, "key-2", at_threshold) == "base"
    assert duplicates.find(ANY_ITEM, "key-3", below) is None


def test_duplicates_window_zero_keeps_nothing():
    duplicates = StreamDuplicates(threshold=0.9, window=0)
    duplicates.add("base", "key-1", np.array([1.0, 0.0], np.float32))

    assert duplicates.find(ANY_ITEM, "key-1", np.array([1.0, 0.0], np.float32)) is None


def test_unclosed_string_message():
    from tagcli.jsonl_stream import LineError, parse_line

    with pytest.raises(LineError) as caught:
        parse_line(b'{"id": 2, "title": "broken\n')

    message = str(caught.value)
    assert "Unterminated string starting at column 20" in message
    assert "at at" not in message
