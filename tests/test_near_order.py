"""Near duplicates across batches keep the row with the earliest created_on.

With `[ray] batch_size = 4`, a near copy in a later batch that was created
earlier than the row kept before it displaces that row. Runs use real files,
the bundled embedding model and, for the Ray path, the session's local Ray
instance.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from conftest import read_output, write_config

from tagcli.cli import main
from tagcli.history import read_history

# Distinct sample rows that near-match neither each other nor the copies of
# ORIGINAL_ID (see the same-topic rows in test_dedupe.py).
FILLER_IDS = ["6", "7", "15", "2387", "1506", "580", "989"]
ORIGINAL_ID = "9"
BATCH_ROWS = 4


def sample_row(sample_frame, row_id: str) -> dict:
    return sample_frame.filter(pl.col("id") == row_id).drop("tag").row(0, named=True)


def chain_rows(sample_frame) -> pl.DataFrame:
    """Rows in three batches of four, with one sample row and its copies spread over them.

    - 101 (batch 1, 2022) is the original; 104 (batch 1, 2023) is an exact copy
      and 105 (batch 1, 2022-06) a near copy, both kept out by 101 at first.
    - 102 (batch 2, 2021) is a near copy created before 101.
    - 103 (batch 3, 2020) is a near copy created before both.
    In the end 103 is kept and 101, 102, 104 and 105 all name it.
    """
    original = sample_row(sample_frame, ORIGINAL_ID)
    fillers = [sample_row(sample_frame, row_id) for row_id in FILLER_IDS]

    def copy(row_id, created_on, title_suffix="", title=None):
        return {
            "id": row_id,
            "created_on": created_on,
            "title": (title or original["title"]) + title_suffix,
            "description": original["description"],
        }

    def filler(index, created_on):
        return {**fillers[index], "created_on": created_on}

    rows = [
        copy("101", "2022-01-01 00:00:00"),
        copy("104", "2023-01-01 00:00:00", title=original["title"].upper()),
        copy("105", "2022-06-01 00:00:00", " (repost)"),
        filler(0, "2019-01-01 00:00:00"),
        filler(1, "2019-01-02 00:00:00"),
        copy("102", "2021-01-01 00:00:00", " (updated)"),
        filler(2, "2019-01-03 00:00:00"),
        filler(3, "2019-01-04 00:00:00"),
        filler(4, "2019-01-05 00:00:00"),
        filler(5, "2019-01-06 00:00:00"),
        copy("103", "2020-01-01 00:00:00", " (new version)"),
        filler(6, "2019-01-07 00:00:00"),
    ]
    return pl.DataFrame(rows)


def tag_json(batch, output, model: Path, config: Path, *extra):
    arguments = ["--config", str(config), "tag", str(batch), "-o", str(output)]
    arguments += ["--model", str(model), "--json", *[str(e) for e in extra]]
    result = CliRunner().invoke(main, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def small_batch_config(folder: Path, **sections) -> Path:
    # A review threshold of 1.0 puts every tagged row in the review file, so
    # the check that displaced rows leave it cannot pass vacuously.
    return write_config(
        folder,
        paths={"state_dir": "state"},
        ray={"batch_size": BATCH_ROWS},
        review={"threshold": 1.0},
        **sections,
    )


def check_counts(summary: dict, read: int) -> None:
    assert summary["rows_read"] == read
    assert (
        summary["rows_tagged"] + summary["rows_duplicate"] + summary["rows_rejected"]
        == read
    )
    assert sum(summary["tag_counts"].values()) == summary["rows_tagged"]
    assert summary["rows_needs_review"] == summary["rows_tagged"]
    # Drift covers the rows left in the output, not the displaced ones.
    assert summary["drift"]["rows"] == summary["rows_tagged"]
    for tag, shares in summary["drift"]["tags"].items():
        expected = summary["tag_counts"][tag] / summary["rows_tagged"]
        assert shares["batch_share"] == pytest.approx(expected)


def check_chain(output, duplicates_file, review, summary) -> None:
    tagged = read_output(output)
    duplicates = read_output(duplicates_file)
    by_id = {row["id"]: row for row in duplicates.iter_rows(named=True)}

    assert "103" in tagged["id"].to_list()
    for dropped in ["101", "102", "104", "105"]:
        assert dropped not in tagged["id"].to_list()
        assert by_id[dropped]["duplicate_of"] == "103"
    for near in ["101", "102", "105"]:
        assert by_id[near]["reason"] == "near"
        assert float(by_id[near]["similarity"]) >= 0.95
    assert by_id["104"]["reason"] == "exact"
    assert sorted(by_id) == ["101", "102", "104", "105"]
    assert duplicates.columns == [
        "id",
        "created_on",
        "title",
        "description",
        "duplicate_of",
        "reason",
        "similarity",
    ]
    assert tagged.height == 12 - 4
    assert sorted(read_output(review)["id"].to_list()) == sorted(
        tagged["id"].to_list()
    )
    check_counts(summary, 12)
    assert summary["rows_duplicate_exact"] == 1
    assert summary["rows_duplicate_near"] == 3


def test_later_batch_earlier_row_is_kept(tmp_path, small_model, sample_frame):
    rows = chain_rows(sample_frame).filter(pl.col("id").is_in(["103", "104"]).not_())
    rows.write_parquet(tmp_path / "batch.parquet")
    config = small_batch_config(tmp_path)

    summary = tag_json(
        tmp_path / "batch.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--executor",
        "local",
    )

    tagged = read_output(tmp_path / "out.parquet")
    duplicates = read_output(tmp_path / "out.duplicates.parquet")
    by_id = {row["id"]: row for row in duplicates.iter_rows(named=True)}
    assert "102" in tagged["id"].to_list()
    assert "101" not in tagged["id"].to_list()
    assert sorted(by_id) == ["101", "105"]
    assert by_id["101"]["duplicate_of"] == "102"
    assert by_id["101"]["reason"] == "near"
    assert float(by_id["101"]["similarity"]) >= 0.95
    # 105 was written naming 101 in the first batch, then re-pointed.
    assert by_id["105"]["duplicate_of"] == "102"
    check_counts(summary, 10)
    assert summary["rows_duplicate_near"] == 2


def test_chain_resolves_to_earliest(tmp_path, small_model, sample_frame):
    chain_rows(sample_frame).write_parquet(tmp_path / "batch.parquet")
    config = small_batch_config(tmp_path)

    summary = tag_json(
        tmp_path / "batch.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--executor",
        "local",
    )

    check_chain(
        tmp_path / "out.parquet",
        tmp_path / "out.duplicates.parquet",
        tmp_path / "out.review.parquet",
        summary,
    )


def test_chain_into_csv_folder(tmp_path, small_model, sample_frame):
    chain_rows(sample_frame).write_csv(tmp_path / "batch.csv")
    config = small_batch_config(tmp_path, output={"rows_per_file": 3})
    folder = tmp_path / "out"

    summary = tag_json(
        tmp_path / "batch.csv",
        f"{folder}/",
        small_model,
        config,
        "--executor",
        "local",
        "--output-format",
        "csv",
    )

    parts = sorted(folder.glob("part-*.csv"))
    assert len(parts) >= 2
    combined = tmp_path / "combined.csv"
    pl.concat([read_output(part) for part in parts]).write_csv(combined)
    check_chain(
        combined,
        tmp_path / "out-duplicates.csv",
        tmp_path / "out-review.csv",
        summary,
    )
    assert list(tmp_path.glob(".*partial*")) == []


def test_csv_rows_survive_rewrite(tmp_path, small_model, sample_frame):
    """Rows left in a rewritten CSV output read exactly as in a run without displacement."""
    rows = chain_rows(sample_frame).with_columns(
        pl.when(pl.col("id") == "6")
        .then(pl.lit(None, pl.String))
        .when(pl.col("id") == "7")
        .then(pl.lit(""))
        .otherwise(pl.lit('note, with "quotes"\nand a second line'))
        .alias("note")
    )
    rows.write_parquet(tmp_path / "displacing.parquet")
    # The same texts in the same batches, but 101 is created first: no row is
    # displaced, so that output is never rewritten.
    in_order = rows.with_columns(
        pl.when(pl.col("id") == "101")
        .then(pl.lit("2018-01-01 00:00:00"))
        .otherwise(pl.col("created_on"))
        .alias("created_on")
    )
    in_order.write_parquet(tmp_path / "in_order.parquet")
    config = small_batch_config(tmp_path)
    options = ("--executor", "local", "--no-history", "--no-cache")

    displacing = tag_json(
        tmp_path / "displacing.parquet",
        tmp_path / "a.csv",
        small_model,
        config,
        *options,
    )
    plain = tag_json(
        tmp_path / "in_order.parquet", tmp_path / "b.csv", small_model, config, *options
    )

    assert displacing["rows_duplicate_near"] == 3
    assert plain["rows_duplicate_near"] == 3
    rewritten = read_csv_exactly(tmp_path / "a.csv")
    untouched = read_csv_exactly(tmp_path / "b.csv")
    assert len(rewritten) == 8
    assert rewritten["6"]["note"] is None
    assert rewritten["7"]["note"] == ""
    assert rewritten["103"]["note"] == 'note, with "quotes"\nand a second line'
    for row_id in FILLER_IDS:
        assert rewritten[row_id] == untouched[row_id]


def read_csv_exactly(path: Path) -> dict[str, dict]:
    """Return the rows of a CSV output by id, telling a null field from a quoted empty one."""
    import pyarrow.csv as pacsv

    options = pacsv.ConvertOptions(
        strings_can_be_null=True, quoted_strings_can_be_null=False
    )
    table = pacsv.read_csv(path, convert_options=options)
    return {str(row["id"]): row for row in table.to_pylist()}


def test_without_created_on_input_order(tmp_path, small_model, sample_frame):
    chain_rows(sample_frame).drop("created_on").write_parquet(
        tmp_path / "batch.parquet"
    )
    config = small_batch_config(tmp_path)

    summary = tag_json(
        tmp_path / "batch.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--executor",
        "local",
    )

    tagged = read_output(tmp_path / "out.parquet")
    duplicates = read_output(tmp_path / "out.duplicates.parquet")
    assert "101" in tagged["id"].to_list()
    assert sorted(duplicates["id"].to_list()) == ["102", "103", "104", "105"]
    assert set(duplicates["duplicate_of"].to_list()) == {"101"}
    check_counts(summary, 12)


def test_history_names_kept_row(tmp_path, small_model, sample_frame):
    rows = chain_rows(sample_frame)
    rows.write_parquet(tmp_path / "batch.parquet")
    config = small_batch_config(tmp_path)
    first = tag_json(
        tmp_path / "batch.parquet",
        tmp_path / "a.parquet",
        small_model,
        config,
        "--executor",
        "local",
    )
    # A later run sends the displaced rows' content again under new ids.
    again = rows.filter(pl.col("id").is_in(["101", "102"])).with_columns(
        ("2" + pl.col("id")).alias("id")
    )
    again.write_parquet(tmp_path / "again.parquet")

    second = tag_json(
        tmp_path / "again.parquet",
        tmp_path / "b.parquet",
        small_model,
        config,
        "--executor",
        "local",
    )

    assert first["history_rows"] == read_history(tmp_path / "state").rows
    assert second["rows_tagged"] == 0
    duplicates = read_output(tmp_path / "b.duplicates.parquet")
    assert sorted(duplicates["id"].to_list()) == ["2101", "2102"]
    assert set(duplicates["reason"].to_list()) == {"exact"}
    assert set(duplicates["duplicate_of"].to_list()) == {"103"}


@pytest.mark.usefixtures("ray_local")
def test_chain_on_ray(tmp_path, small_model, sample_frame):
    chain_rows(sample_frame).write_parquet(tmp_path / "batch.parquet")
    config = small_batch_config(tmp_path)

    summary = tag_json(
        tmp_path / "batch.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--executor",
        "ray",
    )

    assert summary["executor"] == "ray"
    check_chain(
        tmp_path / "out.parquet",
        tmp_path / "out.duplicates.parquet",
        tmp_path / "out.review.parquet",
        summary,
    )


def test_exact_copy_of_near_duplicate(tmp_path, small_model, sample_frame):
    original = sample_row(sample_frame, ORIGINAL_ID)
    near = {**original, "id": "302", "title": original["title"] + " (updated)"}
    exact = {**near, "id": "303", "title": near["title"].upper()}
    fillers = [sample_row(sample_frame, row_id) for row_id in FILLER_IDS[:2]]
    rows = pl.DataFrame([{**original, "id": "301"}, near, exact, *fillers])
    rows.drop("created_on").write_parquet(tmp_path / "batch.parquet")
    config = write_config(tmp_path, paths={"state_dir": "state"})

    summary = tag_json(
        tmp_path / "batch.parquet", tmp_path / "out.parquet", small_model, config
    )

    duplicates = read_output(tmp_path / "out.duplicates.parquet")
    by_id = {row["id"]: row for row in duplicates.iter_rows(named=True)}
    assert sorted(by_id) == ["302", "303"]
    assert by_id["302"]["reason"] == "near"
    assert by_id["302"]["duplicate_of"] == "301"
    # 303 copies 302 exactly, but 302 is not kept: it names the row kept.
    assert by_id["303"]["reason"] == "exact"
    assert by_id["303"]["duplicate_of"] == "301"
    assert summary["rows_tagged"] == 3


def test_history_row_is_never_displaced(tmp_path, small_model, sample_frame):
    rows = chain_rows(sample_frame)
    config = small_batch_config(tmp_path)
    rows.filter(pl.col("id") == "101").write_parquet(tmp_path / "first.parquet")
    rows.filter(pl.col("id") == "103").write_parquet(tmp_path / "second.parquet")
    tag_json(
        tmp_path / "first.parquet", tmp_path / "a.parquet", small_model, config
    )

    second = tag_json(
        tmp_path / "second.parquet", tmp_path / "b.parquet", small_model, config
    )

    # 103 was created two years before 101, but 101 is already published.
    duplicates = read_output(tmp_path / "b.duplicates.parquet")
    assert second["rows_tagged"] == 0
    assert duplicates["id"].to_list() == ["103"]
    assert duplicates["duplicate_of"].to_list() == ["101"]
    assert duplicates["reason"].to_list() == ["near"]


def test_chain_with_ivf_search(tmp_path, small_model, sample_frame):
    chain_rows(sample_frame).write_parquet(tmp_path / "batch.parquet")
    config = small_batch_config(tmp_path, dedupe={"exact_search_max_rows": 4})

    summary = tag_json(
        tmp_path / "batch.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--executor",
        "local",
    )

    check_chain(
        tmp_path / "out.parquet",
        tmp_path / "out.duplicates.parquet",
        tmp_path / "out.review.parquet",
        summary,
    )
    history = read_history(tmp_path / "state")
    assert history.near_index is not None
    assert history.near_index["rows"] == history.rows


def vector_batch(first_row: int, ids: list[str], vectors):
    import numpy as np
    import pyarrow as pa

    from tagcli.near import EMBEDDING_COLUMN, ROW_COLUMN

    flat = pa.array(np.asarray(vectors, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            ROW_COLUMN: pa.array(range(first_row, first_row + len(ids)), pa.int64()),
            EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(flat, 3),
        }
    )


def unit(*components):
    import numpy as np

    vector = np.array(components, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_splitter_same_batch_displacers():
    """Two rows of one batch match one earlier row; only the earlier-created one displaces it."""
    import numpy as np

    from tagcli.dedupe import ExactDuplicates
    from tagcli.near import DuplicateSplitter, VectorIndex

    ids = ["A", "B1", "B2", "C", "D"]
    created = np.array([10, 1, 2, 5, 0], dtype=np.int64)
    exact = ExactDuplicates(
        keys=np.array([bytes([i + 1]) * 16 for i in range(5)], dtype="S16"),
        created=created,
        duplicate_of_row=np.full(5, -1, dtype=np.int64),
        duplicate_of_history=np.full(5, -1, dtype=np.int64),
    )
    splitter = DuplicateSplitter(exact, VectorIndex(3), None, 0.95, [])
    a = unit(1, 0, 0)
    b1 = unit(1, 0.25, 0)
    b2 = unit(1, 0, 0.25)
    c = unit(1, -0.02, 0.26)
    d = unit(1, 0.01, 0)
    # B1 and B2 match A (0.97) but not each other (0.94).
    assert float(b1 @ b2) < 0.95

    batches = [
        vector_batch(0, ["A"], [a]),
        vector_batch(1, ["B1", "B2"], [b1, b2]),
        vector_batch(3, ["C"], [c]),
        vector_batch(4, ["D"], [d]),
    ]
    results = [splitter.split(batch)[:2] for batch in batches]
    plan = splitter.displacement_plan()

    kept_b, duplicates_b = results[1]
    assert kept_b["id"].to_pylist() == ["B1"]
    assert duplicates_b["id"].to_pylist() == ["B2"]
    assert duplicates_b["duplicate_of"].to_pylist() == ["B1"]
    assert duplicates_b["similarity"][0].as_py() == pytest.approx(float(b2 @ a))
    kept_c, duplicates_c = results[2]
    assert kept_c.num_rows == 0
    assert duplicates_c["duplicate_of"].to_pylist() == ["B1"]
    assert results[3][0]["id"].to_pylist() == ["D"]
    # A (output 0) and B1 (output 1) were written, then displaced; both name D.
    assert plan.output_positions.tolist() == [0, 1]
    assert plan.duplicate_of == ["D", "D"]
    assert plan.similarity[0] == pytest.approx(float(a @ b1))
    assert plan.similarity[1] == pytest.approx(float(b1 @ d), abs=1e-6)
    # B2 and C were written to the duplicates file naming B1; both now name D.
    assert plan.repointed == {0: "D", 1: "D"}
    assert splitter.near_count == 4
    assert splitter.history_ids() == {0: "D", 1: "D", 2: "D"}


def test_truncated_count_drops_displaced(tmp_path, small_model, sample_frame):
    original = sample_row(sample_frame, ORIGINAL_ID)
    # Over 256 tokens, the model's maximum, so both copies are truncated.
    long_text = " ".join([original["description"]] * 20)
    fillers = [sample_row(sample_frame, row_id) for row_id in FILLER_IDS[:6]]
    first = {**original, "id": "401", "description": long_text}
    first["created_on"] = "2022-01-01 00:00:00"
    copy = {**first, "id": "402", "title": original["title"] + " (updated)"}
    copy["created_on"] = "2021-01-01 00:00:00"
    rows = [first, *fillers[:3], copy, *fillers[3:]]
    pl.DataFrame(rows).write_parquet(tmp_path / "batch.parquet")
    config = small_batch_config(tmp_path, rows={"long_text": "truncate"})

    summary = tag_json(
        tmp_path / "batch.parquet",
        tmp_path / "out.parquet",
        small_model,
        config,
        "--executor",
        "local",
    )

    duplicates = read_output(tmp_path / "out.duplicates.parquet")
    assert duplicates["id"].to_list() == ["401"]
    assert duplicates["duplicate_of"].to_list() == ["402"]
    assert summary["rows_truncated"] == 1
    check_counts(summary, 8)
