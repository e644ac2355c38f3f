"""Shared fixtures: small real data sets, trained models and one local Ray instance.

Everything here is real: files in tmp folders, the bundled embedding model, a
scikit-learn head fitted on sample rows, and a Ray instance on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from tagcli.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CSV = REPO / "sample_data" / "dataset.csv"
SAMPLE_BATCH = REPO / "sample_data" / "batch.parquet"

# Rows per tag in the small training subset: enough for 5-fold CV, quick to embed.
SUBSET_ROWS_PER_TAG = 30


def write_config(folder: Path, **sections: dict) -> Path:
    """Write a tagcli.toml into `folder` with the given sections and return its path."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path = folder / "tagcli.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, config: Path | None = None):
    """Invoke the real `tagcli` command in-process and return click's Result."""
    runner = CliRunner()
    arguments = (["--config", str(config)] if config else []) + [str(a) for a in args]
    return runner.invoke(main, arguments, catch_exceptions=False)


@pytest.fixture(autouse=True)
def isolated_working_directory(tmp_path, monkeypatch):
    """Run each test in its own folder, so the default history folder (./state)
    of one test never makes another test's rows duplicates."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def sample_frame() -> pl.DataFrame:
    return pl.read_csv(SAMPLE_CSV, infer_schema=False)


@pytest.fixture(scope="session")
def subset_csv(tmp_path_factory, sample_frame) -> Path:
    """A stratified subset of the sample data, SUBSET_ROWS_PER_TAG rows per tag."""
    parts = [
        group.head(SUBSET_ROWS_PER_TAG)
        for _, group in sample_frame.group_by("tag", maintain_order=True)
    ]
    path = tmp_path_factory.mktemp("data") / "subset.csv"
    pl.concat(parts).write_csv(path)
    return path


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, subset_csv) -> Path:
    """A model artifact trained by `tagcli train` on the small subset."""
    folder = tmp_path_factory.mktemp("small-model")
    config = write_config(folder, train={"c_grid": [3.0, 30.0]})
    result = run_cli("train", subset_csv, "--output", folder / "model", config=config)
    assert result.exit_code == 0, result.output
    return folder / "model"


@pytest.fixture(scope="session")
def full_model(tmp_path_factory) -> Path:
    """A model artifact trained with the default settings on all sample rows."""
    folder = tmp_path_factory.mktemp("full-model")
    result = run_cli("train", SAMPLE_CSV, "--output", folder / "model")
    assert result.exit_code == 0, result.output
    return folder / "model"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session; `tagcli tag` joins it."""
    from tagcli.cluster import connect

    # connect() keeps a local instance on 127.0.0.1 only when it imports Ray
    # first, so Ray is imported after it.
    started = connect(None)
    import ray

    yield
    if started:
        ray.shutdown()


def read_output(path: Path) -> pl.DataFrame:
    if path.suffix == ".csv":
        return pl.read_csv(path, infer_schema=False)
    return pl.read_parquet(path)
