"""Measure the near-duplicate search of `tagcli tag` as the history grows.

For each history size, builds the index `tag` would load (numpy up to
[dedupe] exact_search_max_rows vectors; above, a faiss IVF-PQ index in
memory with the float16 vectors in a temporary file, read back to rank each
query's candidates by exact cosine), then runs the incoming rows through
`tagcli.near.match_near` in batches of 1,024, as the pipeline does, and
reports:

- seconds per 10,000 incoming rows for the search (the cost every run pays);
- seconds to build the index from the history's vectors, paid only when no
  saved index fits, because a run saves its IVF-PQ index for the next one;
- seconds to load a saved IVF-PQ index from disk, and the bytes per vector
  it keeps in memory (PQ code and id);
- recall of planted near copies and the number of false matches;
- for comparison, brute-force numpy search, timed on 1,000 queries and
  scaled to 10,000.

Vectors are synthetic, 384 dimensions like all-MiniLM-L6-v2, drawn around
1,000 topic centres so that rows about one topic have cosine similarities of
about 0.5 to 0.8, as related items do. Planted near copies are history
vectors plus noise, at a cosine similarity of about 0.97.

Usage: python bench/near_dup_search.py [--history 10000 1000000] [--incoming 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from tagcli.near import VectorIndex, match_near

DIMENSION = 384
TOPICS = 1000
BATCH = 1024


def unit(vectors):
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def synthetic(rows: int, centres, rng):
    topic = rng.integers(0, len(centres), rows)
    noise = rng.normal(scale=0.055, size=(rows, DIMENSION)).astype(np.float32)
    return unit(centres[topic] + noise).astype(np.float32)


def near_copies(vectors, rng):
    noise = rng.normal(scale=0.012, size=vectors.shape).astype(np.float32)
    return unit(vectors + noise).astype(np.float32)


def measure(history_rows: int, incoming_rows: int, planted: int, threshold: float):
    rng = np.random.default_rng(history_rows)
    centres = unit(rng.normal(size=(TOPICS, DIMENSION))).astype(np.float32)
    history = synthetic(history_rows, centres, rng)
    sources = rng.choice(history_rows, planted, replace=False)
    incoming = synthetic(incoming_rows, centres, rng)
    slots = rng.choice(incoming_rows, planted, replace=False)
    incoming[slots] = near_copies(history[sources], rng)

    started = time.perf_counter()
    index = VectorIndex(DIMENSION, exact_limit=20000)
    index.add(history)
    build_seconds = time.perf_counter() - started

    load_seconds = None
    memory = ""
    if index.faiss_index is not None:
        import faiss

        ivf = faiss.extract_index_ivf(index.faiss_index)
        memory = (
            f"; in memory {ivf.code_size + 8} bytes per vector "
            f"({ivf.nlist:,} cells, {ivf.nprobe} probed)"
        )

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "near.faiss")
            faiss.write_index(index.faiss_index, path)
            started = time.perf_counter()
            faiss.read_index(path)
            load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    matches = []
    for start in range(0, incoming_rows, BATCH):
        found, _ = match_near(incoming[start : start + BATCH], index, threshold)
        matches.append(found)
    search_seconds = time.perf_counter() - started
    matches = np.concatenate(matches)

    found_copies = int(
        sum(matches[slot] == source for slot, source in zip(slots, sources))
    )
    others = np.setdiff1d(np.arange(incoming_rows), slots)
    false_matches = int((matches[others] >= 0).sum())

    queries = incoming[:1000]
    started = time.perf_counter()
    for start in range(0, len(queries), BATCH):
        scores = queries[start : start + BATCH] @ history.T
        scores.max(axis=1)
    brute_seconds = (time.perf_counter() - started) * incoming_rows / len(queries)

    per_10k = 10000 / incoming_rows
    index.close()
    kind = (
        "IVF-PQ (faiss) + exact rerank"
        if index.faiss_index is not None
        else "exact (numpy)"
    )
    print(
        f"history {history_rows:>9,} rows, {kind}: search {search_seconds * per_10k:7.2f} s "
        f"per 10,000 incoming rows; build {build_seconds:6.2f} s"
        + (
            f"; load saved index {load_seconds:5.2f} s"
            if load_seconds is not None
            else ""
        )
        + memory
        + f"; planted copies found {found_copies}/{planted}; false matches "
        f"{false_matches}; brute force {brute_seconds * per_10k:7.2f} s per 10,000 "
        "(timed on 1,000 queries)",
        flush=True,
    )
    return search_seconds * per_10k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, nargs="+", default=[10000, 1000000])
    parser.add_argument("--incoming", type=int, default=10000)
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()

    print(
        f"near-duplicate search: {DIMENSION} dimensions, {args.incoming:,} incoming "
        f"rows with {args.planted} planted near copies, threshold {args.threshold}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    seconds = [
        measure(rows, args.incoming, args.planted, args.threshold)
        for rows in args.history
    ]
    if len(seconds) > 1:
        print(
            f"search time grows {seconds[-1] / seconds[0]:.1f}x from "
            f"{args.history[0]:,} to {args.history[-1]:,} history rows "
            f"({args.history[-1] / args.history[0]:.0f}x the rows)"
        )


if __name__ == "__main__":
    main()
