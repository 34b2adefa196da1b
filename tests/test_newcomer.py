"""What a new user reads first: help texts and docs that say what is true (issue 24, point 14)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from celebctl.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def help_of(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


def test_import_help_shows_one_ellipsis():
    text = help_of("import")
    assert "BUNDLE..." in text and "BUNDLE...." not in text


def test_top_level_help_says_how_many_photos():
    text = help_of()
    assert "from 1 to 16 face photos" in text and "from one photo" not in text


def test_the_docs_stand_alone():
    """Nothing shipped in the repository sends the reader to files outside it."""
    shipped = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
               *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "scripts").glob("*"))]
    outside = re.compile(r"\.\./shared|\bshared/gpu\b|(?<![\w.])shared/[\w-]+\.(md|sh|py)")
    found = [f"{path.name}: {m.group(0)}" for path in shipped if path.is_file()
             for m in outside.finditer(path.read_text(encoding="utf-8"))]
    assert found == []
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "pip download" in benchmarks and "--no-index" in benchmarks


def test_the_readme_says_how_long_the_demo_takes():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert re.search(r"`make demo` takes .*\d+ min \d+ s measured on a 2-core machine", readme)
