"""Writing tagged rows: one CSV or Parquet file, or a folder of part files.

Rows stream into temporary files that are moved into place only by `commit()`,
so a failed or killed run leaves no output that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tagcli.errors import EXIT_USAGE, TagcliError
from tagcli.io import file_format, temporary_beside


class FileWriter:
    """Write Arrow tables to one CSV or Parquet file, chosen by the extension.

    Tables stream to a temporary file that `commit()` renames onto `path`;
    `abort()` removes it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.format = file_format(self.path, purpose="output")
        self._temporary = temporary_beside(self.path)
        self._writer = None
        self._schema = None
        self._closed = False
        self.rows_written = 0

    @property
    def schema(self):
        """The schema of the first table written, which every later table is cast to."""
        return self._schema

    def write(self, table) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if self._writer is None:
            self._schema = table.schema
            if self.format == "parquet":
                self._writer = pq.ParquetWriter(self._temporary, table.schema)
            else:
                self._writer = pacsv.CSVWriter(self._temporary, table.schema)
        self._writer.write_table(table.select(self._schema.names).cast(self._schema))
        self.rows_written += table.num_rows

    def commit(self, schema) -> None:
        """Close the file and move it into place; `schema` gives the columns of an empty output."""
        if self._writer is None:
            self.write(schema.empty_table())
        self._close()
        os.replace(self._temporary, self.path)

    def staged_files(self) -> list[Path]:
        """Close the temporary file and return it, for a rewrite before `commit()`.

        Returns [] when nothing was written. No `write` may follow.
        """
        if self._writer is None:
            return []
        self._close()
        return [self._temporary]

    def discount_rows(self, count: int) -> None:
        """Subtract rows that a rewrite of the staged files removed."""
        self.rows_written -= count

    def _close(self) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True

    def abort(self) -> None:
        if self._writer is not None:
            self._close()
        self._temporary.unlink(missing_ok=True)


class FolderWriter:
    """Write Arrow tables to numbered part files in a folder, `rows_per_file` rows each.

    Parts go to a hidden staging folder beside `path`, renamed onto `path` by
    `commit()`. A part file is closed before the next opens, so memory
    contains at most one batch.
    """

    def __init__(self, path: Path, fmt: str, rows_per_file: int) -> None:
        self.path = Path(path)
        self.format = fmt
        self.rows_per_file = rows_per_file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        if self._staging.exists():
            shutil.rmtree(self._staging)
        self._staging.mkdir()
        self._part: FileWriter | None = None
        self._parts = 0
        self.schema = None
        self.rows_written = 0

    def write(self, table) -> None:
        if self.schema is None:
            self.schema = table.schema
        offset = 0
        while offset < table.num_rows:
            if self._part is None or self._part.rows_written >= self.rows_per_file:
                self._close_part()
                name = f"part-{self._parts:05d}.{self.format}"
                self._part = FileWriter(self._staging / name)
                self._parts += 1
            room = self.rows_per_file - self._part.rows_written
            piece = table.slice(offset, room)
            self._part.write(piece)
            self.rows_written += piece.num_rows
            offset += piece.num_rows

    def staged_files(self) -> list[Path]:
        """Close the open part and return the part files in order, for a rewrite before `commit()`."""
        self._close_part()
        return sorted(self._staging.glob(f"part-*.{self.format}"))

    def discount_rows(self, count: int) -> None:
        """Subtract rows that a rewrite of the staged files removed."""
        self.rows_written -= count

    def _close_part(self, schema=None) -> None:
        if self._part is not None:
            self._part.commit(schema)
            self._part = None

    def commit(self, schema) -> None:
        """Close the last part and move the folder into place.

        An empty output still gets one part file with the columns of `schema`.
        An existing folder at `path` is replaced only after the new one is complete.
        """
        if self._parts == 0:
            self._part = FileWriter(self._staging / f"part-00000.{self.format}")
            self._parts = 1
        self._close_part(schema)
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            os.replace(self.path, old)
        os.replace(self._staging, self.path)
        if old is not None and old.is_dir():
            shutil.rmtree(old)
        elif old is not None:
            old.unlink()

    def abort(self) -> None:
        if self._part is not None:
            self._part.abort()
        shutil.rmtree(self._staging, ignore_errors=True)


