"""`tagcli tag`: tag a dump, then print the summary table or the JSON line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from tagcli.cli.app import (
    CliState,
    backend_option,
    encoding_option,
    exit_codes_help,
    input_context,
    json_option,
    main,
    make_console,
    model_option,
    output_options,
)
from tagcli.errors import EXIT_DRIFT, EXIT_PARTIAL, EXIT_USAGE, TagcliError
from tagcli.io import check_encoding
from tagcli.stdin import INPUT_FORMATS, STDIN_NAME, is_stdin
from tagcli.writer import is_folder_output


def _default_output(input_path: Path) -> str:
    """Return INPUT's name with .tagged before the extension; a folder gets a folder."""
    if input_path.is_dir():
        return f"{input_path.with_name(input_path.name + '.tagged')}{os.sep}"
    suffix = (
        input_path.suffix
        if input_path.suffix.lower() in (".csv", ".parquet")
        else ".parquet"
    )
    return str(input_path.with_name(f"{input_path.stem}.tagged{suffix}"))


TAG_HELP = """Tag every row of INPUT with one approved tag.

\b
INPUT is a CSV or Parquet file, or a folder of them, with the columns id,
title and description; - reads standard input (then -o is required). The
output contains every input column plus tag, confidence, one prob_<tag>
column per approved tag, centroid_distance, out_of_distribution and
needs_review. -o names a .csv or .parquet file, or a folder (ending with /)
of part files.

\b
Rows with no title and no description, or with more tokens than the model
reads, follow [rows] in tagcli.toml: tagged, or written with a reason column
to OUTPUT.rejects.csv or .parquet beside the output (a folder output
out/NAME/ gets out/NAME-rejects.EXT) only when there are such rows.
Rows read = tagged + duplicates + rejected.

\b
Where the embedding runs (--executor):
  auto   in-process when the input has at most [ray] max_local_rows rows
         (default 100000), or when at most that many of its rows are neither
         in the embedding cache nor exact duplicates, and no cluster address
         is set; otherwise on Ray
  ray    always on Ray: a local instance, or the cluster at --address
  local  always in-process, on this machine's CPUs
The paths group texts into encoder batches differently. With --backend
torch, probabilities then differ around the 7th decimal place. With
onnx-int8 they differ more (0.11 at most on 2,000 sample rows), because int8
activations share one scale per batch, so a row near a decision boundary can
change tag.

\b
Duplicates: rows with the same title and description as an earlier row
(after normalising case, spacing, punctuation and URLs), or whose embedding
has a cosine similarity of at least [dedupe] near_threshold to one, are not
tagged. They go to NAME.duplicates.EXT beside the output (a folder output
out/NAME/ gets out/NAME-duplicates.EXT) only when there are duplicates, with
the id kept in duplicate_of. The earliest row by created_on, then input
order, is kept.
Rows tagged by earlier runs are remembered in [paths] state_dir, so a later
run drops them too; see `tagcli history`.

\b
Embeddings are cached in [paths] state_dir, keyed by model, backend and text:
rows whose text was embedded before skip the model. --no-cache embeds all.

\b
A progress bar shows on a terminal; otherwise a log line every 10 s.

\b
Review and drift: rows with confidence below [review] threshold get
needs_review = true and also go to OUTPUT.review.EXT beside the output
(NAME-review.EXT beside a folder output NAME/). Rows
farther from the training data than [drift] ood_quantile of the training
rows get out_of_distribution = true. The summary shows the drift table;
with --fail-on-drift, a drifted batch exits with status 5.
"""


