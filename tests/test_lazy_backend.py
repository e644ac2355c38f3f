"""Token counts from a tokenizer alone, and the model that loads on the first embed."""

from __future__ import annotations

import polars as pl
import pytest
from conftest import SAMPLE_CSV

from tagcli import lazy_backend
from tagcli.backends import TorchBackend, load_artifact_backend
from tagcli.config import Config
from tagcli.embed import ModelSpec, load_encoder
from tagcli.lazy_backend import (
    folder_token_counter,
    lazy_artifact_backend,
    model_folder,
)
from tagcli.model import load_artifact
from tagcli.rows import RowPolicy, screen_texts
from tagcli.text import compose_text

MAX_TOKENS = 256


@pytest.fixture(scope="module")
def screening_texts() -> list[str]:
    """Every sample text, texts joined to run past the token limit, and edge cases."""
    frame = pl.read_csv(SAMPLE_CSV, infer_schema=False)
    texts = [
        compose_text(title, description)
        for title, description in zip(frame["title"], frame["description"])
    ]
    joined = [" ".join(texts[start : start + 12]) for start in range(0, 240, 12)]
    edge_cases = [
        "",
        "   ",
        "word " * 254,
        "word " * 255,
        "Café naïve – 東京 🚀 see https://example.com/a?b=c&utm_source=x",
        "x" * 3000,
    ]
    return texts + joined + edge_cases


@pytest.fixture(scope="module")
def onnx_artifact(small_model):
    return load_artifact(small_model, Config().tags.approved)


def test_texts_span_the_limit(onnx_artifact, screening_texts):
    counts = lazy_artifact_backend(onnx_artifact, True).count_tokens(screening_texts)

    assert sum(count > MAX_TOKENS for count in counts) >= 20
    assert sum(count <= MAX_TOKENS for count in counts) >= 700


def test_onnx_counts_match_encoder(onnx_artifact, screening_texts):
    lazy = lazy_artifact_backend(onnx_artifact, offline=True)
    loaded = load_artifact_backend(onnx_artifact, offline=True)

    counts = lazy.count_tokens(screening_texts)

    assert counts == loaded.count_tokens(screening_texts)
    assert lazy.max_seq_length == loaded.max_seq_length == MAX_TOKENS
    # The encoder's truncated input is the count, cut at the limit.
    truncated = [len(ids) for ids in loaded.token_ids(screening_texts)]
    assert truncated == [min(count, MAX_TOKENS) for count in counts]
    assert not lazy.loaded


def test_torch_counts_match_encoder(screening_texts):
    spec = ModelSpec()
    counter = folder_token_counter(model_folder(spec))
    encoder = load_encoder(spec)
    backend = TorchBackend(encoder)

    counts = counter.count_tokens(screening_texts)

    assert counts == backend.count_tokens(screening_texts)
    assert counter.max_seq_length == encoder.max_seq_length == MAX_TOKENS
    # What sentence-transformers feeds the model: the count, cut at the limit.
    features = encoder.preprocess(screening_texts)
    fed = features["attention_mask"].sum(dim=1).tolist()
    assert fed == [min(count, MAX_TOKENS) for count in counts]


def test_torch_counts_need_no_model():
    counter = folder_token_counter(model_folder(ModelSpec()))

    assert type(counter.tokenizer).__module__.startswith("transformers")
    assert counter.count_tokens(["a short text"]) == [5]


def test_folder_without_modules_file(tmp_path):
    assert folder_token_counter(tmp_path) is None
    assert folder_token_counter(None) is None


def test_screening_loads_no_model(onnx_artifact, screening_texts):
    lazy = lazy_artifact_backend(onnx_artifact, offline=True)
    loaded = load_artifact_backend(onnx_artifact, offline=True)
    loads_before = lazy_backend.models_loaded

    for policy in (RowPolicy(), RowPolicy("tag", "reject")):
        expected = screen_texts(screening_texts, loaded, policy)
        screening = screen_texts(screening_texts, lazy, policy)
        assert screening.reasons == expected.reasons
        assert screening.truncated_rows == expected.truncated_rows

    assert lazy.embed([]).shape == (0, 384)
    assert not lazy.loaded
    assert lazy_backend.models_loaded == loads_before


def test_first_embed_loads_model(onnx_artifact, screening_texts):
    lazy = lazy_artifact_backend(onnx_artifact, offline=True)
    loads_before = lazy_backend.models_loaded
    texts_before = lazy_backend.texts_embedded

    embeddings = lazy.embed(screening_texts[:5])
    lazy.embed(screening_texts[5:8])

    assert embeddings.shape == (5, 384)
    assert lazy.loaded
    assert lazy_backend.models_loaded == loads_before + 1
    assert lazy_backend.texts_embedded == texts_before + 8
