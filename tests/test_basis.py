"""The celeb basis: names -> token rows -> mean + components, and its storage."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

from celebctl import basis, models, paths
from celebctl.errors import (
    BasisInUse,
    BasisMismatch,
    BasisNotFound,
    CorruptEntry,
    FetchError,
    InvalidOption,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Unique rows per position for the shipped list with the real CLIP tokenizer (measured).
SHIPPED_UNIQUE_ROWS = (409, 542)


@pytest.fixture
def tokenizer():
    return models.build_clip_tokenizer()


@pytest.fixture
def sd_table():
    """An SD 1.5-shaped random embedding table (no text encoder needed)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(49408, 768, generator=generator) * 0.02


@pytest.fixture
def tiny_basis(tiny_home):
    """The tiny model's basis, already in the data home (built once per session)."""
    (info,) = basis.list_bases()
    assert info.model == "tiny"
    return info


def _write_identity(name: str, basis_id: str) -> None:
    folder = paths.identities_dir() / name
    folder.mkdir(parents=True)
    (folder / "identity.toml").write_text(
        f'schema_version = 1\nname = "{name}"\nbasis_id = "{basis_id}"\n')


def _bases_snapshot() -> list[str]:
    root = paths.bases_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ---- names


def test_packaged_names():
    names = basis.load_names()
    assert len(names) == 691
    assert len(basis.unique_names(names)) == 646
    assert names[0] == "Adam Sandler"


def test_names_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("# my list\n\nTom Hanks\n  Adam   Sandler \n#Cher\ntom hanks\n")
    names = basis.load_names(path)
    assert names == ["Tom Hanks", "Adam Sandler", "tom hanks"]
    assert basis.unique_names(names) == ["Tom Hanks", "Adam Sandler"]
    assert basis.names_sha256(names) == basis.names_sha256(["Adam Sandler", "Tom Hanks"])


def test_bad_names_files(tmp_path):
    with pytest.raises(InvalidOption, match="does not exist"):
        basis.load_names(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InvalidOption, match="has no names"):
        basis.load_names(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidOption, match="not UTF-8"):
        basis.load_names(binary)


def test_name_token_ids_positions(tokenizer):
    pos1, pos2 = basis.name_token_ids(["Adam Sandler", "Tom Hanks", "Cher"], tokenizer)
    assert tokenizer.convert_ids_to_tokens(pos1) == ["adam</w>", "tom</w>", "cher</w>"]
    # A one-word name has no second token: it adds to position 1 only.
    assert tokenizer.convert_ids_to_tokens(pos2) == ["sand", "hanks</w>"]


def test_too_few_distinct_tokens(tokenizer):
    table = torch.randn(49408, 8)
    with pytest.raises(InvalidOption, match="Position 1 has 1 distinct"):
        basis.compute_basis(["Tom Hanks", "Tom Cruise"], tokenizer, table)


# ---- the computation


def test_compute_basis_matches_hand_svd(tokenizer):
    names = ["Tom Hanks", "Adam Sandler", "Emma Stone", "Brad Pitt", "Tom Cruise",
             "Emma Watson", "Will Smith"]
    table = torch.randn(49408, 16, generator=torch.Generator().manual_seed(0))
    data = basis.compute_basis(names, tokenizer, table, components=4)
    assert data.mean.shape == (2, 16) and data.components.shape == (2, 4, 16)
    assert data.mean.dtype == data.components.dtype == torch.float32
    ids = tokenizer(names).input_ids
    for position in (1, 2):
        unique = sorted({row[position] for row in ids})
        assert data.unique_rows[position - 1] == len(unique)
        rows = table[unique].double().numpy()
        centred = rows - rows.mean(axis=0)
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        got = data.components[position - 1].double().numpy()
        np.testing.assert_allclose(data.mean[position - 1].numpy(), rows.mean(axis=0), atol=1e-6)
        # Same directions up to sign.
        np.testing.assert_allclose(np.abs((got * vt[:4]).sum(axis=1)), 1.0, atol=1e-5)
        ratio = singular**2 / (singular**2).sum()
        np.testing.assert_allclose(data.explained_variance_ratio[position - 1].numpy(),
                                   ratio[:4], atol=1e-6)
    # Tom/Emma repeat at position 1: 5 unique first tokens for 7 names.
    assert data.unique_rows == (5, 7) and data.num_names == 7


