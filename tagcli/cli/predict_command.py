"""`tagcli predict`: tag one item, or a stream of JSON lines as they arrive."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tagcli.cli.app import CliState, exit_codes_help, main, model_option, output_options
from tagcli.errors import EXIT_PARTIAL, EXIT_USAGE, TagcliError


PREDICT_HELP = """Tag one item, or a stream of JSON lines, as each arrives.

\b
With --title and/or --description, tags that one item. Otherwise reads
standard input one line at a time, each line a JSON object with id, title
and description, and writes one JSON line per input line as soon as it is
tagged, so `tail -f feed.jsonl | tagcli predict` works. The model loads once.

\b
Each output line has id, tag, confidence, probabilities (per approved tag),
needs_review (confidence below [review] threshold, as in `tag`) and
duplicate_of: the id of an earlier item of the stream, or of a row that
`tag` kept in the history in [paths] state_dir, with the same text or an
embedding at cosine similarity of at least [predict]
near_duplicate_threshold, else null. Predict reads the history once at
start and never writes it. A line that cannot be tagged gets
{"line": N, "error": "..."} instead, and the stream goes on; the exit code
is then 4.
"""


PREDICT_EXIT_CODES_HELP = (
    exit_codes_help(0, 1, 2, 3)
    + "  4    partial success: some input lines got error lines, the rest were tagged\n"
    + "  130  interrupted with Ctrl-C; every line read before has its output line\n"
    + "  143  stopped by SIGTERM; every line read before has its output line\n"
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
    obj: CliState,
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
