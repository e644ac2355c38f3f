"""Measure `tagcli tag` on a dump, then again with every text in the embedding cache.

Builds a Parquet dump of ROWS unique rows from the sample data, as
bench/tag_throughput.py does. Then runs `tagcli tag` on it twice as a
subprocess, with a fresh state folder from a temporary tagcli.toml. The first
run embeds every row and fills the cache, and the second finds every row there.
Both wall times include Python start-up and, on the first run, loading the
model (and starting Ray with --executor ray). The script fails when the
second run does not report every row as cached.

Usage: python bench/cache_retag.py --rows 10000 [--model DIR] [--executor local]
"""

from __future__ import annotations

import argparse
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
    """Run `tagcli tag` and return (seconds, its standard output)."""
    command = [sys.executable, "-m", "tagcli", "--config", str(config), "tag"]
    command += [str(dump), "-o", str(output), "--overwrite", "--executor", executor]
    if model:
        command += ["--model", str(model)]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"tagcli tag exited with {result.returncode}:\n{result.stderr}")
    return seconds, result.stdout


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
        if f"{args.rows} row(s) from the embedding cache" not in report:
            raise SystemExit(f"the second run did not find every row cached:\n{report}")

    print(
        f"N={args.rows} ({args.executor}): first run {first:.1f} s, fully cached "
        f"re-run {second:.1f} s, {first / second:.1f}x faster "
        "(wall time of each `tagcli tag` subprocess)"
    )


if __name__ == "__main__":
    main()