def test_only_positions_1_and_2_matter(tokenizer):
    names = ["Adam Sandler", "Tom Hanks", "Emma Stone", "Brad Pitt"]
    table = torch.randn(49408, 8, generator=torch.Generator().manual_seed(1))
    before = basis.compute_basis(names, tokenizer, table, components=3)
    changed = table.clone()
    changed[tokenizer.convert_tokens_to_ids("ler</w>")] += 5.0  # position 3 of Adam Sandler
    changed[49406] += 5.0  # <|startoftext|>
    same = basis.compute_basis(names, tokenizer, changed, components=3)
    assert torch.equal(before.mean, same.mean) and torch.equal(before.components,
                                                                same.components)
    changed[tokenizer.convert_tokens_to_ids("sand")] += 5.0  # position 2 of Adam Sandler
    moved = basis.compute_basis(names, tokenizer, changed, components=3)
    assert torch.equal(before.mean[0], moved.mean[0])
    assert not torch.allclose(before.mean[1], moved.mean[1])


def test_components_are_orthonormal_and_signs_fixed(tokenizer):
    names = basis.load_names()
    table = torch.randn(49408, 32, generator=torch.Generator().manual_seed(2))
    data = basis.compute_basis(names, tokenizer, table)
    assert data.p == 32 and data.components.shape == (2, 32, 32)
    for comps in data.components:
        gram = comps.double() @ comps.double().T
        assert torch.allclose(gram, torch.eye(32, dtype=torch.float64), atol=1e-5)
        biggest = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))
        assert (biggest > 0).all()
    assert data.unique_rows == SHIPPED_UNIQUE_ROWS and data.single_token_names == 8


def test_sd15_shaped_table(tokenizer, sd_table):
    data = basis.compute_basis(basis.load_names(), tokenizer, sd_table)
    assert data.components.shape == (2, 512, 768) and data.mean.shape == (2, 768)
    assert data.unique_rows == SHIPPED_UNIQUE_ROWS
    assert data.rank == (408, 541)
    ratio = data.explained_variance_ratio
    assert int((ratio[0] > 0).sum()) <= 409 and int((ratio[0] > 0).sum()) == 408
    assert int((ratio[1] > 0).sum()) == 512
    assert abs(float(ratio[0].sum()) - 1.0) < 1e-5
    # The zero-variance directions complete an orthonormal set of 512.
    comps = data.components[0].double()
    assert torch.allclose(comps @ comps.T, torch.eye(512, dtype=torch.float64), atol=1e-5)


def test_components_capped_by_hidden(tokenizer):
    table = torch.randn(49408, 8)
    names = ["Tom Hanks", "Adam Sandler", "Emma Stone", "Brad Pitt"]
    assert basis.compute_basis(names, tokenizer, table, components=100).p == 8
    with pytest.raises(InvalidOption, match="positive integer"):
        basis.compute_basis(names, tokenizer, table, components=0)


# ---- build and storage


def test_build_tiny_basis_files_and_metadata():
    info, created = basis.build_basis("tiny")
    assert created
    folder = paths.bases_dir() / info.id
    assert sorted(p.name for p in folder.iterdir()) == ["basis.safetensors", "basis.toml"]
    meta = tomllib.loads((folder / "basis.toml").read_text())
    assert meta["schema_version"] == 1 and meta["id"] == info.id
    assert meta["model"] == "tiny" and meta["hidden"] == 32 and meta["components"] == 32
    assert meta["num_names"] == 646 and meta["unique_rows"] == list(SHIPPED_UNIQUE_ROWS)
    assert meta["rank"] == [32, 32] and meta["names_source"] == "packaged"
    assert len(meta["explained_variance"]["ratio_pos1"]) == 32
    assert set(meta["explained_variance"]["cumulative"]) == {"10", "50", "100", "all"}
    from celebctl import __version__
    from celebctl.storage import sha256_file

    assert meta["celebctl_version"] == __version__
    assert meta["tensors_sha256"] == sha256_file(folder / "basis.safetensors")
    loaded = basis.load_basis(info.id)
    assert loaded.mean.shape == (2, 32) and loaded.components.shape == (2, 32, 32)
    assert loaded.explained_variance_ratio.shape == (2, 32)
    assert [t.numel() for t in loaded.token_ids] == list(SHIPPED_UNIQUE_ROWS)


