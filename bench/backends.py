"""Compare the embedding backends on the sample texts: agreement and speed in-process.

Embeds the texts of the sample data with a plain `SentenceTransformer.encode`
(torch, float32), then with each tagcli backend, and prints for each backend
its rows/s and the mean and minimum cosine of its embeddings to the plain
encode. Model load and the ONNX export are not timed.

Usage: python bench/backends.py [--rows N] [--batch-size 32] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import polars as pl

from tagcli.backends import BACKENDS, OnnxInt8Backend, TorchBackend
from tagcli.backends import export_onnx_int8, read_onnx_model
from tagcli.embed import ModelSpec, load_encoder
from tagcli.text import compose_text


def sample_texts(rows: int) -> list[str]:
    frame = pl.read_csv("sample_data/dataset.csv", infer_schema=False)
    repeats = -(-rows // frame.height)
    frame = pl.concat([frame] * repeats).head(rows)
    return [
        compose_text(title, description)
        for title, description in zip(frame["title"], frame["description"])
    ]


def timed(function):
    started = time.monotonic()
    result = function()
    return result, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=764)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, help="torch and onnxruntime threads. Default: theirs."
    )
    args = parser.parse_args()

    texts = sample_texts(args.rows)
    encoder = load_encoder(ModelSpec(), threads=args.threads)
    with tempfile.TemporaryDirectory() as folder:
        entry = export_onnx_int8(encoder, folder)
        backends = {
            "torch": TorchBackend(encoder),
            "onnx-int8": OnnxInt8Backend(read_onnx_model(folder, entry), args.threads),
        }
    assert set(backends) == set(BACKENDS)

    import torch

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, torch threads {torch.get_num_threads()}"
    )
    print(f"rows: {len(texts)}, encoder batch size: {args.batch_size}")

    reference, seconds = timed(
        lambda: encoder.encode(
            texts, batch_size=args.batch_size, normalize_embeddings=True
        )
    )
    print(f"plain SentenceTransformer.encode: {len(texts) / seconds:.1f} rows/s")

    for name, backend in backends.items():
        embeddings, seconds = timed(lambda: backend.embed(texts, args.batch_size))
        cosine = (embeddings * reference).sum(axis=1)
        print(
            f"{name}: {len(texts) / seconds:.1f} rows/s; cosine to the plain "
            f"encode: mean {cosine.mean():.4f}, min {cosine.min():.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
