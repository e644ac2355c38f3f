"""The `tagcli` command group and what its commands share.

Exit codes and their help lines, the rich console, the state passed to each
command, turning errors into messages and exit codes, logging set-up and the
options that several commands take.
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
from tagcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, TagcliError
from tagcli.signals import Terminated, sigterm_raises
from tagcli.stdin import is_stdin, spooled_stdin

# One line per exit code; each command's epilog lists the codes it can return.
_EXIT_CODE_LINES = {
    0: "  0    success",
    1: "  1    internal error (a bug: please report it with the log)",
    2: "  2    usage error: an invalid option or tagcli.toml setting, an output\n"
    "       that exists (without --overwrite) or is the input, or an\n"
    "       unsupported output extension",
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


def make_console(stderr: bool = False):
    """Return a rich console on standard output, or on standard error."""
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


class CliState:
    """Options of the `tagcli` group, and the configuration, loaded once."""

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
            if ctx.invoked_subcommand == "predict":
                message = (
                    "Stopped by SIGTERM; every line read before it has its "
                    "output line."
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
    if not isinstance(obj, CliState) or obj.json_command is None:
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


def input_context(path: Path, input_format: str = "auto"):
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
        obj = ctx.ensure_object(CliState)
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
    CSV or Parquet dumps in-process or on a Ray cluster, and evaluate the model.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = CliState(config_path, verbose, quiet)
