"""`tagcli eval`: metrics, slices and calibration of a model."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import click

from tagcli.cli.app import (
    CliState,
    backend_option,
    encoding_option,
    exit_codes_help,
    input_context,
    main,
    make_console,
    model_option,
    output_options,
)
from tagcli.errors import EXIT_USAGE, TagcliError
from tagcli.io import check_encoding
from tagcli.stdin import is_stdin


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
    obj: CliState,
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
    with input_context(data) if data is not None else nullcontext() as data_file:
        report = evaluate_model(config, data_file, model_dir, encoding, feedback)
    if data is not None and is_stdin(data):
        report["data"] = "-"

    console = make_console(stderr=to_stdout)
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
