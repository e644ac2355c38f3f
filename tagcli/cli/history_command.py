"""`tagcli history`: show or clear the history of content already tagged."""

from __future__ import annotations

import click

from tagcli.cli.app import CliState, exit_codes_help, main, make_console, output_options
from tagcli.errors import EXIT_USAGE, TagcliError


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
def history(obj: CliState, clear: bool, yes: bool) -> None:
    """Show the size of the history in [paths] state_dir, or clear it.

    `tag` remembers the content keys, ids and embeddings of the rows it tags
    there, and drops later rows that duplicate them.
    """
    from tagcli.history import clear_history, read_history

    config = obj.config
    state_dir = config.paths.state_dir
    current = read_history(state_dir)
    if clear and current.rows == 0:
        if not obj.quiet:
            make_console().print(f"The history in {state_dir} is empty; nothing to clear.")
        return
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
            make_console().print(f"Cleared the history in {state_dir}.")
        return
    if obj.quiet:
        return
    console = make_console()
    console.print(f"History: {state_dir}")
    console.print(f"rows: {current.rows}")
    console.print(f"bytes: {current.size_bytes()}")
    console.print(f"segments: {len(current.segments)}")
    if current.embedding_model:
        console.print(
            f"embedding model: {current.embedding_model} ({current.dimension} dimensions)"
        )
