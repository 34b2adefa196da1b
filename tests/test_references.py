"""Hardening II, class 3: ids and references from a bundle are checked and never become
instructions.

A basis id has one exact form, and only a person typing on the command line may abbreviate it.
A recorded model name is information: celebctl loads the model the user names (--model, the
config's default_model) or the one this machine built the identities' basis from.
"""

from __future__ import annotations

import json
import shutil

import pytest
import tomli_w
from typer.testing import CliRunner

from celebctl import basis, bundles, documents, fitting, models, paths, registry, rendering
from celebctl.errors import BasisInUse, BasisMismatch, BasisNotFound, BundleError
from tests.helpers import add_identity, craft_bundle

runner = CliRunner()


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("basis_id", ["/etc", "../../..", "", "ABCDEF0123456789", "abcd",
                                      "0123456789abcdef0", "0123456789abcde/", "{prefix}",
                                      "0123456789abcdeg", " 0123456789abcdef"])
def test_malformed_basis_ids_are_refused_at_import(tiny_home, tmp_path, basis_id):
    real = basis.list_bases()[0].id
    basis_id = basis_id.replace("{prefix}", real[:6])
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", basis_id=basis_id)
    with pytest.raises(BundleError, match="is not a basis id"):
        bundles.import_bundle(bundle)
    assert not registry.identity_exists("bob")


def test_internal_lookups_never_take_a_prefix(tiny_home):
    real = basis.list_bases()[0].id
    for text in (real[:6], real.upper(), "../" + real, real + "/"):
        with pytest.raises(BasisNotFound):
            basis.load_basis(text)
        with pytest.raises(BasisNotFound):
            basis.get_basis_info(text)
    assert basis.get_basis_info(real[:6], allow_prefix=True).id == real  # typed by a person


def test_a_prefix_in_the_registry_is_a_broken_entry_not_a_user(tiny_home):
    real = basis.list_bases()[0].id
    add_identity("alice", seed=1, basis_id=real)
    add_identity("bob", seed=2, basis_id=real)
    toml_path = paths.identities_dir() / "bob" / registry.IDENTITY_TOML
    meta = documents.parse_toml(toml_path.read_bytes())
    meta["basis_id"] = real[:6]
    toml_path.write_text(tomli_w.dumps(meta), "utf-8")
    result = invoke("list", "--json")
    assert [i["name"] for i in json.loads(result.stdout)["identities"]] == ["alice"]
    assert "is not a basis id" in result.stderr
    # alice uses the basis: remove is refused and names her.
    with pytest.raises(BasisInUse, match="alice"):
        basis.remove_basis(real)
    result = invoke("basis", "remove", real[:6], "--yes")
    assert result.exit_code == 1 and "alice" in result.stderr
    assert basis.get_basis_info(real).id == real


def test_basis_remove_counts_damaged_identities_as_users(tiny_home):
    real = basis.list_bases()[0].id
    ident = add_identity("alice", seed=1, basis_id=real)
    ident.file_path("face").write_bytes(b"damaged")
    assert registry.list_identities().identities == []  # alice is broken ...
    with pytest.raises(BasisInUse, match="alice"):  # ... but still uses the basis
        basis.remove_basis(real)
    assert basis.remove_basis(real, force=True) == real


def _evil_alice(tmp_path):
    bundle = craft_bundle(tmp_path / "evil.celeb", "alice",
                          meta={"model": "attacker/evil-model"})
    bundles.import_bundle(bundle)


def test_a_recorded_model_is_never_loaded(tiny_home, tmp_path, monkeypatch):
    _evil_alice(tmp_path)
    loaded = []
    monkeypatch.setattr(models, "load_pipeline_components",
                        lambda spec, *a, **k: loaded.append(spec) or pytest.fail("loaded"))
    plan = rendering.plan_render("alice")
    # The basis was built here from `tiny`: that is the model to load.
    assert plan.spec.ref == "tiny"
    assert any("'attacker/evil-model'" in note and "loading tiny" in note for note in plan.notes)
    result = invoke("render", "alice", "--dry-run")
    assert result.exit_code == 0 and "Model:      tiny" in result.stdout
    assert "attacker/evil-model" in result.stderr  # said, as information
    assert loaded == []


def test_the_users_choice_wins(tiny_home, tmp_path):
    _evil_alice(tmp_path)
    # alice's basis is tiny's (32-d), so sd15-random (768-d) is refused early; the refusal
    # names the model the user chose, not the one the bundle recorded.
    with pytest.raises(BasisMismatch, match="but sd15-random's is 768-d") as info:
        rendering.plan_render("alice", model="sd15-random")
    assert "attacker" not in str(info.value)
    paths.config_path().write_text('default_model = "sd15-random"\n')
    with pytest.raises(BasisMismatch, match="but sd15-random's is 768-d"):
        rendering.plan_render("alice")
    assert rendering.plan_render("alice", model="tiny").spec.ref == "tiny"


def test_joint_loads_the_users_model_not_the_recorded_one(tiny_home, tmp_path, monkeypatch):
    _evil_alice(tmp_path)
    add_identity("bob", seed=2, basis_id=basis.list_bases()[0].id)
    seen = []

    def stop(spec, *args, **kwargs):
        seen.append(models.resolve_model_spec(spec).ref)
        raise KeyboardInterrupt  # stop before the fit; nothing is written

    monkeypatch.setattr(models, "load_pipeline_components", stop)
    with pytest.raises(KeyboardInterrupt):
        fitting.refit_jointly(["alice", "bob"])
    assert seen == ["tiny"]


def test_a_fetched_basis_is_not_a_source_of_models(tiny_home, tmp_path):
    info = basis.list_bases()[0]
    sent = tmp_path / "sent"
    shutil.copytree(info.path, sent)
    meta = documents.parse_toml((sent / basis.META_FILE).read_bytes())
    meta.update(model="attacker/evil-model", fetched_from="trust-me", built_locally=True)
    (sent / basis.META_FILE).write_text(tomli_w.dumps(meta), "utf-8")
    shutil.rmtree(info.path)
    fetched, created = basis.fetch_basis(str(sent))
    assert created and not fetched.built_here
    assert fetched.extra["fetched_from"] == str(sent) and "built_locally" not in fetched.extra
    add_identity("alice", seed=1, basis_id=info.id)
    assert rendering.plan_render("alice").spec.ref == models.DEFAULT_MODEL


def test_import_notes_never_instruct_with_the_bundle_model(tiny_home, tmp_path):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", basis_id="c" * 16,
                          meta={"model": "attacker/evil-model"})
    _, notes = bundles.import_bundle(bundle)
    text = " ".join(notes)
    assert "--model attacker/evil-model" not in text
    # The bundle's model is named as data: the model it says it was fitted with (the first
    # render builds the missing basis from it and keeps it only when the id matches).
    assert "'attacker/evil-model'" in text and "the model the bundle names" in text
    result = invoke("doctor", "--json")
    messages = " ".join(p["message"] for p in json.loads(result.stdout)["problems"])
    assert "--model attacker/evil-model" not in messages


@pytest.mark.parametrize("face_encoder", ["evil", "vggface2; rm -rf /", ""])
def test_unknown_face_encoders_are_refused(tiny_home, tmp_path, face_encoder):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", meta={"face_encoder": face_encoder})
    with pytest.raises(BundleError, match="face_encoder"):
        bundles.import_bundle(bundle)
