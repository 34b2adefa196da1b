"""Model specs, device/dtype parsing, the packaged CLIP tokenizer and the tiny model."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from celebctl import models, paths
from celebctl.errors import InvalidOption, ModelUnavailable


@pytest.fixture
def tokenizer():
    # Function scope: a module-scoped fixture would run before conftest's autouse fixture has
    # set HF_HUB_OFFLINE, and huggingface_hub reads it once, at import.
    return models.build_clip_tokenizer()


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- tokenizer


def test_tokenizer_matches_clip(tokenizer):
    assert tokenizer("tom hanks").input_ids == [49406, 2435, 29943, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407


def test_tokenizer_splits_adam_sandler_by_position(tokenizer):
    ids = tokenizer("Adam Sandler").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1] == "adam</w>" and tokens[2] == "sand"
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"


def test_tokenizer_pads_to_77(tokenizer):
    ids = tokenizer("a photo of Tom Hanks", padding="max_length", max_length=77,
                    truncation=True).input_ids
    assert len(ids) == 77 and ids[:7] == [49406, 320, 1125, 539, 2435, 29943, 49407]


def test_tokenizer_sha_is_stable(tokenizer):
    assert models.tokenizer_sha256(tokenizer) == models.tokenizer_sha256(
        models.build_clip_tokenizer())
    # The copy saved in the tiny cache (tokenizer.json) hashes the same as the in-memory one.
    text = models.load_text_model("tiny")
    assert models.tokenizer_sha256(text.tokenizer) == models.tokenizer_sha256(tokenizer)


# ---- the tiny model


def test_tiny_build_is_bit_identical():
    first, second = models.build_tiny_model(), models.build_tiny_model()
    for name in ("text_encoder", "unet", "vae"):
        assert _same_weights(first[name], second[name]), name


def test_tiny_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.build_tiny_model()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_cached_load_equals_build():
    comps = models.load_pipeline_components("tiny", device="cpu", dtype="auto")
    built = models.build_tiny_model()
    for name in ("text_encoder", "unet", "vae"):
        assert _same_weights(getattr(comps, name), built[name]), name
    cache = models.tiny_model_dir()
    assert sorted(p.name for p in cache.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert not any("celebctl-tmp" in p.name for p in cache.parent.iterdir())
    # A second load reuses the cache instead of rebuilding it.
    stamp = (cache / "unet").stat().st_mtime_ns
    again = models.load_pipeline_components("tiny", device="cpu", dtype="fp32")
    assert (cache / "unet").stat().st_mtime_ns == stamp
    assert _same_weights(again.unet, comps.unet)


def test_tiny_components_are_frozen_and_described():
    comps = models.load_pipeline_components("tiny", device="cpu", dtype="fp32")
    assert comps.default_resolution == 64
    assert comps.is_noise_model and comps.face_encoder == "random-init"
    assert comps.dtype == torch.float32 and comps.device == torch.device("cpu")
    assert comps.spec.ref == "tiny"
    for module in (comps.text_encoder, comps.unet, comps.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert models.embedding_table(comps.text_encoder).shape == (49408, 32)
    assert comps.scheduler.config.num_train_timesteps == 1000
    assert comps.scheduler.config.prediction_type == "epsilon"
    # One denoising step runs at the default resolution (8x8 latents).
    latents = torch.zeros(1, 4, 8, 8)
    ids = comps.tokenizer("a photo", padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    hidden = comps.text_encoder(ids).last_hidden_state
    assert comps.unet(latents, 10, hidden).sample.shape == (1, 4, 8, 8)
    assert comps.vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_tiny_fp16_load():
    comps = models.load_pipeline_components("tiny", device="cpu", dtype="fp16")
    assert comps.unet.dtype == torch.float16 and comps.text_encoder.dtype == torch.float16


def test_load_text_model_loads_no_unet():
    text = models.load_text_model("tiny")
    assert set(vars(text)) == {"tokenizer", "text_encoder", "spec", "device", "family",
                               "tokenizer_2", "text_encoder_2"}
    assert text.text_encoder_2 is None and text.family == "sd1"
    assert not text.text_encoder.training


def test_damaged_tiny_cache_is_rebuilt():
    models.load_text_model("tiny")
    weights = models.tiny_model_dir() / "text_encoder" / "model.safetensors"
    weights.write_bytes(b"not safetensors")
    text = models.load_text_model("tiny")
    assert _same_weights(text.text_encoder, models.build_tiny_model()["text_encoder"])


def test_sd15_configs_are_sd15():
    text = models.sd15_text_config()
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["intermediate_size"], text["hidden_act"]) == (768, 12, 12, 3072, "quick_gelu")
    unet = models.sd15_unet_config()
    assert unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert unet["cross_attention_dim"] == 768 and unet["sample_size"] == 64
    assert models.sd15_vae_config()["scaling_factor"] == 0.18215


@pytest.mark.slow
def test_sd15_random_text_model_is_seeded():
    first = models.load_text_model("sd15-random")
    second = models.load_text_model("sd15-random")
    assert models.embedding_table(first.text_encoder).shape == (49408, 768)
    assert _same_weights(first.text_encoder, second.text_encoder)


# ---- specs


def test_builtin_specs():
    tiny = models.resolve_model_spec("tiny")
    assert (tiny.kind, tiny.ref, tiny.is_noise_model, tiny.default_resolution) == (
        "tiny", "tiny", True, 64)
    rand = models.resolve_model_spec("sd15-random")
    assert (rand.kind, rand.ref, rand.is_noise_model, rand.default_resolution) == (
        "sd15-random", "sd15-random", True, 512)


def test_default_spec_and_config(celebctl_home):
    spec = models.resolve_model_spec(None)
    assert spec.kind == "hub" and spec.ref == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert not spec.is_noise_model and spec.face_encoder == "vggface2"
    celebctl_home.mkdir(parents=True, exist_ok=True)
    paths.config_path().write_text('default_model = "tiny"\n')
    assert models.resolve_model_spec(None).kind == "tiny"
    paths.config_path().write_text("default_model = [1]\n")
    with pytest.raises(InvalidOption, match="default_model"):
        models.resolve_model_spec(None)


def test_folder_and_file_specs(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    spec = models.resolve_model_spec(str(folder))
    assert spec.kind == "folder" and spec.ref == str(folder.resolve())
    checkpoint = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(checkpoint))
    monkeypatch.chdir(tmp_path)
    spec = models.resolve_model_spec("./model.safetensors")
    assert spec.kind == "single_file" and spec.ref == str(checkpoint.resolve())
    assert spec.path == checkpoint.resolve()


def test_hub_spec():
    spec = models.resolve_model_spec("runwayml/stable-diffusion-v1-5")
    assert (spec.kind, spec.ref, spec.path) == ("hub", "runwayml/stable-diffusion-v1-5", None)


@pytest.mark.parametrize("text", ["./missing-model", "/no/such/model", "~/no-such-dir/x",
                                  "missing.safetensors"])
def test_missing_path_names_it(text):
    with pytest.raises(ModelUnavailable) as info:
        models.resolve_model_spec(text)
    assert f"Model path {text} does not exist" in str(info.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelUnavailable) as info:
        models.resolve_model_spec(str(path))
    message = str(info.value)
    assert "never unpickles" in message and ".safetensors" in message and str(path) in message


def test_unknown_spec_is_invalid():
    with pytest.raises(InvalidOption, match="not a model spec"):
        models.resolve_model_spec("nonsense")
    with pytest.raises(InvalidOption, match="empty"):
        models.resolve_model_spec("  ")


# ---- offline loading errors


def test_uncached_hub_model_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; another test may have imported it
    # before the env was set, and then every lookup would retry the network for ~45 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (models.load_text_model,
                 lambda s: models.load_pipeline_components(s, "cpu", "fp32")):
        with pytest.raises(ModelUnavailable) as info:
            load("someone/not-cached-model")
        message = str(info.value)
        assert "'someone/not-cached-model'" in message
        assert "hf download someone/not-cached-model" in message
        assert "huggingface-cli download someone/not-cached-model" in message
        assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message
        assert "local diffusers folder" in message


def test_broken_folder_and_file(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    with pytest.raises(ModelUnavailable, match="Could not load model folder .*empty-model"):
        models.load_text_model(str(folder))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)  # a download cut short: the header does not parse
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"x": torch.zeros(1)}, str(unrelated))  # readable, but no Stable Diffusion in it
    for load in (models.load_text_model,
                 lambda s: models.load_pipeline_components(s, "cpu", "fp32")):
        with pytest.raises(ModelUnavailable, match="broken.safetensors is not a readable "
                                                   r"\.safetensors checkpoint .*stopped early"):
            load(str(broken))
        with pytest.raises(ModelUnavailable, match="Could not load checkpoint .*unrelated"):
            load(str(unrelated))


def test_tiny_folder_loads_as_a_diffusers_folder():
    folder = models.ensure_tiny_model()
    comps = models.load_pipeline_components(str(folder), "cpu", "fp32")
    assert comps.spec.kind == "folder" and not comps.is_noise_model
    assert comps.default_resolution == 64  # 8 latents x 8 (VAE scale) read from the configs
    assert _same_weights(comps.unet, models.build_tiny_model()["unet"])


# ---- device and dtype


def test_resolve_device():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("CPU") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert models.resolve_device("auto").type in ("cpu", "mps")
        for name in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(InvalidOption, match="no CUDA GPU is available"):
                models.resolve_device(name)
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(InvalidOption, match="Unknown device"):
            models.resolve_device(bad)


def test_resolve_dtype():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("fp32", "cpu") == torch.float32
    assert models.resolve_dtype("fp16", "cpu") == torch.float16
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert models.resolve_dtype(torch.float16) == torch.float16
    for bad in ("fp8", "int8", "double"):
        with pytest.raises(InvalidOption, match="Unknown dtype"):
            models.resolve_dtype(bad, "cpu")


def test_auto_dtype_asks_the_requested_cuda_device_for_native_bf16(monkeypatch):
    # A host with a V100 (7.0) as cuda:0, an A100 (8.0) as cuda:1 and an H100 (9.0) as cuda:2;
    # torch's bf16 check (emulation counts, current device only) must not decide.
    capabilities = {0: (7, 0), 1: (8, 0), 2: (9, 0)}
    asked = []

    def capability(device=None):
        index = torch.device(device).index if device is not None else None
        asked.append(index)
        return capabilities[0 if index is None else index]

    def not_this(*args, **kwargs):
        raise AssertionError("resolve_dtype must not use is_bf16_supported")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", not_this)
    assert models.resolve_dtype("auto", "cuda:0") == torch.float16
    assert models.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert models.resolve_dtype("auto", "cuda:2") == torch.bfloat16
    assert models.resolve_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert asked == [0, 1, 2, 1]  # the device asked for, not the current one
    assert models.resolve_dtype("auto", "cuda") == torch.float16  # cuda = cuda:0 here
    # Explicit names and other devices never ask the GPU.
    asked.clear()
    assert models.resolve_dtype("bf16", "cuda:0") == torch.bfloat16
    assert models.resolve_dtype("fp16", "cuda:2") == torch.float16
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert asked == []


@pytest.mark.gpu
def test_auto_dtype_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for index in range(torch.cuda.device_count()):
        major, _ = torch.cuda.get_device_capability(index)
        expected = torch.bfloat16 if major >= 8 else torch.float16
        assert models.resolve_dtype("auto", f"cuda:{index}") == expected


# ---- hashes


def test_embedding_table_sha():
    table = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sha = models.embedding_table_sha256(table)
    assert sha == models.embedding_table_sha256(table.clone())
    assert sha != models.embedding_table_sha256(table.reshape(4, 3))
    changed = table.clone()
    changed[0, 0] = 0.5
    assert sha != models.embedding_table_sha256(changed)


@pytest.mark.slow
def test_sd1_single_file_text_encoder_loads_offline(tmp_path):

    reference = models._build_text_encoder(models.sd15_text_config())
    prefix = "cond_stage_model.transformer.text_model."
    tensors = {prefix + k: v.contiguous() for k, v in reference.state_dict().items()}
    tensors["model.diffusion_model.placeholder"] = torch.zeros(1)
    path = tmp_path / "sd1.safetensors"
    save_file(tensors, str(path))
    text = models.load_text_model(str(path))
    assert text.spec.kind == "single_file"
    assert _same_weights(text.text_encoder, reference)
    assert models.tokenizer_sha256(text.tokenizer) == models.tokenizer_sha256(
        models.build_clip_tokenizer())
