"""Time the [rows] screening step against embedding, on sample rows.

Screening tokenizes every text once more to count its tokens. The script
prints how long that takes next to embedding the same texts, which gives the
overhead of `[rows]` as a fraction of the embedding time.

    python bench/row_screening.py [--rows 512]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import polars as pl

from tagcli.embed import ModelSpec, embed_texts, load_encoder
from tagcli.rows import RowPolicy, screen_texts
from tagcli.text import compose_text

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "dataset.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="texts to time")
    arguments = parser.parse_args()

    frame = pl.read_csv(SAMPLE, infer_schema=False)
    texts = [
        compose_text(title, description)
        for title, description in zip(frame["title"], frame["description"])
    ]
    texts = (texts * (arguments.rows // len(texts) + 1))[: arguments.rows]
    encoder = load_encoder(ModelSpec())

    started = time.perf_counter()
    screening = screen_texts(texts, encoder, RowPolicy(long_text="reject"))
    screen_seconds = time.perf_counter() - started

    started = time.perf_counter()
    embed_texts(encoder, texts, 32)
    embed_seconds = time.perf_counter() - started

    rejected = sum(reason is not None for reason in screening.reasons)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}")
    print(f"texts: {len(texts)} sample rows (title + description), {rejected} rejected")
    print(f"screening (tokenize + count): {screen_seconds:.3f} s")
    print(f"embedding (all-MiniLM-L6-v2, batch 32): {embed_seconds:.3f} s")
    print(f"screening / embedding: {screen_seconds / embed_seconds:.1%}")


if __name__ == "__main__":
    main()
