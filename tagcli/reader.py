"""Reading a dump to tag in batches: one CSV or Parquet file, or a folder of them.

The input is described once (files, columns, row count) without loading rows.
Rows then stream either through Ray Data readers or, in-process, through
pyarrow's batch readers; both read CSV columns as text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tagcli.errors import TagcliError
from tagcli.io import (
    SUPPORTED_SUFFIXES,
    check_columns,
    check_readable,
    csv_error,
    csv_options,
    file_format,
    parquet_columns,
    parquet_error,
    read_csv_header,
)


@dataclass
class InputSource:
    """A dump to tag: its files (all of one format), columns and total row count.

    `schema` is the Arrow schema every batch is cast to: all text for CSV, and
    for Parquet the files' schemas unified, so a column that is all null (of
    type null) in one file takes its type from the others.
    """

    path: Path
    files: list[Path]
    format: str
    columns: list[str]
    rows: int
    schema: object
    encoding: str = "utf-8"


def open_source(
    path: Path, required: tuple[str, ...], encoding: str = "utf-8"
) -> InputSource:
    """Describe the file or folder at `path` and check its columns.

    A folder must contain .parquet files or .csv files, not both; hidden files
    and files of other types in it are ignored. Raises TagcliError naming the
    file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            child
            for child in path.iterdir()
            if child.is_file()
            and not child.name.startswith((".", "_"))
            and child.suffix.lower() in SUPPORTED_SUFFIXES
        )
        if not files:
            raise TagcliError(
                f"{path}: the folder contains no .csv or .parquet files; "
                "point INPUT at a data file or a folder of them."
            )
        formats = {file_format(file) for file in files}
        if len(formats) > 1:
            raise TagcliError(
                f"{path}: the folder mixes CSV and Parquet files; keep one format "
                "per input folder."
            )
    else:
        check_readable(path)
        files = [path]
        file_format(path)

    fmt = file_format(files[0])
    columns = None
    rows = 0
    for file in files:
        check_readable(file)
        file_columns = _columns_of(file, fmt, encoding)
        check_columns(file, file_columns, required)
        if columns is None:
            columns = file_columns
        elif file_columns != columns:
            raise TagcliError(
                f"{file}: columns {file_columns} differ from {columns} in "
                f"{files[0]}; every file in an input folder needs the same columns."
            )
        rows += _count_rows(file, fmt, file_columns, encoding)

    if fmt == "parquet":
        schema = unify_parquet_schemas(path, files)
        if rows:
            check_not_all_null(path, files, required)
    else:
        schema = _text_schema(columns)
    return InputSource(
        path=path,
        files=files,
        format=fmt,
        columns=columns,
        rows=rows,
        schema=schema,
        encoding=encoding,
    )


def _text_schema(columns: list[str]):
    import pyarrow as pa

    return pa.schema([pa.field(name, pa.string()) for name in columns])


def unify_parquet_schemas(path: Path, files: list[Path]):
    """Return one schema for all `files`, or raise TagcliError naming the column.

    A column of type null, as written for a column that is all null in a file,
    takes the type the other files give it. Other type differences are errors.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(file) for file in files]
    try:
        return pa.unify_schemas(schemas)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise TagcliError(
            f"{path}: the Parquet files give a column different types "
            f"({str(error).strip().splitlines()[0]}); write every file with the "
            "same column types."
        ) from error


def check_not_all_null(path: Path, files: list[Path], columns: tuple[str, ...]) -> None:
    """Raise TagcliError when a required column is null in every row of the input.

    Counts nulls from the Parquet statistics where the writer stored them,
    else by reading that one column.
    """
    for name in columns:
        if all(_parquet_all_null(file, name) for file in files):
            raise TagcliError(
                f"{path}: column {name!r} is null in every row, so there is "
                f"nothing to read there; fill in the {name} values, or write "
                "empty strings for rows that have none."
            )


def _parquet_all_null(file: Path, name: str) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    if parquet.schema_arrow.field(name).type == pa.null():
        return True
    metadata = parquet.metadata
    # Statistics are kept per leaf column; a text column is its own leaf.
    leaves = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    if name not in leaves:
        return False
    index = leaves.index(name)
    nulls = 0
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(index).statistics
        if statistics is None or not statistics.has_null_count:
            nulls = parquet.read(columns=[name]).column(0).null_count
            break
        nulls += statistics.null_count
    return nulls == metadata.num_rows


def _columns_of(path: Path, fmt: str, encoding: str) -> list[str]:
    if fmt == "csv":
        return read_csv_header(path, encoding)
    return parquet_columns(path)


def _count_rows(path: Path, fmt: str, columns: list[str], encoding: str) -> int:
    """Count data rows: from Parquet metadata, or by parsing a CSV file once.

    The CSV pass also decodes every field, so a bad byte or a ragged row fails
    here, naming the row, before any model time is spent.
    """
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as error:
            raise parquet_error(path, error) from error
    try:
        reader = _open_csv(path, columns, encoding)
        return sum(batch.num_rows for batch in reader)
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise csv_error(path, error, encoding) from error


def _open_csv(path: Path, columns: list[str], encoding: str):
    import pyarrow.csv as pacsv

    return pacsv.open_csv(path, **csv_options(columns, encoding))


def iter_local_batches(source: InputSource, batch_size: int) -> Iterator:
    """Yield Arrow tables of at most `batch_size` rows, in file and row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in source.files:
        if source.format == "parquet":
            batches = pq.ParquetFile(file).iter_batches(batch_size=batch_size)
        else:
            batches = _open_csv(file, source.columns, source.encoding)
        pending: list = []
        pending_rows = 0
        for batch in batches:
            if not batch.schema.equals(source.schema, check_metadata=False):
                batch = batch.select(source.schema.names).cast(source.schema)
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= batch_size:
                table = pa.Table.from_batches(pending).combine_chunks()
                yield table.slice(0, batch_size)
                rest = table.slice(batch_size)
                pending = rest.to_batches()
                pending_rows = rest.num_rows
        if pending_rows:
            yield pa.Table.from_batches(pending).combine_chunks()


def bytes_per_row(source: InputSource, sample_rows: int = 1000) -> float:
    """Estimate the in-memory Arrow bytes of one row from the first rows of the input."""
    first = next(iter_local_batches(source, sample_rows), None)
    if first is None or first.num_rows == 0:
        return 1.0
    return first.nbytes / first.num_rows


def ray_dataset(source: InputSource):
    """Return a lazy Ray Data dataset over the source files."""
    import ray.data

    paths = [str(file) for file in source.files]
    # Read tasks reserve a quarter CPU, so they fit beside the embedding actors
    # even where the free CPU is split across nodes.
    if source.format == "parquet":
        return ray.data.read_parquet(paths, num_cpus=0.25, schema=source.schema)
    return ray.data.read_csv(
        paths, num_cpus=0.25, **csv_options(source.columns, source.encoding)
    )
