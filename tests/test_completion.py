"""Shell completion (through Typer's own completion hooks) and help that reads like the tools
users know."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from typer.testing import CliRunner

from celebctl import paths
from celebctl.cli import app, helpstyle
from celebctl.models.specs import BUILTIN_FAMILIES

runner = CliRunner()


def complete(line: str, shell: str = "zsh") -> list[str]:
    """What the shell gets back for ``line`` (the cursor at its end), as Typer's completion
    scripts ask for it: zsh and fish pass the line in _TYPER_COMPLETE_ARGS, bash in
    COMP_WORDS/COMP_CWORD."""
    env = {"_CELEBCTL_COMPLETE": f"complete_{shell}", "_TYPER_COMPLETE_ARGS": line}
    if shell == "bash":
        words = line.split(" ")
        env.update(COMP_WORDS=line, COMP_CWORD=str(len(words) - 1))
    if shell == "fish":
        env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    result = runner.invoke(app, [], env=env, prog_name="celebctl")
    assert result.exit_code == 0, result.output
    if shell == "bash":
        return [w for w in result.stdout.split("\n") if w]
    if shell == "fish":
        return [w.split("\t")[0] for w in result.stdout.split("\n") if w]
    # zsh: _arguments '*: :(("alice" "bob"))'
    found = []
    for part in result.stdout.replace("\n", " ").split('"'):
        part = part.strip()
        if part and not part.startswith(("_arguments", "(", ")", ":")) and "'" not in part:
            found.append(part.split(":")[0])
    return found


def test_identity_names_complete_from_the_registry(home):
    assert complete("celebctl show ") == ["alice", "bob"]
    assert complete("celebctl show a") == ["alice"]
    assert complete("celebctl export b", shell="bash") == ["bob"]
    assert complete("celebctl joint alice b", shell="fish") == ["bob"]
    assert complete("celebctl rename al") == ["alice"]
    assert complete("celebctl eval ") == ["alice", "bob"]
    # Not names: leftovers of interrupted writes, folders without a TOML, stray files.
    root = paths.identities_dir()
    (root / "carol.tmp-123").mkdir()
    (root / "dave").mkdir()
    (root / "erin").write_text("x")
    assert complete("celebctl show ") == ["alice", "bob"]


def test_basis_ids_models_and_commands_complete(home):
    ids = sorted(p.name for p in paths.bases_dir().iterdir())
    assert ids and complete("celebctl basis show ", shell="bash") == ids
    assert complete(f"celebctl basis show {ids[0][:6]}", shell="bash") == [ids[0]]
    assert complete("celebctl render x --model tiny", shell="bash") == [
        m for m in BUILTIN_FAMILIES if m.startswith("tiny")]
    assert complete("celebctl add alice p.png -m sd", shell="bash") == [
        "sd15-random", "sdxl-random"]
    assert complete("celebctl re", shell="bash") == ["refit", "remove", "rename", "render"]


def test_completion_of_an_empty_or_missing_home_is_empty(celebctl_home):
    assert complete("celebctl show ", shell="bash") == []
    assert complete("celebctl basis remove ", shell="bash") == []


def test_completion_is_quick_and_does_not_import_torch(home):
    script = (
        "import sys\n"
        "from celebctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    env = dict(os.environ, _CELEBCTL_COMPLETE="complete_bash", COMP_WORDS="celebctl show a",
               COMP_CWORD="2", CELEBCTL_HOME=str(paths.data_home()))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.stdout.split() == ["alice", "NO-TORCH"], proc.stdout + proc.stderr


def test_install_and_show_completion_are_options_of_the_root_command(monkeypatch):
    import typer.completion

    result = runner.invoke(app, ["--help"], prog_name="celebctl")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
    # Typer finds the shell from the parent processes (make runs tests under sh, which it does
    # not support); which shell is detected is Typer's business, the script is ours to check.
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    result = runner.invoke(app, ["--show-completion"], prog_name="celebctl")
    assert result.exit_code == 0 and "_CELEBCTL_COMPLETE=complete_bash" in result.stdout, (
        result.output, result.exception)
    # Only the root has them.
    result = runner.invoke(app, ["basis", "--help"], prog_name="celebctl")
    assert "--install-completion" not in result.stdout


def _all_commands() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    found = [[]]
    for name, command in root.commands.items():
        found.append([name])
        if isinstance(command, click.Group):
            found.extend([name, sub] for sub in command.commands)
    return found


@pytest.mark.parametrize("words", _all_commands(), ids=lambda w: " ".join(w) or "root")
def test_help_reads_like_the_tools_users_know(words):
    result = runner.invoke(app, [*words, "--help"], prog_name="celebctl",
                           env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "<bool>" not in text and "<int>" not in text and "<str>" not in text
    assert "list[" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage
    # Arguments are upper-case in usage lines, as in click and most Unix tools.
    for word in usage.split("Usage:")[1].split()[len(words) + 1:]:
        if word.strip("[].") not in ("OPTIONS", "COMMAND", "ARGS"):
            assert word.strip("[].") == word.strip("[].").upper(), usage


def test_option_values_are_named_in_capitals():
    result = runner.invoke(app, ["render", "--help"], env={"COLUMNS": "200"})
    lines = {line.split()[1]: line for line in result.stdout.splitlines()
             if line.strip("│ ").startswith("--")}
    assert "INTEGER" in lines["--steps"] and "FLOAT" in lines["--guidance"]
    assert "[ddim|dpm|euler]" in lines["--scheduler"] and "MODEL" in lines["--model"]
    assert "PATH" in lines["--out"]
    flag = lines["--grid"].split("Also")[0]
    assert flag.split() == ["│", "--grid"]  # nothing between a flag and its help


def test_missing_argument_is_named_in_capitals():
    result = runner.invoke(app, ["export"], prog_name="celebctl")
    assert result.exit_code == 2 and "Missing argument 'NAME'" in result.output


@pytest.mark.parametrize(("label", "word"), [
    ("<int>", "INTEGER"), ("<float>", "FLOAT"), ("<str>", "TEXT"), ("<path>", "PATH"),
    ("<list[str]>", "TEXT"), ("<celeb|a1111>", "[celeb|a1111]"), ("<weird>", "WEIRD"),
])
def test_value_words(label, word):
    assert helpstyle.value_word(label) == word


def test_the_patch_fits_the_installed_typer():
    # apply() ran when celebctl.cli was imported; running it again still finds its pieces.
    assert helpstyle.apply() is True
