"""Embedding backends: sentence-transformers on torch, or an int8 ONNX export.

Both backends turn a list of texts into L2-normalised float32 embeddings, and
both sort each block of texts by token count before cutting it into encoder
batches, so texts of similar length share a batch and little padding is
computed. Results come back in input order.

- "torch" runs the SentenceTransformer model as it is.
- "onnx-int8" runs the model's transformer exported to ONNX, with int8 weights
  (per output channel), on onnxruntime, then mean-pools the token embeddings
  and normalises them, as the model's sentence-transformers modules do. It
  needs neither torch nor sentence-transformers at tag time: the tokenizer is
  the `tokenizers` library's, reading the model's tokenizer.json. `tagcli
  train` makes the export and stores it in the model artifact.

torch, onnxruntime and tokenizers are imported inside the functions, so
importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from tagcli.errors import EXIT_USAGE, TagcliError

TORCH = "torch"
ONNX_INT8 = "onnx-int8"
BACKENDS = (TORCH, ONNX_INT8)

ONNX_FILE = "encoder-int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
ONNX_OPSET = 17


def import_onnxruntime():
    """Import and return onnxruntime with its telemetry turned off.

    The onnxruntime 1.31 wheel for Linux contains a telemetry client (the 1DS
    SDK, with a collector URL at mobile.events.data.microsoft.com). It starts
    on import and writes a `.ses` file to TMPDIR unless ORT_DISABLE_TELEMETRY
    is set first. tagcli sends nothing to any host, so it sets the variable.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    onnxruntime.disable_telemetry_events()
    return onnxruntime


def length_grouped_batches(lengths, batch_size: int) -> list:
    """Split positions 0..n-1 into batches of at most `batch_size` similar lengths.

    Positions are sorted by descending length (ties keep input order), so each
    batch pads to the length of its first text. Returns a list of index arrays.
    """
    import numpy as np

    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    starts = range(0, len(order), batch_size)
    return [order[start : start + batch_size] for start in starts]


