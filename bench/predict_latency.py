"""Measure `tagcli predict` latency per item, and the start-up time of the CLI.

Starts `tagcli predict` as a subprocess with pipes and waits for the reply to
a first item, so Python, the embedding backend and the model are loaded. Then
feeds ITEMS items one at a time through the same stream. Each JSON line is written only after
the reply to the one before has been read. The latency of an item is the wall time from writing
its line to reading its reply, so it includes the pipe, JSON parsing, the
embedding, the head and the duplicate check. Items are sample rows with a
numbered suffix, so none is an exact duplicate of another.

It also reports the median wall time of RUNS runs each of `tagcli --help` and
`tagcli --version`, as subprocesses, Python start-up included.

Usage: python bench/predict_latency.py --items 1000 [--model DIR] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data" / "dataset.csv"
TAGCLI = [sys.executable, "-m", "tagcli"]


def item_lines(count: int) -> list[bytes]:
    """Return `count` JSON lines built from the sample rows, each with a unique title."""
    sample = pl.read_csv(SAMPLE, infer_schema=False)
    lines = []
    for number in range(count):
        row = sample.row(number % sample.height, named=True)
        item = {
            "id": number,
            "title": f"{row['title']} (item {number})",
            "description": row["description"],
        }
        lines.append((json.dumps(item) + "\n").encode("utf-8"))
    return lines


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values`."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def measure_predict(items: int, model: Path | None) -> list[float]:
    """Return the latency in seconds of each item fed through one predict process."""
    command = TAGCLI + ["predict"] + (["--model", str(model)] if model else [])
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        warm_up = item_lines(1)[0]
        process.stdin.write(warm_up)
        process.stdin.flush()
        if not process.stdout.readline():
            raise SystemExit("tagcli predict exited before its first reply")

        latencies = []
        for line in item_lines(items):
            started = time.perf_counter()
            process.stdin.write(line)
            process.stdin.flush()
            reply = process.stdout.readline()
            latencies.append(time.perf_counter() - started)
            if "error" in json.loads(reply):
                raise SystemExit(f"tagcli predict rejected an item: {reply!r}")
        process.stdin.close()
        if process.wait() != 0:
            raise SystemExit(f"tagcli predict exited with {process.returncode}")
        return latencies
    finally:
        if process.poll() is None:
            process.kill()


def median_wall_time(arguments: list[str], runs: int) -> float:
    """Return the median wall time in seconds of `tagcli ARGUMENTS` over `runs` runs."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(TAGCLI + arguments, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000, help="Items to time.")
    parser.add_argument("--model", type=Path, help="Model artifact. Default: the newest.")
    parser.add_argument("--runs", type=int, default=5, help="Runs of --help, --version.")
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    for arguments in (["--help"], ["--version"]):
        seconds = median_wall_time(arguments, args.runs)
        print(
            f"tagcli {arguments[0]}: median {seconds * 1000:.0f} ms wall time "
            f"over {args.runs} runs, Python start-up included"
        )

    latencies = measure_predict(args.items, args.model)
    milliseconds = [seconds * 1000 for seconds in latencies]
    print(
        f"tagcli predict, {args.items} items one at a time, model loaded: "
        f"p50 {percentile(milliseconds, 0.50):.1f} ms, "
        f"p99 {percentile(milliseconds, 0.99):.1f} ms, "
        f"mean {statistics.mean(milliseconds):.1f} ms, "
        f"max {max(milliseconds):.1f} ms "
        "(write of the line to read of the reply)"
    )


if __name__ == "__main__":
    main()
