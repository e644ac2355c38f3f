"""Estimate the weighted F1 of `tagcli train` by repeated stratified cross-validation.

Each outer fold runs the same steps as `tagcli train` on the other folds: choose
C by inner cross-validation, fit the head, then predict the held-out fold. The
texts are embedded once, since the embedding model is frozen.

With --backend onnx-int8 the model is first exported to int8 ONNX, as
`tagcli train --backend onnx-int8` does, and the texts are embedded with it.

Usage: python bench/cv_f1.py [DATA] [--repeats N] [--backend torch|onnx-int8]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from tagcli.backends import BACKENDS, build_training_backend
from tagcli.config import load_config
from tagcli.embed import ModelSpec
from tagcli.model import HeadSettings, choose_c, fit_head
from tagcli.train import load_labeled, texts_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default="sample_data/dataset.csv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--backend", choices=BACKENDS, help="Default: [embedding] backend."
    )
    args = parser.parse_args()

    config = load_config(None)
    frame = load_labeled(Path(args.data), config).frame
    texts = texts_of(frame)
    labels = np.asarray(frame["tag"].to_list())
    tags = config.tags.approved

    backend_name = args.backend or config.embedding.backend
    spec = ModelSpec(config.embedding.model, config.embedding.offline)
    with tempfile.TemporaryDirectory() as export_folder:
        backend, _, _ = build_training_backend(spec, backend_name, export_folder)
        started = time.monotonic()
        embeddings = backend.embed(texts, config.embedding.batch_size)
        embed_seconds = time.monotonic() - started

    scores = []
    for repeat in range(args.repeats):
        settings = HeadSettings(
            lexical=config.train.lexical_features,
            class_weight=config.train.class_weight,
            seed=config.train.seed + repeat,
        )
        outer = StratifiedKFold(args.folds, shuffle=True, random_state=settings.seed)
        predicted = np.empty(len(labels), dtype=object)
        for train_index, test_index in outer.split(embeddings, labels):
            train_texts = [texts[i] for i in train_index]
            best_c, _ = choose_c(
                embeddings[train_index],
                train_texts,
                labels[train_index],
                tags,
                config.train.c_grid,
                config.train.cv_folds,
                settings,
            )
            head = fit_head(
                embeddings[train_index],
                train_texts,
                labels[train_index],
                tags,
                best_c,
                settings,
            )
            predicted[test_index] = head.predict(
                embeddings[test_index], [texts[i] for i in test_index]
            )
        score = f1_score(labels, predicted.tolist(), average="weighted")
        scores.append(score)
        print(f"repeat {repeat}: weighted F1 {score:.4f}", flush=True)

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    print(f"rows: {len(labels)}, folds: {args.folds}, repeats: {args.repeats}")
    print(
        f"backend: {backend_name}; embedding {embed_seconds:.1f} s, "
        f"{len(texts) / embed_seconds:.1f} rows/s (model load and export excluded)"
    )
    print(
        f"weighted F1: mean {np.mean(scores):.4f}, min {min(scores):.4f}, max {max(scores):.4f}"
    )


if __name__ == "__main__":
    main()
