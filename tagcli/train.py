"""`tagcli train`: labeled rows in, a versioned model artifact out.

Steps: read and validate, map unapproved tags to the fallback, stratified split,
embed, choose C by cross-validation, fit, validate, refit on all rows (optional),
save the artifact.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tagcli.config import Config
from tagcli.backends import build_training_backend
from tagcli.dedupe import drop_training_duplicates
from tagcli.embed import ModelSpec, embed_texts
from tagcli.errors import TagcliError
from tagcli.feedback import apply_stored_feedback
from tagcli.evaluate import compute_metrics, reliability_table
from tagcli.io import read_table
from tagcli.model import (
    HeadSettings,
    check_output_folder,
    choose_c,
    fit_head,
    fit_temperature,
    out_of_fold_logits,
    new_version_name,
    package_versions,
    save_artifact,
    sha256_file,
)
from tagcli.monitor import build_drift_reference, choose_review_threshold
from tagcli.text import compose_text, content_key

log = logging.getLogger(__name__)

LABELED_COLUMNS = ("id", "title", "description", "tag")
# At least this many rows per tag, so a stratified split leaves one on each side.
MIN_ROWS_PER_TAG = 2
# At least this many rows per tag in the training split, one per fold of the
# smallest (2-fold) cross-validation.
MIN_TRAIN_ROWS_PER_TAG = 2
# Column of the labeled frame with the original tag of each row mapped to the
# fallback tag, null for rows whose tag is approved.
MAPPED_FROM = "mapped_from"


@dataclass
class LabeledData:
    """Labeled rows after tag mapping; `mapped` counts rows per unapproved original tag."""

    frame: object
    mapped: dict[str, int] = field(default_factory=dict)


def load_labeled(path: Path, config: Config, encoding: str = "utf-8") -> LabeledData:
    """Read a labeled CSV or Parquet file and map unapproved tags to the fallback.

    Raises TagcliError naming the file and rows for empty tags or rows with
    neither title nor description.
    """
    import polars as pl

    frame = read_table(path, LABELED_COLUMNS, encoding)
    if frame.height == 0:
        raise TagcliError(
            f"{path}: the file has a header but no data rows; add labeled rows."
        )
    frame = frame.with_columns(pl.col("tag").cast(pl.Utf8).str.strip_chars())

    _reject_rows(
        path,
        frame,
        pl.col("tag").is_null() | (pl.col("tag") == ""),
        "have an empty tag",
        "fill in the tag or remove the rows",
    )
    _reject_rows(
        path,
        frame,
        (pl.col("title").str.strip_chars() == "")
        & (pl.col("description").str.strip_chars() == ""),
        "have neither a title nor a description",
        "fill in the text or remove the rows",
    )

    approved = config.tags.approved
    frame = frame.with_columns(
        pl.when(pl.col("tag").is_in(approved))
        .then(pl.lit(None, dtype=pl.Utf8))
        .otherwise(pl.col("tag"))
        .alias(MAPPED_FROM)
    )
    frame = frame.with_columns(
        pl.when(pl.col("tag").is_in(approved))
        .then(pl.col("tag"))
        .otherwise(pl.lit(config.tags.fallback))
        .alias("tag")
    )
    return LabeledData(frame=frame, mapped=count_mapped(frame))


def count_mapped(frame) -> dict[str, int]:
    """Count the rows of `frame` per unapproved original tag, sorted by tag.

    Call it again after any step that drops rows, so the counts match the
    rows that remain.
    """
    original = [tag for tag in frame[MAPPED_FROM].to_list() if tag is not None]
    return dict(sorted(Counter(original).items()))


def _reject_rows(path: Path, frame, condition, problem: str, fix: str) -> None:
    rows = frame.with_row_index("row", offset=1).filter(condition)["row"].to_list()
    if rows:
        first_rows = ", ".join(str(row) for row in rows[:10])
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        raise TagcliError(
            f"{path}: {len(rows)} row(s) {problem} (data rows {first_rows}{more}, "
            f"counting from 1 after the header); {fix}."
        )


def texts_of(frame) -> list[str]:
    return [
        compose_text(title, description)
        for title, description in zip(
            frame["title"].to_list(), frame["description"].to_list()
        )
    ]


def check_trainable(path: Path, tags: list[str], config: Config) -> None:
    """Raise TagcliError when the labels cannot give a stratified split and a classifier."""
    counts = Counter(tags)
    if len(counts) < 2:
        only = next(iter(counts), "(none)")
        raise TagcliError(
            f"{path}: the tag column has only one class ({only!r}) after mapping "
            "unapproved tags; a classifier needs rows of at least two approved tags."
        )
    too_few = {tag: n for tag, n in counts.items() if n < MIN_ROWS_PER_TAG}
    if too_few:
        listed = ", ".join(f"{tag} ({n})" for tag, n in sorted(too_few.items()))
        raise TagcliError(
            f"{path}: too few rows to split for tag(s) {listed}; each tag needs at "
            f"least {MIN_ROWS_PER_TAG} rows. Add rows or drop the tag from the data."
        )
    validation_rows = round(len(tags) * config.train.validation_fraction)
    if validation_rows < len(counts):
        raise TagcliError(
            f"{path}: {len(tags)} rows give a validation split of {validation_rows} "
            f"row(s), fewer than the {len(counts)} tags; add rows or raise "
            "[train] validation_fraction."
        )
    _check_train_split(path, tags, config)


def _check_train_split(path: Path, tags: list[str], config: Config) -> None:
    """Raise TagcliError unless the split leaves every tag 2 training rows.

    Cross-validation picks C with at least 2 stratified folds (fewer than
    [train] cv_folds when a tag is small), and every fold's training part needs
    each tag, so each tag needs 2 rows in the training split. The split here
    is the same seeded one that `train` makes, run on the labels alone.
    """
    from sklearn.model_selection import train_test_split

    train_tags, _ = train_test_split(
        tags,
        test_size=config.train.validation_fraction,
        stratify=tags,
        random_state=config.train.seed,
    )
    train_counts = Counter(train_tags)
    short = sorted(
        tag for tag in set(tags) if train_counts[tag] < MIN_TRAIN_ROWS_PER_TAG
    )
    if not short:
        return
    needed = MIN_TRAIN_ROWS_PER_TAG + 1
    fraction = config.train.validation_fraction
    while needed - math.ceil(needed * fraction) < MIN_TRAIN_ROWS_PER_TAG:
        needed += 1
    per_tag = ", ".join(f"{tag} {n}" for tag, n in sorted(Counter(tags).items()))
    raise TagcliError(
        f"{path}: too few rows for the validation split and cross-validation; "
        f"rows per tag: {per_tag}. After the validation split "
        f"([train] validation_fraction = {config.train.validation_fraction}) "
        f"tag(s) {', '.join(short)} keep fewer than {MIN_TRAIN_ROWS_PER_TAG} "
        f"training rows, and 2-fold cross-validation needs "
        f"{MIN_TRAIN_ROWS_PER_TAG} per tag. Add rows to those tags (about "
        f"{needed} or more each) or drop them from the data."
    )


@dataclass
class TrainResult:
    artifact: Path
    manifest: dict
    mapped: dict[str, int]
    rows: int
    seconds: float
    duplicates_exact: int = 0
    duplicates_near: int = 0
    feedback: dict | None = None


def train(
    data_path: Path,
    config: Config,
    output: Path | None = None,
    encoding: str = "utf-8",
    overwrite: bool = False,
    use_feedback: bool = True,
) -> TrainResult:
    """Train a head on `data_path` and save an artifact; return where and what.

    `overwrite` lets `output` replace a model artifact already there. With
    `use_feedback`, corrections stored by `tagcli feedback` override the tags
    of their rows and add new rows first. Raises TagcliError before any model
    time is spent when the data or the output folder cannot be used.
    """
    import numpy as np
    from sklearn.model_selection import train_test_split

    started = time.monotonic()
    data_path = Path(data_path)
    if output is not None:
        check_output_folder(Path(output), overwrite)
    labeled = load_labeled(data_path, config, encoding)
    feedback_counts = None
    if use_feedback:
        # NOTE: a feedback row whose text duplicates an earlier row of DATA is
        # dropped by the duplicate filter below, and the earlier row's tag stays.
        labeled.frame, feedback_counts = apply_stored_feedback(
            labeled.frame, config, mapped_column=MAPPED_FROM
        )
    check_trainable(data_path, labeled.frame["tag"].to_list(), config)
    spec = ModelSpec(config.embedding.model, config.embedding.offline)
    backend_name = config.embedding.backend
    # Holds the ONNX export until save_artifact copies it into the artifact.
    # After a failure, the TemporaryDirectory finaliser removes it at exit.
    export_folder = tempfile.TemporaryDirectory(prefix="tagcli-export-")
    encoder, backend_entries, backend_files = build_training_backend(
        spec, backend_name, Path(export_folder.name)
    )

    read_rows = labeled.frame.height
    log.info(
        "Embedding %d rows with %s on the %s backend",
        read_rows,
        spec.model_id(),
        backend_name,
    )
    # Drop duplicates before the split, so no content straddles train and validation.
    duplicates = drop_training_duplicates(
        labeled.frame,
        lambda part: embed_texts(encoder, texts_of(part), config.embedding.batch_size),
        config.dedupe.near_threshold,
    )
    frame = labeled.frame[duplicates.kept.tolist()]
    if duplicates.exact or duplicates.near:
        log.info(
            "%s: dropped %d duplicate row(s) before the split (%d exact, %d near).",
            data_path,
            duplicates.exact + duplicates.near,
            duplicates.exact,
            duplicates.near,
        )
    # Counted on the rows trained on: a step that drops rows goes above this.
    mapped = count_mapped(frame)
    frame = frame.drop(MAPPED_FROM)
    labels = frame["tag"].to_list()
    check_trainable(data_path, labels, config)
    missing_tags = [tag for tag in config.tags.approved if tag not in labels]
    if missing_tags:
        log.warning(
            "%s has no rows tagged %s; the model will never predict %s.",
            data_path,
            ", ".join(missing_tags),
            "them" if len(missing_tags) > 1 else "it",
        )
    seed = config.train.seed

    # Split first, on row positions, so the validation rows are never seen by CV.
    positions = np.arange(frame.height)
    train_index, validation_index = train_test_split(
        positions,
        test_size=config.train.validation_fraction,
        stratify=labels,
        random_state=seed,
    )
    train_index = np.sort(train_index)
    validation_index = np.sort(validation_index)

    texts = texts_of(frame)
    embeddings = duplicates.embeddings
    label_array = np.asarray(labels)
    tags = config.tags.approved
    settings = HeadSettings(
        lexical=config.train.lexical_features,
        class_weight=config.train.class_weight,
        seed=seed,
    )

    def subset(index):
        return embeddings[index], [texts[i] for i in index], label_array[index]

    train_embeddings, train_texts, train_labels = subset(train_index)
    best_c, cv_scores = choose_c(
        train_embeddings,
        train_texts,
        train_labels,
        tags,
        config.train.c_grid,
        config.train.cv_folds,
        settings,
    )
    head = fit_head(train_embeddings, train_texts, train_labels, tags, best_c, settings)

    # Temperature scaling, fitted on out-of-fold logits of the training split.
    train_logits = out_of_fold_logits(
        train_embeddings,
        train_texts,
        train_labels,
        tags,
        best_c,
        config.train.cv_folds,
        settings,
    )
    head.temperature = fit_temperature(train_logits, train_labels.tolist(), tags)
    out_of_fold_predicted = [tags[i] for i in train_logits.argmax(axis=1)]

    validation_embeddings, validation_texts, validation_labels = subset(
        validation_index
    )
    validation_frame = frame[validation_index.tolist()]
    validation_probabilities = head.predict_proba(
        validation_embeddings, validation_texts
    )
    predicted = [tags[i] for i in validation_probabilities.argmax(axis=1)]
    validation_correct = np.asarray(predicted) == validation_labels
    review = choose_review_threshold(
        validation_probabilities.max(axis=1),
        validation_correct,
        config.review.error_share,
    )
    if review["errors"] == 0:
        log.warning(
            "The head made no errors on the %d validation rows, so the review "
            "threshold is 0 and queues no rows; set [review] threshold in "
            "tagcli.toml to queue low-confidence rows.",
            review["rows"],
        )
    calibration = {
        "method": "temperature scaling on out-of-fold logits of the training split",
        "temperature": head.temperature,
        "validation_ece": reliability_table(
            validation_probabilities.max(axis=1), validation_correct
        )["ece"],
    }
    metrics = compute_metrics(
        validation_frame["title"].to_list(),
        validation_frame["description"].to_list(),
        validation_labels.tolist(),
        predicted,
        tags,
    )

    fitted_index = train_index
    if config.train.refit_on_all:
        temperature = head.temperature
        head = fit_head(embeddings, texts, label_array, tags, best_c, settings)
        head.temperature = temperature
        fitted_index = positions
    head.drift_reference = build_drift_reference(
        embeddings[fitted_index],
        label_array[fitted_index].tolist(),
        out_of_fold_predicted,
        tags,
    )
    fitted_keys = [
        content_key(frame["title"][int(i)], frame["description"][int(i)])
        for i in fitted_index
    ]

    manifest = {
        "tags": {"approved": list(tags), "fallback": config.tags.fallback},
        "embedding": {
            "model": spec.setting,
            "model_id": spec.model_id(),
            "dimension": int(embeddings.shape[1]),
            "offline": spec.offline,
            "backend": backend_name,
            **backend_entries,
        },
        "head": {
            "type": "LogisticRegression",
            "C": best_c,
            "cv_weighted_f1": cv_scores,
            "lexical_features": settings.lexical,
            "class_weight": settings.class_weight,
            "fitted_on": "all_rows" if config.train.refit_on_all else "train_split",
            "fitted_rows": len(fitted_index),
        },
        "training_data": {
            "path": str(data_path),
            "sha256": sha256_file(data_path),
            "rows": frame.height,
            "rows_read": read_rows,
            "duplicates_dropped": {
                "exact": duplicates.exact,
                "near": duplicates.near,
            },
            "train_rows": len(train_index),
            "validation_rows": len(validation_index),
            "seed": seed,
            "tag_counts": dict(sorted(Counter(labels).items())),
            "mapped_to_fallback": mapped,
        },
        "validation_metrics": metrics,
        "calibration": calibration,
        "review": review,
        "drift": head.drift_reference.summary(),
        "feedback": feedback_counts,
        "package_versions": package_versions(),
    }

    models_dir = config.paths.models_dir
    target = Path(output) if output else models_dir / new_version_name(models_dir)
    save_artifact(
        target,
        head,
        manifest,
        validation_frame,
        fitted_keys,
        overwrite,
        extra_files=backend_files,
    )
    export_folder.cleanup()
    return TrainResult(
        artifact=target,
        manifest=manifest,
        mapped=mapped,
        rows=frame.height,
        seconds=time.monotonic() - started,
        duplicates_exact=duplicates.exact,
        duplicates_near=duplicates.near,
        feedback=feedback_counts,
    )
