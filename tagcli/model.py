"""The logistic-regression head over the approved tags, and the model artifact.

An artifact is a folder:

    head.joblib          the fitted TagHead
    head-linear.pkl      the same head as numpy arrays, for tagging (linear_head.py)
    manifest.json        tags, embedding model, metrics, checksums, versions
    validation.parquet   the validation split, the default set for `tagcli eval`
    fitted_rows.txt      content keys of the rows the saved head was fitted on
    encoder-int8.onnx    with the onnx-int8 backend: the int8 ONNX export
    tokenizer.json       with the onnx-int8 backend: the model's tokenizer
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tagcli.errors import EXIT_USAGE, TagcliError

HEAD_FILE = "head.joblib"
MANIFEST_FILE = "manifest.json"
VALIDATION_FILE = "validation.parquet"
FITTED_ROWS_FILE = "fitted_rows.txt"
MANIFEST_FORMAT = 1


@dataclass
class TagHead:
    """Logistic regression on the embedding, optionally beside TF-IDF text features.

    `tags` is the approved list in its configured order; probability columns
    follow that order, and a tag the training data lacked gets probability 0.
    """

    classifier: object
    vectorizer: object | None
    tags: list[str]
    # Divides the logits before the softmax; fitted by `fit_temperature`. Heads
    # saved before calibration existed load with the class default, 1.0.
    temperature: float = 1.0
    # tagcli.monitor.DriftReference of the training embeddings, or None.
    drift_reference: object = None

    def features(self, embeddings, texts: list[str]):
        if self.vectorizer is None:
            return embeddings
        from scipy.sparse import csr_matrix, hstack

        return hstack(
            [csr_matrix(embeddings), self.vectorizer.transform(texts)]
        ).tocsr()

    def logits(self, embeddings, texts: list[str]):
        """Return uncalibrated logits of shape (rows, len(tags)).

        A tag the training data lacked gets -inf, so its probability is 0.
        With two classes scikit-learn returns one decision value d, which is
        the logit of the second class against a logit of 0 for the first.
        """
        import numpy as np

        decision = self.classifier.decision_function(self.features(embeddings, texts))
        classes = list(self.classifier.classes_)
        if decision.ndim == 1:
            decision = np.column_stack([np.zeros_like(decision), decision])
        logits = np.full((decision.shape[0], len(self.tags)), -np.inf)
        for column, tag in enumerate(classes):
            logits[:, self.tags.index(tag)] = decision[:, column]
        return logits

    def predict_proba(self, embeddings, texts: list[str]):
        """Return calibrated probabilities of shape (rows, len(tags)); rows sum to 1."""
        return softmax(self.logits(embeddings, texts) / self.temperature)

    def predict(self, embeddings, texts: list[str]) -> list[str]:
        probabilities = self.predict_proba(embeddings, texts)
        return [self.tags[i] for i in probabilities.argmax(axis=1)]


def softmax(logits):
    """Return the row-wise softmax of `logits`; -inf entries get probability 0."""
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def fit_temperature(logits, labels, tags) -> float:
    """Fit the temperature T that minimises the log loss of softmax(logits / T).

    `logits` must come from rows the head was not fitted on, such as
    out-of-fold predictions, because in-sample logits are overconfident.
    T is searched in [0.05, 20]; T > 1 softens the probabilities.
    """
    import numpy as np
    from scipy.optimize import minimize_scalar

    columns = np.array([tags.index(label) for label in labels])
    rows = np.arange(len(columns))

    def log_loss(log_temperature: float) -> float:
        probabilities = softmax(logits / np.exp(log_temperature))
        return float(-np.log(np.clip(probabilities[rows, columns], 1e-12, 1)).mean())

    result = minimize_scalar(
        log_loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded"
    )
    return float(np.exp(result.x))


@dataclass(frozen=True)
class HeadSettings:
    """Hyperparameters of the head other than C."""

    lexical: bool
    class_weight: str
    seed: int


def fit_head(
    embeddings, texts, labels, tags, c_value: float, settings: HeadSettings
) -> TagHead:
    """Fit a TagHead with inverse regularisation strength `c_value`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = None
    if settings.lexical:
        vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
        vectorizer.fit(texts)
    head = TagHead(classifier=None, vectorizer=vectorizer, tags=list(tags))
    head.classifier = LogisticRegression(
        C=c_value,
        class_weight=None if settings.class_weight == "none" else settings.class_weight,
        max_iter=5000,
        random_state=settings.seed,
    )
    head.classifier.fit(head.features(embeddings, texts), labels)
    return head


