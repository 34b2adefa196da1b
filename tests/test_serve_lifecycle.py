"""`celebctl serve` starting, refusing to start, auth, and Ctrl-C mid-fit; and the WebUI
field mapping without a server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from tests.helpers import PHOTO
from tests.serving import ROOT, ServerProcess

httpx = pytest.importorskip("httpx")


# --------------------------------------------------------------------------------------------
# no server


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host", "192.168.1.5"],
                                  ["--host", "::"]])
def test_refuses_a_public_address_without_a_password(args):
    from celebctl.cli import app

    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 1
    assert "Refusing to listen on" in result.output
    assert "--api-auth USER:PASS" in result.output and "--insecure" in result.output


@pytest.mark.parametrize("value", ["alice", ":pw", "user:", "a:b,c"])
def test_api_auth_must_be_user_colon_password(value):
    from celebctl.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--api-auth", value])
    assert result.exit_code == 1
    assert "--api-auth takes USER:PASS" in result.output


def test_an_unknown_model_fails_before_the_port_opens(tmp_path):
    from celebctl.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_exposure_rules():
    from celebctl.server.security import check_exposure

    assert check_exposure("127.0.0.1", {}, False) is None
    assert check_exposure("localhost", {}, False) is None
    assert check_exposure("::1", {}, False) is None
    assert check_exposure("0.0.0.0", {"u": "p"}, False) is None
    assert "no password" in check_exposure("0.0.0.0", {}, True)


def test_list_and_help_do_not_import_the_server():
    code = ("import sys; from celebctl.cli import app; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'celebctl.server', "
            "'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("body", "sampler", "schedule"), [
    ({"sampler_name": "DDIM"}, "DDIM", "Automatic"),
    ({"sampler_name": "Euler a", "scheduler": "automatic"}, "Euler a", "Automatic"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, "DPM++ 2M", "Karras"),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Automatic"}, "DPM++ 2M", "Karras"),
    ({"sampler_index": "k_euler", "scheduler": "sgm_uniform"}, "Euler", "SGM Uniform"),
    ({"sampler_name": "UniPC"}, "UniPC", "Automatic")])
def test_webui_sampler_names_go_through_celebctl_samplers(body, sampler, schedule):
    from celebctl.server.webui import Txt2ImgRequest, render_options_from_txt2img

    options = render_options_from_txt2img(Txt2ImgRequest(prompt="alice", **body), {"tiny"})
    assert (options.sampler, options.schedule, options.scheduler) == (sampler, schedule, None)


def test_webui_defaults_are_the_webuis():
    from celebctl.server.webui import Txt2ImgRequest, render_options_from_txt2img

    options = render_options_from_txt2img(Txt2ImgRequest(prompt="alice"), {"tiny"})
    assert (options.steps, options.guidance, options.width, options.height) == (
        50, 7.0, 512, 512)
    assert (options.sampler, options.schedule) == ("Euler", "Automatic")  # sampler_index's
    assert options.seed is None and options.num_images == 1
    assert options.clip_skip is None and options.hires is None


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"sampler_name": "Euler b"}, "sampler_name", "Unknown sampler 'Euler b'"),
    ({"sampler_index": "nope"}, "sampler_index", "Unknown sampler 'nope'"),
    ({"sampler_name": "Euler a", "scheduler": "karras"}, "scheduler", "no 'Karras' schedule"),
    ({"scheduler": "align_your_steps"}, "scheduler", "Unknown schedule type"),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "exponential"}, "scheduler",
     "already says schedule type Karras"),
    ({"sampler_name": "DDIM", "eta": 0.5}, "eta", "eta 0"),
    ({"sampler_name": "Euler a", "eta": 0.5}, "eta", "eta 1"),
    ({"sampler_name": "Euler", "s_churn": 1}, "s_churn", "without churn"),
    ({"clip_skip": 40}, "clip_skip", "whole number from 1"),
    ({"clip_skip": 2, "override_settings": {"CLIP_stop_at_last_layers": 3}}, "clip_skip",
     "differs"),
])
def test_webui_values_celebctl_lacks_are_refused_by_field(body, field, says):
    from celebctl.server.webui import (
        Txt2ImgRequest,
        UnsupportedField,
        render_options_from_txt2img,
    )

    with pytest.raises(UnsupportedField) as caught:
        render_options_from_txt2img(Txt2ImgRequest(**body), {"tiny"})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and says in str(caught.value)


def test_webui_eta_and_clip_skip_that_change_nothing_are_taken():
    from celebctl.server.webui import Txt2ImgRequest, render_options_from_txt2img

    for body in ({"sampler_name": "Euler a", "eta": 1}, {"sampler_name": "DDIM", "eta": 0},
                 {"sampler_name": "Euler", "eta": 0.3}, {"clip_skip": 0}):
        render_options_from_txt2img(Txt2ImgRequest(**body), {"tiny"})
    options = render_options_from_txt2img(
        Txt2ImgRequest(override_settings={"CLIP_stop_at_last_layers": 2}), {"tiny"})
    assert options.clip_skip == 2
    assert render_options_from_txt2img(Txt2ImgRequest(clip_skip=3), {"tiny"}).clip_skip == 3


def test_webui_hires_fields_map_to_hires_fix():
    from celebctl.server.webui import Txt2ImgRequest, render_options_from_txt2img

    options = render_options_from_txt2img(Txt2ImgRequest(enable_hr=True), {"tiny"})
    hires = options.hires
    # A1111's StableDiffusionProcessingTxt2Img defaults: hr_scale 2, denoising 0.75, Latent.
    assert (hires.scale, hires.steps, hires.denoise, hires.upscaler) == (
        2.0, None, 0.75, "latent")
    options = render_options_from_txt2img(Txt2ImgRequest(
        enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_second_pass_steps=3,
        denoising_strength=0.4, hr_sampler_name="Use same sampler", hr_scheduler="",
        hr_checkpoint_name="tiny", hr_prompt="", sampler_name="Euler"), {"tiny"})
    assert (options.hires.scale, options.hires.steps, options.hires.denoise,
            options.hires.upscaler) == (1.5, 3, 0.4, "lanczos")
    # Off, its fields are ignored, as the WebUI ignores them.
    assert render_options_from_txt2img(Txt2ImgRequest(hr_upscaler="ESRGAN_4x"),
                                       {"tiny"}).hires is None


@pytest.mark.parametrize(("body", "field"), [
    ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"), ({"hr_resize_x": 1024}, "hr_resize_x"),
    ({"hr_scale": 8}, "hr_scale"), ({"denoising_strength": 0}, "denoising_strength"),
    ({"hr_sampler_name": "DDIM"}, "hr_sampler_name"), ({"hr_scheduler": "karras"},
                                                       "hr_scheduler"),
    ({"hr_prompt": "other"}, "hr_prompt"), ({"hr_negative_prompt": "x"}, "hr_negative_prompt"),
    ({"hr_checkpoint_name": "sdxl"}, "hr_checkpoint_name"),
])
def test_webui_hires_fields_it_cannot_honour_are_refused(body, field):
    from celebctl.server.webui import (
        Txt2ImgRequest,
        UnsupportedField,
        render_options_from_txt2img,
    )

    with pytest.raises(UnsupportedField) as caught:
        render_options_from_txt2img(Txt2ImgRequest(enable_hr=True, prompt="a", **body),
                                    {"tiny"})
    assert caught.value.field == field


def test_webui_img2img_fields():
    import base64

    from celebctl.server.webui import (
        Img2ImgRequest,
        UnsupportedField,
        render_options_from_img2img,
    )

    raw = base64.b64encode(b"png bytes").decode()
    for sent in (raw, "data:image/png;base64," + raw):
        options, data = render_options_from_img2img(Img2ImgRequest(init_images=[sent]),
                                                    {"tiny"})
        assert data == b"png bytes" and options.strength == 0.75  # the WebUI's default
    # webuiapi's img2img defaults (eta 1 with Euler a, inpainting fields without a mask).
    options, _ = render_options_from_img2img(Img2ImgRequest(
        init_images=[raw], sampler_name="Euler a", eta=1.0, mask_blur=4, inpainting_fill=0,
        inpaint_full_res=True, image_cfg_scale=1.5, initial_noise_multiplier=1,
        denoising_strength=0.5, include_init_images=False), {"tiny"})
    assert options.strength == 0.5 and options.sampler == "Euler a"
    for body, field in (({"init_images": []}, "init_images"),
                        ({"init_images": [raw, raw]}, "init_images"),
                        ({"init_images": ["%%%"]}, "init_images"),
                        ({"init_images": [raw], "resize_mode": 1}, "resize_mode"),
                        ({"init_images": [raw], "mask": raw}, "mask"),
                        ({"init_images": [raw], "initial_noise_multiplier": 0.5},
                         "initial_noise_multiplier"),
                        ({"init_images": [raw], "denoising_strength": 1.5},
                         "denoising_strength")):
        with pytest.raises(UnsupportedField) as caught:
            render_options_from_img2img(Img2ImgRequest(**body), {"tiny"})
        assert caught.value.field == field


# --------------------------------------------------------------------------------------------
# auth, on a server of its own


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, _tiny_template):
    home = tmp_path_factory.mktemp("serve-auth") / "home"
    shutil.copytree(_tiny_template, home)
    process = ServerProcess(home, "--api-auth", "ada:s3cret,bo:pw",
                            auth=("ada", "s3cret")).start()
    yield process
    process.stop()


def test_auth_on(auth_server):
    import webuiapi

    url = auth_server.url
    for path in ("/", "/api/identities", "/sdapi/v1/sd-models", "/docs"):
        answer = httpx.get(url + path)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith("Basic")
        assert "--api-auth" in answer.json()["message"]
    assert httpx.get(url + "/api/identities", auth=("ada", "wrong")).status_code == 401
    assert httpx.get(url + "/api/identities", auth=("eve", "s3cret")).status_code == 401
    assert httpx.get(url + "/api/identities", auth=("bo", "pw")).status_code == 200
    assert httpx.get(url + "/", auth=("ada", "s3cret")).text.startswith("<!doctype html>")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=auth_server.port, username="ada",
                            password="s3cret", sampler="DDIM", steps=2)
    assert api.util_get_model_names() == ["tiny"]
    result = api.txt2img(prompt="a red house", width=64, height=64, seed=1, eta=0)
    assert len(result.images) == 1


# --------------------------------------------------------------------------------------------
# Ctrl-C mid-fit


def test_ctrl_c_mid_fit_finishes_the_fit_and_exits_cleanly(tmp_path, _tiny_template):
    home = tmp_path / "home"
    shutil.copytree(_tiny_template, home)
    server = ServerProcess(home).start()
    try:
        photo = PHOTO.read_bytes()
        jobs = []
        for name in ("gina", "hugo"):
            answer = httpx.post(f"{server.url}/api/identities",
                                data={"name": name, "steps": "2"},
                                files=[("photos", ("p.png", photo, "image/png"))])
            assert answer.status_code == 202, answer.text
            jobs.append(answer.json()["job"]["id"])
        waiting: list[httpx.Response] = []  # a WebUI client whose render waits behind them
        client = threading.Thread(target=lambda: waiting.append(httpx.post(
            f"{server.url}/sdapi/v1/txt2img", timeout=300,
            json={"prompt": "gina", "width": 64, "height": 64, "steps": 2,
                  "sampler_name": "Euler"})))
        client.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = httpx.get(f"{server.url}/api/jobs/{jobs[0]}").json()
            if job["state"] == "running" and job["progress"]["phase"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the fit never started")
        while len(httpx.get(f"{server.url}/api/jobs").json()["jobs"]) < 4:
            time.sleep(0.1)  # load, two adds and the render are all in
        code = server.stop(timeout=300)
        client.join(60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log()
    assert code == 130, log  # the shell's code for Ctrl-C, as every celebctl command
    assert "identity 'gina' was written in full" in log
    assert "Traceback" not in log
    # The waiting client was answered, not left hanging: its render was cancelled.
    assert waiting[0].status_code == 503
    assert "cancelled before it started" in waiting[0].json()["message"]
    # The running fit finished whole; the queued one never started.
    listing = json.loads(server.celebctl("list", "--json").stdout)
    assert [i["name"] for i in listing["identities"]] == ["gina"]
    doctor = server.celebctl("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert not list(home.rglob("*.tmp*"))


def test_eval_sheet_paths_stay_out_of_bundles(celebctl_home, tmp_path):
    import zipfile

    from celebctl import bundles, registry
    from celebctl.documents import parse_toml
    from tests.helpers import add_identity

    add_identity("alice")
    registry.append_history(["alice"], "evals", {"date": "2026-12-07", "identity_alice": 0.5,
                                                 "sheet": "/home/someone/evals/sheet.png"})
    assert registry.get_identity("alice").meta["evals"][0]["sheet"].endswith("sheet.png")
    out = bundles.export_bundle("alice", tmp_path / "a.celeb")
    with zipfile.ZipFile(out) as archive:
        meta = parse_toml(archive.read("identity.toml"))
    assert meta["evals"] == [{"date": "2026-12-07", "identity_alice": 0.5}]
