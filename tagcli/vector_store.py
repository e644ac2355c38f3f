"""Float16 vectors on disk, read back by position for the exact cosine.

The compressed near-duplicate search (`tagcli.near.VectorIndex`) keeps only
product-quantisation codes in memory. It finds a few candidates per query
with them, then reads those candidates' float16 vectors from disk with
`os.pread` and computes the exact cosine. Reads go through the page cache and
never map the files, so they do not add to the process's resident memory.

A `VectorStore` is a sequence of ranges, each a run of consecutive vectors in
one file:

- the vector column of a history segment, read where Arrow stored it in the
  IPC file (`add_segment`);
- a temporary spill file for vectors added during the run (`append`), in
  `tempfile`'s folder (`TMPDIR`), deleted when the store is closed or the
  process exits.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FLOAT16_BYTES = 2
# The file name recorded for ranges stored in the spill file.
SPILL = None


class VectorStore:
    """Consecutive float16 vectors of `dimension` values, addressed from position 0.

    Memory per range is a few numbers, however many vectors it covers.
    """

    def __init__(self, dimension: int, spill_dir: Path | None = None) -> None:
        self.dimension = dimension
        self.row_bytes = dimension * FLOAT16_BYTES
        self.size = 0
        self.spill_dir = spill_dir
        # Range r covers positions starts[r] to starts[r + 1] - 1, and stores
        # them from byte offsets[r] of files[r] (SPILL for the spill file).
        self._starts: list[int] = [0]
        self._files: list[str | None] = []
        self._offsets: list[int] = []
        self._spill = None
        self._spill_bytes = 0

    def add_range(self, path: Path, offset: int, rows: int) -> None:
        """Append `rows` vectors stored from byte `offset` of `path` on."""
        if rows > 0:
            self._add(str(path), offset, rows)

    def add_segment(self, path: Path, column: str = "vector") -> int:
        """Append the vectors of an Arrow IPC file's vector column; return their count.

        Each record batch's float16 values are one contiguous buffer in the
        file, so each batch becomes one range. A batch whose buffer is not
        found in the file as written (compressed, or holding nulls) is copied
        to the spill file.
        """
        rows = 0
        batches = arrow_vector_buffers(path, column, self.dimension)
        for offset, count, vectors in batches:
            if offset is None:
                self.append(vectors)
            else:
                self.add_range(path, offset, count)
            rows += count
        return rows

    def append(self, vectors) -> None:
        """Write `vectors` (any float dtype) to the end of the spill file as float16."""
        import numpy as np

        data = np.ascontiguousarray(vectors, dtype=np.float16)
        if len(data) == 0:
            return
        if data.shape[1] != self.dimension:
            raise ValueError(
                f"expected vectors of {self.dimension} values, got {data.shape[1]}"
            )
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(
                prefix="tagcli-vectors-", dir=self.spill_dir
            )
        # A view of the array's bytes: no copy, also after a partial write.
        payload = memoryview(data.reshape(-1).view(np.uint8))
        written = 0
        while written < len(payload):
            written += os.pwrite(
                self._spill.fileno(),
                payload[written:],
                self._spill_bytes + written,
            )
        offset = self._spill_bytes
        self._spill_bytes += len(payload)
        last = len(self._files) - 1
        if (
            last >= 0
            and self._files[last] is SPILL
            and self._offsets[last] + (self.size - self._starts[last]) * self.row_bytes
            == offset
        ):
            # Contiguous with the last spill range: extend it.
            self._starts[-1] += len(data)
            self.size += len(data)
            return
        self._add(SPILL, offset, len(data))

    def read(self, positions):
        """Read the vectors at `positions` into a float32 (len(positions), dimension) array.

        Raises IndexError for a position outside the store, and OSError when a
        file cannot be read in full, for example after `tagcli history
        --clear` removed a segment that a running `tagcli predict` still uses.
        """
        import numpy as np

        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dimension), dtype=np.float16)
        if len(positions) == 0:
            return out.astype(np.float32)
        if positions.min() < 0 or positions.max() >= self.size:
            raise IndexError(
                f"vector positions {positions.min()}..{positions.max()} are outside "
                f"the store of {self.size} vectors"
            )
        starts = np.asarray(self._starts[:-1], dtype=np.int64)
        ranges = np.searchsorted(starts, positions, side="right") - 1
        descriptors: dict[str | None, int] = {}
        try:
            for i, (position, number) in enumerate(zip(positions.tolist(), ranges)):
                name = self._files[number]
                if name not in descriptors:
                    if name is SPILL:
                        descriptors[name] = self._spill.fileno()
                    else:
                        descriptors[name] = os.open(name, os.O_RDONLY)
                start = self._offsets[number]
                start += (position - self._starts[number]) * self.row_bytes
                data = os.pread(descriptors[name], self.row_bytes, start)
                if len(data) != self.row_bytes:
                    raise OSError(
                        f"{name or 'spill file'}: short read of the vector at "
                        f"byte {start} ({len(data)} of {self.row_bytes} bytes)"
                    )
                out[i] = np.frombuffer(data, dtype=np.float16)
        finally:
            for name, descriptor in descriptors.items():
                if name is not SPILL:
                    os.close(descriptor)
        return out.astype(np.float32)

    def close(self) -> None:
        """Delete the spill file. The store must not be read afterwards."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _add(self, name: str | None, offset: int, rows: int) -> None:
        self._files.append(name)
        self._offsets.append(offset)
        self.size += rows
        self._starts.append(self.size)