def sidecar_path(output: str | Path, kind: str, folder_format: str) -> Path:
    """Return the file beside `output` for rows of one `kind` (rejects, duplicates, review).

    A file output `out/NAME.EXT` gets `out/NAME.<kind>.EXT`. A folder output
    `out/NAME/` gets `out/NAME-<kind>.<folder_format>`, outside the folder so
    that reading the folder back finds only part files, and under a name that
    no file output's sidecar can take.
    """
    if is_folder_output(output):
        folder = Path(str(output).rstrip("/" + os.sep))
        return folder.with_name(f"{folder.name}-{kind}.{folder_format}")
    path = Path(output)
    return path.with_name(f"{path.stem}.{kind}{path.suffix}")


def is_folder_output(path: Path) -> bool:
    """Return whether `path` names a folder output: an existing folder, or a trailing slash."""
    return Path(path).is_dir() or str(path).endswith(("/", os.sep))


def check_output_apart(input_path: Path, output_path: str | Path) -> None:
    """Raise TagcliError when the output would replace or sit inside the input.

    Applies with --overwrite too, because replacing the input loses its rows.
    Standard input ("-") has no path to compare.
    """
    if str(input_path) == "-":
        return
    source = Path(input_path).resolve()
    target = Path(str(output_path).rstrip("/" + os.sep) or "/").resolve()
    inside_input = source.is_dir() and target.is_relative_to(source)
    input_inside = is_folder_output(output_path) and source.is_relative_to(target)
    if target == source or inside_input or input_inside:
        raise TagcliError(
            f"{output_path}: the output would replace or sit inside the input "
            f"{input_path}, even with --overwrite; choose an output path outside it.",
            exit_code=EXIT_USAGE,
        )


def open_writer(
    path: str | Path, overwrite: bool, folder_format: str, rows_per_file: int
):
    """Return a FileWriter or FolderWriter for `path`, or raise TagcliError.

    An existing output is replaced only with `overwrite`, and only on commit.
    """
    check_output_path(path, overwrite)
    if is_folder_output(path):
        return FolderWriter(Path(path), folder_format, rows_per_file)
    return FileWriter(Path(path))


def check_output_path(path: str | Path, overwrite: bool) -> None:
    """Raise TagcliError when `path` exists without `overwrite`, or names no known format."""
    folder = is_folder_output(path)
    path = Path(path)
    if path.exists() and not overwrite:
        raise TagcliError(
            f"{path}: the output exists; pass --overwrite to replace it or choose "
            "another path with -o.",
            exit_code=EXIT_USAGE,
        )
    if folder:
        return
    if path.suffix == "":
        raise TagcliError(
            f"{path}: the output has no extension; end a file name with .csv or "
            ".parquet, or a folder name with / for part files.",
            exit_code=EXIT_USAGE,
        )
    file_format(path, purpose="output")


class RejectsWriter:
    """Write rejected (or duplicate) rows to one CSV or Parquet file beside the output.

    The file is created only when the first rejected row arrives, through a
    temporary file like the output. An existing rejects file is an error
    without `overwrite`. With it, `commit()` removes the old file when this
    run rejected nothing, so no stale rejects stay beside a new output.
    """

    def __init__(self, path: Path, overwrite: bool, kind: str = "rejects") -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise TagcliError(
                f"{self.path}: the {kind} file of this output exists; pass "
                "--overwrite to replace both, or choose another path with -o.",
                exit_code=EXIT_USAGE,
            )
        self.format = file_format(self.path, purpose="output")
        self._file: FileWriter | None = None
        self.rows_written = 0

    @property
    def schema(self):
        return self._file.schema if self._file is not None else None

    def staged_files(self) -> list[Path]:
        """Close the temporary file and return it (or []), for a rewrite before `commit()`."""
        return self._file.staged_files() if self._file is not None else []

    def write(self, table) -> None:
        if self._file is None:
            self._file = FileWriter(self.path)
        self._file.write(table)
        self.rows_written += table.num_rows

    def commit(self) -> None:
        if self._file is None:
            self.path.unlink(missing_ok=True)
            return
        self._file.commit(None)

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
