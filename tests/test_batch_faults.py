"""Hardening III (issue 24, points 1, 2, 4 and 6): `add-many` under faults and hostile input,
with real FIFOs, symlink loops and concurrent processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from celebctl import registry
from celebctl.fitting import people
from tests.test_add_many import FIT, people_folder

runner = CliRunner()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX special files")
TIMEOUT = 600  # only catches a hang; the machine may be busy


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


def celebctl(*args, env_extra=None, cwd=None):
    """The real entry point in a subprocess, so a hang fails the test instead of stalling it."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "celebctl", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          stdin=subprocess.DEVNULL, cwd=cwd)


def _refused(result, *phrases):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


# point 1: a manifest that is a FIFO, a link to a device, or too big


def test_a_manifest_that_is_a_fifo_is_refused_at_once(tmp_path, no_models):
    manifest = tmp_path / "fifo.csv"
    os.mkfifo(manifest)
    _refused(celebctl("add-many", manifest, *FIT), "fifo.csv is a named pipe (FIFO)",
             "give a .csv/.tsv text file")


def test_a_manifest_linked_to_a_device_is_refused(tmp_path):
    manifest = tmp_path / "zero.csv"
    manifest.symlink_to("/dev/zero")
    _refused(celebctl("add-many", manifest, *FIT), "zero.csv is a device")


def test_a_manifest_over_the_cap_is_refused_without_reading_it(tmp_path, monkeypatch, no_models):
    manifest = tmp_path / "big.csv"
    with open(manifest, "wb") as f:
        f.truncate(people.MAX_MANIFEST_BYTES + 1)  # sparse: nothing to read anyway
    result = invoke("add-many", manifest, *FIT)
    assert result.exit_code == 1, result.output
    assert "Error: The manifest" in result.stderr and "is larger than 64 MiB" in result.stderr
    assert "split it" in result.stderr and no_models == []


def test_an_unreadable_manifest_is_an_error_not_a_traceback(tmp_path):
    manifest = tmp_path / "locked.csv"
    manifest.write_text("name,photo\n")
    manifest.chmod(0)
    if os.access(manifest, os.R_OK):
        pytest.skip("running as root: permissions are not enforced")
    _refused(celebctl("add-many", manifest, *FIT), "Cannot read the manifest",
             "Permission denied")


# point 2: symlink loops as a person's folder, as a photo, as a manifest's photo


def test_symlink_loops_fail_their_person_only_when_listing(tmp_path):
    folder = people_folder(tmp_path)
    (folder / "loopy").symlink_to("loopy")
    (folder / "bob" / "again.jpg").symlink_to("again.jpg")
    found = {p.name: p for p in people.read_people(folder)}
    assert found["alice"].problem is None
    assert found["loopy"].problem == f"{folder / 'loopy'} is a symlink loop; it points back to " \
                                     "itself."
    assert "again.jpg is a symlink loop" in found["bob"].problem

    manifest = tmp_path / "m.csv"
    manifest.write_text("name,photo\nalice,people/alice/photo.png\nbob,people/bob/again.jpg\n"
                        "carol,people/nobody.png\n")
    rows = {p.name: p.problem for p in people.read_people(manifest)}
    assert rows["alice"] is None
    assert rows["bob"].endswith("again.jpg is a symlink loop; it points back to itself.")
    assert rows["carol"].startswith("Photo not found")


def test_a_source_that_is_a_symlink_loop_is_an_error(tmp_path):
    (tmp_path / "people").symlink_to("people")
    _refused(celebctl("add-many", tmp_path / "people", *FIT), "is a symlink loop")


def test_a_folder_of_folders_with_loops_fits_the_rest(tiny_home, tmp_path):
    folder = people_folder(tmp_path, names=("alice",))
    (folder / "loopy").symlink_to("loopy")
    (folder / "bob").mkdir()
    (folder / "bob" / "a.png").symlink_to("a.png")
    result = invoke("add-many", folder, *FIT, "--json")
    assert result.exit_code == 1, result.output
    status = {r["name"]: (r["status"], r["reason"]) for r in json.loads(result.stdout)["people"]}
    assert status["alice"] == ("added", "")
    assert status["loopy"][0] == "failed" and "symlink loop" in status["loopy"][1]
    assert status["bob"][0] == "failed" and "a.png is a symlink loop" in status["bob"][1]
    assert [i.name for i in registry.list_identities().identities] == ["alice"]


# point 6: temp files of a bundle write killed with kill -9


