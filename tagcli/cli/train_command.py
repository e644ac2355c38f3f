"""`tagcli train`: fit the head on labeled data and save a model artifact."""

from __future__ import annotations

import json
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
    output_options,
)
from tagcli.io import check_encoding


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
    obj: CliState,
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
    with input_context(data) as data_file:
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
    console = make_console(stderr=json_summary)
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