def test_basis_id_is_a_content_hash(tiny_basis):
    info = tiny_basis
    text = models.load_text_model("tiny")
    expected = basis.basis_id_for(
        models.embedding_table_sha256(models.embedding_table(text.text_encoder)),
        models.tokenizer_sha256(text.tokenizer), basis.names_sha256(basis.load_names()), 32)
    assert info.id == expected and len(info.id) == 16
    smaller, created = basis.build_basis("tiny", components=16)
    assert created and smaller.id != info.id and smaller.components == 16


def test_rebuild_is_a_noop_and_force_rebuilds(tiny_basis):
    info = tiny_basis
    toml_path = paths.bases_dir() / info.id / "basis.toml"
    stamp = toml_path.stat().st_mtime_ns
    again, created = basis.build_basis("tiny")
    assert not created and again.id == info.id
    assert toml_path.stat().st_mtime_ns == stamp
    before = basis.load_basis(info.id)
    forced, created = basis.build_basis("tiny", force=True)
    assert created and forced.id == info.id
    # The id is a hash of the inputs. The tensors agree to rounding: LAPACK (MKL) may take
    # alignment-dependent code paths, so the last bit can differ between two builds.
    after = basis.load_basis(info.id)
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.components, before.components, rtol=0, atol=1e-5)
    assert len(basis.list_bases()) == 1


def test_names_file_changes_the_id(tmp_path, tiny_basis):
    info = tiny_basis
    path = tmp_path / "names.txt"
    path.write_text("\n".join(basis.load_names()[:50]) + "\n")
    custom, created = basis.build_basis("tiny", names_path=path)
    assert created and custom.id != info.id
    assert custom.names_source == str(path.resolve()) and custom.num_names == 50


def test_load_basis_by_prefix_and_unknown(tiny_basis):
    info = tiny_basis
    # A prefix is what a person types; ids read from files must be exact.
    assert basis.load_basis(info.id[:5], allow_prefix=True).id == info.id
    with pytest.raises(BasisNotFound, match="is not a basis id"):
        basis.load_basis(info.id[:5])
    with pytest.raises(BasisNotFound) as excinfo:
        basis.load_basis(info.id[:-1] + ("0" if info.id[-1] != "0" else "1"), allow_prefix=True)
    assert f"Did you mean '{info.id}'?" in str(excinfo.value)
    with pytest.raises(BasisNotFound, match="See `celebctl basis list`"):
        basis.load_basis("zzzz", allow_prefix=True)


def test_damaged_tensors_are_detected(tiny_basis):
    info = tiny_basis
    path = paths.bases_dir() / info.id / "basis.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptEntry, match="does not match the checksum"):
        basis.load_basis(info.id)


def test_list_reports_broken_entries_as_warnings(tiny_basis):
    info = tiny_basis
    broken = paths.bases_dir() / "0123456789abcdef"
    broken.mkdir()
    (broken / "basis.safetensors").write_bytes(b"half a build")
    garbled = paths.bases_dir() / "fedcba9876543210"
    garbled.mkdir()
    (garbled / "basis.toml").write_text("not = [valid toml")
    listing = basis.list_bases()
    assert [b.id for b in listing] == [info.id]
    assert len(listing.warnings) == 2
    assert any("no basis.toml" in w and "incomplete" in w for w in listing.warnings)
    # A damaged entry can be removed with --force.
    assert basis.remove_basis("0123456789abcdef", force=True) == "0123456789abcdef"
    assert not broken.exists()


