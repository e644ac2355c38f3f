"""Bad inputs through train, tag and eval, one table row each.

Every case asserts the exit code, that the message names the file (or
standard input) and the problem, and that the run wrote nothing: no output,
no rejects file, no model artifact, no other file in the test folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_BATCH, write_config

from tagcli.cli import main

TAG_HEADER = "id,title,description\n"
LABELED_HEADER = "id,title,description,tag\n"


def csv_file(name: str, text: str, encoding: str = "utf-8"):
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(text.encode(encoding))
        return path

    return build


def bytes_file(name: str, data: bytes):
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return build


def parquet_file(name: str, columns: dict):
    def build(folder: Path) -> Path:
        path = folder / name
        pq.write_table(pa.table(columns), path)
        return path

    return build


def missing(name: str):
    def build(folder: Path) -> Path:
        return folder / name

    return build


def standard_input(folder: Path) -> Path:
    return Path("-")


def folder_of(name: str, files: dict[str, Callable[[Path], Path]]):
    def build(folder: Path) -> Path:
        path = folder / name
        path.mkdir()
        for builder in files.values():
            builder(path)
        return path

    return build


def labeled_rows(rows: list[tuple[str, str, str]]) -> str:
    """Return a labeled CSV with one row per (title, description, tag)."""
    lines = [LABELED_HEADER]
    for index, (title, description, tag) in enumerate(rows, start=1):
        lines.append(f"{index},{title},{description},{tag}\n")
    return "".join(lines)


# Enough rows of two tags for a stratified split; cases change a few of them.
GOOD_ROWS = [
    (f"Vision paper {i}", "object detection", "computer-vision") for i in range(6)
] + [
    (f"Language paper {i}", "text summarisation", "natural-language-processing")
    for i in range(6)
]
HALF_PARQUET = SAMPLE_BATCH.read_bytes()[: len(SAMPLE_BATCH.read_bytes()) // 2]
LATIN1_TEXT = "1,Café,Détection d'objets\n"


@dataclass
class BadInput:
    name: str
    command: str
    build: Callable[[Path], Path]
    exit_code: int
    problem: str
    stdin: bytes | None = None


CASES = [
    # tag
    BadInput("tag-missing-file", "tag", missing("nope.csv"), 3, "file not found"),
    BadInput(
        "tag-empty-folder",
        "tag",
        folder_of("dump", {}),
        3,
        "the folder contains no .csv or .parquet files",
    ),
    BadInput(
        "tag-folder-without-data-files",
        "tag",
        folder_of("dump", {"notes": csv_file("notes.txt", "not data")}),
        3,
        "the folder contains no .csv or .parquet files",
    ),
    BadInput(
        "tag-zero-byte-csv",
        "tag",
        bytes_file("zero.csv", b""),
        3,
        "the file is empty (0 bytes); a CSV file needs at least a header line",
    ),
    BadInput(
        "tag-zero-byte-parquet",
        "tag",
        bytes_file("zero.parquet", b""),
        3,
        "the file is empty (0 bytes); a Parquet file needs at least a footer",
    ),
    BadInput(
        "tag-blank-header-line",
        "tag",
        csv_file("blank.csv", "\n1,a,b\n"),
        3,
        "no header line found",
    ),
    BadInput(
        "tag-missing-column-csv",
        "tag",
        csv_file("cols.csv", "id,title\n1,BERT\n"),
        3,
        "missing required column(s) description",
    ),
    BadInput(
        "tag-missing-column-parquet",
        "tag",
        parquet_file("cols.parquet", {"id": ["1"], "description": ["text"]}),
        3,
        "missing required column(s) title",
    ),
    BadInput(
        "tag-duplicated-column",
        "tag",
        csv_file("dup.csv", "id,title,title,description\n1,a,b,c\n"),
        3,
        "column 'title' appears more than once",
    ),
    BadInput(
        "tag-ragged-row",
        "tag",
        csv_file("ragged.csv", TAG_HEADER + "1,YOLO,Detection\n2,BERT,Text,extra\n"),
        3,
        "data row 2 (line 3) has 4 fields but the header has 3",
    ),
    BadInput(
        "tag-not-utf8",
        "tag",
        csv_file("latin1.csv", TAG_HEADER + LATIN1_TEXT, encoding="latin-1"),
        3,
        "line 2 is not valid utf-8",
    ),
    BadInput(
        "tag-corrupt-parquet",
        "tag",
        bytes_file("corrupt.parquet", b"this is not parquet at all" * 20),
        3,
        "not a readable Parquet file",
    ),
    BadInput(
        "tag-truncated-parquet",
        "tag",
        bytes_file("cut.parquet", HALF_PARQUET),
        3,
        "not a readable Parquet file",
    ),
    BadInput(
        "tag-all-null-text-column",
        "tag",
        parquet_file(
            "nulls.parquet",
            {
                "id": ["1", "2"],
                "title": ["BERT", "YOLO"],
                "description": pa.array([None, None], pa.string()),
            },
        ),
        3,
        "column 'description' is null in every row",
    ),
    BadInput(
        "tag-folder-mixes-formats",
        "tag",
        folder_of(
            "dump",
            {
                "a": csv_file("a.csv", TAG_HEADER + "1,a,b\n"),
                "b": parquet_file(
                    "b.parquet", {"id": ["2"], "title": ["t"], "description": ["d"]}
                ),
            },
        ),
        3,
        "the folder mixes CSV and Parquet files",
    ),
    BadInput(
        "tag-folder-columns-differ",
        "tag",
        folder_of(
            "dump",
            {
                "a": csv_file("a.csv", TAG_HEADER + "1,a,b\n"),
                "b": csv_file("b.csv", "id,title,description,extra\n2,c,d,e\n"),
            },
        ),
        3,
        "every file in an input folder needs the same columns",
    ),
    BadInput(
        "tag-folder-column-types-differ",
        "tag",
        folder_of(
            "dump",
            {
                "a": parquet_file(
                    "a.parquet", {"id": [1], "title": ["t"], "description": ["d"]}
                ),
                "b": parquet_file(
                    "b.parquet", {"id": ["2"], "title": ["t"], "description": ["d"]}
                ),
            },
        ),
        3,
        "the Parquet files give a column different types",
    ),
    BadInput(
        "tag-unsupported-extension",
        "tag",
        csv_file("dump.json", '{"id": 1}'),
        3,
        "unsupported input format '.json'",
    ),
    BadInput(
        "tag-stdin-empty",
        "tag",
        standard_input,
        3,
        "the file is empty (0 bytes)",
        stdin=b"",
    ),
    BadInput(
        "tag-stdin-truncated-parquet",
        "tag",
        standard_input,
        3,
        "not a readable Parquet file",
        stdin=HALF_PARQUET,
    ),
    BadInput(
        "tag-stdin-ragged-row",
        "tag",
        standard_input,
        3,
        "data row 1 (line 2) has 2 fields but the header has 3",
        stdin=(TAG_HEADER + "1,only two\n").encode(),
    ),
    BadInput(
        "tag-null-typed-title-column",
        "tag",
        parquet_file(
            "nulls.parquet",
            {
                "id": ["1"],
                "title": pa.array([None], pa.null()),
                "description": pa.array([None], pa.null()),
            },
        ),
        3,
        "column 'title' is null in every row",
    ),
    # train
    BadInput("train-missing-file", "train", missing("labels.csv"), 3, "file not found"),
    BadInput(
        "train-header-without-rows",
        "train",
        csv_file("labels.csv", LABELED_HEADER),
        3,
        "the file has a header but no data rows",
    ),
    BadInput(
        "train-missing-tag-column",
        "train",
        csv_file("labels.csv", TAG_HEADER + "1,a,b\n"),
        3,
        "missing required column(s) tag",
    ),
    BadInput(
        "train-one-class",
        "train",
        csv_file(
            "labels.csv",
            labeled_rows([(f"t{i}", "d", "computer-vision") for i in range(10)]),
        ),
        3,
        "the tag column has only one class ('computer-vision')",
    ),
    BadInput(
        "train-tag-too-few-rows",
        "train",
        csv_file(
            "labels.csv", labeled_rows(GOOD_ROWS + [("Pipelines", "deploy", "mlops")])
        ),
        3,
        "too few rows to split for tag(s) mlops (1)",
    ),
    BadInput(
        "train-empty-labels",
        "train",
        csv_file("labels.csv", labeled_rows(GOOD_ROWS + [("No label", "text", "")])),
        3,
        "1 row(s) have an empty tag (data rows 13",
    ),
    BadInput(
        "train-all-null-labels-parquet",
        "train",
        parquet_file(
            "labels.parquet",
            {
                "id": ["1", "2"],
                "title": ["a", "b"],
                "description": ["c", "d"],
                "tag": pa.array([None, None], pa.string()),
            },
        ),
        3,
        "2 row(s) have an empty tag",
    ),
    BadInput(
        "train-rows-without-text",
        "train",
        csv_file("labels.csv", labeled_rows(GOOD_ROWS + [("", "", "mlops")])),
        3,
        "have neither a title nor a description",
    ),
    BadInput(
        "train-ragged-row",
        "train",
        csv_file("labels.csv", labeled_rows(GOOD_ROWS) + "13,a,b,mlops,extra\n"),
        3,
        "data row 13 (line 14) has 5 fields but the header has 4",
    ),
    BadInput(
        "train-stdin-empty",
        "train",
        standard_input,
        3,
        "the file is empty (0 bytes)",
        stdin=b"",
    ),
    # eval
    BadInput("eval-missing-file", "eval", missing("labels.csv"), 3, "file not found"),
    BadInput(
        "eval-zero-byte-csv",
        "eval",
        bytes_file("labels.csv", b""),
        3,
        "the file is empty (0 bytes)",
    ),
    BadInput(
        "tag-unclosed-quote",
        "tag",
        csv_file("open.csv", TAG_HEADER + '1,"Unclosed quote,desc\n2,Second,row\n'),
        3,
        "unclosed quote starting at line 2; close the quote or escape it",
    ),
    BadInput(
        "tag-unclosed-quote-at-end",
        "tag",
        csv_file("open.csv", TAG_HEADER + '1,"Unclosed quote,desc\n'),
        3,
        "unclosed quote starting at line 2; close the quote or escape it",
    ),
    BadInput(
        "train-too-few-rows-for-cv",
        "train",
        csv_file(
            "labels.csv",
            labeled_rows(
                GOOD_ROWS[:2]
                + [(f"Other post {i}", f"misc topic {i}", "other") for i in range(6)]
            ),
        ),
        3,
        "rows per tag: computer-vision 2, other 6",
    ),
    BadInput(
        "eval-missing-tag-column",
        "eval",
        parquet_file(
            "labels.parquet", {"id": ["1"], "title": ["a"], "description": ["b"]}
        ),
        3,
        "missing required column(s) tag",
    ),
    BadInput(
        "eval-empty-labels",
        "eval",
        csv_file(
            "labels.csv",
            labeled_rows([("BERT", "text", ""), ("YOLO", "boxes", "computer-vision")]),
        ),
        3,
        "1 row(s) have an empty tag (data rows 1",
    ),
    BadInput(
        "eval-not-utf8",
        "eval",
        csv_file(
            "labels.csv",
            LABELED_HEADER + "1,Café,Détection,computer-vision\n",
            encoding="latin-1",
        ),
        3,
        "--encoding cp1252",
    ),
    BadInput(
        "eval-corrupt-parquet",
        "eval",
        bytes_file("labels.parquet", b"PAR1 and then nothing useful"),
        3,
        "not a readable Parquet file",
    ),
]


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


def command_line(case: BadInput, source: Path, folder: Path, model: Path) -> list[str]:
    output = folder / "out"
    if case.command == "tag":
        tagged = str(output / "tagged.csv")
        return ["tag", str(source), "-o", tagged, "--model", str(model)]
    if case.command == "train":
        return ["train", str(source), "--output", str(output / "model")]
    report = str(output / "eval.json")
    return ["eval", str(source), "--model", str(model), "--json", report]


def test_table_has_enough_cases():
    assert len(CASES) >= 25
    assert {case.command for case in CASES} == {"train", "tag", "eval"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(tmp_path, small_model, case):
    config = write_config(tmp_path, paths={"models_dir": str(tmp_path / "models")})
    source = case.build(tmp_path)
    before = files_under(tmp_path)
    arguments = ["--config", str(config)]
    arguments += command_line(case, source, tmp_path, small_model)

    result = CliRunner().invoke(
        main, arguments, input=case.stdin, catch_exceptions=False
    )

    assert result.exit_code == case.exit_code, result.output
    named = "standard input" if case.stdin is not None else str(source)
    assert named in result.output
    assert case.problem in result.output
    assert "Traceback" not in result.output
    assert files_under(tmp_path) == before
