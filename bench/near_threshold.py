"""Measure cosine similarities of labeled pairs to choose [dedupe] near_threshold.

bench/near_pairs.csv lists pairs labeled by hand:

- "same": a sample row and an edited repost of it (an edit named in the
  `edit` column and applied here), or two sample rows that are one item
  posted twice;
- "different": two sample rows that are different items about one topic,
  chosen among the most similar pairs of distinct rows in the sample data.

For each threshold the script prints how many "same" pairs it catches and how
many "different" pairs it would wrongly drop, then the range of thresholds
that drops no "different" pair.

Usage: python bench/near_threshold.py [--pairs bench/near_pairs.csv]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import polars as pl

from tagcli.embed import ModelSpec, embed_texts, load_encoder
from tagcli.text import compose_text

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "sample_data" / "dataset.csv"


def edited(title: str, description: str, edit: str) -> tuple[str, str]:
    """Return title and description after one of the repost edits."""
    if edit == "title_suffix":
        return title + " (updated)", description
    if edit == "trim_description":
        words = description.split()
        return title, " ".join(words[: max(3, len(words) * 3 // 4)])
    if edit == "append_sentence":
        return title, description.rstrip() + " Slides and code are linked in the post."
    if edit == "hashtags":
        return title + " #MachineLearning #DeepLearning", description
    if edit == "typo":
        words = title.lower().split()
        longest = max(range(len(words)), key=lambda i: len(words[i]))
        word = words[longest]
        if len(word) > 3:
            words[longest] = word[0] + word[2] + word[1] + word[3:]
        return " ".join(words), description
    raise ValueError(f"unknown edit {edit!r} in the pairs file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=HERE / "near_pairs.csv")
    args = parser.parse_args()

    sample = pl.read_csv(SAMPLE, infer_schema=False)
    rows = {row["id"]: row for row in sample.iter_rows(named=True)}
    with args.pairs.open(newline="") as handle:
        pairs = list(csv.DictReader(handle))

    first_texts, second_texts = [], []
    for pair in pairs:
        first = rows[pair["first_id"]]
        first_texts.append(compose_text(first["title"], first["description"]))
        if pair["edit"]:
            title, description = edited(
                first["title"], first["description"], pair["edit"]
            )
        else:
            second = rows[pair["second_id"]]
            title, description = second["title"], second["description"]
        second_texts.append(compose_text(title, description))

    encoder = load_encoder(ModelSpec())
    similarity = np.sum(
        embed_texts(encoder, first_texts) * embed_texts(encoder, second_texts), axis=1
    )
    labels = np.array([pair["label"] for pair in pairs])
    same = similarity[labels == "same"]
    different = similarity[labels == "different"]

    print(f"pairs: {len(same)} same, {len(different)} different (all-MiniLM-L6-v2)")
    for pair, value in sorted(zip(pairs, similarity), key=lambda item: -item[1]):
        what = pair["edit"] or f"{pair['second_id']}"
        print(f"  {value:.3f} {pair['label']:<9} {pair['first_id']:>5} vs {what}")
    print("threshold  same caught  different dropped")
    for threshold in np.arange(0.85, 1.0, 0.01):
        caught = int((same >= threshold).sum())
        dropped = int((different >= threshold).sum())
        print(
            f"{threshold:9.2f}  {caught:5d}/{len(same):<5d}  {dropped:5d}/{len(different)}"
        )
    print(
        f"highest different pair: {different.max():.3f}; lowest edited repost: "
        f"{similarity[[bool(p['edit']) for p in pairs]].min():.3f}; a threshold above "
        f"{different.max():.3f} drops no different pair"
    )


if __name__ == "__main__":
    main()
