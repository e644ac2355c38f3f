"""The one error type that the CLI turns into a message and an exit code."""

from __future__ import annotations

# Exit codes, documented in the README and in `tagcli --help`.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
# The output was written, but some rows went to the rejects file.
EXIT_PARTIAL = 4
# Drift found with --fail-on-drift.
EXIT_DRIFT = 5
# Another run holds the state lock (EX_TEMPFAIL from sysexits.h: try again later).
EXIT_LOCKED = 75
# Ctrl-C, and SIGTERM: 128 plus the signal number, as a shell reports it.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class TagcliError(Exception):
    """An error the user can fix: the message names the file, row or column and the fix.

    `exit_code` is the process exit status the CLI uses for it.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TagcliError):
    """An invalid `tagcli.toml` or option value."""

    exit_code = EXIT_USAGE
