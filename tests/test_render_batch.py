"""`render --prompts FILE` on the tiny model: names, metadata, resuming, batching across
prompts, refusals before loading, two torchrun processes; and the render loop's own paths
(the replayed-graph path emulated on the CPU, non-finite latents, the VAE's dtype, the basis
check's cache)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celebctl import denoise, models, rendering
from celebctl.cli import app
from celebctl.errors import IdentityNotFound, InvalidOption
from tests.helpers import one_torch_thread

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image, dtype=int)


THREE = ("# three prompts\nalice riding a bike\n\n  bob in the rain  \n# a comment\n"
         "a castle at dawn\n")


# --------------------------------------------------------------------------------------------
# the CLI: files, names, metadata, resuming


def test_prompts_file_writes_every_line_times_seeds_and_a_rerun_writes_nothing(home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(THREE, encoding="utf-8")
    out = tmp_path / "out"
    result = invoke("render", "--prompts", prompts, "--seeds", 2, "--seed", 41, "--steps", 2,
                    "--batch-size", 4, "--model", "tiny", "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "L00002-s0000041-alice-riding-a-bike.png", "L00002-s0000042-alice-riding-a-bike.png",
        "L00004-s0000041-bob-in-the-rain.png", "L00004-s0000042-bob-in-the-rain.png",
        "L00006-s0000041-a-castle-at-dawn.png", "L00006-s0000042-a-castle-at-dawn.png",
    ]
    assert summary["written"] == 6 and summary["skipped"] == 0 and summary["images"] == 6
    assert [(r["line"], r["prompt"], r["written"]) for r in summary["lines"]] == [
        (2, "alice riding a bike", 2), (4, "bob in the rain", 2), (6, "a castle at dawn", 2)]
    expected = {2: ("alice riding a bike", "<alice> person riding a bike", ["alice"], 10.0),
                4: ("bob in the rain", "<bob> person in the rain", ["bob"], 10.0),
                6: ("a castle at dawn", "a castle at dawn", [], 7.5)}
    for row in summary["lines"]:
        prompt, expanded, identities, cfg = expected[row["line"]]
        for seed, path in zip((41, 42), row["paths"], strict=True):
            meta = rendering.read_png_metadata(path)
            settings = meta["celebctl"]
            assert (settings["prompt"], settings["expanded"], settings["seed"]) == \
                (prompt, expanded, seed)
            assert settings["identities"] == identities and settings["cfg_scale"] == cfg
            assert meta["parameters"].splitlines()[0] == settings["webui_prompt"]
            assert f"Seed: {seed}," in meta["parameters"]
            assert f"CFG scale: {cfg:g}," in meta["parameters"]
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}

    again = invoke("render", "--prompts", prompts, "--seeds", 2, "--seed", 41, "--steps", 2,
                   "--batch-size", 4, "--model", "tiny", "-o", out, "--json", "-q")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["written"] == 0 and summary["skipped"] == 6
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()} == before


def test_a_stopped_job_resumes_and_other_settings_are_refused(home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice\nbob\n", encoding="utf-8")
    out = tmp_path / "out"
    first = invoke("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o", out,
                   "-q")
    assert first.exit_code == 0, first.output
    gone = out / "L00002-s0000000-bob.png"
    kept = out / "L00001-s0000000-alice.png"
    original = gone.read_bytes()
    first_pixels, first_meta = pixels(gone), rendering.read_png_metadata(gone)
    gone.unlink()  # as if the job had stopped before this image
    mtime = kept.stat().st_mtime_ns
    resumed = invoke("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o",
                     out, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.split() == [str(gone)]
    assert kept.stat().st_mtime_ns == mtime
    # Rendered alone now, with alice beside it before: within one level (a CPU's kernels may
    # block a batch of one differently from a batch of two).
    assert np.abs(pixels(gone) - first_pixels).max() <= 1
    assert rendering.read_png_metadata(gone) == first_meta

    other = invoke("render", "--prompts", prompts, "--steps", 3, "--model", "tiny", "-o", out,
                   "-q")
    assert other.exit_code == 1
    assert "L00001-s0000000-alice.png was made with other settings (steps: 2, not 3)" in \
        other.stderr
    gone.write_bytes(original[:-20])  # torn (not by celebctl, whose writes are atomic)
    torn = invoke("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o", out,
                  "-q")
    assert torn.exit_code == 1 and "is not a complete PNG" in torn.stderr
    assert gone.read_bytes() == original[:-20]


def test_a_rerun_with_nothing_left_or_other_settings_loads_no_model(home, tmp_path, built):
    """Both decisions come before the model loads (#24 point 13): a finished job's rerun and a
    job stopped by an image made with other steps build no torch module."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice\na castle\n", encoding="utf-8")
    out = tmp_path / "out"
    first = invoke("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o", out,
                   "-q")
    assert first.exit_code == 0, first.output
    assert built  # this one did load the model
    built.clear()
    again = invoke("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o", out,
                   "--json", "-q")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert (summary["written"], summary["skipped"], summary["width"]) == (0, 2, 64)
    assert built == []
    other = invoke("render", "--prompts", prompts, "--steps", 3, "--model", "tiny", "-o", out,
                   "-q")
    assert other.exit_code == 1 and "made with other settings (steps: 2, not 3)" in other.stderr
    assert built == []


