"""`tagcli predict`: tag one item at a time with a model loaded once.

`Predictor` loads the artifact and the encoder, then tags each item as it
arrives: embedding, head, and a duplicate check against the earlier items of
the same stream. Reading and writing JSON lines is in `tagcli.jsonl_stream`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tagcli.config import Config
from tagcli.errors import TagcliError
from tagcli.monitor import resolve_review_threshold
from tagcli.text import content_key, compose_text

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Item:
    """One item to tag. `id` is None only for a single item given without --id."""

    id: str | int | None
    title: str
    description: str


class HistoryLookup:
    """Read-only lookups in the history that `tag` keeps in [paths] state_dir.

    Finds an item's exact duplicate by the content key that `tag` stores
    (`tagcli.dedupe.short_key`), else its most similar history vector. The
    history is read once, when predict starts, and without the lock, because
    `tag` replaces its index file atomically. Predict never writes it.
    """

    def __init__(
        self, state_dir: Path, model_id: str, dimension: int, exact_limit: int
    ) -> None:
        from tagcli.history import read_history

        history = read_history(state_dir)
        self.rows = history.rows
        if self.rows == 0:
            return
        history.check_model(model_id, dimension)
        self.keys, self.positions = history.sorted_keys()
        self.index = history.load_index(dimension, exact_limit)
        self.history_id = history.id_lookup()
        # NOTE: rows that `tag` adds while predict runs are not seen until
        # predict restarts.
        log.info("Loaded %d history rows from %s", self.rows, state_dir)

    def find(self, item: Item, embedding, threshold: float) -> str | None:
        """Return the id of a history row that `item` duplicates, or None.

        `embedding` is the item's L2-normalised embedding, and `threshold` the
        cosine similarity from which two items count as near duplicates.
        History ids are strings, as `tag` stores them.
        """
        import numpy as np

        from tagcli.dedupe import EMPTY_KEY, short_key

        if self.rows == 0:
            return None
        key = short_key(item.title, item.description)
        if key != EMPTY_KEY:
            found = int(np.searchsorted(self.keys, key))
            if found < len(self.keys) and self.keys[found] == key:
                return self.history_id(int(self.positions[found]))
        similarity, position = self.index.search(embedding[np.newaxis, :])
        if similarity[0] >= threshold:
            return self.history_id(int(position[0]))
        return None


class StreamDuplicates:
    """Earlier items of one stream, to find exact and near duplicates of a new item.

    Exact duplicates share a content key (same title and description, ignoring
    case and spacing). Near duplicates have embeddings at cosine similarity of
    at least `threshold`. Only the last `window` items are kept for the
    near-duplicate check; exact keys are kept for the same items. An item
    that matches none of them is looked up in `history`, when one is given.
    """

    def __init__(
        self, threshold: float, window: int, history: HistoryLookup | None = None
    ) -> None:
        self.threshold = threshold
        self.window = window
        self.history = history
        self._ids_by_key: OrderedDict[str, str | int | None] = OrderedDict()
        self._ids: list = []
        self._embeddings = None
        self._next_slot = 0

    def find(self, item: Item, key: str, embedding) -> str | int | None:
        """Return the id of the earlier item this one duplicates, or None."""
        if key in self._ids_by_key:
            return self._ids_by_key[key]
        if self._embeddings is not None and self._ids:
            stored = self._embeddings[: len(self._ids)]
            similarities = stored @ embedding
            best = int(similarities.argmax())
            if similarities[best] >= self.threshold:
                return self._ids[best]
        if self.history is not None:
            return self.history.find(item, embedding, self.threshold)
        return None

    def add(self, item_id, key: str, embedding) -> None:
        """Remember an item, dropping the oldest once `window` items are kept."""
        import numpy as np

        if self.window == 0 or key in self._ids_by_key:
            return
        if self._embeddings is None:
            self._embeddings = np.zeros((self.window, len(embedding)), np.float32)

        slot = self._next_slot
        if len(self._ids) < self.window:
            self._ids.append(item_id)
        else:
            self._ids[slot] = item_id
            self._ids_by_key.popitem(last=False)
        self._embeddings[slot] = embedding
        self._ids_by_key[key] = item_id
        self._next_slot = (slot + 1) % self.window


class Predictor:
    """Tags items one at a time: the artifact and the encoder load once, in __init__."""

    def __init__(
        self, config: Config, model_dir: Path | None = None, use_history: bool = True
    ) -> None:
        from tagcli.backends import check_artifact_backend, load_artifact_backend
        from tagcli.pipeline import resolve_artifact

        self.artifact = resolve_artifact(config, model_dir, numpy_head=True)
        check_artifact_backend(self.artifact, config.embedding.backend)
        # One item is a few dozen tokens: intra-op threads cost more in
        # hand-offs than they save at that size, and a second thread competes
        # with the rest of the machine. On a shared 2-CPU machine (load average
        # about 7), the torch backend took 23 to 58 ms per item on one thread
        # and 160 to 200 ms on two.
        self.encoder = load_artifact_backend(
            self.artifact, config.embedding.offline, threads=1
        )
        embedding = self.artifact.manifest["embedding"]
        history = None
        if use_history:
            history = HistoryLookup(
                config.paths.state_dir,
                embedding["model_id"],
                embedding["dimension"],
                config.dedupe.exact_search_max_rows,
            )
        self.duplicates = StreamDuplicates(
            config.predict.near_duplicate_threshold,
            config.predict.duplicate_window,
            history,
        )
        # The same threshold as `tag`: [review] threshold, "auto" taking the one
        # chosen at train time. A model too old to have one gets no needs_review.
        try:
            self.review_threshold = resolve_review_threshold(
                config.review.threshold, self.artifact.manifest
            )
        except TagcliError:
            self.review_threshold = None
        # The first encode initialises the backend's kernels; do it before the first
        # item arrives, so that item gets the same latency as the rest.
        self.predict(Item(None, "warm-up", "warm-up"), remember=False)

    def predict(self, item: Item, remember: bool = True) -> dict:
        """Return the JSON-ready result for `item` and, with `remember`, keep it
        for the duplicate check of later items.

        Keys: id, tag, confidence, probabilities (tag to probability, in the
        approved order), needs_review (only when the artifact has a review
        threshold) and duplicate_of (an earlier item's id, or None).
        """
        from tagcli.embed import embed_texts

        text = compose_text(item.title, item.description)
        embeddings = embed_texts(self.encoder, [text], batch_size=1)
        probabilities = self.artifact.head.predict_proba(embeddings, [text])[0]
        best = int(probabilities.argmax())
        tags = self.artifact.head.tags

        key = content_key(item.title, item.description)
        duplicate_of = self.duplicates.find(item, key, embeddings[0])
        if remember:
            self.duplicates.add(item.id, key, embeddings[0])

        result = {
            "id": item.id,
            "tag": tags[best],
            "confidence": float(probabilities[best]),
            "probabilities": {
                tag: float(probability) for tag, probability in zip(tags, probabilities)
            },
        }
        if self.review_threshold is not None:
            result["needs_review"] = result["confidence"] < self.review_threshold
        result["duplicate_of"] = duplicate_of
        return result
