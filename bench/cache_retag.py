"""Measure `tagcli tag` on a dump, then again with every text in the embedding cache.

Builds a Parquet dump of ROWS unique rows from the sample data, as
bench/tag_throughput.py does. Then runs `tagcli tag` on it twice as a
subprocess, with a fresh state folder from a temporary tagcli.toml and
--no-history, so the second run does not drop the first run's rows. The first
run embeds every row and fills the cache, and the second finds every row there.
Both wall times include Python start-up, loading the model and, with
--executor ray, starting Ray. The script fails when the second run does not
report every embedded row as cached.

Usage: python bench/cache_retag.py --rows 10000 [--model DIR] [--executor local]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tag_throughput import build_dump  # noqa: E402


def run_tag(dump: Path, output: Path, config: Path, model, executor: str):
    """Run `tagcli tag` and return (seconds, its --json summary as a dict)."""
    command = [sys.executable, "-m", "tagcli", "--config", str(config), "tag"]
    command += [str(dump), "-o", str(output), "--overwrite", "--executor", executor]
    # With the history, the second run would drop every row as a duplicate of
    # the first run's rows and embed nothing, cached or not.
    command += ["--no-history", "--json"]
    if model:
        command += ["--model", str(model)]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"tagcli tag exited with {result.returncode}:\n{result.stderr}")
    return seconds, json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--model", type=Path, help="Model artifact. Default: the newest.")
    parser.add_argument("--executor", default="local", choices=["ray", "local", "auto"])
    args = parser.parse_args()
    model = args.model.resolve() if args.model else None

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="tagcli-cache-bench-") as folder:
        folder = Path(folder)
        config = folder / "tagcli.toml"
        # Relative to the config's folder, so the models folder stays the
        # usual one unless --model names another.
        models = Path.cwd() / "models"
        config.write_text(
            f'[paths]\nstate_dir = "state"\nmodels_dir = "{models}"\n'
            f"[embedding]\ncache_max_rows = {max(args.rows, 1)}\n"
        )
        dump = folder / "dump.parquet"
        build_dump(args.rows, dump)

        first, _ = run_tag(dump, folder / "first.parquet", config, model, args.executor)
        second, report = run_tag(
            dump, folder / "second.parquet", config, model, args.executor
        )
        # Exact duplicates and rejected rows are never embedded, so never cached.
        embedded = (
            report["rows_read"] - report["rows_duplicate_exact"] - report["rows_rejected"]
        )
        if report["rows_cached"] != embedded:
            raise SystemExit(
                f"the second run found {report['rows_cached']} of {embedded} "
                f"embedded rows in the cache:\n{report}"
            )

    print(
        f"N={args.rows} ({args.executor}): first run {first:.1f} s, fully cached "
        f"re-run {second:.1f} s, {first / second:.1f}x faster "
        "(wall time of each `tagcli tag` subprocess)"
    )


if __name__ == "__main__":
    main()
