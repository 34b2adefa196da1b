"""`celebctl add-many`: who is listed, who is fitted, who is skipped, and why one fails."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from typer.testing import CliRunner

from celebctl import fitting, registry
from celebctl.errors import InvalidOption
from celebctl.fitting import batch, people
from tests.helpers import PHOTO

runner = CliRunner()
FIT = ["--model", "tiny", "--steps", "2", "--pool-size", "2", "--device", "cpu"]


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


def variants() -> dict[str, Image.Image]:
    """Different photos of a face that MTCNN finds (the one public-domain test face)."""
    src = Image.open(PHOTO).convert("RGB")
    return {"alice": src, "bob": ImageOps.mirror(src),
            "carol": ImageEnhance.Brightness(src).enhance(0.85),
            "dave": src.crop((16, 0, 512, 496)), "erin": ImageEnhance.Color(src).enhance(0.5)}


def noise_photo(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def people_folder(root: Path, names=("alice", "bob")) -> Path:
    folder = root / "people"
    for name in names:
        (folder / name).mkdir(parents=True)
        variants()[name].save(folder / name / "photo.png")
    return folder


def test_a_folder_of_folders_lists_one_person_a_folder(tmp_path):
    folder = people_folder(tmp_path)
    (folder / "alice" / "second.jpg").write_bytes((folder / "alice" / "photo.png").read_bytes())
    (folder / "alice" / ".hidden.png").write_bytes(b"x")
    (folder / "alice" / "notes.txt").write_text("not a photo")
    (folder / "README.md").write_text("files at the top level are ignored")
    (folder / "Carol Smith").mkdir()
    (folder / "empty").mkdir()
    found = {p.name: p for p in people.read_people(folder)}
    assert sorted(found) == ["Carol Smith", "alice", "bob", "empty"]
    assert [p.name for p in found["alice"].photos] == ["photo.png", "second.jpg"]
    assert found["alice"].problem is None and found["alice"].where == "alice/"
    assert found["Carol Smith"].problem.startswith("Invalid name")
    assert found["empty"].problem == "No photo (.jpg, .jpeg, .png, .webp or .bmp)."


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_a_manifest_lists_people_with_paths_relative_to_it(tmp_path, suffix, sep):
    folder = people_folder(tmp_path)
    many = sep.join(["photo.png"] * 17)
    manifest = folder / f"list{suffix}"
    manifest.write_text("\n".join([
        f"name{sep}photo", f"# a comment{sep}x", "", f"alice{sep}alice/photo.png",
        f"bob{sep}bob/photo.png{sep}{tmp_path / 'people' / 'alice' / 'photo.png'}",
        f"alice{sep}bob/photo.png", f"carol{sep}missing.png", f"dave{sep}{many}", "erin",
    ]) + "\n", encoding="utf-8")
    found = people.read_people(manifest)
    assert [p.name for p in found] == ["alice", "bob", "alice", "carol", "dave", "erin"]
    assert found[0].problem is None and found[0].photos == [folder / "alice" / "photo.png"]
    assert found[0].where == f"list{suffix} line 4"
    assert found[1].problem is None and len(found[1].photos) == 2
    assert found[2].problem == f"'alice' is listed twice (also at list{suffix} line 4)."
    assert found[3].problem == f"Photo not found: {folder / 'missing.png'}."
    assert found[4].problem.startswith("17 photos; at most 16")
    assert found[5].problem == "The row lists no photo."


def test_a_source_that_lists_nobody_is_refused(tmp_path):
    (tmp_path / "empty.csv").write_text("name,photo\n# nobody\n")
    with pytest.raises(InvalidOption, match="lists nobody"):
        people.read_people(tmp_path / "empty.csv")
    (tmp_path / "list.txt").write_text("alice,a.png\n")
    with pytest.raises(InvalidOption, match="neither a folder nor a .csv/.tsv manifest"):
        people.read_people(tmp_path / "list.txt")
    (tmp_path / "bad.csv").write_bytes(b"alice,\xff\xfe.png\n")
    with pytest.raises(InvalidOption, match="not UTF-8"):
        people.read_people(tmp_path / "bad.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InvalidOption, match="has no sub-folders"):
        people.read_people(tmp_path / "folder")
    result = invoke("add-many", tmp_path / "nowhere", *FIT)
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_add_many_fits_the_good_reports_the_bad_and_resumes(tiny_home, tmp_path):
    folder = people_folder(tmp_path)
    (folder / "frank").mkdir()
    noise_photo(folder / "frank" / "noise.png")
    (folder / "gina").mkdir()
    (folder / "gina" / "broken.jpg").write_bytes(b"not a jpeg")
    result = invoke("add-many", folder, *FIT, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    status = {row["name"]: (row["status"], row["reason"]) for row in report["people"]}
    assert status["alice"] == ("added", "") and status["bob"] == ("added", "")
    assert status["frank"][0] == "failed" and "No face found" in status["frank"][1]
    assert status["gina"][0] == "failed" and "broken.jpg" in status["gina"][1]
    assert (report["added"], report["skipped"], report["failed"]) == (2, 0, 2)
    assert report["pack"] == 4  # a small model on a CPU packs 4
    # alice and bob are names, not words prompts use: no note.
    assert not any("ordinary word" in n for n in report["notes"]), report["notes"]
    alice = registry.get_identity("alice")
    assert alice.meta["fit"]["pack"] == 2 and alice.meta["sources"][0]["photo"] == "photo.png"
    before = alice.meta["files"]["coefficients"]["sha256"]

    # A rerun fits nobody (and loads no model): the two are skipped, the two still fail.
    again = invoke("add-many", folder, *FIT)
    assert again.exit_code == 1
    assert "Added 0, skipped 2, failed 2" in again.stdout
    assert "already added with these photos" in again.stdout
    assert "Loaded" not in again.stderr
    assert registry.get_identity("alice").meta["files"]["coefficients"]["sha256"] == before


def test_a_name_taken_by_other_photos_fails_until_replace(tiny_home, tmp_path):
    folder = people_folder(tmp_path, names=("alice",))
    assert invoke("add-many", folder, *FIT).exit_code == 0
    variants()["carol"].save(folder / "alice" / "photo.png")  # other photos, same name
    taken = invoke("add-many", folder, *FIT, "--json")
    assert taken.exit_code == 1
    row = json.loads(taken.stdout)["people"][0]
    assert row["status"] == "failed" and row["reason"].startswith(
        "Name taken: 'alice' in the registry was fitted from other photos")
    replaced = invoke("add-many", folder, *FIT, "--replace", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["added"] == 1


def test_add_many_checks_names_and_options_before_loading_any_model(tiny_home, tmp_path,
                                                                    monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(fitting.identities, "load_fit_model", no_model)
    folder = tmp_path / "people"
    (folder / "Not A Name").mkdir(parents=True)
    result = invoke("add-many", folder, *FIT)
    assert result.exit_code == 1 and "Invalid name Not A Name" in result.stdout
    assert "Added 0, skipped 0, failed 1" in result.stdout
    bad = invoke("add-many", folder, *FIT, "--pack", "0")
    assert bad.exit_code == 1 and "--pack must be between 1 and 64" in bad.stderr


def test_packed_add_many_gives_each_person_their_lone_fit(tiny_home, tmp_path):
    folder = people_folder(tmp_path)
    assert invoke("add-many", folder, *FIT, "--pack", "2").exit_code == 0
    settings = fitting.FitSettings(steps=2, pool_size=2)
    for name in ("alice", "bob"):
        fitting.add_identity_from_photo(f"{name}_alone", [folder / name / "photo.png"],
                                        model="tiny", device="cpu", settings=settings)
        packed = registry.get_identity(name).load_coefficients()
        alone = registry.get_identity(f"{name}_alone").load_coefficients()
        np.testing.assert_allclose(packed, alone, rtol=0, atol=2e-5)


def test_bundles_are_written_and_count_as_done(tiny_home, tmp_path):
    folder = people_folder(tmp_path, names=("alice",))
    out = tmp_path / "bundles"
    assert invoke("add-many", folder, *FIT, "--bundles", out).exit_code == 0
    assert (out / "alice.celeb").is_file()
    again = invoke("add-many", folder, *FIT, "--bundles", out, "--json")
    assert json.loads(again.stdout)["people"][0]["reason"] == "alice.celeb exists"
    # Registered but its bundle lost: only the bundle is written again, nothing is refitted.
    (out / "alice.celeb").unlink()
    third = invoke("add-many", folder, *FIT, "--bundles", out, "--json")
    assert json.loads(third.stdout)["people"][0]["reason"] == "bundle written from the registry"
    assert (out / "alice.celeb").is_file()
    # --with-basis: the bundles carry the basis (#24 point 11).
    (out / "alice.celeb").unlink()
    fourth = invoke("add-many", folder, *FIT, "--bundles", out, "--with-basis")
    assert fourth.exit_code == 0, fourth.output
    with zipfile.ZipFile(out / "alice.celeb") as archive:
        assert {"basis.toml", "basis.safetensors"} <= set(archive.namelist())
    alone = invoke("add-many", folder, *FIT, "--with-basis")
    assert alone.exit_code == 1 and "give --bundles DIR" in alone.stderr


def test_the_default_pack_follows_the_device_and_model():
    from types import SimpleNamespace

    import torch

    def parts(width, resolution):
        return SimpleNamespace(
            unet=SimpleNamespace(config=SimpleNamespace(block_out_channels=[width, width])),
            vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[32, 32, 32, 32])),
            default_resolution=resolution)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batch.resolve_pack(None, parts(64, 64), cpu) == 4  # tiny: 8x8 latents
    assert batch.resolve_pack(None, parts(320, 512), cpu) == 1  # SD 1.5 size
    assert batch.resolve_pack(None, parts(320, 512), cuda) == 8
    assert batch.resolve_pack(3, parts(320, 512), cpu) == 3


def test_a_model_that_cannot_be_had_fails_before_any_photo_is_read(tiny_home, tmp_path):
    folder = people_folder(tmp_path, names=("alice",))
    result = invoke("add-many", folder, "--model", tmp_path / "no-such-model", "--steps", "2")
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "no-such-model" in result.stderr
    assert not registry.identity_exists("alice")


def test_a_model_that_fails_to_load_fails_each_pending_person_with_the_reason(
        tiny_home, tmp_path, monkeypatch):
    from celebctl.errors import ModelUnavailable

    def unavailable(*args, **kwargs):
        raise ModelUnavailable("The weights are not on this machine; download them first.")

    monkeypatch.setattr(fitting.identities, "load_fit_model", unavailable)
    folder = people_folder(tmp_path)
    result = invoke("add-many", folder, *FIT, "--json")
    assert result.exit_code == 1
    rows = json.loads(result.stdout)["people"]
    assert [(r["name"], r["status"]) for r in rows] == [("alice", "failed"), ("bob", "failed")]
    assert all(r["reason"].startswith("The weights are not on this machine") for r in rows)


def test_a_pack_that_runs_out_of_memory_is_halved_and_a_diverged_person_fails_alone(
        tiny_home, tmp_path, monkeypatch):
    import torch

    from celebctl.fitting import phases

    real = phases.fit_packed
    calls = []

    def out_of_memory_for_two(components, mean, comps, groups, *args, **kwargs):
        calls.append([g[0].name for g in groups])
        if len(groups) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(components, mean, comps, groups, *args, **kwargs)

    monkeypatch.setattr(phases, "fit_packed", out_of_memory_for_two)
    folder = people_folder(tmp_path)
    result = invoke("add-many", folder, *FIT, "--pack", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == 2 and report["pack"] == 1
    assert calls == [["alice", "bob"], ["alice"], ["bob"]]
    assert "Out of GPU memory with 2 people per batch; went on with 1" in result.stderr

    def bob_diverges(components, mean, comps, groups, *args, **kwargs):
        names = [g[0].name for g in groups]
        if "bob" in names:
            raise phases.PackedFitError("The loss of 'bob' became nan at step 3; try a lower "
                                        "--lr or --dtype fp32.", names.index("bob"))
        return real(components, mean, comps, groups, *args, **kwargs)

    monkeypatch.setattr(phases, "fit_packed", bob_diverges)
    again = invoke("add-many", folder, *FIT, "--pack", "2", "--replace", "--json")
    assert again.exit_code == 1
    status = {r["name"]: (r["status"], r["reason"]) for r in json.loads(again.stdout)["people"]}
    assert status["alice"] == ("added", "")
    assert status["bob"][0] == "failed" and "became nan at step 3" in status["bob"][1]


def test_bundles_of_a_job_import_in_one_command_elsewhere(tiny_home, tmp_path, monkeypatch):
    folder = people_folder(tmp_path)
    out = tmp_path / "bundles"
    assert invoke("add-many", folder, *FIT, "--bundles", out).exit_code == 0
    (out / "broken.celeb").write_bytes(b"not a zip")
    monkeypatch.setenv("CELEBCTL_HOME", str(tmp_path / "other-home"))
    result = invoke("import", *sorted(out.glob("*.celeb")), "--json")
    assert result.exit_code == 1  # one bundle is broken; the others are still imported
    report = json.loads(result.stdout)
    assert [i["name"] for i in report["imported"]] == ["alice", "bob"]
    assert [f["bundle"] for f in report["failed"]] == [str(out / "broken.celeb")]
    assert sorted(i.name for i in registry.list_identities().identities) == ["alice", "bob"]
    renamed = invoke("import", out / "alice.celeb", out / "bob.celeb", "--as", "carol")
    assert renamed.exit_code == 2 and "--as renames one bundle" in renamed.stderr


def test_the_table_keeps_the_manifest_order_with_a_repeated_name(tmp_path, tiny_home):
    folder = people_folder(tmp_path)
    (folder / "list.csv").write_text("name,photo\nbob,bob/photo.png\nalice,alice/photo.png\n"
                                     "bob,alice/photo.png\n")
    result = invoke("add-many", folder / "list.csv", *FIT, "--json")
    rows = [(r["name"], r["where"], r["status"]) for r in json.loads(result.stdout)["people"]]
    assert rows == [("bob", "list.csv line 2", "added"), ("alice", "list.csv line 3", "added"),
                    ("bob", "list.csv line 4", "failed")]


def test_a_bundle_of_the_same_name_from_other_photos_is_not_taken_for_done(tiny_home, tmp_path):
    folder = people_folder(tmp_path, names=("alice",))
    out = tmp_path / "bundles"
    assert invoke("add-many", folder, *FIT, "--bundles", out).exit_code == 0
    variants()["carol"].save(folder / "alice" / "photo.png")  # another person, same name
    taken = invoke("add-many", folder, *FIT, "--bundles", out, "--json")
    assert taken.exit_code == 1
    reason = json.loads(taken.stdout)["people"][0]["reason"]
    assert reason.startswith(f"Name taken: {out / 'alice.celeb'} was fitted from other photos")
    (out / "alice.celeb").write_bytes(b"damaged")
    damaged = invoke("add-many", folder, *FIT, "--bundles", out, "--json")
    reason = json.loads(damaged.stdout)["people"][0]["reason"]
    assert reason.startswith(f"{out / 'alice.celeb'} cannot be read:")
