"""Precision, recall and F1: overall, per tag and per slice, as rich tables and JSON."""

from __future__ import annotations

import re
from collections.abc import Callable

SHORT_TEXT_WORDS = 8
RELIABILITY_BINS = 10
_TRANSFORMER_WORDS = re.compile(
    r"\b(llms?|large language models?|transformers?|bert\w*)\b", re.IGNORECASE
)


def _short_text(title: str, description: str, tag: str) -> bool:
    return len(f"{title} {description}".split()) < SHORT_TEXT_WORDS


def _nlp_transformers(title: str, description: str, tag: str) -> bool:
    return tag == "natural-language-processing" and bool(
        _TRANSFORMER_WORDS.search(f"{title} {description}")
    )


# Each slice selects rows by their text and true tag.
SLICES: dict[str, tuple[str, Callable[[str, str, str], bool]]] = {
    "short_text": (f"title + description under {SHORT_TEXT_WORDS} words", _short_text),
    "nlp_llm_transformers": (
        "NLP rows that mention LLMs, transformers or BERT",
        _nlp_transformers,
    ),
}


def _scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    if not y_true:
        return {"precision": None, "recall": None, "f1": None, "rows": 0}
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="weighted", zero_division=0
    )
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "rows": len(y_true),
    }


def compute_metrics(
    titles: list[str],
    descriptions: list[str],
    y_true: list[str],
    y_pred: list[str],
    tags: list[str],
) -> dict:
    """Return weighted, per-tag and per-slice metrics and the confusion matrix.

    Weighted averages weight each tag by its support (rows whose true tag it is).
    The confusion matrix rows are true tags and its columns predicted tags, both
    in the order of `tags`.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    result = {"overall": _scores(y_true, y_pred, tags), "per_tag": {}, "slices": {}}

    if y_true:
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=tags, average=None, zero_division=0
        )
        predicted_counts = {tag: y_pred.count(tag) for tag in tags}
        for index, tag in enumerate(tags):
            # A score with no rows to measure it on is undefined, not 0.
            has_true = support[index] > 0
            has_predicted = predicted_counts[tag] > 0
            result["per_tag"][tag] = {
                "precision": float(precision[index]) if has_predicted else None,
                "recall": float(recall[index]) if has_true else None,
                "f1": float(f1[index]) if has_true or has_predicted else None,
                "support": int(support[index]),
            }

    for name, (description, selects) in SLICES.items():
        chosen = [
            i
            for i in range(len(y_true))
            if selects(titles[i], descriptions[i], y_true[i])
        ]
        scores = _scores([y_true[i] for i in chosen], [y_pred[i] for i in chosen], tags)
        scores["description"] = description
        result["slices"][name] = scores

    matrix = confusion_matrix(y_true, y_pred, labels=tags) if y_true else []
    result["confusion_matrix"] = {
        "labels": list(tags),
        "matrix": [[int(value) for value in row] for row in matrix],
    }
    return result


def reliability_table(confidences, correct, bins: int = RELIABILITY_BINS) -> dict:
    """Return the reliability table and the expected calibration error (ECE).

    Rows fall into `bins` equal-width confidence bins over [0, 1]. Each bin
    reports its mean confidence, its accuracy, the gap between them and the
    gap weighted by the bin's share of rows. The ECE is the sum of those
    weighted gaps. Empty bins are listed with None.
    """
    import numpy as np

    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    rows = len(confidences)
    # Bin i contains confidences in [i/bins, (i+1)/bins), and a confidence of 1
    # goes to the last bin.
    index = np.minimum((confidences * bins).astype(int), bins - 1)
    table = []
    ece = 0.0
    for number in range(bins):
        members = index == number
        count = int(members.sum())
        entry = {
            "lower": number / bins,
            "upper": (number + 1) / bins,
            "rows": count,
            "mean_confidence": None,
            "accuracy": None,
            "gap": None,
            "ece_contribution": None,
        }
        if count:
            mean_confidence = float(confidences[members].mean())
            accuracy = float(correct[members].mean())
            gap = abs(accuracy - mean_confidence)
            contribution = gap * count / rows
            ece += contribution
            entry.update(
                mean_confidence=mean_confidence,
                accuracy=accuracy,
                gap=gap,
                ece_contribution=contribution,
            )
        table.append(entry)
    return {"bins": table, "ece": ece if rows else None, "rows": rows}


def render_reliability(console, calibration: dict, title: str) -> None:
    """Print a reliability table and its ECE to a rich console."""
    from rich.table import Table

    table = Table(title=title)
    columns = ("confidence bin", "rows", "mean confidence", "accuracy", "gap", "ECE part")
    for column in columns:
        justify = "left" if column == "confidence bin" else "right"
        table.add_column(column, justify=justify)
    for entry in calibration["bins"]:
        if not entry["rows"]:
            continue
        table.add_row(
            f"{entry['lower']:.1f} to {entry['upper']:.1f}",
            str(entry["rows"]),
            _format(entry["mean_confidence"]),
            _format(entry["accuracy"]),
            _format(entry["gap"]),
            _format(entry["ece_contribution"]),
        )
    console.print(table)
    temperature = calibration.get("temperature")
    scaled = f" (temperature {temperature:.3f})" if temperature else ""
    console.print(
        f"Expected calibration error: {_format(calibration['ece'])}{scaled}; "
        "bins without rows are not shown."
    )


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_metrics(console, metrics: dict, title: str) -> None:
    """Print the overall, per-tag, slice and confusion-matrix tables to a rich console."""
    from rich.table import Table

    overall = metrics["overall"]
    table = Table(title=title)
    for column in ("scope", "precision", "recall", "F1", "rows"):
        table.add_column(column, justify="left" if column == "scope" else "right")
    table.add_row(
        "weighted, all rows",
        _format(overall["precision"]),
        _format(overall["recall"]),
        _format(overall["f1"]),
        str(overall["rows"]),
    )
    console.print(table)

    per_tag = Table(title="Per tag")
    for column in ("tag", "precision", "recall", "F1", "support"):
        per_tag.add_column(column, justify="left" if column == "tag" else "right")
    for tag, scores in metrics["per_tag"].items():
        per_tag.add_row(
            tag,
            _format(scores["precision"]),
            _format(scores["recall"]),
            _format(scores["f1"]),
            str(scores["support"]),
        )
    console.print(per_tag)

    slices = Table(title="Slices (weighted)")
    for column in ("slice", "rows", "precision", "recall", "F1"):
        slices.add_column(column, justify="left" if column == "slice" else "right")
    for name, scores in metrics["slices"].items():
        slices.add_row(
            f"{name}: {scores['description']}",
            str(scores["rows"]),
            _format(scores["precision"]),
            _format(scores["recall"]),
            _format(scores["f1"]),
        )
    console.print(slices)

    labels = metrics["confusion_matrix"]["labels"]
    matrix = metrics["confusion_matrix"]["matrix"]
    if matrix:
        confusion = Table(title="Confusion matrix (rows: true tag, columns: predicted)")
        confusion.add_column("true \\ predicted")
        for label in labels:
            confusion.add_column(label, justify="right")
        for label, row in zip(labels, matrix):
            confusion.add_row(label, *(str(value) for value in row))
        console.print(confusion)


def evaluate_model(
    config, data_path=None, model_dir=None, encoding: str = "utf-8", feedback=False
) -> dict:
    """Evaluate a model artifact on labeled rows and return a JSON-ready report.

    `data_path` defaults to the validation split saved in the artifact. With
    `feedback`, the rows are the corrections in the state folder instead (see
    `tagcli.feedback.feedback_evaluation_rows`). The report's "leak" entry
    counts evaluation rows whose title and description match rows the saved
    head was fitted on, and "calibration" contains the reliability table.
    """
    from pathlib import Path

    import polars as pl

    from tagcli.backends import check_artifact_backend, load_artifact_backend
    from tagcli.model import VALIDATION_FILE
    from tagcli.pipeline import resolve_artifact
    from tagcli.text import content_key
    from tagcli.train import load_labeled, texts_of

    artifact = resolve_artifact(config, model_dir)
    check_artifact_backend(artifact, config.embedding.backend)
    feedback_sources = None
    if feedback:
        from tagcli.feedback import feedback_evaluation_rows

        frame, feedback_sources = feedback_evaluation_rows(config, artifact)
        data_path = feedback_sources["store"]
        mapped = {}
    elif data_path is None:
        data_path = artifact.path / VALIDATION_FILE
        frame = pl.read_parquet(data_path)
        mapped: dict[str, int] = {}
    else:
        labeled = load_labeled(Path(data_path), config, encoding)
        frame, mapped = labeled.frame, labeled.mapped

    texts = texts_of(frame)
    backend = load_artifact_backend(artifact, config.embedding.offline)
    embeddings = backend.embed(texts, config.embedding.batch_size)
    probabilities = artifact.head.predict_proba(embeddings, texts)
    predicted = [artifact.tags[i] for i in probabilities.argmax(axis=1)]

    titles = frame["title"].to_list()
    descriptions = frame["description"].to_list()
    true_tags = frame["tag"].to_list()
    metrics = compute_metrics(titles, descriptions, true_tags, predicted, artifact.tags)
    calibration = reliability_table(
        probabilities.max(axis=1) if len(texts) else [],
        [p == t for p, t in zip(predicted, true_tags)],
    )
    calibration["temperature"] = float(artifact.head.temperature)

    fitted = artifact.fitted_keys()
    overlapping = sum(content_key(t, d) in fitted for t, d in zip(titles, descriptions))
    return {
        "model": str(artifact.path),
        "data": str(data_path),
        "mapped_to_fallback": mapped,
        "leak": {
            "overlapping_rows": overlapping,
            "fitted_on": artifact.manifest["head"]["fitted_on"],
        },
        "validation_f1_at_training": artifact.manifest["validation_metrics"]["overall"][
            "f1"
        ],
        "metrics": metrics,
        "calibration": calibration,
        "feedback": feedback_sources,
    }
