"""`tagcli tag` as a subprocess on real Ray: a two-node cluster and a killed worker."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import SAMPLE_CSV, read_output

BIN = Path(sys.executable).parent
TAGCLI = [sys.executable, "-m", "tagcli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_batch(path: Path, rows: int) -> pl.DataFrame:
    """Write `rows` unique rows built from the sample data to `path` and return them."""
    sample = pl.read_csv(SAMPLE_CSV, infer_schema=False).drop("tag")
    repeats = -(-rows // sample.height)
    frame = pl.concat([sample] * repeats).head(rows).with_row_index("n")
    frame = frame.with_columns(
        pl.col("n").cast(pl.Utf8).alias("id"),
        (pl.col("title") + " #" + pl.col("n").cast(pl.Utf8)).alias("title"),
    ).drop("n")
    frame.write_parquet(path)
    return frame


def cluster_env(tmp_path: Path) -> dict:
    """Environment for every process of the test cluster: one shared auth token.

    Multi-node mode is on, because `ray start --address` refuses to run without it.
    """
    token_path = tmp_path / "ray-token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    env.pop("RAY_ADDRESS", None)
    return env


def start_node(env: dict, *args: str) -> subprocess.Popen:
    """Start `ray start --block ...` in its own process group."""
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            "--num-cpus=1",
            *args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_node(node: subprocess.Popen, temp_dir: str) -> None:
    """Stop a node started by start_node, and any process left in its temp folder."""
    try:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    subprocess.run(["pkill", "-KILL", "-f", temp_dir], check=False)


def cluster_status(env: dict, address: str) -> str:
    status = subprocess.run(
        [str(BIN / "ray"), "status", f"--address={address}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    return status.stdout


@pytest.fixture
def two_node_cluster(tmp_path):
    """A Ray head and a second worker node, one CPU each, on loopback addresses.

    Ray rewrites 127.0.0.1 to the machine's network address, but not other
    addresses of 127.0.0.0/8, so the nodes use 127.0.0.2 and 127.0.0.3.
    """
    env = cluster_env(tmp_path)
    port = free_port()
    address = f"127.0.0.2:{port}"
    # Ray's socket paths must stay short, so not under tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="ray-tagcli-", dir="/tmp")
    head = start_node(
        env,
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.2",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
    )
    worker = None
    try:
        deadline = time.monotonic() + 90
        while "/1.0 CPU" not in cluster_status(env, address):
            assert time.monotonic() < deadline, "the head node did not start"
            time.sleep(1)
        worker = start_node(env, f"--address={address}", "--node-ip-address=127.0.0.3")
        while "/2.0 CPU" not in cluster_status(env, address):
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(1)
        yield address
    finally:
        if worker is not None:
            stop_node(worker, temp_dir)
        stop_node(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_node_cluster_tags_every_row(tmp_path, small_model, two_node_cluster):
    batch = make_batch(tmp_path / "batch.parquet", 300)
    output = tmp_path / "tagged.parquet"

    env = cluster_env(tmp_path)

    completed = subprocess.run(
        [
            *TAGCLI,
            "tag",
            str(tmp_path / "batch.parquet"),
            "-o",
            str(output),
            "--model",
            str(small_model),
            # The rows differ only by a number in the title: near duplicates.
            "--keep-duplicates",
            "--address",
            two_node_cluster,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )

    assert completed.returncode == 0, completed.stderr
    assert "on Ray, 2 worker(s)" in completed.stdout
    # Ray's C++ log lines go to a file, not to the terminal or cron mail.
    assert "core_worker.cc" not in completed.stderr
    assert "logging.cc" not in completed.stderr
    tagged = read_output(output)
    assert tagged.height == batch.height
    assert tagged["id"].to_list() == batch["id"].to_list()
    assert tagged["tag"].null_count() == 0


def _tag_worker_pids(job_pid: int) -> list[int]:
    """Return the pids of embedding actors started under `job_pid`.

    Only descendants count: other jobs on a shared machine run actors of the
    same name.
    """
    listing = subprocess.run(
        ["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True
    )
    parents = {}
    workers = []
    for line in listing.stdout.splitlines()[1:]:
        pid, ppid, args = line.split(None, 2)
        parents[int(pid)] = int(ppid)
        if "MapBatches(TagWorker)" in args:
            workers.append(int(pid))

    def under_job(pid: int) -> bool:
        while pid in parents and pid > 1:
            if pid == job_pid:
                return True
            pid = parents[pid]
        return False

    return [pid for pid in workers if under_job(pid)]


def test_killed_worker_loses_no_row(tmp_path, small_model):
    batch = make_batch(tmp_path / "batch.parquet", 4000)
    output = tmp_path / "tagged.parquet"
    job = subprocess.Popen(
        [
            *TAGCLI,
            "tag",
            str(tmp_path / "batch.parquet"),
            "-o",
            str(output),
            "--model",
            str(small_model),
            # The rows differ only by a number in the title: near duplicates.
            "--keep-duplicates",
            "--executor",
            "ray",
            "--batch-size",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        pids: list[int] = []
        while time.monotonic() < deadline and len(pids) < 2:
            time.sleep(0.5)
            pids = _tag_worker_pids(job.pid)
        assert len(pids) >= 2, "the embedding actors never started"
        # Let the actors load the model and take their first batches.
        time.sleep(8)
        assert job.poll() is None, "the job ended before a worker could be killed"
        os.kill(pids[0], signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()

    if job.returncode == 0:
        tagged = read_output(output)
        assert tagged.height == batch.height
        assert tagged["id"].to_list() == batch["id"].to_list()
        assert tagged["id"].n_unique() == batch.height
    else:
        assert not output.exists(), stderr
        assert "Error" in stderr
