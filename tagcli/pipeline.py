"""`tagcli tag`: read a dump, embed and classify on Ray Data workers, write tagged rows.

Batches flow from the reader through an actor pool (`TagWorker`, one model per
actor) to a single writer in the driver, so only a few batches are in memory at
any time.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tagcli.cluster import cluster_cpus, connect, plan_workers
from tagcli.config import Config
from tagcli.embed import ModelSpec
from tagcli.errors import TagcliError
from tagcli.io import (
    TableWriter,
    check_columns,
    check_readable,
    file_format,
    read_csv_header,
)
from tagcli.model import Artifact, load_artifact, newest_artifact

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("id", "title", "description")
PROBABILITY_PREFIX = "prob_"


def output_columns(tags: list[str]) -> list[str]:
    """Columns `tag` adds to every input row, in order."""
    return ["tag", "confidence"] + [PROBABILITY_PREFIX + tag for tag in tags]


class TagWorker:
    """Ray Data callable class: embeds and classifies one Arrow batch.

    The model loads once per actor in `__init__`. The head arrives through Ray's
    object store as `head_ref`, a one-element list holding an ObjectRef, so
    workers on other nodes need no shared file system. The list keeps Ray from
    resolving the reference into the constructor arguments, which would stop a
    crashed actor from restarting once those arguments are freed.
    """

    def __init__(
        self,
        head_ref: list,
        spec: ModelSpec,
        threads: int,
        batch_size: int,
        renames: dict,
    ):
        import ray

        from tagcli.embed import load_encoder

        self.head = ray.get(head_ref[0])
        self.encoder = load_encoder(spec, threads=threads)
        self.batch_size = batch_size
        self.renames = renames

    def __call__(self, batch):
        return classify_batch(
            batch, self.encoder, self.head, self.batch_size, self.renames
        )


def classify_batch(batch, encoder, head, batch_size: int, renames: dict):
    """Return `batch` (an Arrow table) with tag, confidence and probability columns added."""
    import numpy as np
    import pyarrow as pa

    from tagcli.embed import embed_texts
    from tagcli.text import compose_text

    if renames:
        batch = batch.rename_columns(
            [renames.get(name, name) for name in batch.column_names]
        )
    titles = _text_column(batch, "title")
    descriptions = _text_column(batch, "description")
    texts = [compose_text(t, d) for t, d in zip(titles, descriptions)]

    embeddings = embed_texts(encoder, texts, batch_size)
    probabilities = head.predict_proba(embeddings, texts)
    best = probabilities.argmax(axis=1)

    tags = head.tags
    columns = {
        "tag": pa.array([tags[i] for i in best], pa.string()),
        "confidence": pa.array(probabilities[np.arange(len(best)), best], pa.float64()),
    }
    for index, tag in enumerate(tags):
        columns[PROBABILITY_PREFIX + tag] = pa.array(
            probabilities[:, index], pa.float64()
        )
    for name, values in columns.items():
        batch = batch.append_column(name, values)
    return batch


def _text_column(batch, name: str) -> list[str]:
    values = batch.column(name).to_pylist()
    return ["" if value is None else str(value) for value in values]


@dataclass
class TagSummary:
    input: Path
    output: Path
    model: Path
    rows_read: int = 0
    rows_written: int = 0
    tag_counts: dict[str, int] = field(default_factory=dict)
    renamed_columns: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 0


def resolve_artifact(config: Config, model_dir: Path | None) -> Artifact:
    path = Path(model_dir) if model_dir else newest_artifact(config.paths.models_dir)
    return load_artifact(path, config.tags.approved)


def _input_columns(path: Path) -> list[str]:
    if file_format(path) == "csv":
        return read_csv_header(path)
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as error:  # pyarrow raises several types for a bad footer
        raise TagcliError(
            f"{path}: not a readable Parquet file ({error}); the file may be "
            "truncated or corrupt."
        ) from error


def count_rows(path: Path) -> int:
    """Count data rows: from Parquet metadata, or by streaming through a CSV file once."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if file_format(path) == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    columns = read_csv_header(path)
    reader = pacsv.open_csv(
        path,
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in columns},
            include_columns=[columns[0]],
        ),
    )
    return sum(batch.num_rows for batch in reader)


def _read_dataset(path: Path, columns: list[str]):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    if file_format(path) == "parquet":
        return ray.data.read_parquet(str(path))
    # Every CSV column is text, so "007" and "NaN" survive as written.
    return ray.data.read_csv(
        str(path),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in columns},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
        read_options=pacsv.ReadOptions(encoding="utf8"),
    )


def tag(
    input_path: Path,
    output_path: Path,
    config: Config,
    model_dir: Path | None = None,
    address: str | None = None,
) -> TagSummary:
    """Tag every row of `input_path` and write it, with probabilities, to `output_path`."""
    import ray
    import ray.data

    started = time.monotonic()
    input_path = Path(input_path)
    output_path = Path(output_path)
    artifact = resolve_artifact(config, model_dir)
    check_readable(input_path)
    file_format(output_path, purpose="output")
    columns = _input_columns(input_path)
    check_columns(input_path, columns, INPUT_COLUMNS)

    added = output_columns(artifact.tags)
    renames = {name: f"input_{name}" for name in columns if name in added}
    summary = TagSummary(input=input_path, output=output_path, model=artifact.path)
    summary.renamed_columns = renames
    rows_read = count_rows(input_path)

    started_ray = connect(address or config.ray.address)
    try:
        plan = plan_workers(
            cluster_cpus(), config.ray.num_workers, config.ray.cpus_per_worker
        )
        summary.workers = plan.num_workers
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        context.print_on_execution_start = False

        spec = ModelSpec(
            artifact.manifest["embedding"]["model"], config.embedding.offline
        )
        dataset = _read_dataset(input_path, columns)
        # Blocks of at most one batch, and at least one block per worker.
        rows_per_block = max(
            1, min(config.ray.batch_size, -(-rows_read // plan.num_workers))
        )
        dataset = dataset.repartition(target_num_rows_per_block=rows_per_block)
        head_ref = ray.put(artifact.head)
        dataset = dataset.map_batches(
            TagWorker,
            fn_constructor_kwargs={
                "head_ref": [head_ref],
                "spec": spec,
                "threads": plan.torch_threads,
                "batch_size": config.embedding.batch_size,
                "renames": renames,
            },
            batch_size=config.ray.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=plan.num_workers),
            num_cpus=plan.cpus_per_worker,
        )

        writer = TableWriter(output_path)
        counts: Counter[str] = Counter()
        schema = None
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                schema = schema or batch.schema
                writer.write(batch)
                counts.update(batch.column("tag").to_pylist())
            if schema is None:
                schema = _empty_output_schema(columns, renames, added)
            writer.commit(schema)
        except BaseException:
            writer.abort()
            raise
    finally:
        if started_ray:
            ray.shutdown()

    summary.rows_written = writer.rows_written
    summary.rows_read = rows_read
    if summary.rows_written != rows_read:
        raise RuntimeError(
            f"{input_path}: read {rows_read} rows but wrote {summary.rows_written}; "
            f"{output_path} may be incomplete."
        )
    summary.tag_counts = {name: counts.get(name, 0) for name in artifact.tags}
    summary.seconds = time.monotonic() - started
    return summary


def _empty_output_schema(columns: list[str], renames: dict, added: list[str]):
    import pyarrow as pa

    fields = [pa.field(renames.get(name, name), pa.string()) for name in columns]
    fields.append(pa.field("tag", pa.string()))
    fields.extend(pa.field(name, pa.float64()) for name in added[1:])
    return pa.schema(fields)
