"""`tagcli tag`: read a dump, embed and classify, write tagged rows.

Batches flow from the reader through the embedding stage to one writer in the
driver, so only a few batches are in memory at any time, whatever the input
size. The embedding stage runs on a Ray Data actor pool (`TagWorker`, one model
per actor) or, for inputs too small to repay Ray's start-up, in-process with the
same `classify_batch`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tagcli.backends import check_artifact_backend
from tagcli.cached_tagging import CacheSpec, open_tag_cache, tag_cache_spec
from tagcli.config import Config
from tagcli.dedupe import DuplicateRun
from tagcli.embed import ModelSpec
from tagcli.errors import TagcliError
from tagcli.executor_choice import (
    CachedRowCounter,
    cached_row_counter,
    executor_reason,
)
from tagcli.history import history_lock
from tagcli.model import Artifact, load_artifact, newest_artifact
from tagcli.near import ROW_COLUMN
from tagcli.numbered import numbered_dataset
from tagcli.monitor import (
    DISTANCE_COLUMN,
    MONITOR_COLUMNS,
    OOD_COLUMN,
    REVIEW_COLUMN,
    DriftMonitor,
    flag_batch,
    resolve_review_threshold,
)
from tagcli.progress import RowProgress
from tagcli.reader import (
    InputSource,
    bytes_per_row,
    iter_local_batches,
    open_source,
    ray_dataset,
)
from tagcli.rows import (
    REJECT_MARKER,
    TRUNCATED_MARKER,
    RowPolicy,
    rejects_path,
    split_rejects,
)
from tagcli.signals import sigterm_deferred
from tagcli.writer import (
    RejectsWriter,
    check_output_apart,
    check_output_path,
    open_writer,
    sidecar_path,
)

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("id", "title", "description")
PROBABILITY_PREFIX = "prob_"
EXECUTORS = ("auto", "ray", "local")


def output_columns(tags: list[str]) -> list[str]:
    """Columns `tag` adds to every input row, in order."""
    probabilities = [PROBABILITY_PREFIX + tag for tag in tags]
    return ["tag", "confidence"] + probabilities + list(MONITOR_COLUMNS)


class TagWorker:
    """Ray Data callable class: embeds and classifies one Arrow batch.

    The model loads once per actor, for the first batch with a text to embed
    (see `tagcli.lazy_backend`). The head, and the ONNX export or a local
    model folder if the artifact has one, arrive through Ray's object store,
    so workers on other nodes need no shared file system; neither does the
    embedding cache, which `cache_service` serves from the driver's node.
    Each arrives wrapped in a one-element list: Ray then passes the ObjectRef
    instead of resolving it into the constructor arguments, which a restarted
    actor could no longer read once they were freed.
    """

    def __init__(
        self,
        head_ref: list,
        spec: ModelSpec,
        model_folder_ref: list,
        threads: int,
        batch_size: int,
        renames: dict,
        policy: RowPolicy | None = None,
        skip_rows_ref: list | None = None,
        onnx_ref: list | None = None,
        cache_service=None,
        dimension: int = 0,
    ):
        import ray

        from tagcli.lazy_backend import lazy_worker_backend

        self.head = ray.get(head_ref[0])
        # Loads the model only for a batch with texts the cache lacks.
        self.encoder = lazy_worker_backend(
            spec, model_folder_ref, onnx_ref or [], threads, dimension
        )
        self.batch_size = batch_size
        self.renames = renames
        self.policy = policy
        self.skip_rows = ray.get(skip_rows_ref[0]) if skip_rows_ref else None
        self.cache = None
        if cache_service is not None:
            from tagcli.cache_service import RemoteCacheReader

            self.cache = RemoteCacheReader(cache_service)

    def __call__(self, batch):
        return classify_batch(
            batch,
            self.encoder,
            self.head,
            self.batch_size,
            self.renames,
            self.policy,
            self.skip_rows,
            self.cache,
        )


def classify_batch(
    batch,
    encoder,
    head,
    batch_size: int,
    renames: dict,
    policy: RowPolicy | None = None,
    skip_rows=None,
    cache=None,
):
    """Return `batch` (an Arrow table) with the tag columns and the centroid distance.

    With a `policy`, rows it rejects get null tag columns, and two marker
    columns record each rejected row's reason and each truncated row (see
    `tagcli.rows`). A batch with a `__row` column also gets an `__embedding`
    column for the near-duplicate search. Rows whose number is in `skip_rows`
    (exact duplicates) are not embedded: their tag columns are null. The distance
    is each tagged row's cosine distance to the nearest training tag centroid;
    the driver turns it into the out-of-distribution flag. With a `cache` (a
    `tagcli.cache.CacheReader`), only texts it lacks are embedded, and the
    `__embedding`, `__cached` and `__tokens` columns follow for the driver.
    """
    import numpy as np
    import pyarrow as pa

    from tagcli.cached_tagging import (
        CACHED_COLUMN,
        TOKENS_COLUMN,
        BatchLookup,
        embed_with_cache,
    )
    from tagcli.monitor import nearest_centroid_distance
    from tagcli.near import EMBEDDING_COLUMN
    from tagcli.rows import screen_texts
    from tagcli.text import compose_text

    if renames:
        batch = batch.rename_columns(
            [renames.get(name, name) for name in batch.column_names]
        )
    titles = _text_column(batch, "title")
    descriptions = _text_column(batch, "description")
    texts = [compose_text(t, d) for t, d in zip(titles, descriptions)]
    # The cache may also hold the token counts, which the screening then reuses.
    lookup = BatchLookup(cache, texts) if cache is not None else None
    known_counts = lookup.token_counts if lookup is not None else None
    screening = screen_texts(texts, encoder, policy, known_counts) if policy else None
    numbered = ROW_COLUMN in batch.column_names
    skipped = np.zeros(len(texts), dtype=bool)
    if numbered and skip_rows is not None and len(skip_rows):
        skipped = np.isin(batch.column(ROW_COLUMN).to_numpy(), skip_rows)
    tagged_rows = [
        index
        for index in range(len(texts))
        if (screening is None or screening.reasons[index] is None)
        and not skipped[index]
    ]
    tagged_texts = [texts[index] for index in tagged_rows]

    tags = head.tags
    from_cache = lookup.take(tagged_rows) if lookup is not None else None
    embeddings, found = embed_with_cache(encoder, tagged_texts, batch_size, from_cache)
    distances = np.full(len(texts), np.nan)
    if tagged_texts:
        probabilities = head.predict_proba(embeddings, tagged_texts)
        distances[tagged_rows] = nearest_centroid_distance(
            head.drift_reference, embeddings
        )
    else:
        # scikit-learn rejects an empty feature matrix.
        probabilities = np.zeros((0, len(tags)))

    columns = _tag_columns(probabilities, tagged_rows, len(texts), tags)
    columns[DISTANCE_COLUMN] = pa.array(
        distances, pa.float64(), mask=np.isnan(distances)
    )
    if screening is not None:
        columns[REJECT_MARKER] = pa.array(screening.reasons, pa.string())
        columns[TRUNCATED_MARKER] = pa.array(screening.truncated_rows, pa.bool_())
    if numbered or cache is not None:
        vectors = np.zeros((len(texts), embeddings.shape[1]), dtype=np.float32)
        vectors[tagged_rows] = embeddings
        columns[EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1)), embeddings.shape[1]
        )
    if cache is not None:
        cached = np.zeros(len(texts), dtype=bool)
        cached[tagged_rows] = found
        columns[CACHED_COLUMN] = pa.array(cached, pa.bool_())
        token_counts = screening.token_counts if screening else [None] * len(texts)
        columns[TOKENS_COLUMN] = pa.array(token_counts, pa.int64())
    for name, values in columns.items():
        batch = batch.append_column(name, values)
    return batch


def _tag_columns(probabilities, tagged_rows: list[int], rows: int, tags: list[str]):
    """Return the tag, confidence and probability columns for `rows` rows.

    `probabilities` has one row per entry of `tagged_rows`, the batch rows
    that were tagged. The other rows, which were rejected, get nulls.
    """
    import numpy as np
    import pyarrow as pa

    best = probabilities.argmax(axis=1)
    full = np.full((rows, len(tags)), np.nan)
    full[tagged_rows] = probabilities
    mask = np.ones(rows, dtype=bool)
    mask[tagged_rows] = False
    tag_names = [None] * rows
    confidence = np.full(rows, np.nan)
    for position, row in enumerate(tagged_rows):
        tag_names[row] = tags[best[position]]
        confidence[row] = probabilities[position, best[position]]

    columns = {
        "tag": pa.array(tag_names, pa.string()),
        "confidence": pa.array(confidence, pa.float64(), mask=mask),
    }
    for index, tag in enumerate(tags):
        columns[PROBABILITY_PREFIX + tag] = pa.array(
            full[:, index], pa.float64(), mask=mask
        )
    return columns


def _text_column(batch, name: str) -> list[str]:
    values = batch.column(name).to_pylist()
    return ["" if value is None else str(value) for value in values]


@dataclass
class TagOptions:
    """Options of one `tag` run that are not in tagcli.toml."""

    model_dir: Path | None = None
    address: str | None = None
    executor: str = "auto"
    overwrite: bool = False
    folder_format: str = "parquet"
    show_progress: bool = True
    encoding: str = "utf-8"
    # Neither read nor update the history; duplicates within the batch still drop.
    no_history: bool = False
    # Tag every row: no duplicate filter and no history.
    keep_duplicates: bool = False
    # Reuse and store embeddings in the cache (off with --no-cache).
    use_cache: bool = True


@dataclass
class TagSummary:
    """Counts and paths of one `tag` run.

    Every row read is counted once: rows_read = rows_written + rows_duplicate
    + rows_rejected. rows_written counts tagged rows; rows_truncated counts
    the tagged rows whose text the model read only in part.
    """

    input: Path
    output: Path
    model: Path
    executor: str = ""
    backend: str = ""
    rows_read: int = 0
    rows_written: int = 0
    # rows_duplicate = rows_duplicate_exact + rows_duplicate_near.
    rows_duplicate: int = 0
    rows_duplicate_exact: int = 0
    rows_duplicate_near: int = 0
    rows_rejected: int = 0
    rows_truncated: int = 0
    # The rejects file, or None when no row was rejected.
    rejects: Path | None = None
    # The duplicates file, or None with --keep-duplicates or no duplicates.
    duplicates_output: Path | None = None
    # Rows in the history after this run, or None without the history.
    history_rows: int | None = None
    # Rows this run added to the history, or None without the history.
    history_rows_added: int | None = None
    tag_counts: dict[str, int] = field(default_factory=dict)
    renamed_columns: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 0
    review_output: Path | None = None
    review_threshold: float = 0.0
    review_rows: int = 0
    drift: dict = field(default_factory=dict)
    # Rows whose embedding came from the cache, or None when the cache was off.
    cached_rows: int | None = None


def duplicates_path(output_path: str | Path, folder_format: str) -> Path:
    """Return the duplicates file beside the output (see `writer.sidecar_path`)."""
    return sidecar_path(output_path, "duplicates", folder_format)


def artifact_path(config: Config, model_dir: Path | None) -> Path:
    """Return `model_dir`, or the newest artifact folder under `[paths] models_dir`."""
    if model_dir:
        return Path(model_dir)
    return newest_artifact(config.paths.models_dir, config.source)


def resolve_artifact(
    config: Config, model_dir: Path | None, numpy_head: bool = False
) -> Artifact:
    return load_artifact(
        artifact_path(config, model_dir), config.tags.approved, numpy_head
    )


def choose_executor(
    requested: str,
    rows: int,
    address: str,
    max_local_rows: int,
    rows_to_embed: int | None = None,
) -> str:
    """Return "ray" or "local" for a run.

    "auto" embeds in-process when no cluster address is set and the input has at
    most `max_local_rows` rows, where starting Ray would cost more than the work.
    It does so for a larger input too when `rows_to_embed`, the rows that are
    neither in the embedding cache nor exact duplicates, is at most that.
    """
    if requested != "auto":
        return requested
    if address:
        return "ray"
    if rows_to_embed is not None and rows_to_embed <= max_local_rows:
        return "local"
    return "local" if rows <= max_local_rows else "ray"


def tag(
    input_path: Path,
    output_path: str | Path,
    config: Config,
    options: TagOptions | None = None,
) -> TagSummary:
    """Tag every row of `input_path` and write it, with probabilities, to `output_path`.

    `output_path` is a .csv or .parquet file, or a folder for part files when
    it is an existing folder or a string ending with a slash.

    Raises TagcliError for unusable input or output, and RuntimeError when the
    rows written differ from the rows read; in both cases no output is left.
    """
    options = options or TagOptions()
    started = time.monotonic()
    # A missing model folder or input file is reported before the slower
    # artifact load, which checks hashes and unpickles the head.
    model_path = artifact_path(config, options.model_dir)
    source = open_source(Path(input_path), INPUT_COLUMNS, options.encoding)
    check_output_apart(source.path, output_path)
    check_output_path(output_path, options.overwrite)
    artifact = load_artifact(model_path, config.tags.approved, numpy_head=True)
    check_artifact_backend(artifact, config.embedding.backend)

    added = output_columns(artifact.tags)
    renames = {name: f"input_{name}" for name in source.columns if name in added}
    address = options.address or config.ray.address
    executor = choose_executor(
        options.executor, source.rows, address, config.ray.max_local_rows
    )
    # Set when the rows already in the embedding cache may turn Ray into local.
    counter = cached_row_counter(
        options.executor,
        executor,
        address,
        tag_cache_spec(artifact, config, options.use_cache),
    )
    summary = TagSummary(
        input=source.path,
        output=Path(output_path),
        model=artifact.path,
        executor=executor,
        backend=config.embedding.backend,
        rows_read=source.rows,
        renamed_columns=renames,
    )
    if counter is None:
        _log_executor(source, executor, options.executor, address, config)

    review_threshold, monitor = _start_monitoring(artifact, config)
    summary.review_output = review_output_path(output_path, options.folder_format)
    summary.review_threshold = review_threshold

    writer = open_writer(
        output_path,
        options.overwrite,
        options.folder_format,
        config.output.rows_per_file,
    )
    rejects = RejectsWriter(
        rejects_path(output_path, options.folder_format), options.overwrite
    )
    duplicates_writer = None
    if not options.keep_duplicates:
        try:
            duplicates_writer = RejectsWriter(
                duplicates_path(output_path, options.folder_format),
                options.overwrite,
                "duplicates",
            )
        except BaseException:
            writer.abort()
            raise
    use_history = not (options.no_history or options.keep_duplicates)
    policy = RowPolicy.from_config(config)
    try:
        review_writer = open_writer(
            summary.review_output,
            options.overwrite,
            options.folder_format,
            config.output.rows_per_file,
        )
    except BaseException:
        writer.abort()
        rejects.abort()
        if duplicates_writer is not None:
            duplicates_writer.abort()
        raise
    counts: Counter[str] = Counter()
    batches = None
    duplicates = None
    cache = None
    with ExitStack() as stack:
        try:
            if use_history:
                lock = history_lock(
                    config.paths.state_dir, config.dedupe.lock_timeout_seconds
                )
                stack.enter_context(lock)
            if not options.keep_duplicates:
                duplicates = DuplicateRun(
                    source,
                    artifact.manifest["embedding"]["model_id"],
                    artifact.manifest["embedding"]["dimension"],
                    config,
                    use_history,
                    added + [REJECT_MARKER, TRUNCATED_MARKER],
                    on_texts=counter.add if counter is not None else None,
                )
            cache = open_tag_cache(artifact, config, options.use_cache)
            if counter is not None:
                executor = _choose_with_cache(
                    counter, source, duplicates, options.executor, address, config
                )
                summary.executor = executor
            cache_spec = cache.spec if cache is not None else None
            with RowProgress(source.rows, enabled=options.show_progress) as progress:
                if executor == "ray":
                    batches = _ray_batches(
                        source,
                        artifact,
                        renames,
                        config,
                        address,
                        summary,
                        policy,
                        duplicates,
                        cache_spec,
                    )
                else:
                    batches = _local_batches(
                        source,
                        artifact,
                        renames,
                        config,
                        policy,
                        duplicates,
                        cache_spec,
                    )
                    summary.workers = 1
                for batch in batches:
                    progress.advance(batch.num_rows)
                    if cache is not None:
                        batch = cache.absorb(batch, duplicates is not None)
                    if duplicates is not None:
                        batch, dropped = duplicates.split(batch)
                        if dropped.num_rows:
                            duplicates_writer.write(dropped)
                    split = split_rejects(batch, renames, added)
                    tagged = flag_batch(
                        split.tagged, review_threshold, monitor.ood_distance
                    )
                    writer.write(tagged)
                    review_writer.write(tagged.filter(tagged.column(REVIEW_COLUMN)))
                    monitor.update(tagged)
                    if split.rejected is not None:
                        rejects.write(split.rejected)
                    summary.rows_truncated += split.truncated
                    counts.update(tagged.column("tag").to_pylist())

            if cache is not None:
                summary.cached_rows = cache.cached_rows
            if duplicates is not None:
                moved = duplicates.move_displaced(
                    writer, review_writer, duplicates_writer
                )
                counts.subtract(moved.tag_counts)
                # Drift and review counts cover the rows that stay in the output.
                monitor.remove(moved)
                summary.rows_truncated -= moved.truncated_rows
                summary.rows_duplicate_exact = duplicates.exact_count
                summary.rows_duplicate_near = duplicates.near_count
            summary.rows_duplicate = (
                summary.rows_duplicate_exact + summary.rows_duplicate_near
            )
            accounted = (
                writer.rows_written + summary.rows_duplicate + rejects.rows_written
            )
            if accounted != source.rows:
                raise RuntimeError(
                    f"{source.path}: read {source.rows} rows but tagged "
                    f"{writer.rows_written}, found {summary.rows_duplicate} "
                    f"duplicates and rejected {rejects.rows_written}; no output "
                    "was written."
                )
            # SIGTERM waits until the renames are done: stopping between the
            # output's rename and the history's would leave an output whose
            # rows the next run tags again.
            # NOTE: SIGKILL or a power loss in that gap still has that effect.
            with sigterm_deferred() as deferred:
                # The rejects file goes first, so an output never appears without it.
                rejects.commit()
                schema = _output_schema(source, renames, added)
                if duplicates_writer is not None:
                    duplicates_writer.commit()
                writer.commit(schema)
                review_writer.commit(schema)
                # The history learns the rows only once the output is in place.
                if duplicates is not None:
                    history_before = duplicates.history
                    duplicates.commit()
                    if duplicates.history is not None:
                        summary.history_rows = duplicates.history.rows
                        summary.history_rows_added = (
                            duplicates.history.rows - history_before.rows
                        )
            if deferred.received:
                log.warning(
                    "SIGTERM arrived while the output was being committed; the "
                    "commit was completed first"
                )
        except BaseException:
            writer.abort()
            rejects.abort()
            review_writer.abort()
            if duplicates_writer is not None:
                duplicates_writer.abort()
            if duplicates is not None:
                duplicates.abort()
            raise
        finally:
            if batches is not None:
                # Stops a Ray instance this run started, even on an error.
                batches.close()
            if cache is not None:
                cache.close()

    summary.rows_written = writer.rows_written
    summary.rows_rejected = rejects.rows_written
    summary.rejects = rejects.path if rejects.rows_written else None
    if duplicates_writer is not None and duplicates_writer.rows_written:
        summary.duplicates_output = duplicates_writer.path
    summary.tag_counts = {name: counts.get(name, 0) for name in artifact.tags}
    summary.review_rows = monitor.needs_review
    summary.drift = monitor.report(
        config.drift.psi_threshold, config.drift.ood_share_threshold
    )
    summary.seconds = time.monotonic() - started
    return summary


def _log_executor(
    source: InputSource,
    executor: str,
    requested: str,
    address: str,
    config: Config,
    rows_to_embed: int | None = None,
) -> None:
    reason = executor_reason(
        requested, source.rows, address, config.ray.max_local_rows, rows_to_embed
    )
    log.info(
        "Tagging %d rows from %s with executor %s (%s)",
        source.rows,
        source.path,
        executor,
        reason,
    )


def _choose_with_cache(
    counter: CachedRowCounter,
    source: InputSource,
    duplicates: DuplicateRun | None,
    requested: str,
    address: str,
    config: Config,
) -> str:
    """Choose the executor from the rows left to embed, and log the choice.

    The screening pass of `duplicates` has fed `counter`; without it, the
    counter reads the input's texts itself.
    """
    try:
        if duplicates is None:
            counter.read(source)
        skipped = duplicates.exact.skipped_rows() if duplicates is not None else None
        rows_to_embed = counter.rows_to_embed(skipped)
    finally:
        counter.close()
    executor = choose_executor(
        requested, source.rows, address, config.ray.max_local_rows, rows_to_embed
    )
    _log_executor(source, executor, requested, address, config, rows_to_embed)
    return executor


def _start_monitoring(artifact: Artifact, config: Config):
    """Return the review threshold and an empty DriftMonitor for a run."""
    review_threshold = resolve_review_threshold(
        config.review.threshold, artifact.manifest
    )
    reference = artifact.head.drift_reference
    if reference is None:
        raise TagcliError(
            f"{artifact.path}: the model has no drift statistics, because an older "
            "tagcli trained it; retrain it with `tagcli train DATA`."
        )
    ood_distance = reference.distance_at(config.drift.ood_quantile)
    return review_threshold, DriftMonitor(reference, ood_distance)


def review_output_path(output_path: str | Path, folder_format: str) -> Path:
    """Return the review file beside the output (see `writer.sidecar_path`)."""
    return sidecar_path(output_path, "review", folder_format)


def _local_batches(
    source: InputSource,
    artifact: Artifact,
    renames: dict,
    config: Config,
    policy: RowPolicy,
    duplicates: DuplicateRun | None = None,
    cache_spec: CacheSpec | None = None,
):
    """Yield tagged batches embedded in this process, in input order.

    With `duplicates`, batches are numbered and its exact duplicates skip
    embedding. With `cache_spec`, texts found in the cache skip embedding.
    """
    import numpy as np
    import pyarrow as pa

    from tagcli.lazy_backend import lazy_artifact_backend

    if source.rows == 0:
        # An input with a header and no rows needs no model.
        return
    # Loads the model only for a batch with texts the cache lacks.
    encoder = lazy_artifact_backend(artifact, config.embedding.offline)
    skip_rows = duplicates.exact.skipped_rows() if duplicates else None
    cache = cache_spec.open_reader() if cache_spec else None
    first_row = 0
    for batch in iter_local_batches(source, config.ray.batch_size):
        if duplicates is not None:
            numbers = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
            batch = batch.append_column(ROW_COLUMN, pa.array(numbers))
        first_row += batch.num_rows
        yield classify_batch(
            batch,
            encoder,
            artifact.head,
            config.embedding.batch_size,
            renames,
            policy,
            skip_rows,
            cache,
        )


def _ray_batches(
    source: InputSource,
    artifact: Artifact,
    renames: dict,
    config: Config,
    address: str,
    summary: TagSummary,
    policy: RowPolicy,
    duplicates: DuplicateRun | None = None,
    cache_spec: CacheSpec | None = None,
) -> Iterator:
    """Yield tagged batches from a Ray Data pipeline, in input order.

    Joins the cluster at `address` or starts a local instance, and shuts down
    only an instance this call started, when the generator finishes or is closed.
    """
    import ray

    from tagcli.cluster import (
        connect,
        node_cpus,
        plan_workers,
        ray_native_output_to_file,
    )
    from tagcli.signals import DeferredSigterm, install_sigterm_handler

    sigterm = DeferredSigterm()
    sigterm.install()
    batches = None
    started_ray = False
    with ray_native_output_to_file():
        try:
            started_ray = connect(address)
            # ray.init() replaces the SIGTERM handler with one that calls sys.exit.
            sigterm.install()
            sigterm.check()
            plan = plan_workers(
                node_cpus(), config.ray.num_workers, config.ray.cpus_per_worker
            )
            summary.workers = plan.num_workers
            dataset = _build_dataset(
                source, artifact, renames, config, plan, policy, duplicates, cache_spec
            )
            batches = iter(
                dataset.iter_batches(batch_format="pyarrow", batch_size=None)
            )
            for batch in batches:
                sigterm.check()
                yield batch
            sigterm.check()
        finally:
            # Stop Ray Data's executor before Ray itself, so none of its threads
            # use the core worker after shutdown.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            if ray.is_initialized() and started_ray:
                ray.shutdown()
            install_sigterm_handler()


def _build_dataset(
    source,
    artifact,
    renames: dict,
    config: Config,
    plan,
    policy: RowPolicy,
    duplicates: DuplicateRun | None = None,
    cache_spec: CacheSpec | None = None,
):
    """Return the lazy Ray Data pipeline: read, then embed and classify on actors.

    With `duplicates`, the reader numbers the rows and the actors skip
    embedding its exact duplicates. With `cache_spec`, each actor looks its
    texts up through a `CacheService` on this node and embeds only those the
    cache lacks.
    """
    import ray
    import ray.data

    from tagcli.backends import ONNX_INT8, read_onnx_model, recorded_backend
    from tagcli.cache_service import start_cache_service
    from tagcli.embed import pack_folder

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False

    spec = ModelSpec(artifact.manifest["embedding"]["model"], config.embedding.offline)
    onnx_ref = []
    model_folder_ref = []
    if recorded_backend(artifact.manifest) == ONNX_INT8:
        onnx_entry = artifact.manifest["embedding"]["onnx"]
        onnx_ref = [ray.put(read_onnx_model(artifact.path, onnx_entry))]
    elif spec.local_folder():
        model_folder_ref = [ray.put(pack_folder(spec.local_folder()))]

    # Blocks of at most one batch, and at least one block per worker, so small
    # inputs still keep every actor busy. Readers split their output by bytes,
    # so the target block size comes from the bytes of a row. A repartition
    # step would split by rows, but its tasks reserve a whole CPU, which a
    # cluster whose free CPU is split across nodes never has.
    rows_per_block = max(
        1, min(config.ray.batch_size, -(-source.rows // plan.num_workers))
    )
    context.target_max_block_size = max(
        1024, int(rows_per_block * bytes_per_row(source))
    )

    spread_args = {}
    if plan.spread:
        spread_args["ray_remote_args_fn"] = lambda: {"scheduling_strategy": "SPREAD"}
    dataset = ray_dataset(source)
    skip_rows_ref = None
    if duplicates is not None:
        dataset = numbered_dataset(source, duplicates.exact.file_rows, rows_per_block)
        skip_rows_ref = [ray.put(duplicates.exact.skipped_rows())]
    return dataset.map_batches(
        TagWorker,
        fn_constructor_kwargs={
            "head_ref": [ray.put(artifact.head)],
            "spec": spec,
            "model_folder_ref": model_folder_ref,
            "threads": plan.torch_threads,
            "batch_size": config.embedding.batch_size,
            "renames": renames,
            "policy": policy,
            "skip_rows_ref": skip_rows_ref,
            "onnx_ref": onnx_ref,
            # Actors on any node look the cache up through one service actor
            # on this node, which has the state folder.
            "cache_service": (
                start_cache_service(cache_spec) if cache_spec is not None else None
            ),
            "dimension": int(artifact.manifest["embedding"]["dimension"]),
        },
        batch_size=config.ray.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.num_workers),
        num_cpus=plan.cpus_per_worker,
        **spread_args,
    )


def _output_schema(source: InputSource, renames: dict, added: list[str]):
    """Return the output schema, used to write the header of an empty output."""
    import pyarrow as pa

    fields = [
        pa.field(renames.get(f.name, f.name), f.type)
        for f in source.schema
        if not f.name.startswith("__")
    ]
    fields.append(pa.field("tag", pa.string()))
    for name in added[1:]:
        is_flag = name in (OOD_COLUMN, REVIEW_COLUMN)
        fields.append(pa.field(name, pa.bool_() if is_flag else pa.float64()))
    return pa.schema(fields)
