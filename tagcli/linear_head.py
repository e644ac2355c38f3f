"""A `TagHead` reduced to numpy arrays, for tagging without scikit-learn.

Unpickling `head.joblib` imports scikit-learn and, through it, scipy.stats:
about 1.8 s on a 2-CPU machine, most of a fully cached `tag` run. At train
time the fitted head is also saved as `head-linear.pkl`, which holds only
numpy arrays, the TF-IDF vocabulary and the drift reference. `LinearHead`
computes the same probabilities from them: the TF-IDF features as
`TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))` with its other
settings at their defaults builds them, then the linear decision function.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

LINEAR_HEAD_FILE = "head-linear.pkl"
# scikit-learn's default token pattern for text vectorizers.
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass
class LinearHead:
    """Coefficients, intercepts and TF-IDF statistics of a fitted `TagHead`."""

    tags: list[str]
    classes: list[str]
    coef: object
    intercept: object
    temperature: float
    drift_reference: object
    vocabulary: dict | None = None
    idf: object = None

    @classmethod
    def from_tag_head(cls, head) -> LinearHead:
        import numpy as np

        vectorizer = head.vectorizer
        return cls(
            tags=list(head.tags),
            classes=[str(name) for name in head.classifier.classes_],
            coef=np.asarray(head.classifier.coef_, dtype=np.float64),
            intercept=np.asarray(head.classifier.intercept_, dtype=np.float64),
            temperature=float(head.temperature),
            drift_reference=head.drift_reference,
            vocabulary=(
                {term: int(index) for term, index in vectorizer.vocabulary_.items()}
                if vectorizer is not None
                else None
            ),
            idf=(
                np.asarray(vectorizer.idf_, dtype=np.float64)
                if vectorizer is not None
                else None
            ),
        )

    def logits(self, embeddings, texts: list[str]):
        """Return uncalibrated logits of shape (rows, len(tags)), as `TagHead.logits` does."""
        import numpy as np

        embeddings = np.asarray(embeddings, dtype=np.float64)
        dimension = embeddings.shape[1]
        decision = embeddings @ self.coef[:, :dimension].T + self.intercept
        if self.vocabulary is not None:
            lexical = self.coef[:, dimension:]
            for row, text in enumerate(texts):
                indexes, weights = self._tfidf(text)
                if len(indexes):
                    decision[row] += weights @ lexical[:, indexes].T
        if decision.shape[1] == 1:
            decision = np.column_stack([np.zeros(len(decision)), decision[:, 0]])
        logits = np.full((decision.shape[0], len(self.tags)), -np.inf)
        for column, tag in enumerate(self.classes):
            logits[:, self.tags.index(tag)] = decision[:, column]
        return logits

    def predict_proba(self, embeddings, texts: list[str]):
        """Return calibrated probabilities of shape (rows, len(tags)); rows sum to 1."""
        from tagcli.model import softmax

        return softmax(self.logits(embeddings, texts) / self.temperature)

    def _tfidf(self, text: str):
        """Return (feature indexes, L2-normalised sublinear TF-IDF weights) of one text."""
        import numpy as np

        tokens = _TOKEN.findall(text.lower())
        terms = tokens + [
            f"{first} {second}" for first, second in zip(tokens, tokens[1:])
        ]
        counts: dict[int, int] = {}
        for term in terms:
            index = self.vocabulary.get(term)
            if index is not None:
                counts[index] = counts.get(index, 0) + 1
        indexes = np.fromiter(counts, dtype=np.int64, count=len(counts))
        tf = np.array([1.0 + math.log(n) for n in counts.values()])
        weights = tf * self.idf[indexes] if len(indexes) else tf
        norm = float(np.sqrt((weights**2).sum()))
        if norm > 0:
            weights = weights / norm
        return indexes, weights


# TfidfVectorizer settings that `LinearHead._tfidf` reproduces.
_SUPPORTED_VECTORIZER = {
    "analyzer": "word",
    "lowercase": True,
    "ngram_range": (1, 2),
    "norm": "l2",
    "preprocessor": None,
    "stop_words": None,
    "strip_accents": None,
    "sublinear_tf": True,
    "token_pattern": _TOKEN.pattern,
    "tokenizer": None,
    "use_idf": True,
}


def supports(head) -> bool:
    """Return whether `LinearHead` reproduces `head`.

    That needs a linear classifier and the TF-IDF settings that `_tfidf` follows.
    """
    if not hasattr(head.classifier, "coef_"):
        return False
    if head.vectorizer is None:
        return True
    params = head.vectorizer.get_params()
    return all(
        params.get(name) == value for name, value in _SUPPORTED_VECTORIZER.items()
    )


def save_linear_head(head, path: Path) -> bool:
    """Write the `LinearHead` of a fitted `TagHead` to `path`; return False when unsupported."""
    if not supports(head):
        return False
    with open(path, "wb") as handle:
        pickle.dump(LinearHead.from_tag_head(head), handle, protocol=5)
    return True


def load_linear_head(path: Path) -> LinearHead:
    """Read a `LinearHead`; call only after its sha256 was checked against the manifest."""
    with open(path, "rb") as handle:
        return pickle.load(handle)
