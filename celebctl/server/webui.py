"""The WebUI's API (``/sdapi/v1``), the part its clients use, on celebctl's renderer.

Field names and defaults are the WebUI's (AUTOMATIC1111 ``modules/api/models.py`` and its
processing defaults); inside, celebctl's names. Unknown fields are ignored as the WebUI ignores
them; a field that would draw something else if ignored (hires fix, an init image, face
restoration, tiling, a sampler or schedule celebctl does not have, ...) is refused with a 422
that names it. Identities are found by name in prompts exactly as `celebctl render` finds them.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidOption
from .jobs import QueueClosed
from .state import JobFailed, ServeState, State, wait_for_job
from .work import RenderOptions, check_render
from .work import render as render_job

router = APIRouter(prefix="/sdapi/v1", tags=["WebUI API"])

# The WebUI's sampler name (and its aliases) -> celebctl's --scheduler value. The one place that
# maps them: when celebctl gains samplers, this table and render_options_from_txt2img change.
SAMPLER_NAMES = {"DDIM": "ddim", "Euler": "euler", "DPM++ 2M": "dpm"}
SAMPLER_ALIASES = {"ddim": "DDIM", "k_euler": "Euler", "euler": "Euler",
                   "k_dpmpp_2m": "DPM++ 2M", "dpm++ 2m": "DPM++ 2M"}
# Only the sampler's own schedule today ("Automatic" in the WebUI).
SCHEDULE_NAMES = {"automatic": "Automatic"}
WEBUI_DEFAULT_SAMPLER = "Euler"  # the API's sampler_index default


class UnsupportedField(InvalidOption):
    """A WebUI field whose value celebctl cannot honour; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Txt2ImgRequest(BaseModel):
    """The WebUI's txt2img request: its names and its defaults; other fields are ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = WEBUI_DEFAULT_SAMPLER
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_churn: float | None = None
    enable_hr: bool = False
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


def _sampler(request: Txt2ImgRequest) -> tuple[str, str]:
    """(the WebUI's sampler name, celebctl's scheduler) for the request."""
    field, value = (("sampler_name", request.sampler_name) if request.sampler_name
                    else ("sampler_index", request.sampler_index or WEBUI_DEFAULT_SAMPLER))
    name = value if value in SAMPLER_NAMES else SAMPLER_ALIASES.get(value.strip().lower())
    if name is None:
        raise UnsupportedField(field, f"celebctl has no sampler '{value}'; use one of "
                               f"{', '.join(SAMPLER_NAMES)} (GET /sdapi/v1/samplers).")
    return name, SAMPLER_NAMES[name]


def render_options_from_txt2img(request: Txt2ImgRequest, served_titles: set[str]
                                ) -> RenderOptions:
    """The WebUI request as celebctl render options; UnsupportedField (a 422 naming the
    field) for a value that would draw something else if it were ignored."""
    data = request.model_dump()
    extra = request.model_extra or {}

    def refuse(field: str, why: str) -> None:
        raise UnsupportedField(field, why)

    if request.enable_hr:
        refuse("enable_hr", "hires fix is not supported by celebctl serve.")
    if extra.get("init_images"):
        refuse("init_images", "txt2img takes no init image (img2img is not served).")
    for field in ("restore_faces", "tiling"):
        if data.get(field):
            refuse(field, "not supported by celebctl; send false or leave it out.")
    if request.styles:
        refuse("styles", "saved styles are not supported; put their text in the prompt.")
    if request.subseed_strength:
        refuse("subseed_strength", "variation seeds are not supported; send 0.")
    if request.seed_resize_from_h > 0 or request.seed_resize_from_w > 0:
        refuse("seed_resize_from_h" if request.seed_resize_from_h > 0 else "seed_resize_from_w",
               "resizing the seed is not supported; send -1 or 0.")
    if request.script_name:
        refuse("script_name", "WebUI scripts are not supported.")
    if request.alwayson_scripts:
        refuse("alwayson_scripts", "WebUI extensions are not supported; send {}.")
    for field in ("refiner_checkpoint", "mask", "image_cfg_scale"):
        if extra.get(field):
            refuse(field, "not supported by celebctl serve.")
    if extra.get("clip_skip") not in (None, 0, 1):
        refuse("clip_skip", "only 1 (the model's last layer) is supported today.")
    settings = request.override_settings or {}
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint and checkpoint not in served_titles:
        refuse("override_settings.sd_model_checkpoint",
               f"this server serves {sorted(served_titles)[0]!r} only (GET /sdapi/v1/sd-models).")
    if settings.get("CLIP_stop_at_last_layers") not in (None, 1):
        refuse("override_settings.CLIP_stop_at_last_layers",
               "only 1 (the model's last layer) is supported today.")
    if settings.get("sd_vae") not in (None, "", "Automatic", "None"):
        refuse("override_settings.sd_vae", "only the model's own VAE (Automatic) is served.")
    sampler_name, scheduler = _sampler(request)
    if request.scheduler and request.scheduler.strip().lower() not in SCHEDULE_NAMES:
        refuse("scheduler", f"celebctl has no schedule '{request.scheduler}'; use Automatic "
               "(the sampler's own; GET /sdapi/v1/schedulers).")
    if scheduler == "ddim" and request.eta:
        refuse("eta", "DDIM runs with eta 0 (deterministic) in celebctl; send 0.")
    if scheduler == "euler" and request.s_churn:
        refuse("s_churn", "Euler runs without churn in celebctl; send 0.")
    for field in ("batch_size", "n_iter", "steps", "width", "height"):
        if data[field] < 1:
            refuse(field, "must be at least 1.")
    return RenderOptions(
        prompt=request.prompt, negative=request.negative_prompt or "",
        num_images=request.batch_size * request.n_iter, steps=request.steps,
        guidance=float(request.cfg_scale), scheduler=scheduler,
        seed=None if request.seed < 0 else request.seed, width=request.width,
        height=request.height, batch_size=min(request.batch_size, 64),
        extra={"sampler_name": sampler_name})


def served_titles(state: ServeState) -> set[str]:
    model = state.model_entry()
    return {model["title"], model["model_name"], model["filename"]}


def _png_parameters(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return str((getattr(image, "text", {}) or {}).get("parameters", ""))


@router.post("/txt2img", summary="Render as the WebUI's txt2img does")
async def txt2img(body: Txt2ImgRequest, request: Request,
                  state: State) -> dict[str, Any]:
    options = render_options_from_txt2img(body, served_titles(state))
    await state.run_blocking(check_render, state.settings, options)
    job = state.queue.submit("render", f"txt2img: {options.prompt[:60]}",
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
    parameters = {k: v for k, v in body.model_dump().items()}
    parameters["seed"] = int(options.seed or 0)
    infotexts = [_png_parameters(png) for png in job.outputs]
    model = state.model_entry()
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(seeds),
        "negative_prompt": body.negative_prompt or "",
        "all_negative_prompts": [body.negative_prompt or ""] * len(seeds),
        "seed": int(options.seed or 0), "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": result.get("width", body.width), "height": result.get("height", body.height),
        "sampler_name": options.extra["sampler_name"], "scheduler": "Automatic",
        "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
        "n_iter": body.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model["model_name"], "sd_model_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S",
                                                     time.localtime(job.created)),
        "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "interrupted": bool(result.get("interrupted")),
        "celebctl": {k: v for k, v in result.items() if k != "images"} | {"job": job.id},
    }
    images = ([base64.b64encode(png).decode("ascii") for png in job.outputs]
              if body.send_images else [])
    job.outputs = []  # answered inline: not kept in memory with the job
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


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
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint and checkpoint not in served_titles(state):
        raise UnsupportedField("sd_model_checkpoint",
                               f"this server serves {state.model_entry()['title']!r} only; "
                               "start `celebctl serve --model` with another model to change "
                               "it.")
    return None


@router.get("/samplers", summary="The samplers celebctl has")
async def samplers() -> list[dict[str, Any]]:
    aliases: dict[str, list[str]] = {name: [] for name in SAMPLER_NAMES}
    for alias, name in SAMPLER_ALIASES.items():
        aliases[name].append(alias)
    return [{"name": name, "aliases": aliases[name], "options": {}} for name in SAMPLER_NAMES]


@router.get("/schedulers", summary="The schedules celebctl has")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for name, label in SCHEDULE_NAMES.items()]


@router.get("/upscalers", summary="Upscalers: only 'None' (no hires fix)")
async def upscalers() -> list[dict[str, Any]]:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None,
             "scale": 4}]


@router.get("/latent-upscale-modes", summary="Latent upscale modes (none)")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return []


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
