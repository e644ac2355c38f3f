"""The numpy form of the head gives the probabilities of the scikit-learn head."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
from conftest import SAMPLE_CSV

from tagcli.linear_head import LINEAR_HEAD_FILE, LinearHead
from tagcli.model import load_artifact
from tagcli.text import compose_text

TAGS = ["natural-language-processing", "computer-vision", "mlops", "other"]


def test_linear_head_matches_sklearn_head(small_model):
    full = load_artifact(small_model, TAGS)
    fast = load_artifact(small_model, TAGS, numpy_head=True)
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False).head(300)
    texts = [compose_text(t, d) for t, d in zip(frame["title"], frame["description"])]
    # Odd texts too: no known word, repeated words, case and punctuation.
    texts += ["", "zzzq xxqv", "BERT bert BERT, bert!", "a"]
    embeddings = np.random.default_rng(0).normal(size=(len(texts), 384))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)

    expected = full.head.predict_proba(embeddings, texts)
    actual = fast.head.predict_proba(embeddings, texts)

    assert isinstance(fast.head, LinearHead)
    assert full.head.vectorizer is not None
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-9)
    assert (small_model / LINEAR_HEAD_FILE).is_file()


def test_tagging_head_imports_no_sklearn(small_model):
    code = (
        "import sys\n"
        "from tagcli.model import load_artifact\n"
        f"load_artifact({str(small_model)!r}, {TAGS!r}, numpy_head=True)\n"
        "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
