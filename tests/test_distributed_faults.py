"""Processes of a job that never arrive or die (issue 24, point 3), for real: plain processes
with the launcher's variables, and two torchrun agents (two gloo processes) with one killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from celebctl import distributed, paths, registry
from celebctl.errors import InvalidOption
from tests.test_add_many import variants
from tests.test_add_many_torchrun import _rank_pid

FIT = ["--model", "tiny", "--steps", "2", "--pool-size", "2", "--pack", "1", "--device", "cpu"]
TIMEOUT = 600  # only catches a hang; the machine may be busy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(root: Path, names=("alice", "bob")) -> Path:
    rows = ["name,photo"]
    for name in names:
        variants()[name].save(root / f"{name}.png")
        rows.append(f"{name},{name}.png")
    (root / "people.csv").write_text("\n".join(rows) + "\n")
    return root / "people.csv"


def _clean(stderr: str) -> str:
    return " ".join(stderr.split())


def test_the_rendezvous_timeout_is_read_from_the_environment():
    assert distributed.rendezvous_timeout({}) == distributed.DEFAULT_RENDEZVOUS_TIMEOUT_S
    assert distributed.rendezvous_timeout({"CELEBCTL_RENDEZVOUS_TIMEOUT": "42"}) == 42
    for bad in ("soon", "0", "-5", "nan"):
        with pytest.raises(InvalidOption, match="CELEBCTL_RENDEZVOUS_TIMEOUT"):
            distributed.rendezvous_timeout({"CELEBCTL_RENDEZVOUS_TIMEOUT": bad})


@pytest.mark.parametrize("launcher", [
    {"RANK": "1", "WORLD_SIZE": "2"},  # torchrun's variables, the other process lost
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},  # srun's, the second task lost
])
def test_a_process_that_never_arrives_stops_the_job_with_who_waits_where(
        tiny_home, tmp_path, launcher):
    manifest = _manifest(tmp_path, ("alice",))
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(launcher, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               CELEBCTL_RENDEZVOUS_TIMEOUT="7")
    job = subprocess.run([sys.executable, "-m", "celebctl", "add-many", str(manifest), *FIT],
                         capture_output=True, text=True, env=env, timeout=TIMEOUT,
                         stdin=subprocess.DEVNULL)
    said = _clean(job.stderr)
    rank = launcher.get("RANK", launcher.get("SLURM_PROCID"))
    assert job.returncode == 1, said[-3000:]
    assert "Traceback" not in job.stderr
    assert f"Rank {rank} of 2 is waiting for the other 1 process(es) at 127.0.0.1:{port}" in said
    assert f"Error: Rank {rank} of 2 waited" in said
    assert f"for the other 1 process(es) at 127.0.0.1:{port}; they never arrived" in said
    assert "CELEBCTL_RENDEZVOUS_TIMEOUT=SECONDS waits longer" in said
    assert not registry.identity_exists("alice")


def _agent(manifest: Path, port: int, node: int, marker: str) -> subprocess.Popen:
    """The torchrun agent of node ``node`` of a two-machine job (one process each; node 0's
    agent holds the job's store, as on a real first node)."""
    env = dict(os.environ, CELEBCTL_TEST_JOB=marker, PYTHONUNBUFFERED="1",
               CELEBCTL_RENDEZVOUS_TIMEOUT="10")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port",
         str(port), "-m", "celebctl", "add-many", str(manifest), *FIT, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        stdin=subprocess.DEVNULL)


def test_rank_0_stops_waiting_for_a_killed_rank_and_names_it(tiny_home, tmp_path):
    manifest = _manifest(tmp_path)  # rank 0 fits alice, rank 1 bob
    port, marker = _free_port(), uuid.uuid4().hex
    survivor, lost = _agent(manifest, port, 0, marker), _agent(manifest, port, 1, marker)
    try:
        # Wait until rank 1 has claimed bob (it is fitting), then lose its whole machine:
        # the worker and its agent, with kill -9.
        claim = paths.claims_dir() / "bob.claim"
        deadline = time.monotonic() + TIMEOUT
        while not claim.exists() and time.monotonic() < deadline:
            assert survivor.poll() is None and lost.poll() is None, lost.communicate()
            assert not registry.identity_exists("bob"), "bob was fitted before the kill"
            time.sleep(0.05)
        os.kill(_rank_pid(marker, 1), signal.SIGKILL)
        lost.kill()
        _, stderr = survivor.communicate(timeout=TIMEOUT)
    finally:
        for agent in (survivor, lost):
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    said = _clean(stderr)
    assert survivor.returncode != 0, said[-3000:]
    assert "Error: Rank 1 of 2 stopped answering: no sign of life for" in said, said[-3000:]
    assert "Rank 0 of 2 stops waiting for it" in said
    assert "Traceback" not in stderr.split("Error: Rank 1")[0][-2000:]
    assert registry.identity_exists("alice") and not registry.identity_exists("bob")
