"""A Ray Data datasource that reads the input files and numbers their rows.

Ray Data's own CSV and Parquet readers do not say which input row a block row
came from. The duplicate filter needs it: the screening pass decides by row
number which rows are exact duplicates, and the workers skip embedding them.
One read task per file adds a `__row` column counting from 0 over all files,
in input order, from the row counts the screening pass found.
"""

from __future__ import annotations

from functools import partial

from tagcli.near import ROW_COLUMN


def numbered_dataset(source, file_rows: list[int], rows_per_block: int):
    """Return a lazy Ray Data dataset of `source` with a `__row` column."""
    import ray.data

    # Read tasks reserve a quarter CPU, as Ray Data's readers do in tagcli,
    # so they fit beside the embedding actors.
    return ray.data.read_datasource(
        _numbered_datasource(source, file_rows, rows_per_block), num_cpus=0.25
    )


def _numbered_datasource(source, file_rows: list[int], rows_per_block: int):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class NumberedFilesDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(
            self, parallelism, per_task_row_limit=None, data_context=None
        ):
            # NOTE: one read task per file, so a single large file is read by
            # one task; the embedding actors, not the read, limit throughput.
            tasks = []
            first_row = 0
            for file, rows in zip(source.files, file_rows):
                read = partial(
                    read_numbered_file,
                    str(file),
                    source.format,
                    list(source.columns),
                    source.encoding,
                    first_row,
                    rows_per_block,
                )
                metadata = BlockMetadata(
                    num_rows=rows,
                    size_bytes=None,
                    exec_stats=None,
                    input_files=[str(file)],
                )
                tasks.append(
                    ReadTask(read, metadata, per_task_row_limit=per_task_row_limit)
                )
                first_row += rows
            return tasks

    return NumberedFilesDatasource()


def read_numbered_file(
    path: str,
    fmt: str,
    columns: list[str],
    encoding: str,
    first_row: int,
    rows_per_block: int,
):
    """Yield Arrow tables of at most `rows_per_block` rows with a `__row` column.

    Runs in a Ray read task, on whichever node Ray picks, so `path` must be
    readable there.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from tagcli.io import csv_options

    if fmt == "parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=rows_per_block)
    else:
        batches = pacsv.open_csv(path, **csv_options(columns, encoding))
    row = first_row
    pending: list = []
    pending_rows = 0

    def numbered(table):
        numbers = np.arange(row, row + table.num_rows, dtype=np.int64)
        return table.append_column(ROW_COLUMN, pa.array(numbers))

    for batch in batches:
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= rows_per_block:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield numbered(table.slice(0, rows_per_block))
            row += rows_per_block
            rest = table.slice(rows_per_block)
            pending = rest.to_batches()
            pending_rows = rest.num_rows
    if pending_rows:
        yield numbered(pa.Table.from_batches(pending).combine_chunks())
