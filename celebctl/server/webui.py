"""The WebUI's API (``/sdapi/v1``), the part its clients use, on celebctl's renderer.

Requests are mapped in :mod:`.webui_requests` (the WebUI's field names and defaults; a field
that would draw something else if ignored is refused with a 422 naming it). Identities and
``<lora:NAME:WEIGHT>`` tags are found in prompts exactly as `celebctl render` finds them;
txt2img takes the hires fix, img2img one init image.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Request

from .. import samplers as samplers_mod
from .jobs import QueueClosed
from .state import JobFailed, ServeState, State, wait_for_job
from .webui_requests import (  # noqa: F401 - the adapter's names, used by the tests too
    WEBUI_DEFAULT_SAMPLER,
    Img2ImgRequest,
    Txt2ImgRequest,
    UnsupportedField,
    render_options_from_img2img,
    render_options_from_txt2img,
)
from .work import RenderOptions, check_render, stage_init_image
from .work import render as render_job

router = APIRouter(prefix="/sdapi/v1", tags=["WebUI API"])
MAX_LORA_WALK = 200_000  # entries looked at in the LoRA folder for GET /loras


def served_titles(state: ServeState) -> set[str]:
    model = state.model_entry()
    return {model["title"], model["model_name"], model["filename"]}


def _png_parameters(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return str((getattr(image, "text", {}) or {}).get("parameters", ""))


@router.post("/txt2img", summary="Render as the WebUI's txt2img does (hires fix too)")
async def txt2img(body: Txt2ImgRequest, request: Request, state: State) -> dict[str, Any]:
    options = render_options_from_txt2img(body, served_titles(state))
    return await _generate("txt2img", body, options, request, state)


@router.post("/img2img", summary="Render from an init image as the WebUI's img2img does")
async def img2img(body: Img2ImgRequest, request: Request, state: State) -> dict[str, Any]:
    options, data = render_options_from_img2img(body, served_titles(state))
    options.init_image = await state.run_blocking(stage_init_image, data)
    del data
    parameters = {k: v for k, v in body.model_dump().items() if k != "init_images"}
    return await _generate("img2img", body, options, request, state, parameters)


async def _generate(kind: str, body: Any, options: RenderOptions, request: Request,
                    state: ServeState, parameters: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Check, queue, wait for the render; answer as the WebUI answers."""
    plan = await state.run_blocking(check_render, state.settings, options)
    job = state.queue.submit("render", f"{kind}: {options.prompt[:60]}",
                             render_job(state.settings, options))
    if not await wait_for_job(request, job, state.queue):
        return {"images": [], "parameters": {}, "info": "{}"}  # the client has gone
    if job.error:
        raise JobFailed(job.error)
    if job.state == "cancelled":
        raise QueueClosed("The render was cancelled before it started (the server is "
                          "shutting down, or the job was cancelled through /api/jobs).")
    result = job.result or {}
    seeds = [int(options.seed or 0) + i for i in range(len(job.outputs))]
    if parameters is None:
        parameters = body.model_dump()
    parameters["seed"] = int(options.seed or 0)
    infotexts = [_png_parameters(png) for png in job.outputs]
    model = state.model_entry()
    redraw = result.get("redraw") or {}
    denoise = redraw.get("denoising_strength")
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(seeds),
        "negative_prompt": body.negative_prompt or "",
        "all_negative_prompts": [body.negative_prompt or ""] * len(seeds),
        "seed": int(options.seed or 0), "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": result.get("width", body.width), "height": result.get("height", body.height),
        "sampler_name": result.get("sampler", options.extra["sampler_name"]),
        "scheduler": result.get("schedule_type", options.extra["scheduler"]),
        "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
        "n_iter": body.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model["model_name"], "sd_model_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": denoise,
        "extra_generation_params": _extra_params(redraw), "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": result.get("clip_skip", getattr(plan, "clip_skip", 1)),
        "is_using_inpainting_conditioning": False,
        "interrupted": bool(result.get("interrupted")),
        "celebctl": {k: v for k, v in result.items() if k != "images"} | {"job": job.id},
    }
    images = ([base64.b64encode(png).decode("ascii") for png in job.outputs]
              if body.send_images else [])
    job.outputs = []  # answered inline: not kept in memory with the job
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def _extra_params(redraw: dict[str, Any]) -> dict[str, Any]:
    """The hires fix as the WebUI's info lists it."""
    if "hires_scale" not in redraw:
        return {}
    return {"Hires upscale": redraw["hires_scale"], "Hires steps": redraw["hires_steps"],
            "Hires upscaler": redraw["hires_upscaler"]}


@router.get("/sd-models", summary="The served model, as the WebUI lists checkpoints")
async def sd_models(state: State) -> list[dict[str, Any]]:
    return [state.model_entry()]


@router.get("/options", summary="Settings (sd_model_checkpoint is the served model)")
async def get_options(state: State) -> dict[str, Any]:
    model = state.model_entry()
    return {"sd_model_checkpoint": model["title"], "sd_checkpoint_hash": model["sha256"],
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_format": "png",
            "eta_ddim": 0.0}


