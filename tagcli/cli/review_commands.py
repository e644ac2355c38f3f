"""`tagcli feedback` and `tagcli sample`: the review loop's commands."""

from __future__ import annotations

from pathlib import Path

import click

from tagcli.cli.app import (
    CliState,
    encoding_option,
    exit_codes_help,
    main,
    make_console,
    output_options,
)
from tagcli.io import check_encoding


@main.command(
    epilog=exit_codes_help(0, 1, 2, 3, 130, 143),
    short_help="Record corrected tags from a CSV, Parquet or JSONL file.",
)
@click.argument("file", type=click.Path(path_type=Path))
@encoding_option
@output_options
@click.pass_obj
def feedback(obj: CliState, file: Path, encoding: str) -> None:
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
        make_console().print(
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
    obj: CliState,
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
        make_console().print(f"Wrote {rows.height} row(s) to {output}.")
