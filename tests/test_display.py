"""Hardening II, class 2: text from a file is data, never markup or terminal control.

Strings that come from disk, a bundle, a photo's name or a prompt are shown literally: rich
markup is not interpreted, emoji codes are not replaced, and control characters (ESC, BEL,
bidi overrides, ...) are escaped, in every command and in --json.
"""

from __future__ import annotations

import json
import shutil

import pytest
import tomli_w
from typer.testing import CliRunner

from celebctl import basis, documents, paths, registry
from celebctl.cli import app
from tests.helpers import PHOTO, craft_bundle

runner = CliRunner()

ESC_TITLE = "tiny\x1b]0;PWNED\x07"
HOSTILE = ["[/bold]", "[red]red[/red]", ":warning:", "\x1b[2J\x1b[31mred", "a\u202eevil",
           "line\nbreak", "\x9b31m", "del\x7f"]
RAW = ("\x1b", "\x07", "\u202e", "\x9b", "\x7f")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_literal(output: str, value: str) -> None:
    """``value`` shows in ``output`` exactly as documents.visible writes it, and no raw control
    character reached the output."""
    assert documents.visible(value) in output, (value, output)
    for char in RAW:
        assert char not in output, (repr(char), output)


@pytest.mark.parametrize("value", HOSTILE)
def test_imported_metadata_is_shown_literally(tiny_home, tmp_path, value):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", meta={
        "source": {"photo": value, "note": value}, "imported_from": "alice",
        "fit": {"comment": value}})
    result = invoke("import", bundle)
    assert result.exit_code == 0, result.output
    for args in (["list"], ["show", "bob"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "Traceback" not in result.output
    shown = invoke("show", "bob")
    assert_literal(shown.stdout, value)
    data = json.loads(invoke("show", "bob", "--json").stdout)
    assert data["sources"][0]["photo"] == value
    for char in RAW:
        assert char not in invoke("show", "bob", "--json").stdout


@pytest.mark.parametrize("model", ["[/bold]", "[link=http://x]y[/link]", ":smile:"])
def test_a_model_field_with_markup_is_data(tiny_home, tmp_path, model):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", meta={"model": model})
    result = invoke("import", bundle)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    for args in (["list"], ["show", "bob"], ["basis", "list"], ["doctor"]):
        result = invoke(*args)
        assert result.exit_code in (0, 1) and "Traceback" not in result.output, args
    wide = runner.invoke(app, ["list"], env={"COLUMNS": "200"})  # room for the whole model
    assert model in wide.stdout
    assert model in invoke("show", "bob").stdout
    # The bundle's model shows up in notes as data, never as a command to run.
    assert "--model " + model not in invoke("render", "bob", "--dry-run").output


def test_control_characters_in_a_model_field_are_refused_at_import(tiny_home, tmp_path):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", meta={"model": ESC_TITLE})
    result = invoke("import", bundle)
    assert result.exit_code == 1 and "printable" in result.stderr
    assert "\x1b" not in result.output and not registry.identity_exists("bob")


def test_hand_edited_registry_text_is_shown_literally(home):
    toml_path = paths.identities_dir() / "alice" / registry.IDENTITY_TOML
    meta = documents.parse_toml(toml_path.read_bytes())
    meta["sources"][0]["photo"] = ESC_TITLE
    meta["model"] = "[/bold]"
    toml_path.write_text(tomli_w.dumps(meta), "utf-8")
    for args in (["list"], ["show", "alice"], ["show", "alice", "--json"], ["list", "--json"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        for char in RAW:
            assert char not in result.output, args
    assert_literal(invoke("show", "alice").stdout, ESC_TITLE)
    # A model with control characters makes the entry invalid; the warning is still literal.
    meta["model"] = ESC_TITLE
    toml_path.write_text(tomli_w.dumps(meta), "utf-8")
    result = invoke("list")
    assert result.exit_code == 0 and "Skipping 'alice'" in result.stderr
    for char in RAW:
        assert char not in result.output


def test_a_fetched_basis_model_with_markup_is_data(tiny_home, tmp_path):
    info = basis.list_bases()[0]
    folder = tmp_path / "sent"
    shutil.copytree(info.path, folder)
    meta = documents.parse_toml((folder / basis.META_FILE).read_bytes())
    meta["model"] = "[/bold][red]"
    (folder / basis.META_FILE).write_text(tomli_w.dumps(meta), "utf-8")
    shutil.rmtree(info.path)
    result = invoke("basis", "fetch", folder)
    assert result.exit_code == 0, result.output
    for args in (["basis", "list"], ["basis", "show", info.id[:6]]):
        result = invoke(*args)
        assert result.exit_code == 0 and "[/bold][red]" in result.stdout, (args, result.output)


def test_an_identity_folder_with_escape_codes_in_its_name(home):
    shutil.copytree(paths.identities_dir() / "alice", paths.identities_dir() / "ev\x1b]0;X\x07")
    for args in (["list"], ["doctor"], ["show", "alice"]):
        result = invoke(*args)
        assert "Traceback" not in result.output, args
        assert "\x1b" not in result.output and "\x07" not in result.output, args
    assert "ev\\x1b]0;X\\x07" in invoke("list").stderr


@pytest.mark.parametrize(("text", "shown"), [
    # [text] is WebUI's de-emphasis, so it is shown as the weight it means, never as markup.
    ("[bold]alice", "(bold:0.9091)<alice> person"),
    ("\\[bold\\]alice", "\\[bold\\]<alice> person"),
    (":warning: alice", ":warning: <alice> person"),
    ("alice \u202eevil", "<alice> person \u202eevil"),
])
def test_prompts_are_shown_literally(home, text, shown):
    result = invoke("render", text, "--dry-run")
    assert result.exit_code == 0, result.output
    assert_literal(result.stdout, shown)


def test_user_typed_paths_in_errors_are_literal(tiny_home, tmp_path):
    missing = tmp_path / "[bold]x\x1b[31m.celeb"
    result = invoke("import", missing)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert_literal(result.stderr, str(missing))
    odd = tmp_path / "[red]me\x1b].jpg"
    shutil.copy(PHOTO, odd)
    result = invoke("add", "zed", odd, "--model", "tiny", "--steps", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert_literal(invoke("show", "zed").stdout, odd.name)


def test_a_bundle_key_with_escape_codes_in_an_error(tiny_home, tmp_path):
    raw = (b'schema_version = 1\nname = "bob"\nbasis_id = "' + b"b" * 16 +
           b'"\nmodel = "tiny"\nhidden = 32\ncomponents = 32\ncreated = "x"\nupdated = "x"\n'
           b'[files.coefficients]\npath = "coefficients-0123456789ab.safetensors"\n'
           b'sha256 = "' + b"0" * 64 + b'"\nsize = 1\n'
           b'[files."e\\u001b]0;X\\u0007"]\npath = "p"\nsha256 = "s"\nsize = 1\n')
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", raw_toml=raw)
    result = invoke("import", bundle)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "\x1b" not in result.output and "\\x1b" in result.stderr


def test_json_output_is_strict_and_ascii():
    from celebctl.cli.common import json_text

    text = json_text({"a": float("nan"), "b": [float("inf"), -float("inf")],
                      "c": "x\x1b\x7f\u202e\x9b", "d": {"e": 1.5}})
    assert "NaN" not in text and "Infinity" not in text
    assert all(32 <= ord(c) < 127 for c in text), text
    assert json.loads(text) == {"a": None, "b": [None, None], "c": "x\x1b\x7f\u202e\x9b",
                                "d": {"e": 1.5}}


def test_warnings_from_data_are_literal(tiny_home, tmp_path):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", meta={"model": "[/red]:boom:"},
                          basis_id="c" * 16)
    result = invoke("import", bundle)
    assert result.exit_code == 0, result.output
    assert "[/red]:boom:" in result.stderr and "Warning:" in result.stderr

