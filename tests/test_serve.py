"""`celebctl serve`: one real server (tiny model, CPU) driven by real clients: the `webuiapi`
package, requests shaped as Open WebUI's and SillyTavern's A1111 backends send them, httpx
for celebctl's /api, and hostile uploads."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time

import pytest

from celebctl import samplers
from tests.helpers import PHOTO
from tests.serving import ServerProcess

httpx = pytest.importorskip("httpx")
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory, fitted):
    """One server for the module, on a copy of the home with alice and bob fitted."""
    home = tmp_path_factory.mktemp("serve") / "home"
    shutil.copytree(fitted, home)
    process = ServerProcess(home).start()
    yield process
    process.stop()


def png_text(data: bytes) -> dict[str, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return dict(image.text)


def jobs(server) -> list[dict]:
    return httpx.get(f"{server.url}/api/jobs").json()["jobs"]


def wait_job(server, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
        if job["state"] in ("done", "error", "interrupted", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish")


# --------------------------------------------------------------------------------------------
# the WebUI's API


def test_webuiapi_client_renders_an_identity_by_name(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2)
    result = api.txt2img(prompt="alice riding a bike", width=64, height=64, seed=5,
                         cfg_scale=6)
    assert len(result.images) == 1
    assert result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [5]
    assert result.info["sampler_name"] == "Euler"
    assert result.parameters["prompt"] == "alice riding a bike"
    # The PNG carries the same text chunks `celebctl render` writes.
    text = result.images[0].info
    assert text["parameters"].startswith("alice person riding a bike\nNegative prompt: ")
    assert ("Steps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 6, Seed: 5, "
            "Size: 64x64") in text["parameters"]
    assert "Identities: alice" in text["parameters"]
    meta = json.loads(text["celebctl"])
    assert meta["identities"] == ["alice"] and meta["sampler"] == "Euler"
    assert result.info["infotexts"] == [text["parameters"]]
    assert result.info["scheduler"] == "Automatic" and result.info["clip_skip"] == 1

    assert api.util_get_model_names() == ["tiny"]
    assert api.util_get_current_model() == "tiny"
    listed = {s["name"]: s for s in api.get_samplers()}
    assert list(listed) == samplers.sampler_names()
    assert "k_euler_a" in listed["Euler a"]["aliases"]
    assert listed["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    embeddings = api.get_embeddings()
    assert set(embeddings["loaded"]) == {"alice", "bob"}
    assert embeddings["loaded"]["alice"]["vectors"] == 2
    assert embeddings["loaded"]["alice"]["step"] == 3
    assert embeddings["skipped"] == {}
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0.0


def test_webuiapi_defaults_euler_a_and_automatic_render(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)  # "Euler a", "automatic"
    result = api.txt2img(prompt="alice", width=64, height=64, steps=2, seed=8)
    assert result.info["sampler_name"] == "Euler a" and result.info["scheduler"] == "Automatic"
    assert "Sampler: Euler a, Schedule type: Automatic" in result.images[0].info["parameters"]


def test_karras_schedule_and_clip_skip_override(server):
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "alice", **SMALL, "seed": 4, "sampler_name": "DPM++ 2M",
        "scheduler": "karras", "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert (info["sampler_name"], info["scheduler"], info["clip_skip"]) == (
        "DPM++ 2M", "Karras", 2)
    params = png_text(base64.b64decode(answer.json()["images"][0]))["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in params
    assert "Clip skip: 2" in params
    # alice was fitted at clip skip 1: the render says so.
    assert any("clip skip" in note for note in info["celebctl"]["notes"])
    listed = httpx.get(f"{server.url}/sdapi/v1/schedulers").json()
    karras = next(s for s in listed if s["label"] == "Karras")
    assert set(karras) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    assert karras["name"] == "karras"
    assert httpx.get(f"{server.url}/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1


def test_hires_fix_through_webuiapi(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2)
    result = api.txt2img(prompt="bob", width=64, height=64, seed=2, enable_hr=True,
                         hr_scale=2, hr_upscaler=webuiapi.HiResUpscaler.Latent,
                         hr_second_pass_steps=2, denoising_strength=0.6)
    assert result.images[0].size == (128, 128)
    params = result.images[0].info["parameters"]
    assert "Size: 64x64" in params  # the first pass's, as the WebUI writes it
    for field in ("Denoising strength: 0.6", "Hires upscale: 2", "Hires steps: 2",
                  "Hires upscaler: Latent"):
        assert field in params
    assert result.info["denoising_strength"] == 0.6
    assert result.info["extra_generation_params"]["Hires upscaler"] == "Latent"
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos"]
    assert [m["name"] for m in api.get_latent_upscale_modes()] == ["Latent"]


def test_img2img_through_webuiapi(server):
    import webuiapi
    from PIL import Image

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, steps=4)
    with Image.open(PHOTO) as photo:
        init = photo.convert("RGB").resize((80, 72))
    result = api.img2img(images=[init], prompt="alice", width=64, height=64, seed=3,
                         denoising_strength=0.5)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    params = result.images[0].info["parameters"]
    assert "Denoising strength: 0.5" in params and "Sampler: Euler a" in params
    assert result.info["denoising_strength"] == 0.5
    assert "init_images" not in result.parameters
    meta = json.loads(result.images[0].info["celebctl"])
    assert meta["init_image_sha256"]  # the PNG records which image it started from


def _img2img(server, image: bytes, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=300, json={
        "prompt": "alice", **SMALL, "init_images": [
            "data:image/png;base64," + base64.b64encode(image).decode()], **body})


def test_img2img_init_images_that_are_not_images(server):
    from PIL import Image

    before = len(jobs(server))
    answer = _img2img(server, b"#!/bin/sh\necho hi\n")
    assert answer.status_code == 422
    assert answer.json()["message"].startswith("init_images: ")
    assert "not an image" in answer.json()["message"]
    assert "/tmp" not in answer.json()["message"] and "celebctl-init" not in answer.text
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 MP in a few kB
    answer = _img2img(server, buffer.getvalue())
    assert answer.status_code == 422 and "megapixel" in answer.json()["message"]
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json={
        "prompt": "alice", **SMALL, "init_images": ["not base64!"]})
    assert answer.status_code == 422 and "base64" in answer.json()["message"]
    answer = _img2img(server, PHOTO.read_bytes(), mask="aGVsbG8=")
    assert answer.status_code == 422 and answer.json()["message"].startswith("mask: ")
    assert len(jobs(server)) == before  # refused before anything queued


def test_lora_tags_in_prompts_and_the_lora_list(server):
    from celebctl import models
    from tests.helpers import data_home
    from tests.test_lora import make_lora

    folder = server.home / "loras"
    with data_home(server.home):
        parts = models.load_pipeline_components("tiny", "cpu", "fp32")
    make_lora(parts, folder / "styles" / "film.safetensors")
    (folder / "old.ckpt").write_bytes(b"never listed")
    listed = httpx.get(f"{server.url}/sdapi/v1/loras").json()
    assert listed == [{"name": "film", "alias": "film", "path": "styles/film.safetensors",
                       "metadata": {}}]
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "alice <lora:film:0.8>", **SMALL, "seed": 1, "sampler_name": "Euler"})
    assert answer.status_code == 200, answer.text
    params = png_text(base64.b64decode(answer.json()["images"][0]))["parameters"]
    assert "<lora:film:0.8>" in params and "Lora hashes: " in params
    before = len(jobs(server))
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={
        "prompt": "alice <lora:flim:0.8>", **SMALL})
    assert answer.status_code == 422
    assert "No LoRA 'flim'" in answer.json()["message"]
    assert str(server.home) not in answer.json()["message"]  # the server's paths stay its own
    assert len(jobs(server)) == before


def test_open_webui_request_shape(server):
    # Open WebUI (backend/open_webui/routers/images.py): an empty authorization header when
    # no auth is set, the options read and posted back whole, sd-models' title and model_name.
    headers = {"authorization": ""}
    options = httpx.get(f"{server.url}/sdapi/v1/options", headers=headers).json()
    assert options["sd_model_checkpoint"] == "tiny"
    options["sd_model_checkpoint"] = "tiny"
    answer = httpx.post(f"{server.url}/sdapi/v1/options", json=options, headers=headers)
    assert answer.status_code == 200
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models", headers=headers).json()
    assert [(m["title"], m["model_name"]) for m in models] == [("tiny", "tiny")]
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", headers=headers, timeout=300, json={
        "prompt": "a portrait of bob", "batch_size": 2, "width": 64, "height": 64, "steps": 2,
        "negative_prompt": "blurry"})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert len(data["images"]) == 2
    info = json.loads(data["info"])
    assert info["all_seeds"][1] == info["all_seeds"][0] + 1
    for image in data["images"]:
        assert "Identities: bob" in png_text(base64.b64decode(image))["parameters"]


def test_sillytavern_request_shape(server):
    # SillyTavern's sd extension through its server (src/endpoints/stable-diffusion.js): the
    # whole body is forwarded, with its own url/auth fields and the hires-fix fields off.
    base = server.url
    assert httpx.get(f"{base}/sdapi/v1/options").status_code == 200
    assert "DPM++ 2M" in [s["name"] for s in httpx.get(f"{base}/sdapi/v1/samplers").json()]
    assert [s["name"] for s in httpx.get(f"{base}/sdapi/v1/schedulers").json()] == [
        "automatic", "uniform", "karras", "exponential", "sgm_uniform", "ddim", "beta"]
    assert httpx.post(f"{base}/sdapi/v1/options",
                      json={"sd_model_checkpoint": "tiny"}).status_code == 200
    # The lists its settings panel asks for: answered, and empty where celebctl has none.
    assert [u["name"] for u in httpx.get(f"{base}/sdapi/v1/upscalers").json()] == [
        "None", "Lanczos"]
    assert httpx.get(f"{base}/sdapi/v1/latent-upscale-modes").json() == [{"name": "Latent"}]
    assert httpx.get(f"{base}/sdapi/v1/sd-vae").json() == []
    body = {
        "prompt": "alice and bob, best quality", "negative_prompt": "lowres",
        "sampler_name": "DPM++ 2M", "scheduler": "Automatic", "steps": 2, "cfg_scale": 7,
        "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
        "hr_upscaler": "Latent", "hr_scale": 2, "hr_additional_modules": [],
        "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": -1,
        "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                              "forge_additional_modules": []},
        "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True,
        "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False,
        "url": base, "auth": "",
    }
    answer = httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and 0 <= info["seed"] < 2**32
    params = png_text(base64.b64decode(answer.json()["images"][0]))["parameters"]
    assert "Sampler: DPM++ 2M" in params and 'Identities: "alice, bob"' in params


@pytest.mark.parametrize(("field", "value"), [
    ("mask", "aGVsbG8="), ("init_images", ["aGVsbG8="]), ("restore_faces", True),
    ("tiling", True), ("sampler_name", "Euler b"), ("scheduler", "align_your_steps"),
    ("override_settings", {"CLIP_stop_at_last_layers": 99}),
    ("override_settings", {"sd_model_checkpoint": "sd_xl_base_1.0"}),
    ("alwayson_scripts", {"ADetailer": {"args": [True]}}),
])
def test_txt2img_refuses_what_it_would_draw_differently(server, field, value):
    before = len(jobs(server))
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img",
                        json={"prompt": "alice", **SMALL, field: value})
    assert answer.status_code == 422
    assert answer.json()["message"].startswith(field)
    assert len(jobs(server)) == before  # refused before it queued


@pytest.mark.parametrize(("body", "says"), [
    ({"steps": 151}, "steps must be between 1 and 150"),
    ({"batch_size": 9, "n_iter": 2}, "At most 16 images"),
    ({"width": 4096}, "width must be at most 1024"),
    ({"enable_hr": True, "hr_second_pass_steps": 151}, "hires steps must be at most 150"),
    ({"enable_hr": True, "hr_scale": 4, "width": 512, "height": 512}, "past this server's 1024"),
    ({"prompt": "<nobody> at the beach"}, "nobody"),
])
def test_limits_and_prompts_refused_before_queueing(server, body, says):
    before = len(jobs(server))
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img",
                        json={"prompt": "alice", **SMALL, **body})
    assert answer.status_code in (404, 422)
    assert says in answer.json()["message"]
    assert "Traceback" not in answer.text
    assert len(jobs(server)) == before


def test_unknown_fields_are_ignored(server):
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "bob", **SMALL, "seed": 3, "sampler_name": "DDIM", "eta": 0,
        "some_extension_field": {"x": 1}, "do_not_save_samples": True})
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["all_seeds"] == [3]


def test_two_clients_at_once_are_queued_and_both_answered(server):
    answers: dict[int, httpx.Response] = {}

    def ask(seed: int) -> None:
        answers[seed] = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
            "prompt": "alice", **SMALL, "seed": seed, "sampler_name": "Euler"})

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (11, 12):
        assert answers[seed].status_code == 200, answers[seed].text
        assert json.loads(answers[seed].json()["info"])["all_seeds"] == [seed]
    renders = [j for j in jobs(server) if j["kind"] == "render"][-2:]
    first, second = sorted(renders, key=lambda j: j["started"])
    assert second["started"] >= first["finished"]  # one at a time


def test_a_client_that_disconnects_mid_render_stops_its_job(server):
    body = json.dumps({"prompt": "alice", "width": 64, "height": 64, "steps": 150,
                       "sampler_name": "Euler"}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = httpx.get(f"{server.url}/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the render never started")
    sock.close()
    job = [j for j in jobs(server) if j["kind"] == "render"][-1]
    job = wait_job(server, job["id"], timeout=120)
    assert job["state"] == "interrupted"
    assert job["progress"]["done"] < 150
    # The server goes on serving.
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=300,
                        json={"prompt": "bob", **SMALL, "sampler_name": "Euler"})
    assert answer.status_code == 200


def test_interrupt_stops_the_running_render_and_cancel_drops_a_queued_one(server):
    long = {"prompt": "alice", "width": 64, "height": 64, "steps": 150, "scheduler": "euler"}
    running = httpx.post(f"{server.url}/api/render", json=long).json()["job"]["id"]
    queued = httpx.post(f"{server.url}/api/render", json=long).json()["job"]["id"]
    cancelled = httpx.post(f"{server.url}/api/jobs/{queued}/cancel").json()
    assert cancelled["state"] == "cancelled"
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline, "the render never started"
        time.sleep(0.2)
    assert httpx.post(f"{server.url}/sdapi/v1/interrupt").json() == {"interrupted": running}
    job = wait_job(server, running, timeout=120)
    assert job["state"] == "interrupted" and job["progress"]["done"] < 150
    assert wait_job(server, queued)["started"] is None  # it never ran


# --------------------------------------------------------------------------------------------
# celebctl's API


def test_api_lists_shows_and_serves_face_crops(server):
    listing = httpx.get(f"{server.url}/api/identities").json()
    names = [i["name"] for i in listing["identities"]]
    assert "alice" in names and "bob" in names
    alice = next(i for i in listing["identities"] if i["name"] == "alice")
    assert alice["family"] == "sd1" and alice["model"] == "tiny"
    shown = httpx.get(f"{server.url}/api/identities/alice").json()
    assert shown["name"] == "alice" and shown["fit"]["steps"] == 3
    face = httpx.get(f"{server.url}{alice['face_url']}")
    assert face.status_code == 200 and face.headers["content-type"] == "image/png"
    assert face.content.startswith(b"\x89PNG")
    missing = httpx.get(f"{server.url}/api/identities/alise")
    assert missing.status_code == 404
    assert "alice" in missing.json()["message"]  # did you mean
    assert httpx.get(f"{server.url}/api/identities/nobody/sheet").status_code == 404
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/sdapi/v1/txt2img" in schema["paths"] and "/api/render" in schema["paths"]


def test_api_shows_the_latest_eval_and_its_sheet(server, tmp_path, monkeypatch):
    from PIL import Image

    from celebctl import registry

    sheet = tmp_path / "eval-bob-sheet.png"
    Image.new("RGB", (8, 8), "white").save(sheet)
    monkeypatch.setenv("CELEBCTL_HOME", str(server.home))
    registry.append_history(["bob"], "evals", {"date": "2026-12-07T12:00:00+00:00",
                                               "identity_bob": 0.61, "sheet": str(sheet)})
    bob = next(i for i in httpx.get(f"{server.url}/api/identities").json()["identities"]
               if i["name"] == "bob")
    assert bob["latest_eval"]["identity_bob"] == 0.61
    answer = httpx.get(f"{server.url}{bob['sheet_url']}")
    assert answer.status_code == 200 and answer.content == sheet.read_bytes()


def test_api_render_job_with_server_sent_events(server):
    answer = httpx.post(f"{server.url}/api/render",
                        json={"prompt": "alice at the beach", **SMALL, "seed": 4})
    assert answer.status_code == 202
    job_id = answer.json()["job"]["id"]
    events = []
    with httpx.stream("GET", f"{server.url}/api/jobs/{job_id}/events", timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and line != "data: {}":
                events.append(json.loads(line[6:]))
    assert events[-1]["state"] == "done"
    assert any(e["progress"]["phase"] == "render" for e in events)
    job = events[-1]
    assert job["result"]["identities"] == ["alice"] and job["result"]["seeds"] == [4]
    picture = httpx.get(f"{server.url}{job['images'][0]}")
    assert picture.status_code == 200
    assert "Seed: 4" in png_text(picture.content)["parameters"]
    assert httpx.get(f"{server.url}/api/jobs/{job_id}/images/5").status_code == 404


def test_api_add_rename_remove(server):
    photo = PHOTO.read_bytes()
    answer = httpx.post(f"{server.url}/api/identities",
                        data={"name": "carol", "steps": "2"},
                        files=[("photos", ("me.png", photo, "image/png"))])
    assert answer.status_code == 202, answer.text
    job = wait_job(server, answer.json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["result"]["identities"] == ["carol"] and job["result"]["steps"] == 2
    again = httpx.post(f"{server.url}/api/identities", data={"name": "carol"},
                       files=[("photos", ("me.png", photo, "image/png"))])
    assert again.status_code == 409
    renamed = httpx.post(f"{server.url}/api/identities/carol/rename",
                         json={"new_name": "dora"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "dora"
    assert (server.home / "identities" / "dora" / "identity.toml").is_file()
    removed = httpx.delete(f"{server.url}/api/identities/dora")
    assert removed.status_code == 200
    assert not (server.home / "identities" / "dora").exists()
    assert httpx.delete(f"{server.url}/api/identities/dora").status_code == 404


def test_api_joint_is_checked_before_queueing(server):
    before = len(jobs(server))
    answer = httpx.post(f"{server.url}/api/identities/joint", json={"names": ["alice", "zed"]})
    assert answer.status_code == 404 and "zed" in answer.json()["message"]
    answer = httpx.post(f"{server.url}/api/identities/joint", json={"names": ["alice"]})
    assert answer.status_code == 422
    assert len(jobs(server)) == before


# --------------------------------------------------------------------------------------------
# hostile requests


def _add(server, name="eve", files=None):
    files = files if files is not None else [("photos", ("p.png", PHOTO.read_bytes(),
                                                         "image/png"))]
    return httpx.post(f"{server.url}/api/identities", data={"name": name, "steps": "2"},
                      files=files, timeout=60)


def test_upload_that_is_not_an_image(server):
    answer = _add(server, files=[("photos", ("x.png", b"#!/bin/sh\necho hi\n", "image/png"))])
    assert answer.status_code == 422
    assert "not an image" in answer.json()["message"]


def test_upload_decompression_bomb(server):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 MP in a few kB
    answer = _add(server, files=[("photos", ("bomb.png", buffer.getvalue(), "image/png"))])
    assert answer.status_code == 422
    assert "megapixel" in answer.json()["message"]


def test_upload_with_a_fifo_as_its_file_name(server, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    answer = _add(server, files=[("photos", (str(fifo), b"not an image", "image/png"))])
    assert answer.status_code == 422  # answered: the name was never opened
    assert "not an image" in answer.json()["message"]
    assert "fifo" not in answer.json()["message"]


def test_upload_of_17_photos(server):
    photo = PHOTO.read_bytes()
    answer = _add(server, files=[("photos", (f"{i}.png", photo, "image/png"))
                                 for i in range(17)])
    assert answer.status_code == 422
    assert "1 to 16 photos" in answer.json()["message"]


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "Alice", ""])
def test_upload_with_a_traversal_name(server, name):
    answer = _add(server, name=name)
    assert answer.status_code == 422
    assert "name" in answer.json()["message"].lower()
    assert not (server.home / "evil").exists()
    assert not (server.home.parent / "evil").exists()


def test_paths_in_urls_never_reach_the_file_system(server):
    for path in ("/api/identities/..%2F..%2Fetc/face", "/static/..%2Fapp.py",
                 "/static/../../pyproject.toml", "/api/identities/%2e%2e/face"):
        answer = httpx.get(f"{server.url}{path}")
        assert answer.status_code in (404, 422), path
        assert answer.headers["content-type"].startswith("application/json")


def test_cross_site_posts_are_refused_and_cors_is_closed(server):
    answer = httpx.post(f"{server.url}/api/render", json={"prompt": "alice"},
                        headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403
    answer = httpx.get(f"{server.url}/api/identities", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in answer.headers
    rebound = httpx.get(f"{server.url}/api/identities", headers={"Host": "evil.example"})
    assert rebound.status_code == 403


# --------------------------------------------------------------------------------------------
# the page, in a real browser

CHROMIUM = "/usr/bin/chromium"


def test_page_adds_a_person_and_renders_them(server):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (install the system's chromium package; "
                    ".ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--headless", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            outside = []
            page.on("request", lambda r: r.url.startswith(server.url) or outside.append(r.url))
            page.goto(server.url + "/")
            page.wait_for_selector(".card[data-name=alice]")
            page.fill("#add-name", "frank")
            page.set_input_files("#add-photos", str(PHOTO))
            page.fill("#add-steps", "2")
            page.click("#add-button")
            page.wait_for_selector(".card[data-name=frank] img.face", timeout=300_000)
            assert "frank added" in page.text_content("#add-message")
            page.fill("#prompt", "frank riding a bike")
            page.fill("#steps", "2")
            page.click("#render-button")
            page.wait_for_selector("#pictures img.picture", timeout=300_000)
            natural = page.eval_on_selector("#pictures img.picture",
                                            "img => img.complete && img.naturalWidth")
            assert natural == 64
            assert "of frank" in page.text_content("#render-message")
            assert outside == []  # nothing fetched from anywhere else
        finally:
            browser.close()