@main.command(
    help=TAG_HELP,
    epilog=exit_codes_help(0, 1, 2, 3, 4, 5, 75, 130, 143),
    short_help="Tag every row of a CSV or Parquet dump.",
)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    # A str, not a Path: a trailing slash marks a folder output.
    type=click.Path(),
    help="Output file (.csv or .parquet) or folder (ending with /). "
    "Default: INPUT's name with .tagged before the extension.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the output and its rejects, duplicates and review files if "
    "they exist; stale rejects or duplicates files are removed when this run "
    "has none. The input itself is never replaced.",
)
@click.option(
    "--input-format",
    type=click.Choice(INPUT_FORMATS),
    default="auto",
    show_default=True,
    help="Format of standard input (INPUT -): auto detects Parquet by its "
    "first bytes and reads anything else as CSV.",
)
@click.option(
    "--output-format",
    type=click.Choice(["parquet", "csv"]),
    help="Format of the part files when the output is a folder. Default: parquet.",
)
@model_option
@click.option(
    "--executor",
    type=click.Choice(["auto", "ray", "local"]),
    default="auto",
    show_default=True,
    help="Where to embed: see above.",
)
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    help="Ray cluster to join, such as 127.0.0.1:6379 (also RAY_ADDRESS, "
    "[ray] address). Default: start a local instance.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Embedding actors on Ray. Default: one per CPU in the cluster.",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(min=0),
    help="CPUs each embedding actor reserves. Default: (C - 1) / C, C being the "
    "CPUs of the smallest node, so every node keeps a CPU for read and write tasks.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Rows per batch handed to an embedding actor. Default: [ray] batch_size (1024).",
)
@click.option(
    "--no-history",
    is_flag=True,
    help="Neither read nor update the history of earlier runs; duplicates "
    "within INPUT are still dropped.",
)
@click.option(
    "--keep-duplicates",
    is_flag=True,
    help="Tag every row: no duplicate filter, no history, no duplicates file.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Embed every row, neither reading nor writing the embedding cache in "
    "[paths] state_dir.",
)
@backend_option
@click.option(
    "--fail-on-drift",
    is_flag=True,
    help="Exit with status 5 when the batch has drifted (the output is still written).",
)
@encoding_option
@json_option
@output_options
@click.pass_obj
def tag(
    obj: CliState,
    input_path: Path,
    output: str | None,
    overwrite: bool,
    input_format: str,
    output_format: str | None,
    model_dir: Path | None,
    executor: str,
    address: str | None,
    workers: int | None,
    cpus_per_worker: float | None,
    batch_size: int | None,
    no_history: bool,
    keep_duplicates: bool,
    no_cache: bool,
    backend: str | None,
    fail_on_drift: bool,
    encoding: str,
    json_summary: bool,
) -> None:
    from tagcli.pipeline import TagOptions
    from tagcli.pipeline import tag as run_tag

    if json_summary:
        obj.json_command = "tag"
    config = obj.config
    if workers is not None:
        config.ray.num_workers = workers
    if cpus_per_worker is not None:
        config.ray.cpus_per_worker = cpus_per_worker
    if batch_size is not None:
        config.ray.batch_size = batch_size
    if backend:
        config.embedding.backend = backend
    config.validate()

    if input_format != "auto" and not is_stdin(input_path):
        raise TagcliError(
            f"--input-format applies to standard input (INPUT -) only; the "
            f"extension of {input_path} sets its format.",
            exit_code=EXIT_USAGE,
        )
    if is_stdin(input_path) and not output:
        raise TagcliError(
            "INPUT is - (standard input), which has no name to derive the "
            "output from; pass -o with a .csv or .parquet file.",
            exit_code=EXIT_USAGE,
        )
    output = output or _default_output(input_path)
    if output_format and not is_folder_output(output):
        raise TagcliError(
            f"--output-format applies to folder outputs only; {output} is a file, "
            "whose extension sets the format. End -o with / for part files.",
            exit_code=EXIT_USAGE,
        )
    options = TagOptions(
        model_dir=model_dir,
        address=address,
        executor=executor,
        overwrite=overwrite,
        folder_format=output_format or "parquet",
        show_progress=not obj.quiet,
        encoding=encoding,
        no_history=no_history,
        keep_duplicates=keep_duplicates,
        use_cache=not no_cache,
    )
    check_encoding(encoding)
    with input_context(input_path, input_format) as input_file:
        summary = run_tag(input_file, output, config, options)
    if is_stdin(input_path):
        summary.input = input_path
    exit_code = EXIT_PARTIAL if summary.rows_rejected else 0
    drifted = fail_on_drift and summary.drift["drifted"]
    if drifted:
        exit_code = EXIT_DRIFT

    if json_summary:
        click.echo(json.dumps(tag_summary_record(summary, exit_code)))
    if not obj.quiet:
        _print_tag_summary(make_console(stderr=json_summary), summary)
    if summary.rows_rejected:
        logging.getLogger("tagcli").warning(
            "%d row(s) rejected by the [rows] policy; they are in %s with their "
            "reason.",
            summary.rows_rejected,
            summary.rejects,
        )
    if drifted:
        reasons = "; ".join(summary.drift["reasons"])
        click.echo(f"Error: the batch has drifted ({reasons}).", err=True)
    ctx = click.get_current_context()
    ctx.exit(exit_code)


