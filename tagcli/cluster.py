"""Connecting to Ray and sizing the embedding workers for the CPUs it reports."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tagcli.errors import TagcliError

log = logging.getLogger(__name__)


AUTO = -1.0

# Environment of every Ray worker of a tagcli job.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray 2.60's Parquet reader starts 32 footer-reading actors by default:
    # seconds of start-up and about 2 GB of memory on a 2-CPU machine, for
    # inputs of a few files. Two actors are enough to read their footers.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
}


@dataclass(frozen=True)
class WorkerPlan:
    """How many embedding actors run, the CPUs each reserves, and its torch threads.

    With `spread`, Ray places the actors on as many nodes as it can.
    """

    num_workers: int
    cpus_per_worker: float
    torch_threads: int
    spread: bool


def plan_workers(
    node_cpus: list[float], num_workers: int = 0, cpus_per_worker: float = AUTO
) -> WorkerPlan:
    """Size the actor pool so that a whole CPU stays free for Ray Data's own tasks.

    Ray Data's file listing, read and write tasks each reserve a whole CPU on
    one node (Ray 2.60). When the actors reserve the rest, those tasks never
    start and the job hangs. So by default there is one actor per CPU in the
    cluster, spread over the nodes. Each reserves (C - 1) / C of a CPU, where C
    is the CPU count of the smallest node, so every node keeps about one CPU free.
    On one 2-CPU machine that is two actors at 0.5 CPU. Each actor runs torch on
    one thread unless it reserves more than one CPU.
    """
    node_cpus = [cpus for cpus in node_cpus if cpus > 0] or [1.0]
    total = sum(node_cpus)
    smallest = min(node_cpus)
    if num_workers <= 0:
        num_workers = max(1, int(total))
    if cpus_per_worker < 0:
        cpus_per_worker = (smallest - 1) / smallest
    if num_workers * cpus_per_worker > total:
        raise TagcliError(
            f"{num_workers} workers at {cpus_per_worker:g} CPU each need "
            f"{num_workers * cpus_per_worker:g} CPUs, but the Ray cluster has "
            f"{total:g}; lower --workers or --cpus-per-worker.",
            exit_code=2,
        )
    threads = max(1, int(cpus_per_worker))
    return WorkerPlan(
        num_workers, round(cpus_per_worker, 3), threads, len(node_cpus) > 1
    )


def connect(address: str | None) -> bool:
    """Connect to the Ray cluster at `address`, or start a local instance.

    Returns True when this call started or joined Ray, so the caller should shut
    it down again. Ray's own log lines go to its session folder, not the terminal.
    """
    if not address:
        # Ray replaces 127.0.0.1 with the machine's network address unless
        # multi-node support is off; a local instance needs none, so it stays
        # on loopback. Read by Ray at import, hence before the import below.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import ray
    import ray.data  # noqa: F401  (configures the ray.data logger, silenced below)

    if ray.is_initialized():
        return False
    _quiet_ray_loggers()

    runtime_env = {"env_vars": dict(WORKER_ENV)}
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    options = dict(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=_ray_log_level(),
        runtime_env=runtime_env,
    )
    try:
        if address:
            log.info("Connecting to the Ray cluster at %s", address)
            host = _loopback_host(address)
            if host:
                # A cluster on this machine's loopback: the driver must use the
                # head's address to find its raylet.
                options["_node_ip_address"] = host
            ray.init(address=address, **options)
        else:
            # address="local" starts a new instance even when `ray start` left
            # a cluster on this machine.
            ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a local instance"
        raise TagcliError(
            f"Cannot start or reach Ray at {where}: {error}. Check --address "
            "(or RAY_ADDRESS) and that `ray status` works for that cluster."
        ) from error
    _quiet_ray_loggers()
    return True


def _loopback_host(address: str) -> str | None:
    """Return the host of `address` when it is a 127.x.x.x address, else None."""
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host if host.startswith("127.") else None


def _quiet_ray_loggers() -> None:
    """Show Ray's log lines only with -v.

    Ray configures its loggers on import and again in `ray.init`, and its
    start-up warnings (token authentication, deprecations) are noise in cron mail.
    """
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(_ray_log_level())


def _ray_log_level() -> int:
    verbose = logging.getLogger("tagcli").getEffectiveLevel() <= logging.INFO
    return logging.INFO if verbose else logging.ERROR


def node_cpus() -> list[float]:
    """Return the CPU count of each alive node of the connected cluster."""
    import ray

    return [
        float(node["Resources"].get("CPU", 0.0))
        for node in ray.nodes()
        if node.get("Alive")
    ]


@contextmanager
def ray_native_output_to_file() -> Iterator[Path | None]:
    """Send what Ray's C++ core writes to file descriptor 2 into a log file.

    Ray's core worker in this process, and the GCS and raylet of a local
    instance, print start-up lines and an "E" line about constructor arguments
    on every Ray Data job straight to descriptor 2, past Python's logging.
    Python's own sys.stderr keeps writing to the terminal through a duplicate
    of the original descriptor. The file is removed after a clean run and
    named in an error log line after a failure. With -v nothing is redirected.
    """
    if _ray_log_level() <= logging.INFO:
        yield None
        return

    try:
        python_uses_descriptor = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        python_uses_descriptor = False
    sys.stderr.flush()
    saved = os.dup(2)
    handle, name = tempfile.mkstemp(prefix="tagcli-ray-", suffix=".log")
    os.dup2(handle, 2)
    os.close(handle)

    original = sys.stderr
    handlers = []
    if python_uses_descriptor:
        sys.stderr = os.fdopen(
            os.dup(saved), "w", buffering=1, errors="backslashreplace"
        )
        handlers = [
            handler
            for handler in logging.getLogger().handlers
            if isinstance(handler, logging.StreamHandler) and handler.stream is original
        ]
        for handler in handlers:
            handler.setStream(sys.stderr)

    failed = False
    try:
        yield Path(name)
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if python_uses_descriptor:
            replacement = sys.stderr
            sys.stderr = original
            for handler in handlers:
                handler.setStream(original)
            replacement.close()
        if failed:
            log.error("Ray's own messages from this run are in %s", name)
        else:
            os.unlink(name)
