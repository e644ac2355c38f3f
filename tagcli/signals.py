"""SIGTERM as a clean abort: the run unwinds, removes its temporaries and exits 143.

cron, systemd and `timeout` stop a job with SIGTERM. Without a handler Python
dies at once and leaves temporary files behind. With this one, SIGTERM raises
`Terminated` in the main thread, so the `except`/`finally` blocks that remove
partial outputs run as they do for any error.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM.

    A BaseException, like KeyboardInterrupt, so `except Exception` blocks
    that turn failures into input errors let it through.
    """


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM during clean-up stops the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def install_sigterm_handler() -> None:
    """Make SIGTERM raise Terminated; does nothing outside the main thread.

    Call it again after `ray.init()`, which installs its own handler.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


class DeferredSigterm:
    """Record SIGTERM instead of raising it, for code that runs inside Ray.

    Raised deep inside Ray Data's iterator, Terminated would reach
    `ray.shutdown()` while the streaming executor's threads still use the
    core worker, and Ray 2.60 then ends the process with status 1 before any
    clean-up message. The caller calls `check()` between batches instead.
    """

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        """Replace the SIGTERM handler; call it again after `ray.init()`."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum, frame) -> None:
        self.received = True

    def check(self) -> None:
        """Raise Terminated if SIGTERM arrived; later signals stop the process at once."""
        if self.received:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Make SIGTERM raise Terminated inside the block; restore the old handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm_handler()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_deferred() -> Iterator[DeferredSigterm]:
    """Record SIGTERM inside the block instead of raising it; restore the old handler after.

    For steps that must not stop half-way, such as the renames that commit an
    output and the history. The caller reads `received` after the block.
    """
    deferred = DeferredSigterm()
    if threading.current_thread() is not threading.main_thread():
        yield deferred
        return
    previous = signal.getsignal(signal.SIGTERM)
    deferred.install()
    try:
        yield deferred
    finally:
        signal.signal(signal.SIGTERM, previous)
