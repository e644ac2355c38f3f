"""Reading and writing CSV and Parquet: validation, typed errors, atomic writes.

CSV columns are read as text, so ids such as `007` and titles such as `NaN`
stay exactly as written. Parquet columns keep their stored types.
"""

from __future__ import annotations

import codecs
import csv
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tagcli.errors import EXIT_USAGE, TagcliError

SUPPORTED_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
TEXT_COLUMNS = ("title", "description")


def file_format(path: Path, purpose: str = "input") -> str:
    """Return "csv" or "parquet" from the file's extension, or raise TagcliError."""
    fmt = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise TagcliError(
            f"{path}: unsupported {purpose} format {path.suffix or '(no extension)'!r}; "
            "use a .csv or .parquet file.",
            # A wrong output name is a usage error; a wrong input file is bad input.
            exit_code=EXIT_USAGE if purpose == "output" else None,
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
        needs = (
            "a Parquet file needs at least a footer"
            if path.suffix.lower() in (".parquet", ".pq")
            else "a CSV file needs at least a header line"
        )
        raise TagcliError(f"{path}: the file is empty (0 bytes); {needs}.")


def python_codec(encoding: str) -> str:
    """Return the Python codec for an --encoding value; UTF-8 accepts a byte-order mark."""
    return "utf-8-sig" if encoding.lower().replace("-", "") == "utf8" else encoding


def check_encoding(encoding: str) -> None:
    """Raise TagcliError unless `encoding` names a Python codec."""
    try:
        codecs.lookup(encoding)
    except LookupError as error:
        raise TagcliError(
            f"unknown encoding {encoding!r}; use a Python codec name such as "
            "utf-8, cp1252 or latin-1.",
            exit_code=EXIT_USAGE,
        ) from error


def read_csv_header(path: Path, encoding: str = "utf-8") -> list[str]:
    """Return the column names on the first line of a CSV file."""
    try:
        with path.open(newline="", encoding=python_codec(encoding)) as handle:
            header = next(csv.reader(handle), None)
    except UnicodeDecodeError as error:
        raise csv_error(path, error, encoding) from error
    if not header:
        raise TagcliError(
            f"{path}: no header line found; the first line must name the columns."
        )
    return header


def locate_csv_problem(path: Path, encoding: str) -> str | None:
    """Return where the first undecodable or ragged record of a CSV file is, or None.

    Runs only after a parser failed, so a second pass over the file is cheap
    next to the failed job. Rows count from 1 after the header; lines from 1.
    """
    codec = python_codec(encoding)
    decoder = codecs.getincrementaldecoder(codec)()
    offset = 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as error:
                bad = raw[error.start]
                return (
                    f"line {line_number} is not valid {encoding}: byte 0x{bad:02x} at "
                    f"offset {offset + error.start}. If the file uses another "
                    f"encoding, pass it with --encoding, for example "
                    f"--encoding {_guess_encoding(raw)}"
                )
            offset += len(raw)

    with path.open(newline="", encoding=codec) as handle:
        # The lines of the record being parsed, to look at its first line.
        record_lines: list[str] = []

        def remembered(lines):
            for line in lines:
                record_lines.append(line)
                yield line

        reader = csv.reader(remembered(handle))
        header = next(reader, [])
        start_line = reader.line_num + 1
        record_lines.clear()
        for row_number, row in enumerate(reader, start=1):
            # An odd number of quotes on the first line of a ragged record means
            # a quote opened there ran on into later lines.
            if row and len(row) != len(header) and record_lines[0].count('"') % 2:
                return (
                    f"unclosed quote starting at line {start_line}; close the "
                    'quote or escape it (write a quote inside a field as "")'
                )
            if row and len(row) != len(header):
                return (
                    f"data row {row_number} (line {reader.line_num}) has {len(row)} "
                    f"fields but the header has {len(header)}; quote fields that "
                    "contain commas, or fix the row"
                )
            start_line = reader.line_num + 1
            record_lines.clear()
    return None


def _guess_encoding(raw: bytes) -> str:
    for candidate in ("cp1252", "latin-1"):
        try:
            raw.decode(candidate)
        except UnicodeDecodeError:
            continue
        return candidate
    return "latin-1"


def csv_error(path: Path, error: BaseException, encoding: str) -> TagcliError:
    """Turn a CSV parser or decoder error into a TagcliError naming the row and the fix."""
    where = locate_csv_problem(path, encoding)
    if where:
        return TagcliError(f"{path}: {where}.")
    return TagcliError(f"{path}: cannot parse the CSV file: {_first_line(error)}.")


def csv_options(
    columns: list[str], encoding: str = "utf-8", include: list[str] | None = None
) -> dict:
    """pyarrow CSV options that read every column as text, newlines in quotes included."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    return {
        "parse_options": pacsv.ParseOptions(newlines_in_values=True),
        "convert_options": pacsv.ConvertOptions(
            column_types={name: pa.string() for name in columns},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            include_columns=include or [],
        ),
        "read_options": pacsv.ReadOptions(encoding=encoding),
    }


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


def read_table(path: Path, required: Iterable[str], encoding: str = "utf-8"):
    """Read a whole CSV or Parquet file into a polars DataFrame and check its columns.

    Used for labeled data (`train`, `eval`), which fits in memory. CSV is parsed
    by the same pyarrow reader as `tag` uses. Text columns come back as strings,
    and a null description becomes the empty string.
    """
    import polars as pl
    import pyarrow as pa

    path = Path(path)
    check_readable(path)
    fmt = file_format(path)
    required = list(required)

    if fmt == "csv":
        import pyarrow.csv as pacsv

        header = read_csv_header(path, encoding)
        check_columns(path, header, required)
        try:
            table = pacsv.read_csv(path, **csv_options(header, encoding))
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            raise csv_error(path, error, encoding) from error
    else:
        import pyarrow.parquet as pq

        check_columns(path, parquet_columns(path), required)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as error:
            raise parquet_error(path, error) from error
    frame = pl.from_arrow(table)

    for name in TEXT_COLUMNS:
        if name in frame.columns:
            frame = frame.with_columns(pl.col(name).cast(pl.Utf8).fill_null(""))
    return frame


def parquet_columns(path: Path) -> list[str]:
    """Return the column names in a Parquet file's footer, or raise TagcliError."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as error:  # pyarrow raises several types for a bad footer
        raise parquet_error(path, error) from error


def parquet_error(path: Path, error: BaseException) -> TagcliError:
    return TagcliError(
        f"{path}: not a readable Parquet file ({_first_line(error)}); the file may "
        "be truncated or corrupt, so write it again."
    )


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
    # mkstemp creates the file as 0600; give the output the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
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
