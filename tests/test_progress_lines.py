"""Progress when stderr is not a terminal: plain lines at a steady pace (issue 24, point 8)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from celebctl.cli import app
from celebctl.cli.progress import PlainProgress

runner = CliRunner()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_tenth_and_at_the_end():
    lines: list[str] = []
    clock = Clock()
    progress = PlainProgress(lines.append, clock=clock)
    for step in range(401):
        clock.now = step * 0.1  # 10 steps a second
        progress("fit", step, 400, {"loss": 1.0 / (step + 1)})
    # 0 %, 10 %, ..., 100 %: eleven lines, the last one once.
    assert len(lines) == 11, lines
    assert lines[0].startswith("Fitting: 0/400 (0 %), loss 1.0000")
    assert re.match(r"Fitting: 40/400 \(10 %\), loss 0\.0244, 10\.00 it/s, elapsed 4 s, "
                    r"ETA 36 s$", lines[1]), lines[1]
    assert lines[-1].startswith("Fitting: 400/400 (100 %)") and "ETA" not in lines[-1]
    progress("fit", 400, 400, {})
    assert len(lines) == 11  # the end is said once


def test_a_line_every_30_seconds_when_a_tenth_takes_longer():
    lines: list[str] = []
    clock = Clock()
    progress = PlainProgress(lines.append, clock=clock)
    for image in range(101):
        clock.now = image * 5.0  # 5 s an image: a tenth takes 50 s
        progress("images", image, 1000, {})
    # The first line, one when 30 s have passed since the last (every 6 images: 6 .. 96), and
    # one at image 100, the first tenth.
    assert len(lines) == 1 + 16 + 1, lines
    assert lines[-1].startswith("Rendering images: 100/1000 (10 %)")
    assert lines[1].startswith("Rendering images: 6/1000 (1 %), 0.20 it/s, elapsed 30 s, ETA ")
    assert lines[1].endswith("ETA 1h22m")


def test_loads_and_notes_are_lines_and_a_new_run_of_a_phase_starts_over():
    lines: list[str] = []
    progress = PlainProgress(lines.append, clock=Clock())
    progress("load", 0, 0, {"model": "tiny", "part": "UNet"})
    progress("load", 1, 1, {"model": "tiny", "seconds": 2.0})
    progress("note", 0, 0, {"message": "a note"})
    progress("render", 5, 5, {})
    progress("render", 0, 5, {})  # the next render call
    assert lines == ["Loading tiny: UNet ...", "Loaded tiny in 2.0 s", "a note",
                     "Denoising: 5/5 (100 %), elapsed 0 s", "Denoising: 0/5 (0 %), elapsed 0 s"]


def test_add_with_stderr_in_a_file_prints_plain_progress(tiny_home, photo_path):
    """CliRunner's stderr is not a terminal: what `add ... 2> log` writes."""
    result = runner.invoke(app, ["add", "alice", str(photo_path), "--model", "tiny", "--steps",
                                 "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    fitting = [line for line in result.stderr.splitlines() if line.startswith("Fitting: ")]
    assert fitting[0].startswith("Fitting: ") and fitting[-1].startswith("Fitting: 20/20 (100 %)")
    assert 3 <= len(fitting) <= 11, fitting
    assert "Loading tiny" in result.stderr
    assert "━" not in result.stderr  # no bar drawn in its final state


def test_basis_build_says_its_steps_in_a_log(tiny_home):
    result = runner.invoke(app, ["basis", "build", "--model", "tiny", "--force"])
    assert result.exit_code == 0, result.output
    assert "Computing the basis from" in result.stderr and "Writing basis" in result.stderr