def test_remove_refused_while_in_use(tiny_basis):
    info = tiny_basis
    _write_identity("alice", info.id)
    _write_identity("bob", "b" * 16)
    broken = paths.identities_dir() / "carol"
    broken.mkdir()
    (broken / "identity.toml").write_text("[[[ broken")
    with pytest.raises(BasisInUse) as excinfo:
        basis.remove_basis(info.id)
    assert "alice" in str(excinfo.value) and "bob" not in str(excinfo.value)
    assert basis.basis_users(info.id) == ["alice"]
    assert (paths.bases_dir() / info.id / "basis.toml").exists()
    assert basis.remove_basis(info.id[:6], force=True) == info.id
    assert not (paths.bases_dir() / info.id).exists()


def test_remove_unused(tiny_basis):
    info = tiny_basis
    assert basis.remove_basis(info.id) == info.id
    assert basis.list_bases() == []
    with pytest.raises(BasisNotFound):
        basis.remove_basis(info.id)


# ---- matching a model to a basis


def test_mismatch_and_match(tokenizer, tiny_basis):
    info = tiny_basis
    text = models.load_text_model("tiny")
    basis.check_model_matches_basis(info, text.text_encoder, text.tokenizer, "tiny")
    assert basis.find_basis_for_model(text.text_encoder, text.tokenizer).id == info.id
    # The same weights in fp16 (as on a GPU) still match the fp32-built basis.
    half = models.load_text_model("tiny").text_encoder.half()
    basis.check_model_matches_basis(info.id, half, text.tokenizer, "tiny")
    assert basis.find_basis_for_model(half, text.tokenizer).id == info.id
    # A different table of the same shape does not.
    other = models.load_text_model("tiny").text_encoder
    with torch.no_grad():
        models.embedding_table(other).normal_(generator=torch.Generator().manual_seed(5))
    with pytest.raises(BasisMismatch) as excinfo:
        basis.check_model_matches_basis(info, other, text.tokenizer, "other/model")
    message = str(excinfo.value)
    assert "Model other/model's embedding table does not match basis" in message
    assert info.id in message and "built from tiny" in message
    assert "`celebctl basis build --model other/model`" in message
    assert basis.find_basis_for_model(other, text.tokenizer) is None


def test_tokenizer_mismatch(tiny_basis):
    info = tiny_basis
    text = models.load_text_model("tiny")
    text.tokenizer.add_tokens(["<new-token>"])
    with pytest.raises(BasisMismatch, match="tokenizer does not match basis"):
        basis.check_model_matches_basis(info, text.text_encoder, text.tokenizer, "tiny")


def test_ensure_basis_reuses_or_builds():
    first = basis.ensure_basis("tiny")
    assert basis.ensure_basis("tiny").id == first.id
    assert len(basis.list_bases()) == 1


def test_build_for_sd15_shaped_table(tokenizer, sd_table):
    info, created = basis.build_basis_for_table(sd_table, tokenizer, "sd15-shaped")
    assert created and info.components == 512 and info.hidden == 768
    assert info.unique_rows == SHIPPED_UNIQUE_ROWS and info.rank == (408, 541)
    loaded = basis.load_basis(info.id)
    assert loaded.components.shape == (2, 512, 768)
    assert int((loaded.explained_variance_ratio[0] > 0).sum()) <= 409
    size = (paths.bases_dir() / info.id / "basis.safetensors").stat().st_size
    assert 3_000_000 < size < 3_300_000  # about 3 MB, as the method says


def test_token_embeddings(tiny_basis):
    loaded = basis.load_basis(tiny_basis.id)
    coeffs = torch.zeros(3, 2, 32)
    coeffs[:, 0, 0] = 1.0
    out = loaded.token_embeddings(coeffs)
    assert out.shape == (3, 2, 32)
    assert torch.allclose(out[:, 0], loaded.mean[0] + loaded.components[0, 0])
    assert torch.allclose(out[:, 1], loaded.mean[1].expand(3, 32))


# ---- fetch


def _export(info, tmp_path):
    """Copy a registered basis out of the data home and unregister it."""
    target = tmp_path / "shared-basis"
    shutil.copytree(paths.bases_dir() / info.id, target)
    basis.remove_basis(info.id)
    return target


