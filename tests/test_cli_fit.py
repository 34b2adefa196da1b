"""`celebctl add` and `celebctl joint` through the CLI: exit codes, errors, files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from celebctl import paths, registry
from celebctl.cli import app

runner = CliRunner()
# Every fit here runs on the CPU, also on a host with CUDA: `--device auto` would pick the GPU
# there (bf16, CUDA graphs), and these tests are about the CLI, not the device (the gpu-marked
# tests in test_speed_paths.py cover CUDA).
CPU = ["--device", "cpu"]
FAST = ["--model", "tiny", "--steps", "2", "--quiet", *CPU]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _registry_files():
    root = paths.identities_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_add_writes_identity(tiny_home, photo_path):
    result = invoke("add", "alice", photo_path, *FAST, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["identities"] == ["alice"] and data["model"] == "tiny"
    assert data["fit"]["steps"] == 2
    ident = registry.get_identity("alice")
    assert ident.meta["fit"]["steps"] == 2
    assert "random weights" in result.stderr
    result = invoke("add", "alice", photo_path, *FAST)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: Identity 'alice' already exists. Use --replace to overwrite it, or pick "
        "another name."
    )
    result = invoke("add", "alice", photo_path, *FAST, "--replace", "--seed", "4")
    assert result.exit_code == 0
    assert registry.get_identity("alice").meta["fit"]["seed"] == 4


def test_add_shows_progress(tiny_home, photo_path):
    result = invoke("add", "alice", photo_path, "--model", "tiny", "--steps", "3", *CPU)
    assert result.exit_code == 0
    assert "Fitting" in result.stderr and "3/3" in result.stderr and "loss" in result.stderr
    assert "Added 'alice'" in result.stdout
    # 3 steps have no "first/last 10 steps" to average: the line says what it shows.
    line = " ".join(result.stdout.split())
    assert "mean of first/last 10" not in line
    assert re.search(r"3 steps in \d+\.\d s, loss \d+\.\d{4} -> \d+\.\d{4} "
                     r"\(first -> last step\)\.", line), line


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "noface", "directory"])
def test_add_bad_photos(tiny_home, tmp_path, kind):
    path = tmp_path / "photo.jpg"
    if kind == "text":
        path.write_text("hello, I am not a picture")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "noface":
        Image.new("RGB", (256, 256), (128, 128, 128)).save(path, format="JPEG")
    elif kind == "directory":
        path.mkdir()
    before = _registry_files()
    result = invoke("add", "alice", path, *FAST)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ")
    assert "photo.jpg" in result.stderr
    if kind == "noface":
        assert "No face found in" in result.stderr
    assert "Traceback" not in result.output
    assert _registry_files() == before


def test_add_bad_name_and_options(tiny_home, photo_path, monkeypatch):
    import torch

    result = invoke("add", "The", photo_path, *FAST)
    assert result.exit_code == 1 and "use lowercase" in result.stderr
    # --device cuda on a host without CUDA (this one made so, so that the test also holds on a
    # host with a GPU, where the fit would simply run).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("add", "alice", photo_path, "--model", "tiny", "--steps", "2", "--quiet",
                    "--device", "cuda")
    assert result.exit_code == 1 and "no CUDA GPU is available" in result.stderr
    monkeypatch.undo()
    result = invoke("add", "alice", photo_path, *FAST, "--resolution", "100")
    assert result.exit_code == 1 and "multiple of 8" in result.stderr
    assert _registry_files() == []


def test_face_option_picks(tiny_home, photo_path, tmp_path):
    with Image.open(photo_path) as image:
        face = image.convert("RGB").crop((150, 30, 300, 210))
    canvas = Image.new("RGB", (700, 400), (200, 200, 200))
    canvas.paste(face.resize((150, 180)), (40, 100))
    canvas.paste(face.resize((300, 360)), (360, 20))
    group = tmp_path / "group.png"
    canvas.save(group)
    result = invoke("add", "alice", group, *FAST)
    assert result.exit_code == 0, result.output
    assert "2 faces found" in result.stderr
    assert registry.get_identity("alice").meta["sources"][0]["face_index"] == 2
    result = invoke("add", "bob", group, *FAST, "--face", "1")
    assert result.exit_code == 0
    assert registry.get_identity("bob").meta["sources"][0]["face_index"] == 1
    result = invoke("add", "carol", group, *FAST, "--face", "3")
    assert result.exit_code == 1 and "out of range" in result.stderr


def test_joint_cli(tiny_home, photo_path):
    for name in ("alice", "bob"):
        assert invoke("add", name, photo_path, *FAST).exit_code == 0
    before = {n: registry.get_identity(n).load_coefficients() for n in ("alice", "bob")}
    result = invoke("joint", "alice", "bob", "--steps", "3", "--quiet", "--json", *CPU)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identities"] == ["alice", "bob"]
    for name in ("alice", "bob"):
        assert not np.array_equal(registry.get_identity(name).load_coefficients(), before[name])
    result = invoke("joint", "alice", "alise", "--quiet", *CPU)
    assert result.exit_code == 1
    assert "No identity 'alise'. Did you mean 'alice'?" in result.stderr


def test_interrupt_writes_nothing(tiny_home, photo_path, monkeypatch):
    calls = []

    def interrupt_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    from celebctl.fitstep import TrainStep

    real = TrainStep.run
    monkeypatch.setattr(TrainStep, "run", interrupt_on_third)
    result = invoke("add", "alice", photo_path, "--model", "tiny", "--steps", "10", "--quiet",
                    *CPU)
    assert result.exit_code == 130
    assert "nothing was written" in result.stderr
    assert _registry_files() == []


def test_ctrl_c_in_a_real_process(tiny_home, photo_path):
    env = {**os.environ, "CELEBCTL_HOME": str(tiny_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celebctl", "add", "alice", str(photo_path), "--model", "tiny",
         "--steps", "100000", *CPU],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        # A job started in the background of a script (`make test &`) inherits SIGINT ignored,
        # and Python then installs no Ctrl-C handler: give the child the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Wait until the model is loading or fitting (the basis note is printed just before; on a
        # pipe rich draws the bar only at the end), then press Ctrl-C.
        deadline = time.time() + 900
        seen = b""
        fd = proc.stderr.fileno()
        os.set_blocking(fd, False)
        while time.time() < deadline and b"Basis" not in seen and proc.poll() is None:
            try:
                seen += os.read(fd, 65536)
            except BlockingIOError:
                time.sleep(0.2)
        assert b"Basis" in seen, seen
        time.sleep(5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        assert proc.returncode == 130
        assert b"Interrupted; nothing was written." in (proc.stderr.read() or b"") + seen
    finally:
        if proc.poll() is None:  # never leave a runaway fit behind
            proc.kill()
            proc.wait(30)
    assert _registry_files() == []