def arrow_vector_buffers(path: Path, column: str, dimension: int):
    """Yield (byte offset or None, rows, vectors or None) per record batch of `path`.

    The offset is where the batch's float16 values start in the file, found
    from the address of Arrow's zero-copy buffer in a memory map of the file.
    The map is open only while the metadata and the first vector of each
    batch are read, so the vectors' pages are not left resident. When the
    values are not stored as plain bytes in the file (a compressed IPC file,
    or a batch with nulls), the offset is None and the batch's vectors come
    as a float16 array instead.
    """
    import numpy as np
    import pyarrow as pa

    size = os.path.getsize(path)
    row_bytes = dimension * FLOAT16_BYTES
    with pa.memory_map(str(path)) as source:
        base = source.read_buffer(1).address
        source.seek(0)
        reader = pa.ipc.open_file(source)
        field = reader.schema.get_field_index(column)
        descriptor = os.open(path, os.O_RDONLY)
        copied = 0
        try:
            for number in range(reader.num_record_batches):
                array = reader.get_batch(number).column(field)
                rows = len(array)
                offset = _file_offset(array, base, size, dimension)
                if offset is not None and rows:
                    # The first vector read back must equal Arrow's, or the
                    # offset arithmetic does not hold for this file.
                    first = array.values.slice(array.offset * dimension, dimension)
                    expected = first.to_numpy(zero_copy_only=False).tobytes()
                    if os.pread(descriptor, row_bytes, offset) != expected:
                        offset = None
                if offset is None:
                    vectors = array.flatten().to_numpy(zero_copy_only=False)
                    vectors = vectors.reshape(rows, dimension).astype(np.float16)
                    copied += 1
                    yield None, rows, vectors
                else:
                    yield offset, rows, None
        finally:
            os.close(descriptor)
    if copied:
        log.info(
            "%s: %d record batches not stored as plain float16 in the file; "
            "their vectors were copied to a temporary file",
            path,
            copied,
        )


def _file_offset(array, base: int, size: int, dimension: int) -> int | None:
    """Return the file offset of a memory-mapped list array's values, or None."""
    values = array.values
    data = values.buffers()[1]
    if data is None or array.null_count or values.null_count:
        return None
    offset = data.address - base
    offset += (values.offset + array.offset * dimension) * FLOAT16_BYTES
    if offset < 0 or offset + len(array) * dimension * FLOAT16_BYTES > size:
        return None
    return offset
