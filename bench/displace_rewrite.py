"""Time the commit-time pass that drops displaced rows from a staged output.

When a near copy created earlier displaces a row already written, `tagcli
tag` rewrites its staged output once, streaming (`tagcli.displace`). This
script writes a synthetic staged output of N rows (id, title, description
and the tag columns) with `writer.FileWriter`. A fresh process then drops
one row in 1,000 with `displace._rewrite_files`. It reports the seconds,
rows per second and its own peak RSS, which should grow far less than N,
because the pass reads one record batch at a time.

    python bench/displace_rewrite.py --rows 100000 --rows 1000000
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DROP_EVERY = 1000


def output_schema():
    """Return the columns of the synthetic output, as FileWriter writes them."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("title", pa.string()),
            ("description", pa.string()),
            ("tag", pa.string()),
            ("confidence", pa.float64()),
            ("needs_review", pa.bool_()),
        ]
    )


def write_staged(path: Path, rows: int):
    """Write `rows` synthetic output rows through FileWriter; return the writer, not committed."""
    import numpy as np
    import pyarrow as pa

    from tagcli.writer import FileWriter

    writer = FileWriter(path)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 10_000):
        count = min(10_000, rows - start)
        numbers = np.arange(start, start + count)
        table = pa.table(
            {
                "id": pa.array([str(n) for n in numbers]),
                "title": pa.array([f"Project number {n}" for n in numbers]),
                "description": pa.array(
                    [f"A description of project {n}, with a comma." for n in numbers]
                ),
                "tag": pa.array(["mlops"] * count),
                "confidence": pa.array(rng.random(count)),
                "needs_review": pa.array(rng.random(count) < 0.1),
            }
        )
        writer.write(table)
    return writer


def rewrite(fmt: str, rows: int) -> None:
    """Stage an output, then time its rewrite in a fresh process."""
    folder = Path(tempfile.mkdtemp(prefix="displace-bench-"))
    writer = write_staged(folder / f"out.{fmt}", rows)
    size = writer.staged_files()[0].stat().st_size
    # ru_maxrss cannot be reset, so the staging process is not the one measured.
    subprocess.run(
        [sys.executable, __file__, "--measure", str(writer.staged_files()[0]), fmt],
        check=True,
    )
    writer.abort()
    folder.rmdir()
    print(f"  staged file: {size / 1e6:.1f} MB")


def measure(path: Path, fmt: str) -> None:
    """Grandchild process: rewrite `path` without every DROP_EVERY-th row."""
    import numpy as np
    import pyarrow.parquet as pq

    from tagcli.displace import _rewrite_files

    class Staged:
        """The staged file of an output writer, as `_rewrite_files` reads it."""

        def __init__(self) -> None:
            self.format = fmt
            self.schema = pq.read_schema(path) if fmt == "parquet" else output_schema()

        def staged_files(self):
            return [path]

    staged = Staged()
    rows = _count_rows(path, fmt)
    drop = np.arange(0, rows, DROP_EVERY, dtype=np.int64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    dropped = _rewrite_files(staged, drop_positions=drop)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{fmt:8s} rows={rows:>9,d} dropped={dropped:>6,d} "
        f"seconds={seconds:7.2f} rows/s={rows / seconds:>10,.0f} "
        f"peak_rss={peak / 1024:6.0f} MiB (before the pass {before / 1024:.0f} MiB)"
    )


def _count_rows(path: Path, fmt: str) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    convert = pacsv.ConvertOptions(column_types=output_schema())
    return sum(
        batch.num_rows for batch in pacsv.open_csv(path, convert_options=convert)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--format", choices=["parquet", "csv"], action="append")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(Path(args.measure[0]), args.measure[1])
        return
    print(
        "Rewrite of a staged output without 1 row in "
        f"{DROP_EVERY:,d} (tagcli.displace._rewrite_files), one process each:"
    )
    for fmt in args.format or ["parquet", "csv"]:
        for rows in args.rows or [100_000]:
            rewrite(fmt, rows)


if __name__ == "__main__":
    main()
