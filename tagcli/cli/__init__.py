"""Click commands: parse options, call the pipeline functions, render with rich.

Each command lives in its own module and registers itself on `main` when
imported. Heavy packages (torch, Ray, sentence-transformers, scikit-learn)
are imported inside the commands, so `tagcli --help` stays fast.
"""

from tagcli.cli.app import main

# Importing a command module adds its command to `main`.
from tagcli.cli import (  # noqa: E402, F401
    eval_command,
    history_command,
    predict_command,
    review_commands,
    tag_command,
    train_command,
)

__all__ = ["main"]
