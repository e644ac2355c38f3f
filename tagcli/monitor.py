"""Drift statistics, out-of-distribution flags and the review threshold.

At train time `build_drift_reference` summarises the training embeddings: one
centroid per tag, the distribution of each row's cosine distance to the
nearest centroid, and the share of each predicted tag. `tagcli tag` compares
every batch with that summary (`DriftMonitor`): the population stability index
(PSI) of the predicted tag shares, and the share of rows farther from every
centroid than the training rows at `[drift] ood_quantile`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from tagcli.errors import TagcliError

# Output columns added after the probabilities, in this order.
DISTANCE_COLUMN = "centroid_distance"
OOD_COLUMN = "out_of_distribution"
REVIEW_COLUMN = "needs_review"
MONITOR_COLUMNS = (DISTANCE_COLUMN, OOD_COLUMN, REVIEW_COLUMN)

# Share used in place of 0 when computing PSI, whose log term is undefined at 0.
PSI_FLOOR = 1e-4


@dataclass
class DriftReference:
    """Statistics of the training data that each tagged batch is compared with.

    `centroids` has one L2-normalised row per tag in `centroid_tags`.
    `distance_percentiles` contains the 0th to 100th percentiles of the
    training rows' cosine distance to the nearest centroid. Each row's own tag
    centroid leaves that row out, so the figures match rows the model never saw.
    `tag_shares` is the share of each approved tag among out-of-fold predictions
    on the training split.
    """

    centroids: object
    centroid_tags: list[str]
    distance_percentiles: list[float]
    tag_shares: dict[str, float]

    def distance_at(self, quantile: float) -> float:
        """Return the training distance at `quantile` (0 to 1), interpolating percentiles."""
        import numpy as np

        return float(
            np.interp(quantile * 100, np.arange(101), self.distance_percentiles)
        )

    def summary(self) -> dict:
        """Return the JSON-ready part written to the manifest."""
        return {
            "tag_shares": self.tag_shares,
            "centroid_tags": list(self.centroid_tags),
            "distance_quantiles": {
                label: self.distance_at(quantile)
                for label, quantile in (
                    ("0.5", 0.5),
                    ("0.9", 0.9),
                    ("0.95", 0.95),
                    ("0.99", 0.99),
                    ("1.0", 1.0),
                )
            },
        }


def _normalise_rows(matrix):
    import numpy as np

    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def build_drift_reference(
    embeddings, labels: list[str], predicted: list[str], tags: list[str]
) -> DriftReference:
    """Summarise training `embeddings` with their `labels` and out-of-fold `predicted` tags.

    A row's distance to its own tag's centroid uses the centroid of the other
    rows of that tag (leave-one-out), so the training distances are not
    shortened by each row pulling its centroid towards itself.
    """
    import numpy as np

    labels_array = np.asarray(labels)
    centroid_tags = [tag for tag in tags if (labels_array == tag).any()]
    sums = np.stack(
        [embeddings[labels_array == tag].sum(axis=0) for tag in centroid_tags]
    )
    counts = np.array([(labels_array == tag).sum() for tag in centroid_tags])
    centroids = _normalise_rows(sums / counts[:, None])

    similarities = embeddings @ centroids.T
    for column, tag in enumerate(centroid_tags):
        own = labels_array == tag
        if counts[column] < 2:
            # A lone row has no other rows to form its centroid; ignore it.
            similarities[own, column] = -1.0
            continue
        left_out = _normalise_rows(
            (sums[column][None, :] - embeddings[own]) / (counts[column] - 1)
        )
        similarities[own, column] = (embeddings[own] * left_out).sum(axis=1)
    distances = 1.0 - similarities.max(axis=1)
    percentiles = np.percentile(distances, np.arange(101))

    predicted_counts = Counter(predicted)
    total = max(1, len(predicted))
    return DriftReference(
        centroids=centroids.astype(np.float32),
        centroid_tags=centroid_tags,
        distance_percentiles=[float(value) for value in percentiles],
        tag_shares={tag: predicted_counts.get(tag, 0) / total for tag in tags},
    )


def nearest_centroid_distance(reference: DriftReference | None, embeddings):
    """Return each row's cosine distance to the nearest training centroid (0 to 2).

    `embeddings` must be L2-normalised, as `tagcli.embed.embed_texts` returns them.
    Returns NaN for every row when `reference` is None.
    """
    import numpy as np

    if reference is None:
        return np.full(len(embeddings), np.nan)
    if len(embeddings) == 0:
        return np.zeros(0)
    similarities = embeddings @ np.asarray(reference.centroids).T
    return (1.0 - similarities.max(axis=1)).astype(np.float64)


def choose_review_threshold(confidences, correct, error_share: float) -> dict:
    """Choose the confidence below which rows go to review.

    The threshold is the lowest value with at least `error_share` of the
    wrongly predicted rows below it. It sits halfway between that error's
    confidence and the next higher confidence among all rows. Returns the
    threshold with the errors caught and the rows queued among these rows;
    with no errors the threshold is 0 and queues nothing.
    """
    import numpy as np

    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    error_confidences = np.sort(confidences[~correct])
    errors = len(error_confidences)
    if errors == 0:
        threshold = 0.0
    else:
        needed = max(1, math.ceil(error_share * errors - 1e-9))
        boundary = error_confidences[needed - 1]
        above = confidences[confidences > boundary]
        threshold = float((boundary + above.min()) / 2) if len(above) else 1.0
    below = confidences < threshold
    rows = len(confidences)
    return {
        "threshold": threshold,
        "error_share": error_share,
        "rows": rows,
        "errors": errors,
        "errors_caught": int((below & ~correct).sum()),
        "rows_queued": int(below.sum()),
        "share_queued": float(below.sum() / rows) if rows else 0.0,
    }


def resolve_review_threshold(setting: str | float, manifest: dict) -> float:
    """Return the review threshold for `[review] threshold` `setting`.

    "auto" is the value chosen at train time and stored in the manifest.
    """
    if setting != "auto":
        return float(setting)
    try:
        return float(manifest["review"]["threshold"])
    except (KeyError, TypeError) as error:
        raise TagcliError(
            "The model has no review threshold, because an older tagcli trained it; "
            "retrain it, or set [review] threshold to a number in tagcli.toml."
        ) from error


def flag_batch(batch, review_threshold: float, ood_distance: float):
    """Append the `out_of_distribution` and `needs_review` columns to an Arrow batch.

    A row is out of distribution when its centroid distance exceeds
    `ood_distance`, and needs review when its confidence is below
    `review_threshold`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    distance = batch.column(DISTANCE_COLUMN)
    out_of_distribution = pc.fill_null(pc.greater(distance, ood_distance), False)
    needs_review = pc.less(batch.column("confidence"), review_threshold)
    batch = batch.append_column(OOD_COLUMN, out_of_distribution.cast(pa.bool_()))
    return batch.append_column(REVIEW_COLUMN, needs_review.cast(pa.bool_()))