def test_a_rerun_removes_the_temp_files_of_killed_bundle_writes_only(home, tmp_path):
    from tests.helpers import PHOTO

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"name,photo\nalice,{PHOTO}\n")
    out = tmp_path / "bundles"
    trace = tmp_path / "trace"
    first = celebctl("add-many", manifest, *FIT, "--bundles", out,
                     env_extra={"CELEBCTL_FAULT_TRACE": str(trace)})
    assert first.returncode == 0, first.stderr
    checkpoints = [line.split(" ", 2) for line in trace.read_text().splitlines()]
    write = next(int(n) for n, kind, path in checkpoints
                 if kind == "write" and "/.alice.celeb.celebctl-tmp-" in path)
    (out / "alice.celeb").unlink()

    killed = celebctl("add-many", manifest, *FIT, "--bundles", out,
                      env_extra={"CELEBCTL_FAULT": f"kill@{write}"})
    assert killed.returncode == -9, killed.stderr
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".alice.celeb.celebctl-tmp-"), left
    # What is not a dead writer's temp file stays: a living writer's, the user's own files.
    mine = {f".bob.celeb.celebctl-tmp-{os.getpid()}-0badf00d", ".alice.celeb.celebctl-tmp-notes",
            "alice.celeb.celebctl-tmp-1-0badf00d.txt", "notes.txt"}
    for name in mine:
        (out / name).write_text("keep")

    rerun = celebctl("add-many", manifest, *FIT, "--bundles", out)
    assert rerun.returncode == 0, rerun.stderr
    assert "Removed 1 temp file(s) that interrupted bundle writes left" in " ".join(
        rerun.stderr.split())
    assert sorted(p.name for p in out.iterdir()) == sorted(mine | {"alice.celeb"})


# point 4: two add-many on one registry


def _six_people(root) -> Path:
    from tests.test_add_many import variants

    photos = root / "photos"
    photos.mkdir()
    rows = ["name,photo"]
    for name, image in variants().items():
        image.save(photos / f"{name}.png")
        rows.append(f"{name},photos/{name}.png")
    rows.append("frank,photos/alice.png")  # a sixth person (the same face, another name)
    (root / "people.csv").write_text("\n".join(rows) + "\n")
    return root / "people.csv"


def _add_many(manifest, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "celebctl", "add-many", str(manifest), *FIT, "--pack", "1",
         "--json", "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def test_two_add_many_at_once_fit_each_person_once_and_both_succeed(tiny_home, tmp_path):
    manifest = _six_people(tmp_path)
    jobs = [_add_many(manifest), _add_many(manifest)]
    reports = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=TIMEOUT)
        assert job.returncode == 0, (stdout, stderr[-3000:])
        reports.append({r["name"]: (r["status"], r["reason"])
                        for r in json.loads(stdout.strip().splitlines()[-1])["people"]})
    names = ["alice", "bob", "carol", "dave", "erin", "frank"]
    for name in names:
        statuses = sorted(report[name][0] for report in reports)
        assert statuses == ["added", "skipped"], (name, reports)
    skipped = [r[n][1] for r in reports for n in names if r[n][0] == "skipped"]
    assert all("already added with these photos" in why or "being fitted by process" in why
               for why in skipped), skipped
    assert not any("--replace" in why for why in skipped)
    assert sorted(i.name for i in registry.list_identities().identities) == names


def test_a_claimed_person_is_skipped_until_its_process_dies(home, tmp_path):
    from celebctl import paths
    from celebctl.storage.claims import try_claim
    from tests.helpers import PHOTO

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"name,photo\ncarol,{PHOTO}\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from celebctl import paths; "
         "from celebctl.storage.claims import try_claim; "
         "c = try_claim(paths.claims_dir(), 'carol'); print(type(c).__name__, flush=True); "
         "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "Claim"
        assert isinstance(try_claim(paths.claims_dir(), "carol"), dict)  # held: not ours
        busy = celebctl("add-many", manifest, *FIT, "--json")
        assert busy.returncode == 0, busy.stderr
        row = json.loads(busy.stdout)["people"][0]
        assert row["status"] == "skipped", row
        assert f"being fitted by process {holder.pid} on " in row["reason"]
        assert not registry.identity_exists("carol")
    finally:
        holder.kill()  # SIGKILL: the claim dies with its process, its file stays behind
        holder.wait()
    assert (paths.claims_dir() / "carol.claim").exists()
    after = invoke("add-many", manifest, *FIT, "--json")
    assert after.exit_code == 0, after.output
    assert json.loads(after.stdout)["people"][0]["status"] == "added"
    assert not (paths.claims_dir() / "carol.claim").exists()  # released claims leave nothing


def test_an_identity_saved_meanwhile_from_the_same_photos_is_skipped(home, tmp_path,
                                                                     monkeypatch):
    """The registry changed between the plan and the save (a job on a file system without
    locks): the same photos are `skipped`, exit 0, no --replace advice; other photos fail."""
    from celebctl.fitting import batch
    from tests.helpers import PHOTO
    from tests.test_add_many import variants

    monkeypatch.setattr(batch, "_plan_person", lambda person, options: ("fit", ""))
    manifest = tmp_path / "m.csv"
    variants()["bob"].save(tmp_path / "mirror.png")
    manifest.write_text(f"name,photo\nalice,{PHOTO}\nbob,{tmp_path / 'mirror.png'}\n")
    result = invoke("add-many", manifest, *FIT, "--json")
    rows = {r["name"]: (r["status"], r["reason"]) for r in json.loads(result.stdout)["people"]}
    assert rows["alice"] == ("skipped", "added meanwhile by another process with these photos")
    assert rows["bob"][0] == "failed" and "Use --replace" in rows["bob"][1]
    assert result.exit_code == 1  # bob's failure only
