"""Hardening II, class 4: values are checked for sense, not only for type.

Coefficients a fit never makes, face crops a fit cannot use, NaN in metadata and documents
nested thousands of levels deep are refused with a clear error; inside the registry such an
entry is a warning in `list`, and `remove` and `doctor --fix` can always delete it.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import tomli_w
from typer.testing import CliRunner

from celebctl import basis, bundles, documents, paths, registry
from celebctl.errors import BundleError, FetchError
from tests.helpers import craft_bundle, face_png, unit_rows

runner = CliRunner()
DEPTH = 30_000


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("scale", [3e38, 1.5, 1e4])
def test_absurd_coefficients_are_refused(tiny_home, tmp_path, scale):
    coefficients = unit_rows(np.ones((2, 32))) * np.float32(scale)
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", coefficients=coefficients)
    with pytest.raises(BundleError, match="not coefficients celebctl made"):
        bundles.import_bundle(bundle)
    assert not registry.identity_exists("bob")


def test_coefficients_a_fit_makes_are_accepted(tiny_home, tmp_path):
    shorter = unit_rows(np.ones((2, 32))) * np.float32(0.8)  # an EMA of unit rows
    bundles.import_bundle(craft_bundle(tmp_path / "b.celeb", "bob", coefficients=shorter))
    assert registry.get_identity("bob").load_coefficients().shape == (2, 32)


def test_absurd_coefficients_in_the_registry_are_a_damaged_entry(home):
    ident = registry.get_identity("alice")
    path = ident.file_path("coefficients")
    data = registry._tensor_bytes(ident.load_coefficients() * 1e30, "coefficients")
    meta = dict(ident.meta)
    filename, sha = registry._role_file("coefficients", data)
    path.unlink()
    (ident.path / filename).write_bytes(data)
    meta["files"]["coefficients"] = {"path": filename, "sha256": sha, "size": len(data)}
    (ident.path / registry.IDENTITY_TOML).write_text(tomli_w.dumps(meta), "utf-8")
    result = invoke("render", "alice", "--steps", "1", "--quiet")
    assert result.exit_code == 1 and "not coefficients celebctl made" in result.stderr


@pytest.mark.parametrize("scale", [5.0, 0.5, 1e30])
def test_face_embeddings_are_unit_vectors(tiny_home, tmp_path, scale):
    embedding = unit_rows(np.ones(512)) * np.float32(scale)
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", embedding=embedding)
    with pytest.raises(BundleError, match="unit vectors"):
        bundles.import_bundle(bundle)


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (100, 50), (4096, 4096)])
def test_face_crops_a_fit_cannot_use_are_refused(tiny_home, tmp_path, size):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", face=buffer.getvalue())
    with pytest.raises(BundleError, match="face crop"):
        bundles.import_bundle(bundle)


def test_a_tiny_face_crop_in_the_registry_stops_joint_with_a_clear_error(home):
    ident = registry.get_identity("bob")
    data = face_png(seed=1, size=1)
    filename, sha = registry._role_file("face", data)
    ident.file_path("face").unlink()
    (ident.path / filename).write_bytes(data)
    meta = dict(ident.meta)
    meta["files"]["face"] = {"path": filename, "sha256": sha, "size": len(data)}
    (ident.path / registry.IDENTITY_TOML).write_text(tomli_w.dumps(meta), "utf-8")
    result = invoke("joint", "alice", "bob", "--steps", "1", "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "The face crop of 'bob' is 1x1 px" in result.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_metadata_is_refused(tiny_home, tmp_path, value):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", meta={"fit": {"loss_first": value}})
    with pytest.raises(BundleError, match="not a finite number"):
        bundles.import_bundle(bundle)


def test_non_finite_metadata_in_the_registry_never_reaches_json(home):
    toml_path = paths.identities_dir() / "alice" / registry.IDENTITY_TOML
    meta = documents.parse_toml(toml_path.read_bytes())
    meta["fit"]["loss_first"] = float("nan")
    toml_path.write_text(tomli_w.dumps(meta), "utf-8")
    for args in (["show", "alice", "--json"], ["list", "--json"], ["doctor", "--json"]):
        result = invoke(*args)
        assert "NaN" not in result.stdout, args
        if result.stdout.strip():
            json.loads(result.stdout)  # strict JSON
    assert "not a finite number" in invoke("show", "alice").stderr


def _deep(kind: str) -> bytes:
    """identity.toml text with a value nested DEPTH levels deep."""
    head = (b'schema_version = 1\nname = "bob"\nbasis_id = "' + b"b" * 16
            + b'"\nmodel = "tiny"\nhidden = 32\ncomponents = 32\n')
    if kind == "arrays":
        return head + b"deep = " + b"[" * DEPTH + b"]" * DEPTH + b"\n"
    if kind == "tables":
        return head + b"deep = " + b"{a = " * DEPTH + b"1" + b"}" * DEPTH + b"\n"
    return head + b"deep." + b".".join(b"k" for _ in range(DEPTH)) + b" = 1\n"  # dotted keys


@pytest.mark.parametrize("kind", ["arrays", "tables", "dotted"])
def test_deeply_nested_bundles_are_refused(tiny_home, tmp_path, kind):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", raw_toml=_deep(kind), compress=False)
    result = invoke("import", bundle)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output[-500:]
    assert "nested more than" in result.stderr


@pytest.mark.parametrize("kind", ["arrays", "tables", "dotted"])
def test_deeply_nested_basis_toml_is_refused(tiny_home, tmp_path, kind):
    info = basis.list_bases()[0]
    sent = tmp_path / "sent"
    shutil.copytree(info.path, sent)
    text = (sent / basis.META_FILE).read_bytes()
    deep = _deep(kind).split(b"components = 32\n", 1)[1]
    (sent / basis.META_FILE).write_bytes(deep + text if kind != "dotted" else text + deep)
    with pytest.raises(FetchError, match="nested more than"):
        basis.fetch_basis(str(sent))


@pytest.mark.parametrize("kind", ["arrays", "tables", "dotted"])
def test_deeply_nested_registry_entries_can_always_be_deleted(home, kind):
    toml_path = paths.identities_dir() / "bob" / registry.IDENTITY_TOML
    toml_path.write_bytes(_deep(kind))
    limit = sys.getrecursionlimit()
    result = invoke("list", "--json")
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert [i["name"] for i in json.loads(result.stdout)["identities"]] == ["alice"]
    assert "nested more than" in result.stderr
    result = invoke("doctor", "--json")
    assert result.exit_code == 1
    bob = [p for p in json.loads(result.stdout)["problems"] if p["path"].endswith("/bob")]
    assert bob and bob[0]["fix"].startswith("delete the entry")
    assert invoke("show", "bob").exit_code == 1
    if kind == "arrays":
        assert invoke("remove", "bob", "--yes").exit_code == 0
    else:
        invoke("doctor", "--fix")
    assert not (paths.identities_dir() / "bob").exists()
    assert sys.getrecursionlimit() == limit


def test_huge_strings_are_refused(tiny_home, tmp_path):
    bundle = craft_bundle(tmp_path / "b.celeb", "bob", meta={"sources": [{"photo": "x" * 100_000}]})
    with pytest.raises(BundleError, match="characters"):
        bundles.import_bundle(bundle)


@pytest.mark.parametrize("edit, match", [
    ("mean", "not a token-embedding mean"),
    ("ratio", "fractions"),
])
def test_absurd_fetched_bases_are_refused(tiny_home, tmp_path, edit, match):
    from safetensors.torch import load, save

    info = basis.list_bases()[0]
    sent = tmp_path / "sent"
    shutil.copytree(info.path, sent)
    tensors = load((sent / basis.TENSORS_FILE).read_bytes())
    if edit == "mean":
        tensors["mean"] = tensors["mean"] * 0 + 3e38
    else:
        tensors["explained_variance_ratio"] = tensors["explained_variance_ratio"] * 0 + 0.5
    raw = save(tensors)
    (sent / basis.TENSORS_FILE).write_bytes(raw)
    meta = documents.parse_toml((sent / basis.META_FILE).read_bytes())
    meta["tensors_sha256"] = registry.storage.sha256_bytes(raw)
    (sent / basis.META_FILE).write_text(tomli_w.dumps(meta), "utf-8")
    shutil.rmtree(info.path)
    with pytest.raises(FetchError, match=match):
        basis.fetch_basis(str(sent))
    assert basis.list_bases() == []


def test_document_limits_are_iterative():
    deep: dict = {}
    node = deep
    for _ in range(DEPTH):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(documents.UnsafeDocument, match="nested more than"):
        documents.check_document(deep)
