"""Measure `tagcli tag` on a dump, then again with every text in the embedding cache.

Builds a Parquet dump of ROWS unique rows from the sample data, as
bench/tag_throughput.py does. Then runs `tagcli tag` on it twice as a
subprocess, with a fresh state folder from a temporary tagcli.toml and
--no-history, so the second run does not drop the first run's rows. The first
run embeds every row and fills the cache, and the second finds every row there.
Both wall times include Python start-up, loading the model and, with
--executor ray, starting Ray. The script fails when the second run does not
report every embedded row as cached.

For each N given to --rows it prints the wall seconds of the first run and
of the cached re-run, their ratio, the seconds each run reported in its --json
summary (without Python start-up and imports), and the 1-minute load average
before and after, which shows whether other jobs shared the machine.

Usage: python bench/cache_retag.py --rows 10000 50000 [--model DIR] [--executor local]
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


def measure(rows: int, model, executor: str) -> str:
    """Time the first and the cached `tagcli tag` on `rows` rows; return the report."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tagcli-cache-bench-") as folder:
        folder = Path(folder)
        config = folder / "tagcli.toml"
        # Relative to the config's folder, so the models folder stays the
        # usual one unless --model names another.
        models = Path.cwd() / "models"
        config.write_text(
            f'[paths]\nstate_dir = "state"\nmodels_dir = "{models}"\n'
            f"[embedding]\ncache_max_rows = {max(rows, 1)}\n"
        )
        dump = folder / "dump.parquet"
        build_dump(rows, dump)

        first, first_report = run_tag(
            dump, folder / "first.parquet", config, model, executor
        )
        second, report = run_tag(
            dump, folder / "second.parquet", config, model, executor
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

    load_after = os.getloadavg()[0]
    return (
        f"N={rows} ({executor}; cached run chose {report['executor']}): "
        f"first run {first:.1f} s, fully cached re-run {second:.1f} s, "
        f"ratio {first / second:.1f}x (wall time of each `tagcli tag` "
        f"subprocess); in-run seconds {first_report['seconds']:.1f} and "
        f"{report['seconds']:.1f}; load average {load_before:.1f} before, "
        f"{load_after:.1f} after"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        action="extend",
        required=True,
        help="Rows of the dump; several sizes run one after the other.",
    )
    parser.add_argument("--model", type=Path, help="Model artifact. Default: the newest.")
    parser.add_argument("--executor", default="local", choices=["ray", "local", "auto"])
    args = parser.parse_args()
    model = args.model.resolve() if args.model else None

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}",
        flush=True,
    )
    for rows in args.rows:
        print(measure(rows, model, args.executor), flush=True)


if __name__ == "__main__":
    main()