@router.post("/options", summary="Change settings; only sd_model_checkpoint is honoured")
async def set_options(body: dict[str, Any], state: State) -> None:
    if body.get("CLIP_stop_at_last_layers") not in (None, 1):
        raise UnsupportedField("CLIP_stop_at_last_layers",
                               "the server's settings stay as they are; send clip skip with "
                               "each request (override_settings.CLIP_stop_at_last_layers).")
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint and checkpoint not in served_titles(state):
        raise UnsupportedField("sd_model_checkpoint",
                               f"this server serves {state.model_entry()['title']!r} only; "
                               "start `celebctl serve --model` with another model to change "
                               "it.")
    return None


@router.get("/samplers", summary="The samplers celebctl has (the WebUI's names)")
async def samplers() -> list[dict[str, Any]]:
    aliases: dict[str, list[str]] = {name: [] for name in samplers_mod.SAMPLERS}
    for alias, name in samplers_mod._SAMPLER_ALIASES.items():
        aliases[name].append(alias)
    return [{"name": name, "aliases": aliases[name],
             "options": ({"scheduler": _schedule_name(sampler.automatic)}
                         if sampler.automatic else {})}
            for name, sampler in samplers_mod.SAMPLERS.items()]


def _schedule_name(label: str) -> str:
    """The WebUI's name of a schedule type ("SGM Uniform" -> "sgm_uniform")."""
    return label.lower().replace(" ", "_")


@router.get("/schedulers", summary="The schedule types celebctl has")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": _schedule_name(label), "label": label,
             "aliases": ["SGMUniform"] if label == samplers_mod.SGM_UNIFORM else None,
             "default_rho": -1, "need_inner_model": False}
            for label in samplers_mod.SCHEDULE_TYPES]


@router.get("/upscalers", summary="Hires fix upscalers: Lanczos (and Latent, a latent mode)")
async def upscalers() -> list[dict[str, Any]]:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None,
             "scale": 4},
            {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None,
             "scale": 4}]


@router.get("/latent-upscale-modes", summary="Latent upscale modes for the hires fix")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": "Latent"}]


@router.get("/loras", summary="The LoRA folder's files, as the WebUI lists them")
async def loras(state: State) -> list[dict[str, Any]]:
    return await state.run_blocking(_loras)


def _loras() -> list[dict[str, Any]]:
    """name, alias and path (relative to the LoRA folder: the server's own paths stay its own)
    of every .safetensors under the LoRA folder; pickles are never listed (never loaded)."""
    import os

    from ..loras.files import SUFFIX, lora_folder

    folder = lora_folder()
    if not folder.is_dir():
        return []
    found = []
    seen = 0
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        seen += 1 + len(files)
        if seen > MAX_LORA_WALK:  # a huge folder or a symlink loop: list what was found
            break
        for file in sorted(files):
            stem, suffix = os.path.splitext(file)
            if suffix.lower() == SUFFIX:
                relative = os.path.relpath(os.path.join(root, file), folder)
                found.append({"name": stem, "alias": stem,
                              "path": relative.replace(os.sep, "/"), "metadata": {}})
    return found


@router.get("/sd-vae", summary="Separate VAEs (none: the model's own is used)")
async def sd_vae() -> list[dict[str, Any]]:
    return []


@router.get("/scripts", summary="WebUI scripts (none)")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/embeddings", summary="The identities, as the WebUI lists embeddings")
async def embeddings(state: State) -> dict[str, Any]:
    return await state.run_blocking(_embeddings, state)


def _embeddings(state: ServeState) -> dict[str, Any]:
    from .. import registry

    spec = state.settings.spec()
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for ident in registry.list_identities().identities:
        meta = ident.meta
        entry = {"step": (meta.get("fit") or {}).get("steps"),
                 "sd_checkpoint": None,
                 "sd_checkpoint_name": str(meta.get("model", "")),
                 "shape": meta.get("hidden"), "vectors": 2}
        fits = not spec.family or ident.family == spec.family
        (loaded if fits else skipped)[ident.name] = entry
    return {"loaded": loaded, "skipped": skipped}


@router.get("/progress", summary="The running job's progress, as the WebUI reports it")
async def progress(state: State) -> dict[str, Any]:
    job = state.queue.current
    waiting = state.queue.waiting()
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                          "job": "", "job_count": waiting, "job_timestamp": "0", "job_no": 0,
                          "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None}
    fraction = job.fraction()
    elapsed = time.time() - (job.started or time.time())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    return {"progress": round(fraction, 4), "eta_relative": round(eta, 2),
            "state": {"skipped": False, "interrupted": job.stop_requested,
                      "stopping_generation": False, "job": job.label, "job_count": waiting,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S",
                                                     time.localtime(job.created)),
                      "job_no": job.number, "sampling_step": job.done,
                      "sampling_steps": job.total},
            "current_image": None, "textinfo": job.message or None}


@router.post("/interrupt", summary="Stop the running job")
async def interrupt(state: State) -> dict[str, Any]:
    job = state.queue.interrupt_running()
    return {"interrupted": job.id if job else None}
