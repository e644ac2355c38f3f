"""Reading and writing CSV and Parquet: validation, typed errors, atomic writes.

CSV columns are read as text, so ids such as `007` and titles such as `NaN`
stay exactly as written. Parquet columns keep their stored types.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tagcli.errors import TagcliError

SUPPORTED_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
TEXT_COLUMNS = ("title", "description")


def file_format(path: Path, purpose: str = "input") -> str:
    """Return "csv" or "parquet" from the file's extension, or raise TagcliError."""
    fmt = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise TagcliError(
            f"{path}: unsupported {purpose} format {path.suffix or '(no extension)'!r}; "
            "use a .csv or .parquet file."
        )
    return fmt


def check_readable(path: Path) -> None:
    """Raise TagcliError unless `path` is a non-empty file tagcli can read."""
    if not path.exists():
        raise TagcliError(f"{path}: file not found; check the path.")
    if path.is_dir():
        raise TagcliError(f"{path}: is a folder; give a .csv or .parquet file.")
    if not os.access(path, os.R_OK):
        raise TagcliError(f"{path}: permission denied; make the file readable.")
    if path.stat().st_size == 0:
        raise TagcliError(
            f"{path}: the file is empty (0 bytes); a CSV needs at least a header line."
        )


def read_csv_header(path: Path) -> list[str]:
    """Return the column names on the first line of a CSV file (a UTF-8 BOM is accepted)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
    except UnicodeDecodeError as error:
        raise TagcliError(
            f"{path}: the header is not valid UTF-8 ({error.reason} at byte "
            f"{error.start}); save the file as UTF-8."
        ) from error
    if not header:
        raise TagcliError(
            f"{path}: no header line found; the first line must name the columns."
        )
    return header


def check_columns(path: Path, columns: list[str], required: Iterable[str]) -> None:
    """Raise TagcliError when a column name repeats or a required column is missing."""
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise TagcliError(
                f"{path}: column {name!r} appears more than once in the header; "
                "rename or remove the repeated column."
            )
        seen.add(name)
    missing = [name for name in required if name not in seen]
    if missing:
        raise TagcliError(
            f"{path}: missing required column(s) {', '.join(missing)}; "
            f"found columns: {', '.join(columns) or '(none)'}."
        )


def read_table(path: Path, required: Iterable[str]):
    """Read a whole CSV or Parquet file into a polars DataFrame and check its columns.

    Used for labeled data (`train`, `eval`), which fits in memory. Text columns
    come back as strings; a null description becomes the empty string.
    """
    import polars as pl

    path = Path(path)
    check_readable(path)
    fmt = file_format(path)
    required = list(required)

    if fmt == "csv":
        header = read_csv_header(path)
        check_columns(path, header, required)
        try:
            frame = pl.read_csv(
                path,
                infer_schema=False,
                encoding="utf8",
            )
        except pl.exceptions.ComputeError as error:
            raise TagcliError(
                f"{path}: cannot parse the CSV file: {_first_line(error)}"
            ) from error
    else:
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(path).names
        except Exception as error:  # pyarrow raises several types for a bad footer
            raise TagcliError(
                f"{path}: not a readable Parquet file ({_first_line(error)}); "
                "the file may be truncated or corrupt."
            ) from error
        check_columns(path, columns, required)
        frame = pl.read_parquet(path)

    for name in TEXT_COLUMNS:
        if name in frame.columns:
            frame = frame.with_columns(pl.col(name).cast(pl.Utf8).fill_null(""))
    return frame


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def temporary_beside(target: Path) -> Path:
    """Create an empty hidden temporary file in the folder of `target` and return its path.

    Renaming it onto `target` later is atomic because both are on one file system.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".partial", dir=target.parent
    )
    os.close(handle)
    return Path(name)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` and rename it onto `target` on success.

    On an exception the temporary file is removed, so a failed run never leaves a
    file that looks complete under the target name.
    """
    target = Path(target)
    temporary = temporary_beside(target)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