class TorchBackend:
    """The SentenceTransformer model on torch, fed batches grouped by token count."""

    name = TORCH

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    @property
    def dimension(self) -> int:
        return int(self.encoder.get_embedding_dimension())

    @property
    def max_seq_length(self) -> int:
        return int(self.encoder.max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return the untruncated token count of each text, special tokens included."""
        encoded = self.encoder.tokenizer(
            texts, add_special_tokens=True, truncation=False, verbose=False
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def truncated_token_counts(self, texts: list[str]) -> list[int]:
        """Return the token count of each text, truncated, special tokens included."""
        encoded = self.encoder.tokenizer(
            texts,
            add_special_tokens=True,
            truncation=True,
            max_length=self.encoder.max_seq_length,
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def embed(self, texts: list[str], batch_size: int = 32):
        """Return float32 embeddings of shape (len(texts), dimension), L2-normalised."""
        import numpy as np

        embeddings = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return embeddings
        # One encode call per batch: sentence-transformers sorts only inside a
        # call, and by characters, so the batches are formed here by tokens.
        lengths = self.truncated_token_counts(texts)
        for positions in length_grouped_batches(lengths, batch_size):
            embeddings[positions] = self.encoder.encode(
                [texts[i] for i in positions],
                batch_size=len(positions),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return embeddings


@dataclass(frozen=True)
class OnnxModel:
    """An exported encoder as bytes, so it can go through Ray's object store.

    `max_seq_length` is the token limit texts are truncated to, from the
    sentence-transformers model the export was made from.
    """

    onnx_bytes: bytes
    tokenizer_json: str
    max_seq_length: int


class OnnxInt8Backend:
    """The int8 ONNX export on onnxruntime, with mean pooling and L2 normalisation."""

    name = ONNX_INT8

    def __init__(self, model: OnnxModel, threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        onnxruntime = import_onnxruntime()

        options = onnxruntime.SessionOptions()
        # 0 lets onnxruntime use one thread per physical core.
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            model.onnx_bytes, options, providers=["CPUExecutionProvider"]
        )
        self.input_names = {item.name for item in self.session.get_inputs()}
        self.dimension = int(self.session.get_outputs()[0].shape[-1])

        self.tokenizer = Tokenizer.from_str(model.tokenizer_json)
        # sentence-transformers truncates at max_seq_length and pads each batch
        # to its longest text. The settings in a tokenizer.json can differ
        # (128 tokens for all-MiniLM-L6-v2), so they are set here.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(model.max_seq_length)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.max_seq_length = model.max_seq_length
        # Row screening needs the length of a text before truncation.
        self.counting_tokenizer = Tokenizer.from_str(model.tokenizer_json)
        self.counting_tokenizer.no_padding()
        self.counting_tokenizer.no_truncation()

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return the untruncated token count of each text, special tokens included."""
        encodings = self.counting_tokenizer.encode_batch(texts)
        return [len(encoding.ids) for encoding in encodings]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Return the token ids of each text, special tokens included, truncated."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str], batch_size: int = 32):
        """Return float32 embeddings of shape (len(texts), dimension), L2-normalised."""
        import numpy as np

        embeddings = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return embeddings
        ids = self.token_ids(texts)
        lengths = [len(row) for row in ids]
        for positions in length_grouped_batches(lengths, batch_size):
            embeddings[positions] = self._embed_batch([ids[i] for i in positions])
        return embeddings

    def _embed_batch(self, ids: list[list[int]]):
        import numpy as np

        width = max(len(row) for row in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, token_ids in enumerate(ids):
            input_ids[row, : len(token_ids)] = token_ids
            attention_mask[row, : len(token_ids)] = 1

        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            inputs["token_type_ids"] = np.zeros_like(input_ids)
        token_embeddings = self.session.run(None, inputs)[0]

        # Mean pooling over real tokens, then L2 normalisation.
        mask = attention_mask[:, :, None].astype(np.float32)
        summed = (token_embeddings * mask).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def export_onnx_int8(encoder, folder: Path) -> dict:
    """Export a loaded SentenceTransformer to an int8 ONNX file in `folder`.

    Writes ONNX_FILE and TOKENIZER_FILE and returns the manifest entry that
    describes them. The transformer is exported with torch's TorchScript
    exporter. Then onnxruntime's quantize_dynamic stores each MatMul weight
    as int8 with one scale per output channel, and activations are quantised
    at run time. Raises TagcliError when the model is not a transformer followed
    by mean pooling (and optionally normalisation), the only layout this
    backend reproduces.
    """
    import_onnxruntime()
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check_exportable(encoder)
    transformer = encoder[0]
    tokenizer = transformer.tokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    # transformers changes the padding and truncation of its Rust tokenizer on
    # every call. A copy with fixed settings is saved, so every export of a
    # model gives the same file and the same sha256 in the manifest.
    from tokenizers import Tokenizer

    saved_tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    saved_tokenizer.no_padding()
    saved_tokenizer.enable_truncation(int(encoder.max_seq_length))
    saved_tokenizer.save(str(folder / TOKENIZER_FILE))

    input_names = [
        name
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in tokenizer.model_input_names
    ]
    sample = tokenizer(
        ["an example text", "a second, longer example text for the export"],
        padding=True,
        return_tensors="pt",
    )
    wrapper = _token_embedding_module(transformer.auto_model, input_names).eval()
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes["token_embeddings"] = {0: "batch", 1: "sequence"}

    full_precision = folder / "encoder-fp32.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about Python branches on tensor shapes in the
        # attention-mask code. tests/test_backends.py checks that batch and
        # sequence sizes other than the traced ones still run.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            tuple(sample[name] for name in input_names),
            str(full_precision),
            input_names=input_names,
            output_names=["token_embeddings"],
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )

    quantized = folder / ONNX_FILE
    # quantize_dynamic logs a suggestion to run shape pre-processing through
    # the root logger, which would land in cron mail. The int8 model is
    # checked against the torch embeddings by tests instead.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(full_precision),
            str(quantized),
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    finally:
        logging.disable(logging.NOTSET)
    full_precision.unlink()

    return {
        "file": ONNX_FILE,
        "tokenizer_file": TOKENIZER_FILE,
        "max_seq_length": int(encoder.max_seq_length),
        "pooling": "mean",
        "opset": ONNX_OPSET,
        "weights": "int8, per channel (onnxruntime quantize_dynamic)",
    }


def _token_embedding_module(model, input_names: list[str]):
    """Wrap `model` in a torch module that takes positional inputs, for the tracer."""
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            arguments = dict(zip(input_names, inputs))
            return self.model(**arguments).last_hidden_state

    return TokenEmbeddings()


def _check_exportable(encoder) -> None:
    kinds = [type(module).__name__ for module in encoder]
    pooling_mode = getattr(encoder[1], "pooling_mode", None) if len(kinds) > 1 else None
    supported = (
        kinds[:2] == ["Transformer", "Pooling"]
        and kinds[2:] in ([], ["Normalize"])
        and pooling_mode == "mean"
    )
    if not supported:
        raise TagcliError(
            f"The {ONNX_INT8} backend needs a model made of a Transformer, mean "
            f"Pooling and an optional Normalize module; this model has {kinds} "
            f"with pooling {pooling_mode!r}. Use --backend {TORCH}.",
            exit_code=EXIT_USAGE,
        )


def read_onnx_model(artifact_path: Path, entry: dict) -> OnnxModel:
    """Read the export recorded in a manifest's `embedding.onnx` entry."""
    artifact_path = Path(artifact_path)
    return OnnxModel(
        onnx_bytes=(artifact_path / entry["file"]).read_bytes(),
        tokenizer_json=(artifact_path / entry["tokenizer_file"]).read_text(
            encoding="utf-8"
        ),
        max_seq_length=int(entry["max_seq_length"]),
    )


def build_training_backend(spec, name: str, folder: Path):
    """Load backend `name` for training, exporting the model into `folder` if needed.

    Returns (backend, manifest entries, files to store in the artifact by name).
    """
    from tagcli.embed import load_encoder

    encoder = load_encoder(spec)
    if name == TORCH:
        return TorchBackend(encoder), {}, {}

    entry = export_onnx_int8(encoder, folder)
    backend = OnnxInt8Backend(read_onnx_model(folder, entry))
    files = {
        entry["file"]: Path(folder) / entry["file"],
        entry["tokenizer_file"]: Path(folder) / entry["tokenizer_file"],
    }
    return backend, {"onnx": entry}, files


def recorded_backend(manifest: dict) -> str:
    """Return the backend an artifact's head was trained on.

    Artifacts written before backends existed record none and used torch.
    """
    return manifest["embedding"].get("backend", TORCH)


def check_artifact_backend(artifact, requested: str) -> None:
    """Raise a usage error when `requested` differs from the artifact's backend.

    A head is fitted to one backend's embeddings, and the two backends'
    embeddings of a text differ (mean cosine 0.993 on the sample data).
    """
    recorded = recorded_backend(artifact.manifest)
    if requested != recorded:
        raise TagcliError(
            f"{artifact.path}: the model's head was trained on {recorded} "
            f"embeddings, but the embedding backend is {requested} (from "
            f"--backend or [embedding] backend). Use --backend {recorded}, or "
            f"retrain with `tagcli train DATA --backend {requested}`.",
            exit_code=EXIT_USAGE,
        )


def load_artifact_backend(artifact, offline: bool, threads: int | None = None):
    """Load the backend recorded in `artifact` in this process."""
    embedding = artifact.manifest["embedding"]
    if recorded_backend(artifact.manifest) == ONNX_INT8:
        model = read_onnx_model(artifact.path, embedding["onnx"])
        return OnnxInt8Backend(model, threads)

    from tagcli.embed import ModelSpec, load_encoder

    return TorchBackend(load_encoder(ModelSpec(embedding["model"], offline), threads))
