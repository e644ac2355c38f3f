"""Standard input as INPUT (`-`): spooled to a temporary file, then read as a file.

The readers need a file they can open more than once (count rows, then read
batches, maybe on Ray), so standard input is copied to a temporary folder
first, in chunks, without holding it in memory. The folder is under $TMPDIR,
which must have room for the whole input.

NOTE: the file exists on this machine only, so Ray read tasks on other nodes
of a cluster cannot open it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tagcli.errors import TagcliError

STDIN_ARGUMENT = "-"
STDIN_NAME = "standard input"
# Every Parquet file starts with these 4 bytes.
PARQUET_MAGIC = b"PAR1"
INPUT_FORMATS = ("auto", "csv", "parquet")


def is_stdin(path) -> bool:
    return str(path) == STDIN_ARGUMENT


def detect_format(head: bytes) -> str:
    """Return "parquet" when `head` starts with the Parquet magic bytes, else "csv"."""
    return "parquet" if head.startswith(PARQUET_MAGIC) else "csv"


@contextmanager
def spooled_stdin(input_format: str = "auto") -> Iterator[Path]:
    """Copy standard input to a temporary file and yield its path.

    `input_format` "auto" detects Parquet by its magic bytes and reads
    anything else as CSV. A TagcliError raised inside names "standard input"
    in place of the temporary path. The file is removed on exit, also on
    errors and SIGTERM.
    """
    stream = sys.stdin.buffer
    folder = Path(tempfile.mkdtemp(prefix="tagcli-stdin-"))
    try:
        spool = folder / "stdin"
        with spool.open("wb") as handle:
            head = stream.read(len(PARQUET_MAGIC))
            handle.write(head)
            shutil.copyfileobj(stream, handle, 1 << 20)
        fmt = detect_format(head) if input_format == "auto" else input_format
        path = spool.rename(folder / f"stdin.{fmt}")
        try:
            yield path
        except TagcliError as error:
            message = str(error).replace(str(path), STDIN_NAME)
            raise TagcliError(message, exit_code=error.exit_code) from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)
