"""`add-many` under torchrun, for real: two processes on the gloo backend, on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from celebctl import registry
from tests.test_add_many import noise_photo, variants

FIT = ["--model", "tiny", "--steps", "12", "--pool-size", "2", "--pack", "1", "--device", "cpu"]


def _torchrun(manifest: Path, marker: str) -> subprocess.Popen:
    env = dict(os.environ, CELEBCTL_TEST_JOB=marker, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "celebctl", "add-many", str(manifest), *FIT, "--json", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the worker of this job with RANK=rank (read from /proc)."""
    wanted = {f"CELEBCTL_TEST_JOB={marker}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            return int(entry.name)
    return None


def _manifest(root: Path) -> Path:
    photos = root / "photos"
    photos.mkdir()
    for name, image in variants().items():
        image.save(photos / f"{name}.png")
    noise_photo(photos / "noise.png")
    rows = ["name,photo", "alice,photos/alice.png", "bob,photos/bob.png",
            "frank,photos/noise.png", "carol,photos/carol.png", "dave,photos/dave.png",
            "erin,photos/erin.png"]
    (root / "people.csv").write_text("\n".join(rows) + "\n")
    return root / "people.csv"


def test_two_ranks_share_the_job_survive_a_killed_rank_and_finish_on_rerun(tiny_home, tmp_path):
    manifest = _manifest(tmp_path)
    # Shares: rank 0 gets alice, frank, dave; rank 1 gets bob, carol, erin.
    marker = uuid.uuid4().hex
    job = _torchrun(manifest, marker)
    deadline = time.monotonic() + 900
    killed = False
    while job.poll() is None and time.monotonic() < deadline:
        if registry.identity_exists("bob"):  # rank 1 finished its first person: kill it
            pid = _rank_pid(marker, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    job.communicate(timeout=900)
    assert killed, "rank 1 never registered its first person"
    assert job.returncode != 0  # torchrun reports the dead worker
    # Nothing torn: every identity written so far reads back whole, and bob is there.
    scan = registry.list_identities()
    assert not scan.warnings, scan.warnings
    assert "bob" in {i.name for i in scan.identities}
    for ident in scan.identities:
        registry.get_identity(ident.name, verify="all")

    rerun = _torchrun(manifest, uuid.uuid4().hex)
    stdout, stderr = rerun.communicate(timeout=900)
    assert rerun.returncode != 0, stderr  # frank's photo has no face: the job exits 1
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["processes"] == 2
    status = {row["name"]: row["status"] for row in report["people"]}
    assert status.pop("frank") == "failed"
    assert set(status) == {"alice", "bob", "carol", "dave", "erin"}
    assert set(status.values()) <= {"added", "skipped"} and status["bob"] == "skipped"
    assert {row["rank"] for row in report["people"] if row["status"] == "added"} <= {0, 1}
    assert sorted(i.name for i in registry.list_identities().identities) == [
        "alice", "bob", "carol", "dave", "erin"]


def test_a_first_job_in_an_empty_home_works_on_every_rank(celebctl_home, tmp_path):
    """Under torchrun the process group is initialised before the built-in model is cached;
    every rank must still find (or write) a complete cache, not just rank 0."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = ["name,photo"]
    for name in ("alice", "bob"):
        variants()[name].save(photos / f"{name}.png")
        rows.append(f"{name},photos/{name}.png")
    (tmp_path / "people.csv").write_text("\n".join(rows) + "\n")
    job = _torchrun(tmp_path / "people.csv", uuid.uuid4().hex)
    stdout, stderr = job.communicate(timeout=900)
    assert job.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert [(r["name"], r["status"], r["rank"]) for r in report["people"]] == [
        ("alice", "added", 0), ("bob", "added", 1)]
