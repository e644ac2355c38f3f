"""Measure the peak RSS of the near-duplicate search as the kept rows grow.

Feeds N random 384-dimensional unit vectors through
`tagcli.near.match_near` in batches of 1,024, as `tagcli tag` does, with
the default `[dedupe] exact_search_max_rows` of 20,000. Random vectors
never match, so every row is kept: its vector goes into the index and its
id into the splitter's id list. Prints the peak RSS of this process
(`ru_maxrss`) and how far it rose above the RSS once numpy, pyarrow and
faiss are imported. Run one N per process, because the peak never falls.

Usage: python bench/near_search_memory.py --rows 20000
"""

from __future__ import annotations

import argparse
import resource
import time

import faiss  # noqa: F401  (imported before the baseline, as in `tag`)
import numpy as np
import pyarrow  # noqa: F401

import tagcli.near as near

DIMENSION = 384
BATCH = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, required=True)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    index = near.VectorIndex(DIMENSION, exact_limit=20000)
    # The splitter's id list; a plain list in versions without IdList.
    kept_ids = near.IdList() if hasattr(near, "IdList") else []
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for start in range(0, args.rows, BATCH):
        count = min(BATCH, args.rows - start)
        vectors = rng.normal(size=(count, DIMENSION)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        matches, _ = near.match_near(vectors, index, 0.95)
        kept = np.flatnonzero(matches < 0)
        kept_ids.extend(str(10_000_000 + start + int(i)) for i in kept)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if hasattr(index, "close"):
        index.close()

    kind = "IVF" if index.faiss_index is not None else "exact"
    print(
        f"{near.__file__}: {args.rows:,} kept rows ({kind} search at the end): "
        f"peak RSS {peak / 1024:.0f} MiB, {(peak - baseline) / 1024:.0f} MiB "
        f"above the RSS after imports; {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
