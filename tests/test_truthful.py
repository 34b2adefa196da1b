"""Hardening II, class 6: messages tell the truth, and privacy holds.

After Ctrl-C or a failure, celebctl says what was written; advice names a fix that works; a set
of identities refitted together is read whole; removing an identity removes every trace of its
biometric data; only whole words are names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celebctl import fitting, paths, prompting, registry, rendering
from celebctl.errors import IdentityChanged
from tests.helpers import PHOTO, add_identity

runner = CliRunner()
FIT = ["--model", "tiny", "--steps", "1", "--quiet"]


def invoke(*args, **kwargs):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args], **kwargs)


def _interrupt_once(monkeypatch, module, name):
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_ctrl_c_after_add_replace_committed_says_so(home, monkeypatch):
    before = registry.get_identity("alice").meta["files"]["coefficients"]["sha256"]
    # forget_in_list_cache runs right after the new identity.toml is in place.
    _interrupt_once(monkeypatch, registry.writing, "forget_in_list_cache")
    result = invoke("add", "alice", PHOTO, "--replace", "--seed", "5", *FIT)
    assert result.exit_code == 130
    assert "identity 'alice' was written in full" in result.stderr, result.stderr
    assert "nothing was written" not in result.stderr
    assert registry.get_identity("alice").meta["files"]["coefficients"]["sha256"] != before


def test_ctrl_c_before_the_commit_says_nothing_was_written(home, monkeypatch):
    before = registry.get_identity("alice").meta["files"]["coefficients"]["sha256"]
    _interrupt_once(monkeypatch, fitting.identities, "fit_identities")
    result = invoke("add", "alice", PHOTO, "--replace", *FIT)
    assert result.exit_code == 130 and "Interrupted; nothing was written." in result.stderr
    assert registry.get_identity("alice").meta["files"]["coefficients"]["sha256"] == before


def test_ctrl_c_after_joint_committed_says_so(home, monkeypatch):
    _interrupt_once(monkeypatch, registry.writing, "_remove_backups")  # after the journal is gone
    result = invoke("joint", "alice", "bob", *FIT)
    assert result.exit_code == 130
    assert "identity 'alice' was written in full" in result.stderr
    assert "identity 'bob' was written in full" in result.stderr


def test_ctrl_c_inside_joint_before_its_commit_rolls_back_and_says_so(home, monkeypatch):
    before = {n: registry.get_identity(n).meta["files"]["coefficients"]["sha256"]
              for n in ("alice", "bob")}
    real = registry.forget_in_list_cache
    calls = []

    def second_commit(names):
        calls.append(list(names))
        if len(calls) == 2:  # bob's commit, with alice already written
            raise KeyboardInterrupt
        return real(names)

    monkeypatch.setattr(registry.writing, "forget_in_list_cache", second_commit)
    result = invoke("joint", "alice", "bob", *FIT)
    assert result.exit_code == 130 and "Interrupted; nothing was written." in result.stderr
    after = {n: registry.get_identity(n).meta["files"]["coefficients"]["sha256"]
             for n in ("alice", "bob")}
    assert after == before


def test_ctrl_c_during_rename_and_remove_reports_the_commit(home, monkeypatch):
    _interrupt_once(monkeypatch, registry.writing, "forget_in_list_cache")
    result = invoke("rename", "bob", "carol")
    assert result.exit_code == 130 and "'bob' was renamed to 'carol'" in result.stderr
    _interrupt_once(monkeypatch, registry.writing, "forget_in_list_cache")
    result = invoke("remove", "carol", "--yes")
    assert result.exit_code == 130 and "identity 'carol' was removed" in result.stderr


def test_a_full_disk_during_render_names_what_was_written(home, tmp_path, monkeypatch):
    out = tmp_path / "renders"
    # Allocating checkpoints per image: create, half write, rest; #5 is image 2's first half.
    monkeypatch.setenv("CELEBCTL_FAULT", "ENOSPC@5")
    result = invoke("render", "alice", "-n", "3", "--steps", "1", "--quiet", "--out", out)
    monkeypatch.delenv("CELEBCTL_FAULT")
    assert result.exit_code == 1, result.output
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["alice-0.png"]  # no hidden temp file either
    message = " ".join(result.stderr.split())
    assert "the disk is full" in message and "Nothing was changed" not in message
    assert f"1 image had been written before: {written[0]}" in message


def test_ctrl_c_during_render_lists_the_images_written(home, tmp_path, monkeypatch):
    real = rendering.render.sample_images
    calls = []

    def interrupt_on_second(*args, **kwargs):  # Ctrl-C while the second batch denoises
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rendering.render, "sample_images", interrupt_on_second)
    out = tmp_path / "r"
    result = invoke("render", "alice", "-n", "3", "--steps", "1", "--quiet", "--out", out,
                    "--batch-size", "1")
    assert result.exit_code == 130
    assert "1 image had been written in full" in result.stderr
    assert str(out / "alice-0.png") in result.stdout


def test_mixed_bases_advice_names_a_fix_that_works(home):
    add_identity("carol", basis_id="c" * 16)
    result = invoke("render", "alice with carol", "--dry-run")
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert "celebctl add NAME PHOTO --replace --model" in message
    assert "joint" not in message
    result = invoke("joint", "alice", "carol", *FIT)
    assert "--replace --model" in " ".join(result.stderr.split())


def test_a_read_only_output_folder_is_not_about_the_data_home(home, tmp_path, monkeypatch):
    monkeypatch.setenv("CELEBCTL_FAULT", "EROFS@1")
    result = invoke("export", "alice", "-f", "a1111", "-o", tmp_path / "a.safetensors")
    monkeypatch.delenv("CELEBCTL_FAULT")
    assert result.exit_code == 1
    assert "read-only" in result.stderr and "CELEBCTL_HOME" not in result.stderr
    assert "choose a writable output path" in result.stderr


# --------------------------------------------------------------------------------------------
# a joint set is read whole


def _journal(pid: int, names: list[str]) -> Path:
    journal = paths.identities_dir() / f"joint.celebctl-tmp-{pid}-1234-joint-journal"
    journal.write_text(json.dumps({"identities": {n: None for n in names}}))
    return journal


def test_a_joint_write_in_progress_is_waited_for(home, monkeypatch):
    monkeypatch.setattr(registry.reading, "JOINT_WAIT_S", 0.3)
    journal = _journal(os.getpid(), ["alice", "bob"])  # a live writer
    with pytest.raises(IdentityChanged, match="rewriting alice, bob"):
        rendering.plan_render("alice and bob")
    rendering.plan_render("a cat")  # prompts without those identities are not held up
    timer = threading.Timer(0.2, journal.unlink)
    timer.start()
    monkeypatch.setattr(registry.reading, "JOINT_WAIT_S", 10)
    plan = rendering.plan_render("alice and bob")
    timer.join()
    assert set(plan.coefficients) == {"alice", "bob"}


def test_an_interrupted_joint_is_reported(home):
    _journal(2**31 - 2, ["alice", "bob"])  # no such process
    result = invoke("render", "alice", "--dry-run")
    assert result.exit_code == 1 and "was interrupted" in result.stderr
    assert "celebctl doctor --fix" in result.stderr
    assert invoke("doctor", "--fix").exit_code == 0
    assert invoke("render", "alice", "--dry-run").exit_code == 0


def test_an_identity_replaced_while_it_is_read_is_read_again(home, monkeypatch):
    real = registry.get_identity
    swapped = []

    def racing(name, verify="all"):
        ident = real(name, verify)
        if name == "alice" and not swapped:  # bob changes right after alice was read
            swapped.append(1)
            registry.save_identity(registry.IdentityWrite(
                name="bob", coefficients=ident.load_coefficients() * 0.5,
                meta={k: v for k, v in real("bob").meta.items()
                      if k not in ("files", "name", "schema_version")}), replace=True)
        return ident

    monkeypatch.setattr(registry.reading, "get_identity", racing)
    idents = registry.read_identity_set(["alice", "bob"])
    monkeypatch.setattr(registry.reading, "get_identity", real)
    np.testing.assert_array_equal(idents[1].load_coefficients(),
                                  real("bob").load_coefficients())


def test_render_during_a_real_joint_never_mixes_old_and_new(home, tmp_path):
    """A `joint` process is held right after it committed alice; render must wait for bob."""
    trace = tmp_path / "trace"
    env = dict(os.environ, CELEBCTL_HOME=str(paths.data_home()))
    probe_home = tmp_path / "probe"
    shutil.copytree(paths.data_home(), probe_home)
    subprocess.run([sys.executable, "-m", "celebctl", "joint", "alice", "bob", *FIT],
                   env=dict(env, CELEBCTL_HOME=str(probe_home), CELEBCTL_FAULT_TRACE=str(trace)),
                   check=True, capture_output=True, timeout=900)
    rows = [line.split(" ", 2) for line in trace.read_text().splitlines()]
    alice_commit = next(int(n) for n, kind, where in rows
                        if kind == "rename" and where.endswith("/alice/identity.toml"))
    go, trace2 = tmp_path / "go", tmp_path / "trace2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celebctl", "joint", "alice", "bob", *FIT],
        env=dict(env, CELEBCTL_FAULT=f"wait@{alice_commit + 1}:{go}",
                 CELEBCTL_FAULT_TRACE=str(trace2)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while len(trace2.read_text().splitlines() if trace2.exists() else []) <= alice_commit:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    # alice is new on disk now, bob still old: a plain read would mix them.
    threading.Timer(1.0, go.touch).start()
    plan = rendering.plan_render("alice and bob")
    assert proc.wait(timeout=900) == 0, proc.communicate()
    for name in ("alice", "bob"):
        np.testing.assert_array_equal(plan.coefficients[name],
                                      registry.get_identity(name).load_coefficients())


# --------------------------------------------------------------------------------------------
# privacy: no biometric trace left behind


def _cache() -> dict:
    path = paths.data_home() / "cache" / "list-index.json"
    return json.loads(path.read_text()) if path.exists() else {"entries": {}}


def test_the_list_cache_never_holds_biometric_detail(home):
    assert invoke("list").exit_code == 0
    text = json.dumps(_cache())
    for secret in ("photo_sha256", "face_box", "sha256", "astronaut"):
        assert secret not in text, secret
    assert set(_cache()["entries"]) == {"alice", "bob"}


def test_remove_and_rename_drop_the_cache_entry_at_once(home):
    assert invoke("list").exit_code == 0
    assert invoke("remove", "alice", "--yes").exit_code == 0
    assert "alice" not in _cache()["entries"]
    assert invoke("rename", "bob", "carol").exit_code == 0
    assert set(_cache()["entries"]) == set()
    assert invoke("list").exit_code == 0 and set(_cache()["entries"]) == {"carol"}


def test_an_identity_from_the_list_cache_still_loads_fully(home):
    invoke("list")
    cached = [i for i in registry.list_identities().identities if i.name == "alice"][0]
    assert not cached.complete
    assert cached.load_coefficients().shape[0] == 2 and cached.load_face_png()


# --------------------------------------------------------------------------------------------
# only whole words are names


@pytest.mark.parametrize("text, found", [
    ("alice's portrait", ["alice"]),
    ("don't stop, it's late", []),
    ("o'brien's hat", []),
    ("a photo of 'alice'", ["alice"]),
    ("james' dog and s", ["s"]),
    ("ALICE\u2019S cat", ["alice"]),
    ("rock'n'roll t", ["t"]),
])
def test_only_whole_words_are_names(text, found):
    parsed = prompting.parse_prompt(text, ["alice", "s", "t", "don", "brien", "n", "rock"])
    assert parsed.identities == found