def fold_heads(
    embeddings, texts, labels, tags, c_value: float, folds: int, settings: HeadSettings
):
    """Yield (head, test rows) per stratified fold, each head fitted on the other folds.

    The folds depend only on the labels, `folds` and the seed, so `choose_c`
    and `out_of_fold_logits` use the same ones. The TF-IDF vocabulary is
    fitted inside each fold, so no fold's test rows shape its features.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    smallest_class = min(np.unique(labels, return_counts=True)[1])
    folds = max(2, min(folds, smallest_class))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=settings.seed)
    for train_index, test_index in splitter.split(embeddings, labels):
        head = fit_head(
            embeddings[train_index],
            [texts[i] for i in train_index],
            labels[train_index],
            tags,
            c_value,
            settings,
        )
        yield head, test_index


def choose_c(
    embeddings, texts, labels, tags, c_grid, folds: int, settings: HeadSettings
):
    """Pick C by stratified k-fold cross-validation on weighted F1.

    Returns (best C, {C: mean weighted F1}).
    """
    import numpy as np
    from sklearn.metrics import f1_score

    labels = np.asarray(labels)
    scores: dict[float, float] = {}
    for c_value in c_grid:
        fold_scores = []
        for head, test_index in fold_heads(
            embeddings, texts, labels, tags, c_value, folds, settings
        ):
            predicted = head.predict(
                embeddings[test_index], [texts[i] for i in test_index]
            )
            fold_scores.append(
                f1_score(
                    labels[test_index], predicted, average="weighted", zero_division=0
                )
            )
        scores[float(c_value)] = float(np.mean(fold_scores))
    best = max(scores, key=lambda c: (scores[c], -c))
    return best, scores


def out_of_fold_logits(
    embeddings, texts, labels, tags, c_value: float, folds: int, settings: HeadSettings
):
    """Return logits of every row from a head fitted on the other folds.

    Uses the same stratified folds as `choose_c`, so each row's logits come
    from a head that never saw it.
    """
    import numpy as np

    logits = np.zeros((len(labels), len(tags)))
    for head, test_index in fold_heads(
        embeddings, texts, labels, tags, c_value, folds, settings
    ):
        logits[test_index] = head.logits(
            embeddings[test_index], [texts[i] for i in test_index]
        )
    return logits


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "tagcli",
        "scikit-learn",
        "sentence-transformers",
        "torch",
        "transformers",
        "numpy",
        "polars",
        "pyarrow",
        "ray",
        "joblib",
        "onnxruntime",
        "onnx",
        "tokenizers",
    ]
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def new_version_name(models_dir: Path) -> str:
    """Return a folder name for a new artifact that sorts after every earlier one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"model-{stamp}"
    suffix = 1
    while (models_dir / name).exists():
        suffix += 1
        name = f"model-{stamp}-{suffix}"
    return name


