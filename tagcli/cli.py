"""Click commands: parse options, call the pipeline functions, render with rich.

Heavy packages (torch, Ray, sentence-transformers, scikit-learn) are imported
inside the commands, so `tagcli --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import click

from tagcli import __version__
from tagcli.backends import BACKENDS
from tagcli.errors import (
    EXIT_DRIFT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    EXIT_TERMINATED,
    EXIT_USAGE,
    TagcliError,
)
from tagcli.io import check_encoding
from tagcli.signals import Terminated, sigterm_raises
from tagcli.stdin import INPUT_FORMATS, STDIN_NAME, is_stdin, spooled_stdin
from tagcli.writer import is_folder_output

# One line per exit code; each command's epilog lists the codes it can return.
_EXIT_CODE_LINES = {
    0: "  0    success",
    1: "  1    internal error (a bug: please report it with the log)",
    2: "  2    usage error: an invalid option or tagcli.toml setting, an output\n"
    "       that exists (without --overwrite), or an unsupported output extension",
    3: "  3    bad input: a file, column or row that cannot be used",
    4: "  4    partial success: the output was written, and some rows went to\n"
    "       the rejects file ([rows] in tagcli.toml)",
    5: "  5    drift with --fail-on-drift: the output was written, and the batch\n"
    "       differs from the training data ([drift] in tagcli.toml)",
    130: "  130  interrupted with Ctrl-C; no output was written",
    75: "  75   the history of earlier runs is locked by another run for longer\n"
    "       than [dedupe] lock_timeout_seconds",
    143: "  143  stopped by SIGTERM; no output was written",
}


def exit_codes_help(*codes: int) -> str:
    lines = "\n".join(_EXIT_CODE_LINES[code] for code in codes)
    return f"\b\nExit codes:\n{lines}\n"


EXIT_CODES_HELP = exit_codes_help(0, 1, 2, 3, 4, 5, 75, 130, 143)


def _console(stderr: bool = False):
    from rich.console import Console

    no_color = bool(os.environ.get("NO_COLOR"))
    stream = sys.stderr if stderr else sys.stdout
    is_terminal = stream.isatty()
    # Off a terminal rich assumes 80 columns; log files and cron mail take wider lines.
    width = None if is_terminal else 120
    # Off a terminal no escape codes at all, even with FORCE_COLOR set.
    return Console(
        stderr=stderr,
        force_terminal=is_terminal,
        color_system="auto" if is_terminal and not no_color else None,
        no_color=no_color,
        highlight=False,
        width=width,
        soft_wrap=True,
    )


class _Obj:
    def __init__(
        self, config_path: str | None = None, verbose: int = 0, quiet: bool = False
    ) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self.quiet = quiet
        self._config = None
        self.started = time.monotonic()
        # The command name, set when the command's --json requests a summary line.
        self.json_command: str | None = None

    @property
    def config(self):
        if self._config is None:
            from tagcli.config import load_config

            self._config = load_config(self.config_path)
        return self._config


class TagcliGroup(click.Group):
    """Turn TagcliError into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            with sigterm_raises():
                return super().invoke(ctx)
        except TagcliError as error:
            click.echo(f"Error: {error}", err=True)
            _echo_failure_json(ctx, error.exit_code, str(error))
            ctx.exit(error.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Terminated:
            message = (
                "Stopped by SIGTERM; temporary files were removed and no output "
                "was written."
            )
            click.echo(message, err=True)
            _echo_failure_json(ctx, EXIT_TERMINATED, message)
            ctx.exit(EXIT_TERMINATED)
        except BrokenPipeError:
            # The reader of standard output (`| head`) has gone, after the work
            # was done; stop writing and exit as a success.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            ctx.exit(0)
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            _echo_failure_json(ctx, EXIT_INTERRUPTED, "interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as error:  # an unexpected failure is a bug: keep the traceback
            logging.getLogger("tagcli").exception("internal error")
            message = (
                f"Internal error: {type(error).__name__}: {error}. This is a bug in "
                "tagcli; the traceback is above."
            )
            click.echo(message, err=True)
            _echo_failure_json(ctx, EXIT_INTERNAL, message)
            ctx.exit(EXIT_INTERNAL)


def _echo_failure_json(ctx: click.Context, exit_code: int, message: str) -> None:
    """Print the --json summary line of a failed command, when --json was given."""
    obj = ctx.obj
    if not isinstance(obj, _Obj) or obj.json_command is None:
        return
    record = {
        "command": obj.json_command,
        "exit_code": exit_code,
        "error": message,
        "seconds": round(time.monotonic() - obj.started, 3),
    }
    click.echo(json.dumps(record))


def json_option(command):
    return click.option(
        "--json",
        "json_summary",
        is_flag=True,
        help="Print one JSON summary line on standard output (counts, paths, "
        "exit code, seconds), also when the run fails after option parsing; "
        "the report goes to standard error.",
    )(command)


def _input_context(path: Path, input_format: str = "auto"):
    """Return a context yielding the file to read: `path`, or standard input spooled."""
    if is_stdin(path):
        return spooled_stdin(input_format)
    return nullcontext(path)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    if quiet:
        level = logging.ERROR
    logging.basicConfig(
        level=level,
        # Timestamps, because these lines end up in cron mail and log files.
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # sentence-transformers and transformers log progress at INFO.
    for noisy in ("sentence_transformers", "transformers", "ray", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Progress lines replace the progress bar when standard error is not a terminal.
    logging.getLogger("tagcli.progress").setLevel(
        logging.ERROR if quiet else logging.INFO
    )


def output_options(command):
    """Add -v/-q to a subcommand too, so they work after the command name."""

    def apply(ctx: click.Context, param: click.Parameter, value) -> None:
        obj = ctx.ensure_object(_Obj)
        if param.name == "verbose" and value:
            obj.verbose = max(obj.verbose, value)
        if param.name == "quiet" and value:
            obj.quiet = True
        _setup_logging(obj.verbose, obj.quiet)

    command = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=apply,
        help="Print only errors.",
    )(command)
    command = click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=apply,
        help="Log more: -v for steps, -vv for debug.",
    )(command)
    return command


def backend_option(command):
    return click.option(
        "--backend",
        type=click.Choice(list(BACKENDS)),
        help="Embedding backend: onnx-int8 (int8 ONNX export on onnxruntime) or "
        "torch (sentence-transformers). A model is used only with the backend it "
        "was trained on. Default: [embedding] backend (onnx-int8).",
    )(command)


def model_option(command):
    return click.option(
        "--model",
        "model_dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Model artifact folder. Default: the newest under [paths] models_dir.",
    )(command)


def encoding_option(command):
    return click.option(
        "--encoding",
        default="utf-8",
        show_default=True,
        help="Text encoding of CSV input, such as cp1252 or latin-1. A UTF-8 "
        "byte-order mark is accepted.",
    )(command)


@click.group(cls=TagcliGroup, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="tagcli")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="tagcli.toml to read. Default: $TAGCLI_CONFIG, then ./tagcli.toml.",
)
@click.option(
    "-v", "--verbose", count=True, help="Log more: -v for steps, -vv for debug."
)
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.pass_context
def main(
    ctx: click.Context, config_path: str | None, verbose: int, quiet: bool
) -> None:
    """Tag machine-learning content with one approved tag each.

    Train a logistic-regression head on sentence-transformers embeddings, tag
    CSV or Parquet dumps on Ray, and evaluate the model.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = _Obj(config_path, verbose, quiet)


@main.command(
    epilog=exit_codes_help(0, 1, 2, 3, 130, 143),
    short_help="Train a model on labeled CSV or Parquet data.",
)
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the model artifact. Default: a new versioned folder under [paths] models_dir.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the --output folder if it contains a model artifact.",
)
@click.option(
    "--seed",
    type=int,
    help="Seed of the split and the head. Default: [train] seed (42).",
)
@click.option(
    "--embedding-model",
    help='Embedding model: "bundled", a local folder or a hub name. '
    'Default: [embedding] model ("bundled", all-MiniLM-L6-v2).',
)
@click.option(
    "--refit/--no-refit",
    default=None,
    help="After validation, fit the saved head on all rows (--refit) or keep "
    "the head fitted on the training split. Default: [train] refit_on_all (true).",
)
@backend_option
@click.option(
    "--feedback/--no-feedback",
    "use_feedback",
    default=True,
    help="Apply the corrections recorded by `tagcli feedback` (default) or "
    "ignore them.",
)
@encoding_option
@json_option
@output_options
@click.pass_obj
def train(
    obj: _Obj,
    data: Path,
    output: Path | None,
    overwrite: bool,
    seed: int | None,
    embedding_model: str | None,
    refit: bool | None,
    backend: str | None,
    use_feedback: bool,
    encoding: str,
    json_summary: bool,
) -> None:
    """Train a model on labeled DATA (CSV or Parquet: id, title, description, tag).

    DATA - reads standard input, CSV or Parquet.
    """
    from tagcli.train import train as run_train

    if json_summary:
        obj.json_command = "train"
    config = obj.config
    if seed is not None:
        config.train.seed = seed
    if embedding_model:
        config.embedding.model = embedding_model
    if refit is not None:
        config.train.refit_on_all = refit
    if backend:
        config.embedding.backend = backend

    check_encoding(encoding)
    with _input_context(data) as data_file:
        result = run_train(
            data_file, config, output, encoding, overwrite, use_feedback=use_feedback
        )

    if json_summary:
        record = {
            "command": "train",
            "exit_code": 0,
            "data": str(data),
            "artifact": str(result.artifact),
            "rows": result.rows,
            "mapped_to_fallback": result.mapped,
            "validation_f1": result.manifest["validation_metrics"]["overall"]["f1"],
            "review": result.manifest["review"],
            "feedback": result.feedback,
            "seconds": round(result.seconds, 3),
        }
        click.echo(json.dumps(record))
    if obj.quiet:
        return
    console = _console(stderr=json_summary)
    if result.mapped:
        mapped = ", ".join(f"{tag}: {n}" for tag, n in result.mapped.items())
        console.print(
            f"Mapped {sum(result.mapped.values())} row(s) with unapproved tags to "
            f"{config.tags.fallback!r} ({mapped})."
        )
    if result.duplicates_exact or result.duplicates_near:
        console.print(
            f"Dropped {result.duplicates_exact + result.duplicates_near} duplicate "
            f"row(s) before the split ({result.duplicates_exact} exact, "
            f"{result.duplicates_near} near); {result.rows} rows remain."
        )
    if result.feedback and result.feedback["records"]:
        counts = result.feedback
        console.print(
            f"Applied {counts['records']} feedback record(s) from {counts['store']}: "
            f"{counts['rows_corrected']} row(s) corrected ({counts['tags_changed']} "
            f"with a new tag), {counts['rows_added']} added, "
            f"{counts['skipped_without_text']} skipped for lack of text."
        )
    from tagcli.evaluate import render_metrics

    head = result.manifest["head"]
    render_metrics(
        console,
        result.manifest["validation_metrics"],
        f"Validation ({result.manifest['training_data']['validation_rows']} rows, C={head['C']:g})",
    )
    _print_review_choice(console, result.manifest)
    fitted = "all rows" if head["fitted_on"] == "all_rows" else "the training split"
    console.print(
        f"Saved model to {result.artifact} (head fitted on {fitted}, "
        f"{head['fitted_rows']} rows) in {result.seconds:.1f} s."
    )


def _print_review_choice(console, manifest: dict) -> None:
    calibration = manifest["calibration"]
    review = manifest["review"]
    console.print(
        f"Calibration: temperature {calibration['temperature']:.3f}, validation "
        f"ECE {calibration['validation_ece']:.3f}. Review threshold "
        f"{review['threshold']:.3f}: below it are {review['errors_caught']} of "
        f"{review['errors']} validation errors and {review['rows_queued']} of "
        f"{review['rows']} validation rows (\\[review] error_share "
        f"{review['error_share']:g})."
    )


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
out/NAME/ gets out/NAME-rejects.EXT) only when there are such rows. Rows read = tagged + duplicates + rejected.

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
the id kept in duplicate_of. The earliest row by created_on, then input order, is kept.
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
    help="Replace the output and its rejects and duplicates files if they exist; "
    "stale rejects or duplicates files are removed when this run has none. "
    "The input itself is never replaced.",
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
    obj: _Obj,
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
    with _input_context(input_path, input_format) as input_file:
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
        _print_tag_summary(_console(stderr=json_summary), summary)
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


@main.command(
    name="eval",
    epilog=exit_codes_help(0, 1, 2, 3, 130, 143),
    short_help="Evaluate a model: precision, recall, F1 per tag and slice.",
)
@click.argument("data", required=False, type=click.Path(path_type=Path))
@model_option
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Also write the metrics as JSON to this file ('-' for standard output).",
)
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@backend_option
@click.option(
    "--feedback",
    is_flag=True,
    help="Evaluate on the corrections recorded by `tagcli feedback` instead of DATA.",
)
@encoding_option
@output_options
@click.pass_obj
def evaluate(
    obj: _Obj,
    data: Path | None,
    model_dir: Path | None,
    json_path: Path | None,
    overwrite: bool,
    backend: str | None,
    feedback: bool,
    encoding: str,
) -> None:
    """Evaluate a model on labeled DATA. Default: the model's validation split.

    Reports weighted precision, recall and F1, the same per tag and per slice,
    and the confusion matrix, then the reliability table of the confidences
    and the expected calibration error. Warns when DATA overlaps the rows the
    head was fitted on. DATA - reads standard input, CSV or Parquet.
    """
    from tagcli.evaluate import evaluate_model, render_metrics, render_reliability

    config = obj.config
    if backend:
        config.embedding.backend = backend
    check_encoding(encoding)
    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None and not to_stdout and json_path.exists() and not overwrite:
        raise TagcliError(
            f"{json_path}: the file exists; pass --overwrite to replace it or "
            "choose another --json path.",
            exit_code=EXIT_USAGE,
        )

    if feedback and data is not None:
        raise TagcliError(
            "Pass either DATA or --feedback, not both; --feedback evaluates the "
            "recorded corrections.",
            exit_code=EXIT_USAGE,
        )
    with _input_context(data) if data is not None else nullcontext() as data_file:
        report = evaluate_model(config, data_file, model_dir, encoding, feedback)
    if data is not None and is_stdin(data):
        report["data"] = "-"

    console = _console(stderr=to_stdout)
    if report["mapped_to_fallback"] and not obj.quiet:
        mapped = ", ".join(
            f"{tag}: {n}" for tag, n in report["mapped_to_fallback"].items()
        )
        console.print(
            f"Mapped rows with unapproved tags to {config.tags.fallback!r} ({mapped})."
        )
    if report["leak"]["overlapping_rows"]:
        leak = report["leak"]
        refit = leak["fitted_on"] == "all_rows"
        fitted = (
            "all training rows, validation split included"
            if refit
            else "the training split"
        )
        advice = "For clean numbers, evaluate rows held out from training."
        if refit:
            advice = (
                "The validation F1 measured before the refit was "
                f"{report['validation_f1_at_training']:.3f}. For clean numbers, "
                "evaluate rows held out from training, or train with [train] "
                "refit_on_all = false."
            )
        click.echo(
            f"Warning: {leak['overlapping_rows']} of {report['metrics']['overall']['rows']} "
            "evaluation rows have the same title and description as rows the saved "
            f"head was fitted on ({fitted}). This data leak inflates the metrics "
            f"below. {advice}",
            err=True,
        )
    if not obj.quiet:
        console.print(f"Model: {report['model']}\nData: {report['data']}")
        if report["feedback"]:
            sources = report["feedback"]
            console.print(
                f"Feedback rows: {sources['text_from_feedback']} with text from the "
                f"feedback, {sources['text_from_training_data']} joined by id from "
                f"{sources['training_data']}, {sources['without_text']} without text "
                "(not evaluated)."
            )
        render_metrics(console, report["metrics"], "Evaluation")
        render_reliability(console, report["calibration"], "Reliability")

    if json_path is not None:
        text = json.dumps(report, indent=2) + "\n"
        if to_stdout:
            click.echo(text, nl=False)
        else:
            from tagcli.io import atomic_path

            with atomic_path(json_path) as temporary:
                temporary.write_text(text)


@main.command(
    name="history",
    epilog=exit_codes_help(0, 1, 2, 75)
    + "  Exit code 2 also means --clear was declined or got no answer\n"
    "  (standard input not a terminal, without --yes); nothing was cleared.\n",
    short_help="Show or clear the history of content already tagged.",
)
@click.option(
    "--clear",
    is_flag=True,
    help="Forget every row tagged before, so the next run may tag it again.",
)
@click.option("--yes", is_flag=True, help="Clear without asking for confirmation.")
@output_options
@click.pass_obj
def history(obj: _Obj, clear: bool, yes: bool) -> None:
    """Show the size of the history in [paths] state_dir, or clear it.

    `tag` remembers the content keys, ids and embeddings of the rows it tags
    there, and drops later rows that duplicate them.
    """
    from tagcli.history import clear_history, read_history

    config = obj.config
    state_dir = config.paths.state_dir
    current = read_history(state_dir)
    if clear:
        if not yes:
            try:
                confirmed = click.confirm(
                    f"Forget {current.rows} rows tagged before, in {state_dir}?",
                    err=True,
                )
            except click.Abort:
                # Standard input ended before the prompt got a reply.
                confirmed = False
            if not confirmed:
                raise TagcliError(
                    f"{state_dir}: nothing was cleared, because the confirmation "
                    "was declined or standard input ended. Pass --yes to clear "
                    "without asking when standard input is not a terminal.",
                    exit_code=EXIT_USAGE,
                )
        current = clear_history(state_dir, config.dedupe.lock_timeout_seconds)
        if not obj.quiet:
            _console().print(f"Cleared the history in {state_dir}.")
        return
    if obj.quiet:
        return
    console = _console()
    console.print(f"History: {state_dir}")
    console.print(f"rows: {current.rows}")
    console.print(f"bytes: {current.size_bytes()}")
    console.print(f"segments: {len(current.segments)}")
    if current.embedding_model:
        console.print(
            f"embedding model: {current.embedding_model} ({current.dimension} dimensions)"
        )


@main.command(
    epilog=exit_codes_help(0, 1, 2, 3, 130, 143),
    short_help="Record corrected tags from a CSV, Parquet or JSONL file.",
)
@click.argument("file", type=click.Path(path_type=Path))
@encoding_option
@output_options
@click.pass_obj
def feedback(obj: _Obj, file: Path, encoding: str) -> None:
    """Record corrections from FILE in the state folder ([paths] state_dir).

    FILE has the columns id and tag (the correct, approved tag), and optionally
    note, title and description. Other columns are ignored, so an edited
    `tagcli sample` file works as it is. A row whose id is not in the training
    data needs a title or description to be trained on. The next `tagcli
    train` applies the corrections; `tagcli eval --feedback` measures the
    current model on them. A file with any invalid row records nothing.
    """
    from tagcli.feedback import record_feedback

    check_encoding(encoding)
    result = record_feedback(file, obj.config, encoding)
    if not obj.quiet:
        _console().print(
            f"Recorded {result['recorded']} correction(s) in {result['store']} "
            f"({result['ids_in_store']} id(s) corrected in all)."
        )


@main.command(
    epilog=exit_codes_help(0, 1, 2, 3, 130, 143),
    short_help="Draw rows from tagged output for labeling by hand.",
)
@click.argument("size", type=click.IntRange(min=1), metavar="N")
@click.argument("tagged", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sample file to write (.csv or .parquet).",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed.")
@click.option(
    "--per-tag-share",
    type=click.FloatRange(min=0, max=1),
    default=0.25,
    show_default=True,
    help="Share of N drawn at random, equally from each predicted tag; the rest "
    "are the lowest-confidence rows.",
)
@click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
@output_options
@click.pass_obj
def sample(
    obj: _Obj,
    size: int,
    tagged: Path,
    output: Path,
    seed: int,
    per_tag_share: float,
    overwrite: bool,
) -> None:
    """Draw N rows from TAGGED (output of `tagcli tag`) for manual checking.

    Most rows are the lowest-confidence ones; some are drawn at random from
    each predicted tag. The sample has every column of TAGGED plus
    sample_reason. Correct its tag column and pass it to `tagcli feedback`.
    """
    from tagcli.feedback import draw_sample, write_sample

    rows = draw_sample(tagged, size, seed, per_tag_share)
    write_sample(rows, output, overwrite)
    if not obj.quiet:
        _console().print(f"Wrote {rows.height} row(s) to {output}.")


PREDICT_HELP = """Tag one item, or a stream of JSON lines, as each arrives.

\b
With --title and/or --description, tags that one item. Otherwise reads
standard input one line at a time, each line a JSON object with id, title
and description, and writes one JSON line per input line as soon as it is
tagged, so `tail -f feed.jsonl | tagcli predict` works. The model loads once.

\b
Each output line has id, tag, confidence, probabilities (per approved tag),
needs_review (only when the model has a review threshold) and duplicate_of:
the id of an earlier item of the stream, or of a row that `tag` kept in the
history in [paths] state_dir, with the same text or an embedding at cosine
similarity of at least [predict] near_duplicate_threshold, else null.
Predict reads the history once at start and never writes it. A line that cannot be tagged gets {"line": N, "error": "..."} instead,
and the stream goes on; the exit code is then 4.
"""


PREDICT_EXIT_CODES_HELP = (
    exit_codes_help(0, 1, 2, 3)
    + "  4    partial success: some input lines got error lines, the rest were tagged\n"
)


@main.command(
    help=PREDICT_HELP,
    epilog=PREDICT_EXIT_CODES_HELP,
    short_help="Tag one item, or a stream of JSON lines from standard input.",
)
@click.option("--title", help="Title of the one item to tag.")
@click.option("--description", help="Description of the one item to tag.")
@click.option("--id", "item_id", help="Id of the one item, copied to the output.")
@model_option
@click.option(
    "--no-history",
    is_flag=True,
    help="Find duplicates only within the stream, not in the history of `tag` runs.",
)
@output_options
@click.pass_obj
def predict(
    obj: _Obj,
    title: str | None,
    description: str | None,
    item_id: str | None,
    model_dir: Path | None,
    no_history: bool,
) -> None:
    from tagcli.jsonl_stream import run_stream
    from tagcli.predict import Item, Predictor

    single = title is not None or description is not None
    if item_id is not None and not single:
        raise TagcliError(
            "--id applies to one item given with --title or --description; in "
            "a stream each JSON line carries its own id.",
            exit_code=EXIT_USAGE,
        )
    if single and not (title or "").strip() and not (description or "").strip():
        raise TagcliError(
            "--title and --description are both empty; give the text to tag."
        )

    predictor = Predictor(obj.config, model_dir, use_history=not no_history)
    if single:
        result = predictor.predict(Item(item_id, title or "", description or ""))
        click.echo(json.dumps(result))
        return

    if sys.stdin.isatty() and not obj.quiet:
        click.echo(
            "Reading JSON lines from standard input; end with Ctrl-D.", err=True
        )
    try:
        summary = run_stream(predictor, sys.stdin.buffer, sys.stdout)
    except KeyboardInterrupt:
        # The usual way to stop `tail -f feed.jsonl | tagcli predict`. Every
        # line read before the one in progress already has its output line.
        click.echo("Interrupted; stopped reading standard input.", err=True)
        sys.exit(130)
    if summary.failed:
        click.echo(
            f"Rejected {summary.failed} of {summary.lines} line(s); their error "
            "lines on standard output name the line number and the problem.",
            err=True,
        )
        sys.exit(EXIT_PARTIAL)
