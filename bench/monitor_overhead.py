"""Measure the time the review and drift steps add to each tagged batch.

Runs the per-batch monitoring steps of `tagcli tag` (nearest-centroid
distance, the out-of-distribution and review flags, the drift counts) on
random unit vectors of the embedding's dimension, without embedding, and
prints rows per second. Compare with the tagging throughput in
docs/benchmarks.md to see the share of the run they take.

Usage: python bench/monitor_overhead.py [--rows N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import pyarrow as pa

from tagcli.monitor import (
    DISTANCE_COLUMN,
    DriftMonitor,
    build_drift_reference,
    flag_batch,
    nearest_centroid_distance,
)

TAGS = ["natural-language-processing", "computer-vision", "mlops", "other"]
DIMENSION = 384  # all-MiniLM-L6-v2


def unit_vectors(generator, rows: int):
    vectors = generator.standard_normal((rows, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()

    generator = np.random.default_rng(0)
    training = unit_vectors(generator, 800)
    labels = [TAGS[i % len(TAGS)] for i in range(len(training))]
    reference = build_drift_reference(training, labels, labels, TAGS)
    monitor = DriftMonitor(reference, reference.distance_at(0.99))

    batches = []
    for start in range(0, args.rows, args.batch_size):
        rows = min(args.batch_size, args.rows - start)
        batches.append(
            (
                unit_vectors(generator, rows),
                pa.table(
                    {
                        "tag": [TAGS[i % len(TAGS)] for i in range(rows)],
                        "confidence": generator.random(rows),
                    }
                ),
            )
        )

    started = time.perf_counter()
    for embeddings, table in batches:
        distances = nearest_centroid_distance(reference, embeddings)
        table = table.append_column(DISTANCE_COLUMN, pa.array(distances))
        table = flag_batch(table, 0.8, monitor.ood_distance)
        monitor.update(table)
    seconds = time.perf_counter() - started
    report = monitor.report(psi_threshold=0.2, ood_share_threshold=0.1)

    print(
        f"Monitoring steps only, no embedding: {args.rows} rows in batches of "
        f"{args.batch_size}, {seconds:.3f} s, {args.rows / seconds:,.0f} rows/s "
        f"(Python {platform.python_version()}, {platform.machine()})."
    )
    print(
        f"Rows counted: {report['rows']}; rows flagged for review: "
        f"{monitor.needs_review}."
    )


if __name__ == "__main__":
    main()