def save_artifact(
    target: Path,
    head: TagHead,
    manifest: dict,
    validation_frame,
    fitted_keys: list[str],
    overwrite: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write the artifact folder to `target` atomically and return `target`.

    Files go to a hidden sibling folder first, which is renamed into place, so
    `newest_artifact` never finds a half-written artifact. With `overwrite`,
    an artifact already at `target` is replaced only then. `extra_files` maps
    names in the artifact to files to copy there, such as an ONNX export. Adds
    the sha256 of every file and the creation time to `manifest`.
    """
    import joblib

    from tagcli.linear_head import LINEAR_HEAD_FILE, save_linear_head

    target = Path(target)
    check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        joblib.dump(head, staging / HEAD_FILE)
        # The numpy form of the head, when it can reproduce this head's features.
        linear = []
        if save_linear_head(head, staging / LINEAR_HEAD_FILE):
            linear.append(LINEAR_HEAD_FILE)
        validation_frame.write_parquet(staging / VALIDATION_FILE)
        (staging / FITTED_ROWS_FILE).write_text("\n".join(sorted(fitted_keys)) + "\n")
        extra_files = extra_files or {}
        for name, source in extra_files.items():
            shutil.copyfile(source, staging / name)
        manifest["format"] = MANIFEST_FORMAT
        manifest["created_at"] = datetime.now(timezone.utc).isoformat(
            timespec="seconds"
        )
        manifest["files"] = {
            name: sha256_file(staging / name)
            for name in (
                HEAD_FILE,
                *linear,
                VALIDATION_FILE,
                FITTED_ROWS_FILE,
                *extra_files,
            )
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def check_output_folder(target: Path, overwrite: bool = False) -> None:
    """Raise TagcliError unless `target` is missing, an empty folder, or replaceable.

    With `overwrite`, a folder holding a model artifact (a manifest.json) may
    be replaced. Any other non-empty folder is never replaced, so a mistyped
    --output cannot delete unrelated files.
    """
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if overwrite and target.is_dir() and (target / MANIFEST_FILE).is_file():
        return
    if overwrite:
        raise TagcliError(
            f"{target}: the output folder is not empty and contains no model "
            "artifact (no manifest.json), so --overwrite does not replace it; "
            "choose a new folder for --output.",
            exit_code=EXIT_USAGE,
        )
    raise TagcliError(
        f"{target}: the output folder exists and is not empty; pass --overwrite "
        "to replace the model artifact in it, or choose a new folder for --output.",
        exit_code=EXIT_USAGE,
    )


def newest_artifact(models_dir: Path, config_source: Path | None = None) -> Path:
    """Return the newest artifact folder under `models_dir`, or raise TagcliError.

    `config_source` is the tagcli.toml that set `models_dir`, None for the default.
    """
    models_dir = Path(models_dir)
    candidates = []
    if models_dir.is_dir():
        candidates = sorted(
            child
            for child in models_dir.iterdir()
            if child.is_dir()
            and not child.name.startswith(".")
            and (child / MANIFEST_FILE).is_file()
        )
    if not candidates:
        raise TagcliError(
            f"No trained model found in {models_dir} ([paths] models_dir from "
            f"{config_source or 'the default'}); run `tagcli train DATA` first, "
            "or pass --model DIR."
        )
    return candidates[-1]


@dataclass
class Artifact:
    path: Path
    manifest: dict
    # A TagHead, or a tagcli.linear_head.LinearHead when loaded for tagging.
    head: object

    @property
    def tags(self) -> list[str]:
        return list(self.manifest["tags"]["approved"])

    def fitted_keys(self) -> set[str]:
        return set((self.path / FITTED_ROWS_FILE).read_text().split())


def load_artifact(
    path: Path, approved_tags: list[str], numpy_head: bool = False
) -> Artifact:
    """Load and check an artifact folder.

    Raises TagcliError when the manifest is missing or invalid, when a file's
    sha256 differs from the manifest (a changed or corrupt head), or when the
    artifact's approved tags differ from `approved_tags` in the configuration.
    joblib runs code while loading, so the checksum is verified first; still,
    load only artifacts you trust. With `numpy_head`, an artifact that has
    the numpy form of its head (`tagcli.linear_head`) loads that instead, so
    tagging needs no scikit-learn import.
    """

    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.exists():
        raise TagcliError(
            f"{path}: model folder not found; pass a folder written by "
            "`tagcli train` with --model."
        )
    if not manifest_path.is_file():
        raise TagcliError(
            f"{path}: not a tagcli model folder ({MANIFEST_FILE} not found); "
            "pass a folder written by `tagcli train`."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = manifest["files"]
        artifact_tags = manifest["tags"]["approved"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise TagcliError(
            f"{manifest_path}: invalid manifest ({error}); retrain the model."
        ) from error

    for name, expected in recorded.items():
        file_path = path / name
        if not file_path.is_file():
            raise TagcliError(
                f"{file_path}: file listed in the manifest is missing; retrain the model."
            )
        actual = sha256_file(file_path)
        if actual != expected:
            raise TagcliError(
                f"{file_path}: sha256 {actual[:12]}… does not match the manifest's "
                f"{expected[:12]}…; the file was changed or is corrupt. Retrain, or "
                "restore the artifact from a trusted copy."
            )

    if list(artifact_tags) != list(approved_tags):
        raise TagcliError(
            f"{path}: the model was trained for tags {artifact_tags}, but the "
            f"configuration approves {approved_tags}; retrain with the current "
            "tags or restore [tags] approved in tagcli.toml."
        )

    from tagcli.linear_head import LINEAR_HEAD_FILE, load_linear_head

    if numpy_head and LINEAR_HEAD_FILE in recorded:
        head = load_linear_head(path / LINEAR_HEAD_FILE)
    else:
        import joblib

        head = joblib.load(path / HEAD_FILE)
    return Artifact(path=path, manifest=manifest, head=head)