def test_fetch_from_folder_and_file(tmp_path, tiny_basis):
    info = tiny_basis
    components = basis.load_basis(info.id).components
    folder = _export(info, tmp_path)
    fetched, created = basis.fetch_basis(str(folder), sha256=info.tensors_sha256)
    assert created and fetched.id == info.id
    assert fetched.extra["fetched_from"] == str(folder)
    assert torch.equal(basis.load_basis(info.id).components, components)
    again, created = basis.fetch_basis(str(folder / "basis.safetensors"))
    assert not created and again.id == info.id
    basis.remove_basis(info.id)
    by_file, created = basis.fetch_basis(str(folder / "basis.safetensors"))
    assert created and by_file.id == info.id
    assert basis.load_basis(info.id).mean.shape == (2, 32)


def test_fetch_wrong_sha_writes_nothing(tmp_path, tiny_basis):
    folder = _export(tiny_basis, tmp_path)
    before = _bases_snapshot()
    with pytest.raises(FetchError, match="Checksum mismatch.*Nothing was written"):
        basis.fetch_basis(str(folder), sha256="0" * 64)
    assert _bases_snapshot() == before == []


def test_fetch_refuses_tampered_files(tmp_path, tiny_basis):
    info = tiny_basis
    folder = _export(info, tmp_path)
    toml_path = folder / "basis.toml"
    original = toml_path.read_text()
    toml_path.write_text(original.replace("hidden = 32", "hidden = 33"))
    with pytest.raises(FetchError, match="adding up to hidden"):  # widths no longer add up
        basis.fetch_basis(str(folder))
    toml_path.write_text(original.replace("hidden = 32", "hidden = 33").replace(
        "encoder_widths = [\n    32,\n]", "encoder_widths = [\n    33,\n]").replace(
        "encoder_widths = [32]", "encoder_widths = [33]"))
    with pytest.raises(FetchError, match="the TOML says"):
        basis.fetch_basis(str(folder))
    toml_path.write_text(original.replace('id = "', 'id = "../'))
    with pytest.raises(FetchError, match="hex digits"):
        basis.fetch_basis(str(folder))
    toml_path.write_text(original.replace("schema_version = 1", "schema_version = 7"))
    with pytest.raises(FetchError, match="upgrade celebctl"):
        basis.fetch_basis(str(folder))
    toml_path.write_text(original)
    tensors = folder / "basis.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"  # a NaN in the last float
    tensors.write_bytes(bytes(raw))
    with pytest.raises(FetchError, match="does not match tensors_sha256"):
        basis.fetch_basis(str(folder))
    assert _bases_snapshot() == []


def test_fetch_refuses_pickles_and_missing(tmp_path):
    pickle_file = tmp_path / "basis.pt"
    pickle_file.write_bytes(b"\x80\x04\x95")
    with pytest.raises(FetchError, match="never loaded"):
        basis.fetch_basis(str(pickle_file))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "basis.safetensors").write_bytes(b"x")
    with pytest.raises(FetchError, match="basis.toml is missing"):
        basis.fetch_basis(str(lonely))
    with pytest.raises(FetchError, match="does not exist"):
        basis.fetch_basis(str(tmp_path / "nothing-here"))
    with pytest.raises(FetchError, match="Unsupported source"):
        basis.fetch_basis("ftp://example.com/basis.safetensors")
    assert _bases_snapshot() == []


def test_fetch_url_offline(monkeypatch):
    import urllib.error
    import urllib.request

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(FetchError) as excinfo:
        basis.fetch_basis("https://example.com/bases/basis.safetensors")
    message = str(excinfo.value)
    assert "Could not download https://example.com/bases/basis.toml" in message
    assert "Nothing was written" in message and "celebctl basis fetch FOLDER" in message
    assert _bases_snapshot() == []


def test_fetch_hf_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FetchError, match="Hugging Face repo someone/bases"):
        basis.fetch_basis("hf://someone/bases/sd15")
    assert _bases_snapshot() == []


def test_fetch_bad_sha_option():
    with pytest.raises(InvalidOption, match="64 hex digits"):
        basis.fetch_basis("anything", sha256="abc")