def population_stability_index(
    expected: dict[str, float], actual: dict[str, float]
) -> float:
    """Return sum((actual - expected) * ln(actual / expected)) over the tags.

    Shares of 0 are raised to PSI_FLOOR. A common rule of thumb reads under
    0.1 as no shift, 0.1 to 0.25 as moderate and over 0.25 as a large shift.
    """
    total = 0.0
    for tag in expected:
        expected_share = max(expected[tag], PSI_FLOOR)
        actual_share = max(actual.get(tag, 0.0), PSI_FLOOR)
        total += (actual_share - expected_share) * math.log(
            actual_share / expected_share
        )
    return total


@dataclass
class DriftMonitor:
    """Counts of tags, review rows and out-of-distribution rows over a run's batches."""

    reference: DriftReference
    ood_distance: float
    tag_counts: Counter = field(default_factory=Counter)
    rows: int = 0
    out_of_distribution: int = 0
    needs_review: int = 0
    distance_sum: float = 0.0

    def update(self, batch) -> None:
        import pyarrow.compute as pc

        self.rows += batch.num_rows
        self.tag_counts.update(batch.column("tag").to_pylist())
        self.out_of_distribution += int(
            pc.sum(batch.column(OOD_COLUMN).cast("int64")).as_py() or 0
        )
        self.needs_review += int(
            pc.sum(batch.column(REVIEW_COLUMN).cast("int64")).as_py() or 0
        )
        self.distance_sum += float(pc.sum(batch.column(DISTANCE_COLUMN)).as_py() or 0)

    def remove(self, moved) -> None:
        """Take out rows that left the output after `update` counted them.

        `moved` is a `tagcli.displace.MovedRows`: rows displaced as near
        duplicates at the end of the run.
        """
        self.rows -= moved.rows
        self.tag_counts.subtract(moved.tag_counts)
        self.out_of_distribution -= moved.out_of_distribution
        self.needs_review -= moved.review_rows
        self.distance_sum -= moved.distance_sum

    def report(self, psi_threshold: float, ood_share_threshold: float) -> dict:
        """Return the drift report of the batch; `drifted` is None for an empty batch.

        The batch is drifted when the PSI exceeds `psi_threshold` or the share of
        out-of-distribution rows exceeds `ood_share_threshold`.
        """
        expected = self.reference.tag_shares
        rows = self.rows
        actual = {
            tag: self.tag_counts.get(tag, 0) / rows if rows else 0.0 for tag in expected
        }
        psi = population_stability_index(expected, actual) if rows else None
        ood_share = self.out_of_distribution / rows if rows else None
        reasons = []
        if psi is not None and psi > psi_threshold:
            reasons.append(f"PSI {psi:.3f} > {psi_threshold:g}")
        if ood_share is not None and ood_share > ood_share_threshold:
            reasons.append(
                f"out-of-distribution share {ood_share:.3f} > {ood_share_threshold:g}"
            )
        return {
            "rows": rows,
            "tags": {
                tag: {"training_share": expected[tag], "batch_share": actual[tag]}
                for tag in expected
            },
            "psi": psi,
            "psi_threshold": psi_threshold,
            "out_of_distribution_rows": self.out_of_distribution,
            "out_of_distribution_share": ood_share,
            "ood_share_threshold": ood_share_threshold,
            "ood_distance": self.ood_distance,
            "mean_centroid_distance": self.distance_sum / rows if rows else None,
            "training_median_distance": self.reference.distance_at(0.5),
            "drifted": bool(reasons) if rows else None,
            "reasons": reasons,
        }


def render_drift(console, report: dict) -> None:
    """Print the drift table of a tagged batch to a rich console."""
    from rich.table import Table

    def share(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table(title="Drift against the training data")
    for column in ("statistic", "training", "batch", "threshold"):
        table.add_column(column, justify="left" if column == "statistic" else "right")
    for tag, shares in report["tags"].items():
        table.add_row(
            f"share of tag {tag}",
            share(shares["training_share"]),
            share(shares["batch_share"]),
            "",
        )
    table.add_row(
        "PSI of tag shares",
        "",
        share(report["psi"]),
        f"{report['psi_threshold']:g}",
    )
    table.add_row(
        "distance to nearest centroid (training median, batch mean)",
        share(report["training_median_distance"]),
        share(report["mean_centroid_distance"]),
        "",
    )
    table.add_row(
        f"share of rows beyond distance {report['ood_distance']:.3f}",
        "",
        share(report["out_of_distribution_share"]),
        f"{report['ood_share_threshold']:g}",
    )
    console.print(table)
    if report["drifted"]:
        console.print(f"Drift: yes ({'; '.join(report['reasons'])}).")
    elif report["drifted"] is None:
        console.print("Drift: not measured, because no row of the batch was tagged.")
    else:
        console.print("Drift: no.")
