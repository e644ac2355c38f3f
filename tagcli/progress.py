"""Progress of a tagging run: a rich bar on a terminal, plain log lines elsewhere.

Under cron standard error is not a terminal, so the run logs a line such as
"tagged 4096/10000 rows (180.0 rows/s, about 33 s left)" every `interval` seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("tagcli.progress")


def use_terminal_bar() -> bool:
    """Return whether standard error is a terminal and NO_COLOR is unset or empty."""
    return sys.stderr.isatty() and not os.environ.get("NO_COLOR")


class RowProgress:
    """Count rows done out of `total`; show a bar, log lines, or nothing (`enabled=False`)."""

    def __init__(
        self, total: int, enabled: bool = True, interval: float = 10.0
    ) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.interval = interval
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar = None
        self._task = None

    def __enter__(self) -> RowProgress:
        if self.enabled and use_terminal_bar():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("tagging"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("rows", total=self.total, rate="")
        return self

    def advance(self, rows: int) -> None:
        self.done += rows
        if not self.enabled:
            return
        now = time.monotonic()
        rate = self.done / max(now - self._started, 1e-9)
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self.done, rate=f"{rate:,.0f} rows/s"
            )
        elif now - self._last_log >= self.interval or self.done >= self.total:
            self._last_log = now
            left = (self.total - self.done) / rate
            log.info(
                "tagged %d/%d rows (%.1f rows/s, about %.0f s left)",
                self.done,
                self.total,
                rate,
                left,
            )

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.stop()