# --------------------------------------------------------------------------------------------
# batching across prompts


def test_images_batched_across_prompts_equal_single_renders(home, components, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice riding a bike\nbob in the rain\nalice and bob\n",
                       encoding="utf-8")
    job = rendering.render_prompts_file(prompts, seeds=2, seed=3, steps=2, batch_size=4,
                                        components=components, out_dir=tmp_path / "job")
    assert len(job.written) == 6
    # The job's batches were [alice s3, alice s4, bob s3, bob s4] and [alice-and-bob s3, s4].
    for index, prompt in enumerate(("alice riding a bike", "bob in the rain", "alice and bob")):
        alone = rendering.render_prompt(prompt, seed=3, num_images=2, steps=2, batch_size=4,
                                        components=components, out_dir=tmp_path / f"one{index}")
        for seed, path in zip((3, 4), alone.paths, strict=True):
            batched = pixels(job.written[(index, seed)])
            # Bit for bit: a batch row's arithmetic does not depend on the other rows.
            assert np.array_equal(batched, pixels(path)), (prompt, seed)


def test_prompts_of_different_lengths_are_never_padded_together(home, components, tmp_path):
    long = ", ".join(["a red apple on a wooden table"] * 12)  # > 75 tokens: two chunks
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"alice\n{long}\n", encoding="utf-8")
    job = rendering.render_prompts_file(prompts, seeds=1, steps=2, batch_size=4,
                                        guidance=7.5, components=components,
                                        out_dir=tmp_path / "job")
    alone = rendering.render_prompt(long, steps=2, guidance=7.5, components=components,
                                    out_dir=tmp_path / "one")
    short = rendering.render_prompt("alice", steps=2, guidance=7.5, components=components,
                                    out_dir=tmp_path / "short")
    assert rendering.read_png_metadata(alone.paths[0])["celebctl"]["prompt"] == long
    # Padding alice's one chunk to two would change her image: the batches kept them apart.
    assert np.array_equal(pixels(job.written[(0, 0)]), pixels(short.paths[0]))
    assert np.array_equal(pixels(job.written[(1, 0)]), pixels(alone.paths[0]))


# --------------------------------------------------------------------------------------------
# refusals before anything loads


