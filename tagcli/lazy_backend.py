"""An embedding backend that loads its model on the first text it must embed.

A `tagcli tag` run whose texts are all in the embedding cache embeds nothing,
but the `[rows]` screening still counts the tokens of every text. A
`LazyBackend` counts them with the model's tokenizer alone and loads the ONNX
session or the SentenceTransformer only when `embed` gets a text. For
onnx-int8 the tokenizer is the artifact's tokenizer.json, read by the
`tokenizers` library. For torch it is loaded with transformers' AutoTokenizer
from the model folder, set up the way sentence-transformers sets up the
tokenizer of its Transformer module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Embedding models that LazyBackend instances loaded in this process, and
# the texts they embedded.
models_loaded = 0
texts_embedded = 0

# Names sentence-transformers reads a Transformer module's settings from, in
# the order it tries them (sentence-transformers 6.3, Transformer.load_config).
_MODULE_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)


class TokenizerJsonCounter:
    """Token counts from a tokenizer.json, read as OnnxInt8Backend reads it."""

    def __init__(self, tokenizer_json: str, max_seq_length: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_seq_length = max_seq_length

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return the untruncated token count of each text, special tokens included."""
        return [len(encoding.ids) for encoding in self.tokenizer.encode_batch(texts)]


class TransformersCounter:
    """Token counts from a transformers tokenizer, as TorchBackend counts them."""

    def __init__(self, tokenizer, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return the untruncated token count of each text, special tokens included."""
        encoded = self.tokenizer(
            texts, add_special_tokens=True, truncation=False, verbose=False
        )
        return [len(ids) for ids in encoded["input_ids"]]


class LazyBackend:
    """A backend from `tagcli.backends` that is loaded by the first `embed` with texts.

    `load` returns the backend. Without a `token_counter`, counting tokens
    loads the backend too. `dimension` is the embedding size, so embedding
    no texts returns a (0, dimension) array without loading anything.
    """

    def __init__(
        self,
        load: Callable[[], object],
        name: str,
        dimension: int,
        token_counter=None,
    ) -> None:
        self._load = load
        self._backend = None
        self.name = name
        self.dimension = dimension
        self.token_counter = token_counter

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def backend(self):
        """Return the backend, loading it on the first call."""
        global models_loaded

        if self._backend is None:
            started = time.monotonic()
            self._backend = self._load()
            models_loaded += 1
            log.info(
                "Loaded the %s embedding model in %.1f s",
                self.name,
                time.monotonic() - started,
            )
        return self._backend

    @property
    def max_seq_length(self) -> int:
        if self.token_counter is not None:
            return self.token_counter.max_seq_length
        return self.backend().max_seq_length

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return the untruncated token count of each text, special tokens included."""
        if self.token_counter is not None:
            return self.token_counter.count_tokens(texts)
        return self.backend().count_tokens(texts)

    def embed(self, texts: list[str], batch_size: int = 32):
        """Return float32 embeddings of shape (len(texts), dimension), L2-normalised."""
        import numpy as np

        global texts_embedded

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        embeddings = self.backend().embed(texts, batch_size)
        texts_embedded += len(texts)
        return embeddings


def lazy_artifact_backend(artifact, offline: bool, threads: int | None = None):
    """Return a LazyBackend that loads the backend recorded in `artifact` here."""
    from tagcli.backends import ONNX_INT8, load_artifact_backend, recorded_backend
    from tagcli.embed import ModelSpec

    embedding = artifact.manifest["embedding"]
    name = recorded_backend(artifact.manifest)
    if name == ONNX_INT8:
        entry = embedding["onnx"]
        tokenizer_json = (Path(artifact.path) / entry["tokenizer_file"]).read_text(
            encoding="utf-8"
        )
        counter = TokenizerJsonCounter(tokenizer_json, int(entry["max_seq_length"]))
    else:
        counter = folder_token_counter(
            model_folder(ModelSpec(embedding["model"], offline))
        )
    return LazyBackend(
        lambda: load_artifact_backend(artifact, offline, threads),
        name,
        int(embedding["dimension"]),
        counter,
    )


def lazy_worker_backend(
    spec, model_folder_ref: list, onnx_ref: list, threads: int, dimension: int
):
    """Return a LazyBackend for a Ray actor, from the objects `TagWorker` receives.

    `onnx_ref` contains the ObjectRef of a `tagcli.backends.OnnxModel`, or is
    empty for torch. `model_folder_ref` contains the ObjectRef of a packed model
    folder when the model is a folder on the driver's machine.
    """
    import ray

    from tagcli.backends import ONNX_INT8, TORCH, OnnxInt8Backend, TorchBackend
    from tagcli.embed import ModelSpec, load_encoder, unpack_folder

    if onnx_ref:
        onnx_model = ray.get(onnx_ref[0])
        return LazyBackend(
            lambda: OnnxInt8Backend(onnx_model, threads),
            ONNX_INT8,
            dimension,
            TokenizerJsonCounter(onnx_model.tokenizer_json, onnx_model.max_seq_length),
        )

    if model_folder_ref and spec.local_folder() is None:
        folder = unpack_folder(ray.get(model_folder_ref[0]))
        spec = ModelSpec(str(folder), spec.offline)
    return LazyBackend(
        lambda: TorchBackend(load_encoder(spec, threads=threads)),
        TORCH,
        dimension,
        folder_token_counter(model_folder(spec)),
    )


def model_folder(spec) -> Path | None:
    """Return the folder of a sentence-transformers model on this machine, or None.

    None for a hub name: its files are in the Hugging Face cache, if anywhere.
    """
    from tagcli.config import BUNDLED_MODEL

    if spec.setting == BUNDLED_MODEL:
        return Path(spec.load_path())
    return spec.local_folder()


def folder_token_counter(folder: Path | None) -> TransformersCounter | None:
    """Load the tokenizer of the model in `folder` without the model.

    Mirrors sentence-transformers 6.3's Transformer module: the tokenizer comes
    from the module's folder with its `processor_kwargs` (or the older
    `tokenizer_args`), and the token limit is `max_seq_length` from its
    settings file. Returns None, so the caller loads the model to count tokens,
    when the folder is missing or is laid out otherwise: a first module that
    is no Transformer, no settings file, no max_seq_length, or do_lower_case.
    """
    if folder is None:
        return None
    settings_folder = _transformer_folder(folder)
    if settings_folder is None:
        return None
    settings = _module_settings(settings_folder)
    max_seq_length = settings.get("max_seq_length")
    # NOTE: with do_lower_case, sentence-transformers adds a lowercasing step
    # to the tokenizer, which is not reproduced here.
    if max_seq_length is None or settings.get("do_lower_case"):
        log.debug("Counting tokens of %s with the loaded model", folder)
        return None

    # load_encoder sets the same default, which keeps the tokenizers library
    # from warning when a process forks after it tokenized in parallel.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    tokenizer_kwargs = dict(
        settings.get("processor_kwargs") or settings.get("tokenizer_args") or {}
    )
    tokenizer_kwargs.pop("trust_remote_code", None)
    tokenizer_kwargs.setdefault("model_max_length", int(max_seq_length))
    tokenizer = AutoTokenizer.from_pretrained(str(settings_folder), **tokenizer_kwargs)
    return TransformersCounter(tokenizer, int(tokenizer.model_max_length))


def _transformer_folder(folder: Path) -> Path | None:
    """Return the folder of the model's first module when it is a Transformer."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    if not modules or not str(modules[0].get("type", "")).endswith("Transformer"):
        return None
    return folder / modules[0].get("path", "")


def _module_settings(folder: Path) -> dict:
    for name in _MODULE_CONFIG_FILES:
        path = folder / name
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}