def tag_summary_record(summary, exit_code: int) -> dict:
    """Return the --json summary line of a finished `tag` run."""
    return {
        "command": "tag",
        "exit_code": exit_code,
        "input": str(summary.input),
        "output": str(summary.output),
        "rejects": str(summary.rejects) if summary.rejects else None,
        "review": str(summary.review_output),
        "model": str(summary.model),
        "rows_read": summary.rows_read,
        "rows_tagged": summary.rows_written,
        "rows_duplicate": summary.rows_duplicate,
        "rows_duplicate_exact": summary.rows_duplicate_exact,
        "rows_duplicate_near": summary.rows_duplicate_near,
        "duplicates": (
            str(summary.duplicates_output) if summary.duplicates_output else None
        ),
        "history_rows": summary.history_rows,
        "rows_rejected": summary.rows_rejected,
        "rows_truncated": summary.rows_truncated,
        "rows_needs_review": summary.review_rows,
        "review_threshold": summary.review_threshold,
        # Rows whose embedding came from the cache; null with --no-cache.
        "rows_cached": summary.cached_rows,
        "tag_counts": summary.tag_counts,
        "drift": summary.drift,
        "executor": summary.executor,
        "seconds": round(summary.seconds, 3),
    }


def _print_tag_summary(console, summary) -> None:
    from rich.table import Table

    source = STDIN_NAME if is_stdin(summary.input) else summary.input
    table = Table(title=f"Tagged {source} -> {summary.output}")
    table.add_column("", justify="left")
    table.add_column("rows", justify="right")
    table.add_row("read", str(summary.rows_read))
    table.add_row("tagged", str(summary.rows_written))
    for name, count in summary.tag_counts.items():
        table.add_row(f"  tag {name}", str(count))
    table.add_row("duplicates", str(summary.rows_duplicate))
    table.add_row("  exact", str(summary.rows_duplicate_exact))
    table.add_row("  near", str(summary.rows_duplicate_near))
    table.add_row("rejected", str(summary.rows_rejected))
    table.add_row("truncated (tagged)", str(summary.rows_truncated))
    console.print(table)
    if summary.rows_read == 0:
        console.print(
            "The input has no data rows; wrote an empty output with the columns."
        )
    if summary.rejects:
        console.print(f"Rejected rows, with a reason column: {summary.rejects}.")
    if summary.duplicates_output is not None:
        console.print(f"Duplicates written to {summary.duplicates_output}.")
    if summary.history_rows is not None:
        console.print(
            f"History: {summary.history_rows_added} rows added, "
            f"{summary.history_rows} in total."
        )
    if summary.renamed_columns:
        renamed = ", ".join(
            f"{old} -> {new}" for old, new in summary.renamed_columns.items()
        )
        console.print(f"Input columns renamed to avoid output columns: {renamed}.")
    where = (
        "in-process"
        if summary.executor == "local"
        else f"on Ray, {summary.workers} worker(s)"
    )
    if summary.cached_rows is not None:
        where += f", {summary.cached_rows} row(s) from the embedding cache"
    console.print(
        f"Model {summary.model}; embedded {where} with {summary.backend}; "
        f"{summary.seconds:.1f} s."
    )
    console.print(
        f"Review: {summary.review_rows} row(s) with confidence below "
        f"{summary.review_threshold:.3f} -> {summary.review_output}"
    )
    from tagcli.monitor import render_drift

    render_drift(console, summary.drift)