def test_bad_prompts_files_are_refused_before_loading(home, tmp_path, no_models):
    cases = {
        "empty.txt": (b"", "holds no prompt"),
        "comments.txt": (b"# only\n\n   \n#more\n", "holds no prompt"),
        "nul.txt": (b"alice\x00bob\n", "is not text (it contains NUL bytes)"),
        "latin1.txt": (b"alice\ncaf\xe9\n", "is not UTF-8 text (line 2"),
        "long.txt": (b"alice\n" + b"x" * (rendering.MAX_LINE_CHARS + 1) + b"\n",
                     f"Line 2 of the prompts file {tmp_path / 'long.txt'} has"),
        "many.txt": (b"a\n" * (rendering.MAX_LINES + 1), "at most 99,999 are allowed"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InvalidOption) as caught:
            rendering.render_prompts_file(path, steps=2, model="tiny", out_dir=tmp_path / "o")
        assert message in str(caught.value), name
    with pytest.raises(InvalidOption, match="is a folder"):
        rendering.render_prompts_file(tmp_path, model="tiny", out_dir=tmp_path / "o")
    with pytest.raises(InvalidOption, match="There is no prompts file"):
        rendering.render_prompts_file(tmp_path / "nope.txt", model="tiny")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(InvalidOption, match="named pipe|special file"):
            rendering.render_prompts_file(fifo, model="tiny", out_dir=tmp_path / "o")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffalice\r\nbob\r\n".encode())
    assert rendering.read_prompts_file(bom) == [rendering.PromptLine(1, "alice"),
                                                rendering.PromptLine(2, "bob")]
    assert no_models == [] and not (tmp_path / "o").exists()


def test_unknown_identity_names_its_line_and_text_is_shown_as_data(home, tmp_path, no_models):
    path = tmp_path / "prompts.txt"
    path.write_text("alice\n\nbob with <carol>\n", encoding="utf-8")
    with pytest.raises(IdentityNotFound, match=r"^Line 3 of .*prompts.txt: No identity 'carol'"):
        rendering.render_prompts_file(path, model="tiny", out_dir=tmp_path / "o")
    result = invoke("render", "--prompts", path, "--model", "tiny", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "Line 3 of" in result.stderr
    hostile = tmp_path / "hostile.txt"
    hostile.write_text("alice \x1b[31mred\x1b[0m\n", encoding="utf-8")
    refused = invoke("render", "--prompts", hostile, "--model", "tiny", "--dry-run")
    assert refused.exit_code == 1 and "Line 1 of" in refused.stderr
    assert "\x1b" not in refused.stderr and "\\x1b" in refused.stderr
    dry = invoke("render", "--prompts", path.with_name("ok.txt"), "--model", "tiny",
                 "--dry-run")
    assert dry.exit_code == 1 and "There is no prompts file" in dry.stderr
    path.with_name("ok.txt").write_text("# x\nalice at (dawn:1.2)\n", encoding="utf-8")
    dry = invoke("render", "--prompts", path.with_name("ok.txt"), "--model", "tiny",
                 "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "line 2: <alice> person at (dawn:1.2)" in dry.stdout
    assert no_models == []


def test_cli_option_conflicts(home, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("alice\n", encoding="utf-8")
    for args, message in (
        (["alice", "--prompts", path], "not both"),
        (["--prompts", path, "--num-images", 2], "--seeds"),
        (["--prompts", path, "--grid"], "contact sheet"),
        (["alice", "--seeds", 2], "--num-images"),
        ([], "give a PROMPT"),
    ):
        result = invoke("render", *args, "--model", "tiny", "-o", tmp_path / "o")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    result = invoke("render", "--prompts", path, "--seeds", 0, "-o", tmp_path / "o")
    assert result.exit_code == 1 and "--seeds must be between 1 and 1000" in result.stderr


# --------------------------------------------------------------------------------------------
# several processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_processes_write_every_image_once(home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(THREE, encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "CELEBCTL_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "celebctl", "render", "--prompts", str(prompts), "--seeds", "2",
               "--steps", "2", "--model", "tiny", "--device", "cpu", "-o", str(out),
               "--json", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone prints
    assert summary["processes"] == 2 and summary["written"] == 6 and summary["skipped"] == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 6 and all(name.startswith("L0000") for name in files)  # no -1 copies
    assert sorted(Path(p).name for r in summary["lines"] for p in r["paths"]) == files
    for row in summary["lines"]:
        assert row["written"] == 2


# --------------------------------------------------------------------------------------------
# the render loop: the replayed path on the CPU, non-finite latents, the VAE, the basis check


def test_the_replayed_path_renders_what_the_eager_path_renders(home, components, tmp_path,
                                                              monkeypatch):
    made = []

    def emulating(*args, **kwargs):
        call = denoise.UNetCall(*args, **kwargs, emulate=True)
        made.append(call)
        return call

    eager = rendering.render_prompt("alice", num_images=3, seed=7, steps=3, batch_size=2,
                                    components=components, out_dir=tmp_path / "eager")
    monkeypatch.setattr(rendering.render, "UNetCall", emulating)
    replayed = rendering.render_prompt("alice", num_images=3, seed=7, steps=3, batch_size=2,
                                       components=components, out_dir=tmp_path / "replayed")
    # The last batch (one image) was padded to two, so one captured call served every step.
    assert len(made) == 1 and len(made[0].graphs) == 1
    assert replayed.captured and replayed.to_dict()["captured"] is True
    assert not eager.captured  # a CPU never replays a graph
    assert [p.name for p in replayed.paths] == [p.name for p in eager.paths]
    for a, b in zip(eager.paths[:2], replayed.paths[:2], strict=True):
        assert np.array_equal(pixels(a), pixels(b))  # same shapes: bit for bit
    # The padded image went through a batch of two: it equals seed 9 in an eager batch of two
    # and the eager batch of one within a level (a CPU blocks those differently; in the pair it
    # sits at row 1, padded at row 0, so even equal batch sizes need not agree to the bit).
    pair = rendering.render_prompt("alice", num_images=2, seed=8, steps=3, batch_size=2,
                                   components=components, out_dir=tmp_path / "pair")
    assert np.abs(pixels(pair.paths[1]) - pixels(replayed.paths[2])).max() <= 1
    assert np.abs(pixels(eager.paths[2]) - pixels(replayed.paths[2])).max() <= 1


def test_non_finite_latents_fail_clearly_and_write_nothing(home, components, tmp_path,
                                                          monkeypatch):
    class Overflowing(denoise.UNetCall):
        def __call__(self, sample, timestep, states, added=None):
            return super().__call__(sample, timestep, states, added) * float("inf")

    monkeypatch.setattr(rendering.render, "UNetCall", Overflowing)
    with pytest.raises(denoise.NonFiniteImages, match="NaN or infinite after 2 denoising"):
        rendering.render_prompt("alice", steps=2, components=components,
                                out_dir=tmp_path / "o")
    assert list((tmp_path / "o").iterdir()) == []
    monkeypatch.setattr(rendering.batch, "UNetCall", Overflowing)
    path = tmp_path / "prompts.txt"
    path.write_text("alice\n", encoding="utf-8")
    result = invoke("render", "--prompts", path, "--steps", 2, "--model", "tiny", "-o",
                    tmp_path / "p", "-q")
    assert result.exit_code == 1
    assert "NaN or infinite" in result.stderr and "run the same command again" in result.stderr
    assert list((tmp_path / "p").iterdir()) == []


def test_decoding_leaves_a_shared_vae_in_its_dtype(components):
    import copy

    import torch

    vae = copy.deepcopy(components.vae).to(torch.float16)
    vae.config.force_upcast = True  # as SD 1.5's and SDXL's VAE configs say
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, dtype=torch.float16)
    moved = []
    original_to = vae.to

    def spy_to(*args, **kwargs):
        moved.append(args or kwargs)
        return original_to(*args, **kwargs)

    vae.to = spy_to
    decoded = denoise._decode(vae, latents, "sd1")  # SD 1.x pipelines never upcast
    assert decoded.dtype == torch.float16 and moved == [] and vae.dtype == torch.float16
    decoded = denoise._decode(vae, latents, "sdxl")  # SDXL's does, and turns it back
    assert decoded.dtype == torch.float32 and vae.dtype == torch.float16 and len(moved) == 2


def test_the_embedding_table_is_hashed_once_per_loaded_model(home, components, tmp_path,
                                                            monkeypatch):
    import torch

    calls = []
    real = models.embedding_table_sha256
    monkeypatch.setattr(models, "embedding_table_sha256",
                        lambda table: calls.append(1) or real(table))
    rendering.render.check_basis_once.__globals__["_CHECKED"].clear()
    for index in range(3):
        rendering.render_prompt("alice", steps=1, components=components,
                                out_dir=tmp_path / str(index))
    assert len(calls) == 1
    table = models.embedding_table(components.text_encoders[0])
    with torch.no_grad():
        table.mul_(1.0)  # an in-place change (of nothing): the table is checked again
    rendering.render_prompt("alice", steps=1, components=components, out_dir=tmp_path / "x")
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
def test_a_cuda_render_syncs_the_host_the_same_number_of_times_for_any_step_count(home):
    import warnings

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = models.load_pipeline_components("tiny", "cuda", "fp16")
    plan = rendering.plan_render("alice", "", "tiny", tokenizer=gpu.tokenizer)
    from celebctl import basis as basis_mod

    vectors = rendering.identity_vectors_for(plan.coefficients,
                                             basis_mod.load_basis(plan.basis_id))
    embeds = rendering.encode_prompt_pair(gpu, plan, vectors)
    call = denoise.UNetCall(gpu.unet, capture=True)

    def syncs(steps: int, count: int) -> int:
        generators = [torch.Generator("cpu").manual_seed(s) for s in range(count)]
        sampler = rendering.make_scheduler("ddim", gpu.scheduler.config)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                denoise.sample_images(unet_call=call, vae=gpu.vae, scheduler=sampler,
                                      embeds=embeds, family=gpu.family, generators=generators,
                                      steps=steps, guidance=7.5, height=64, width=64,
                                      pad_to=2)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in seen)

    syncs(2, 2)  # captures the graph (capturing synchronizes, once)
    assert len(call.graphs) == 1
    assert syncs(2, 2) == syncs(12, 2)  # no sync per step
    syncs(3, 1)  # a smaller batch is padded: it replays the same graph
    assert len(call.graphs) == 1
    assert gpu.vae.dtype == torch.float16


@pytest.mark.gpu
def test_a_prompts_file_on_cuda_equals_single_renders(home, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice riding a bike\nbob in the rain\n", encoding="utf-8")
    gpu = models.load_pipeline_components("tiny", "cuda", "fp32")
    job = rendering.render_prompts_file(prompts, seeds=3, steps=4, batch_size=4,
                                        components=gpu, out_dir=tmp_path / "job")
    for index, prompt in enumerate(("alice riding a bike", "bob in the rain")):
        alone = rendering.render_prompt(prompt, num_images=3, steps=4, batch_size=4,
                                        components=gpu, out_dir=tmp_path / f"one{index}")
        for seed, path in enumerate(alone.paths):
            diff = np.abs(pixels(job.written[(index, seed)]) - pixels(path))
            assert diff.max() <= 2  # other batch neighbours, other kernels' reduction order


