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


@pytest.mark.parametrize(("sampler", "scheduler"), [
    ("DDIM", "ddim"), ("Euler", "euler"), ("DPM++ 2M", "dpm"), ("k_euler", "euler")])
def test_webui_sampler_names_map_to_schedulers(sampler, scheduler):
    from celebctl.server.webui import Txt2ImgRequest, render_options_from_txt2img

    options = render_options_from_txt2img(
        Txt2ImgRequest(prompt="alice", sampler_name=sampler), {"tiny"})
    assert options.scheduler == scheduler


def test_webui_defaults_are_the_webuis():
    from celebctl.server.webui import Txt2ImgRequest, render_options_from_txt2img

    options = render_options_from_txt2img(Txt2ImgRequest(prompt="alice"), {"tiny"})
    assert (options.steps, options.guidance, options.width, options.height) == (
        50, 7.0, 512, 512)
    assert options.scheduler == "euler"  # sampler_index's default, "Euler"
    assert options.seed is None and options.num_images == 1


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "UniPC", "LCM"])
def test_webui_samplers_celebctl_lacks_are_refused_by_field(sampler):
    from celebctl.server.webui import (
        Txt2ImgRequest,
        UnsupportedField,
        render_options_from_txt2img,
    )

    with pytest.raises(UnsupportedField) as caught:
        render_options_from_txt2img(Txt2ImgRequest(sampler_name=sampler), {"tiny"})
    assert caught.value.field == "sampler_name"


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
