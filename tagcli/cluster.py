"""Connecting to Ray and sizing the embedding workers for the CPUs it reports."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tagcli.errors import TagcliError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """How many embedding actors run, the CPUs each reserves, and its torch threads."""

    num_workers: int
    cpus_per_worker: float
    torch_threads: int


def plan_workers(
    total_cpus: float, num_workers: int = 0, cpus_per_worker: float = 0.0
) -> WorkerPlan:
    """Size the actor pool so that one CPU stays free for read and write tasks.

    Ray Data's read and write tasks need a CPU of their own. When the actors
    reserve every CPU, the read task never gets one and the job hangs, so by
    default there is one actor per CPU, each reserving (CPUs - 1) / CPUs of a
    CPU. Each actor runs torch on one thread, because Ray sets an actor's thread
    count from its CPU reservation, which would round 0.5 down to 1 anyway.
    """
    total = max(1.0, float(total_cpus))
    if num_workers <= 0:
        num_workers = max(1, int(total))
    if cpus_per_worker <= 0:
        spare = 1.0 if total > 1 else 0.5
        cpus_per_worker = max(0.1, (total - spare) / num_workers)
    if num_workers * cpus_per_worker > total:
        raise TagcliError(
            f"{num_workers} workers at {cpus_per_worker} CPU each need "
            f"{num_workers * cpus_per_worker:g} CPUs, but Ray reports {total:g}; "
            "lower --workers or --cpus-per-worker.",
            exit_code=2,
        )
    threads = max(1, int(cpus_per_worker))
    return WorkerPlan(num_workers, round(cpus_per_worker, 3), threads)


def connect(address: str | None) -> bool:
    """Connect to the Ray cluster at `address`, or start a local instance.

    Returns True when this call started or joined Ray, so the caller should shut
    it down again. Ray's own log lines go to its session folder, not the terminal.
    """
    import ray
    import ray.data  # noqa: F401  (configures the ray.data logger, silenced below)

    if ray.is_initialized():
        return False
    _quiet_ray_loggers()
    if _ray_log_level() > logging.INFO:
        # Ray Data's actor pool makes the driver's core worker log an "E" line
        # about constructor arguments on every run; Ray's own log files keep it.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")

    runtime_env = {
        "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    }
    options = dict(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=_ray_log_level(),
        runtime_env=runtime_env,
    )
    try:
        if address:
            log.info("Connecting to the Ray cluster at %s", address)
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a local instance"
        raise TagcliError(
            f"Cannot start or reach Ray at {where}: {error}. Check --address "
            "(or RAY_ADDRESS) and that `ray status` works for that cluster."
        ) from error
    _quiet_ray_loggers()
    return True


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


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
