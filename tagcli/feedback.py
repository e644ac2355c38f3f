"""Corrections from users and reviewers, and samples of tagged rows to label.

`tagcli feedback FILE` appends validated corrections to
`feedback/feedback.jsonl` in the state folder (`[paths] state_dir`). When an id is recorded more than once,
the latest record wins. `tagcli train` applies the stored corrections to its
labeled data, and `tagcli eval --feedback` measures the current model on them.
`tagcli sample` draws rows from tagged output for someone to check by hand.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from tagcli.errors import EXIT_USAGE, TagcliError

log = logging.getLogger(__name__)

# A subfolder, because the duplicate history deletes the files at the top of
# the state folder that its index does not list.
STORE_FOLDER = "feedback"
STORE_FILE = "feedback.jsonl"
FEEDBACK_COLUMNS = ("id", "tag")
OPTIONAL_COLUMNS = ("note", "title", "description")
SAMPLE_REASON_COLUMN = "sample_reason"


def store_path(config) -> Path:
    return Path(config.paths.state_dir) / STORE_FOLDER / STORE_FILE


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def read_feedback_file(path: Path, approved: list[str], encoding: str = "utf-8"):
    """Read and validate corrections from a CSV, Parquet or JSONL file.

    Returns one dict per row with id, tag, note, title and description as
    strings. Columns other than these are ignored, so an edited `tagcli
    sample` file can be sent back as it is. Raises TagcliError naming the rows
    with an empty id or a tag outside `approved`; then nothing is recorded.
    """
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path, encoding)
        first_row = "line"
    else:
        from tagcli.io import read_table

        frame = read_table(path, FEEDBACK_COLUMNS, encoding)
        rows = frame.to_dicts()
        first_row = "data row"

    records = []
    empty_ids = []
    bad_tags = []
    for number, row in enumerate(rows, start=1):
        record = {name: _text(row.get(name)) for name in FEEDBACK_COLUMNS}
        record.update({name: _text(row.get(name)) for name in OPTIONAL_COLUMNS})
        if not record["id"]:
            empty_ids.append(number)
        if record["tag"] not in approved:
            bad_tags.append(f"{number} ({record['tag']!r})")
        records.append(record)

    if not records:
        raise TagcliError(f"{path}: the file has no feedback rows; add id,tag rows.")
    if empty_ids:
        raise TagcliError(
            f"{path}: {len(empty_ids)} row(s) have an empty id ({first_row}s "
            f"{_first_ten(empty_ids)}); fill in the id of the corrected row."
        )
    if bad_tags:
        raise TagcliError(
            f"{path}: {len(bad_tags)} row(s) have a tag that is not approved "
            f"({first_row}s {_first_ten(bad_tags)}); use one of "
            f"{', '.join(approved)}. Nothing was recorded."
        )
    return records


def _first_ten(items: list) -> str:
    listed = ", ".join(str(item) for item in items[:10])
    return listed + (f" and {len(items) - 10} more" if len(items) > 10 else "")


def _read_jsonl(path: Path, encoding: str) -> list[dict]:
    from tagcli.io import check_readable, python_codec

    check_readable(path)
    rows = []
    try:
        with path.open(encoding=python_codec(encoding)) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise TagcliError(
                        f"{path}: line {number} is not valid JSON ({error.msg}); "
                        "write one JSON object per line."
                    ) from error
                if not isinstance(row, dict):
                    raise TagcliError(
                        f"{path}: line {number} is not a JSON object; write one "
                        'object per line, such as {"id": "17", "tag": "mlops"}.'
                    )
                rows.append(row)
    except UnicodeDecodeError as error:
        raise TagcliError(
            f"{path}: bytes at offset {error.start} are not valid {encoding}; "
            "pass --encoding with the file's encoding."
        ) from error
    return rows


def record_feedback(path: Path, config, encoding: str = "utf-8") -> dict:
    """Validate the corrections in `path` and append them to the store.

    Returns the store path, the rows recorded and how many distinct ids the
    store then contains.
    """
    records = read_feedback_file(path, config.tags.approved, encoding)
    recorded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = []
    for record in records:
        record["recorded_at"] = recorded_at
        record["source"] = str(path)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")

    store = store_path(config)
    store.parent.mkdir(parents=True, exist_ok=True)
    # All records of the file go out in one append, after every row is valid.
    # The exclusive flock keeps two runs' appends from interleaving, and
    # readers (shared flock) from seeing half an append.
    with store.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())
    return {
        "store": str(store),
        "recorded": len(records),
        "ids_in_store": len(load_feedback(config)),
    }


def load_feedback(config) -> dict[str, dict]:
    """Return the latest stored record of each id; empty when nothing was recorded."""
    store = store_path(config)
    if not store.is_file():
        return {}
    latest: dict[str, dict] = {}
    with store.open(encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                latest[str(record["id"])] = record
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise TagcliError(
                    f"{store}: line {number} is not a feedback record ({error}); "
                    "fix or remove that line."
                ) from error
    return latest


def _approved_tag(record: dict, config) -> str:
    tag = record["tag"]
    return tag if tag in config.tags.approved else config.tags.fallback


def apply_stored_feedback(frame, config, mapped_column: str | None = None):
    """Apply stored corrections to labeled rows; return (frame, counts).

    A record whose id is in `frame` replaces the tag of every row with that id,
    and clears `mapped_column` (the original unapproved tag) on those rows.
    A record with a new id and a title or description becomes a new row. A new
    id without text cannot be trained on: it is counted as skipped and logged.
    Tags no longer approved become the fallback tag.
    """
    import polars as pl

    feedback = load_feedback(config)
    counts = {
        "store": str(store_path(config)),
        "records": len(feedback),
        "rows_corrected": 0,
        "tags_changed": 0,
        "rows_added": 0,
        "skipped_without_text": 0,
    }
    if not feedback:
        return frame, counts

    frame = frame.with_columns(pl.col("id").cast(pl.Utf8))
    known_ids = set(frame["id"].to_list())
    corrections = {
        record_id: _approved_tag(record, config)
        for record_id, record in feedback.items()
        if record_id in known_ids
    }
    if corrections:
        corrected_tag = pl.col("id").replace_strict(
            corrections, default=None, return_dtype=pl.Utf8
        )
        counts["rows_corrected"] = frame.filter(corrected_tag.is_not_null()).height
        counts["tags_changed"] = frame.filter(
            corrected_tag.is_not_null() & (corrected_tag != pl.col("tag"))
        ).height
        updates = [pl.coalesce(corrected_tag, pl.col("tag")).alias("tag")]
        if mapped_column in frame.columns:
            updates.append(
                pl.when(corrected_tag.is_null())
                .then(pl.col(mapped_column))
                .alias(mapped_column)
            )
        frame = frame.with_columns(updates)

    new_rows = []
    skipped = []
    for record_id, record in feedback.items():
        if record_id in known_ids:
            continue
        if record.get("title") or record.get("description"):
            new_rows.append(
                {
                    "id": record_id,
                    "title": record.get("title", ""),
                    "description": record.get("description", ""),
                    "tag": _approved_tag(record, config),
                }
            )
        else:
            skipped.append(record_id)
    if new_rows:
        frame = pl.concat(
            [frame, pl.DataFrame(new_rows, schema={c: pl.Utf8 for c in new_rows[0]})],
            how="diagonal_relaxed",
        )
    counts["rows_added"] = len(new_rows)
    counts["skipped_without_text"] = len(skipped)
    if skipped:
        log.warning(
            "%d feedback id(s) are not in the training data and have no title or "
            "description, so training skips them (first: %s). Send them again "
            "with title and description columns.",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    return frame, counts


def feedback_evaluation_rows(config, artifact):
    """Return (rows, sources) for evaluating a model on the stored corrections.

    `rows` has id, title, description and tag. A record's text comes from the
    record itself when it has a title or description, otherwise from the row
    with the same id in the data the model was trained on (the path in its
    manifest). `sources` counts the rows from each and those without text.
    """
    import polars as pl

    from tagcli.io import read_table

    store = store_path(config)
    feedback = load_feedback(config)
    if not feedback:
        raise TagcliError(
            f"{store}: no feedback recorded; run `tagcli feedback FILE` first, or "
            "check [paths] state_dir."
        )

    rows = []
    needs_text = {}
    for record_id, record in feedback.items():
        entry = {
            "id": record_id,
            "title": record.get("title", ""),
            "description": record.get("description", ""),
            "tag": _approved_tag(record, config),
        }
        if entry["title"] or entry["description"]:
            rows.append(entry)
        else:
            needs_text[record_id] = entry
    from_feedback = len(rows)

    training_path = Path(artifact.manifest["training_data"]["path"])
    from_training = 0
    if needs_text and training_path.is_file():
        training = read_table(training_path, ("id", "title", "description"))
        training = training.with_columns(pl.col("id").cast(pl.Utf8)).unique(
            subset="id", keep="first", maintain_order=True
        )
        for row in training.filter(pl.col("id").is_in(list(needs_text))).to_dicts():
            entry = needs_text.pop(row["id"])
            entry["title"] = row["title"]
            entry["description"] = row["description"]
            rows.append(entry)
            from_training += 1
    if needs_text:
        log.warning(
            "%d feedback id(s) have no text in the feedback and are not in %s, so "
            "they are not evaluated (first: %s).",
            len(needs_text),
            training_path,
            ", ".join(list(needs_text)[:5]),
        )
    if not rows:
        raise TagcliError(
            f"{store}: none of the {len(feedback)} corrected rows has text to "
            f"evaluate: the records have no title or description and their ids are "
            f"not in {training_path}. Send feedback with title and description."
        )
    sources = {
        "store": str(store),
        "records": len(feedback),
        "text_from_feedback": from_feedback,
        "text_from_training_data": from_training,
        "training_data": str(training_path),
        "without_text": len(needs_text),
    }
    return pl.DataFrame(rows, schema={c: pl.Utf8 for c in rows[0]}), sources


def _scan_tagged(path: Path):
    """Return a polars LazyFrame over tagged output: a file or a folder of parts."""
    import polars as pl

    from tagcli.io import check_readable, file_format

    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("part-*.parquet")) or sorted(path.glob("part-*.csv"))
        if not parts:
            raise TagcliError(
                f"{path}: the folder has no part-*.parquet or part-*.csv files; "
                "give the output of `tagcli tag`."
            )
        fmt = file_format(parts[0])
        files = [str(part) for part in parts]
    else:
        check_readable(path)
        fmt = file_format(path)
        files = str(path)
    if fmt == "parquet":
        scan = pl.scan_parquet(files)
    else:
        scan = pl.scan_csv(files, infer_schema=False)
    columns = scan.collect_schema().names()
    missing = [name for name in ("id", "tag", "confidence") if name not in columns]
    if missing:
        raise TagcliError(
            f"{path}: missing column(s) {', '.join(missing)}; give a file written "
            "by `tagcli tag`."
        )
    return scan.with_columns(pl.col("confidence").cast(pl.Float64))


def draw_sample(tagged_path: Path, size: int, seed: int, per_tag_share: float = 0.25):
    """Draw `size` rows from tagged output for manual labeling.

    About `per_tag_share` of the rows are drawn at random, in equal numbers,
    from each predicted tag (at least one each while `size` allows), and the
    rest are the lowest-confidence rows not drawn yet. Only the id, tag and
    confidence columns are read in full; the other columns are read for the
    chosen rows only. Returns a polars DataFrame, lowest confidence first, with
    a `sample_reason` column.
    """
    import numpy as np
    import polars as pl

    scan = _scan_tagged(tagged_path).with_row_index("_row")
    index = scan.select("_row", "tag", "confidence").collect()
    if size > index.height:
        log.warning(
            "%s has %d rows, fewer than the %d requested; the sample contains "
            "all of them.",
            tagged_path,
            index.height,
            size,
        )
    size = min(size, index.height)

    generator = np.random.default_rng(seed)
    tags = sorted(set(index["tag"].drop_nulls().to_list()))
    per_tag = int(size * per_tag_share) // max(1, len(tags))
    if size >= len(tags):
        per_tag = max(1, per_tag)
    reasons: dict[int, str] = {}
    for tag in tags:
        rows = index.filter(pl.col("tag") == tag)["_row"].to_numpy()
        chosen = generator.choice(rows, size=min(per_tag, len(rows)), replace=False)
        for row in sorted(int(value) for value in chosen):
            reasons[row] = f"random from tag {tag}"

    lowest = index.filter(~pl.col("_row").is_in(list(reasons))).sort(
        ["confidence", "_row"], nulls_last=False
    )
    for row in lowest["_row"].head(size - len(reasons)).to_list():
        reasons[int(row)] = "low confidence"

    sample = scan.filter(pl.col("_row").is_in(list(reasons))).collect()
    reason_column = pl.Series(
        SAMPLE_REASON_COLUMN, [reasons[row] for row in sample["_row"].to_list()]
    )
    return (
        sample.with_columns(reason_column)
        .sort(["confidence", "_row"])
        .drop("_row")
    )


def write_sample(sample, output: Path, overwrite: bool) -> None:
    """Write the sample to a .csv or .parquet file; replace one only with `overwrite`."""
    from tagcli.io import atomic_path, file_format

    output = Path(output)
    fmt = file_format(output, purpose="output")
    if output.exists() and not overwrite:
        raise TagcliError(
            f"{output}: the file exists; pass --overwrite to replace it or choose "
            "another path with -o.",
            exit_code=EXIT_USAGE,
        )
    with atomic_path(output) as temporary:
        if fmt == "parquet":
            sample.write_parquet(temporary)
        else:
            sample.write_csv(temporary)
