"""The WebUI's txt2img and img2img requests, mapped to celebctl's render options.

Field names and defaults are the WebUI's (AUTOMATIC1111 ``modules/api/models.py``, built from
``StableDiffusionProcessingTxt2Img`` / ``...Img2Img``); inside, celebctl's names. Unknown fields
are ignored as the WebUI ignores them; a field that would draw something else if ignored (face
restoration, tiling, inpainting, a hires pass with another sampler, ...) is refused with a 422
that names it (:class:`UnsupportedField`). Samplers and schedule types are
:mod:`celebctl.samplers`'; the hires fix and img2img are :mod:`celebctl.rendering.img2img`'.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import samplers
from ..errors import InvalidOption
from .work import MAX_PHOTO_UPLOAD, RenderOptions

WEBUI_DEFAULT_SAMPLER = "Euler"  # the API's sampler_index default
WEBUI_HIRES_DENOISE = 0.75  # StableDiffusionProcessingTxt2Img's denoising_strength default
WEBUI_IMG2IMG_DENOISE = 0.75  # StableDiffusionProcessingImg2Img's
# hr_upscaler (any case; None: the WebUI's default latent mode) -> HiresFix's upscaler.
HR_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}
SAME = ("", "use same sampler", "use same scheduler", "use same checkpoint")


class UnsupportedField(InvalidOption):
    """A WebUI field whose value celebctl cannot honour; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def refuse(field: str, why: str) -> None:
    raise UnsupportedField(field, why)


class WebUIRequest(BaseModel):
    """What txt2img and img2img share: the WebUI's names and defaults; others are ignored."""

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
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Txt2ImgRequest(WebUIRequest):
    """The WebUI's txt2img request, with its hires fix fields."""

    enable_hr: bool = False
    denoising_strength: float | None = WEBUI_HIRES_DENOISE
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(WebUIRequest):
    """The WebUI's img2img request (no inpainting: a mask is refused)."""

    init_images: list[Any] = Field(default_factory=list)
    resize_mode: int = 0
    denoising_strength: float | None = WEBUI_IMG2IMG_DENOISE
    mask: str | None = None
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


def sampler_choice(request: WebUIRequest) -> samplers.SamplerChoice:
    """The request's sampler and schedule type, checked by :mod:`celebctl.samplers`; a 422
    naming the field for one celebctl lacks. An old combined name ("DPM++ 2M Karras") with
    scheduler Automatic means its schedule, as the WebUI (1.9+) reads it."""
    field, value = (("sampler_name", request.sampler_name) if request.sampler_name
                    else ("sampler_index", request.sampler_index or WEBUI_DEFAULT_SAMPLER))
    try:
        sampler, carried = samplers.split_sampler_name(value)
    except samplers.SamplerError as exc:
        raise UnsupportedField(field, f"{exc} (GET /sdapi/v1/samplers)") from None
    wanted = samplers.AUTOMATIC
    if request.scheduler:
        try:
            wanted = samplers.find_schedule(request.scheduler)
        except samplers.SamplerError as exc:
            raise UnsupportedField("scheduler", f"{exc} (GET /sdapi/v1/schedulers)") from None
    if carried is not None and wanted not in (samplers.AUTOMATIC, carried):
        refuse("scheduler", f"the sampler '{value}' already says schedule type {carried}; "
               f"send the sampler's name alone ({sampler.name}) with scheduler {wanted}.")
    made = samplers.SamplerChoice(sampler, carried if wanted == samplers.AUTOMATIC and carried
                                  else wanted)
    try:
        samplers.check_choice(made)
    except samplers.SamplerError as exc:
        raise UnsupportedField("scheduler" if request.scheduler and made.schedule
                               != samplers.AUTOMATIC else field, str(exc)) from None
    return made


def _clip_skip(request: WebUIRequest) -> int | None:
    """override_settings.CLIP_stop_at_last_layers or a top-level clip_skip (the WebUI's
    numbering, celebctl's too); None: celebctl's rule (the identities' own layer)."""
    settings = request.override_settings or {}
    given = []
    for field, value in (("override_settings.CLIP_stop_at_last_layers",
                          settings.get("CLIP_stop_at_last_layers")),
                         ("clip_skip", (request.model_extra or {}).get("clip_skip"))):
        if value is None or (field == "clip_skip" and value == 0):
            continue  # a top-level 0 is a client's "not set"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        from ..clipskip import check_clip_skip

        try:
            given.append((field, check_clip_skip(value, field)))
        except InvalidOption as exc:
            raise UnsupportedField(field, str(exc).removeprefix(field).strip()) from None
    if len(given) == 2 and given[0][1] != given[1][1]:
        refuse("clip_skip", f"{given[1][1]} differs from override_settings."
               f"CLIP_stop_at_last_layers {given[0][1]}; send one of them.")
    return given[0][1] if given else None


def _common(request: WebUIRequest, served_titles: set[str],
            made: samplers.SamplerChoice) -> dict[str, Any]:
    """Refusals both endpoints share; the RenderOptions fields they set."""
    data = request.model_dump()
    extra = request.model_extra or {}
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
    if extra.get("refiner_checkpoint"):
        refuse("refiner_checkpoint", "not supported by celebctl serve.")
    settings = request.override_settings or {}
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint and checkpoint not in served_titles:
        refuse("override_settings.sd_model_checkpoint",
               f"this server serves {sorted(served_titles)[0]!r} only (GET /sdapi/v1/sd-models).")
    if settings.get("sd_vae") not in (None, "", "Automatic", "None"):
        refuse("override_settings.sd_vae", "only the model's own VAE (Automatic) is served.")
    # eta: DDIM runs deterministic (eta 0); the ancestral and SDE samplers at the WebUI's
    # default eta 1; the others have none (the WebUI ignores it for them too).
    name = made.sampler.name
    if request.eta is not None:
        if name == "DDIM" and request.eta != 0:
            refuse("eta", "DDIM runs with eta 0 (deterministic) in celebctl; send 0.")
        if made.sampler.stochastic and name != "LCM" and request.eta != 1:
            refuse("eta", f"{name} runs with eta 1 (the WebUI's default) in celebctl; send 1.")
    if name in ("Euler", "Heun", "DPM2") and request.s_churn:
        refuse("s_churn", f"{name} runs without churn in celebctl; send 0.")
    for field in ("batch_size", "n_iter", "steps", "width", "height"):
        if data[field] < 1:
            refuse(field, "must be at least 1.")
    return dict(
        prompt=request.prompt, negative=request.negative_prompt or "",
        num_images=request.batch_size * request.n_iter, steps=request.steps,
        guidance=float(request.cfg_scale), scheduler=None, sampler=made.sampler.name,
        schedule=made.schedule, clip_skip=_clip_skip(request),
        seed=None if request.seed < 0 else request.seed, width=request.width,
        height=request.height, batch_size=min(request.batch_size, 64),
        extra={"sampler_name": made.sampler.name, "scheduler": made.schedule})


def _fraction(field: str, value: Any) -> float:
    if (value is None or isinstance(value, bool) or not math.isfinite(float(value))
            or not 0 < value <= 1):
        refuse(field, f"must be a number above 0 and at most 1, not {value}.")
    return float(value)


def _hires(request: Txt2ImgRequest, made: samplers.SamplerChoice,
           served_titles: set[str]) -> Any:
    """The request's hires fix as a HiresFix (None without enable_hr)."""
    from ..rendering.img2img import MAX_HIRES_SCALE, HiresFix
    from ..rendering.plan import MAX_STEPS

    if not request.enable_hr:
        return None
    if request.hr_resize_x or request.hr_resize_y:
        refuse("hr_resize_x" if request.hr_resize_x else "hr_resize_y",
               "resizing to a size is not supported; send 0 and give hr_scale.")
    scale = request.hr_scale
    if not math.isfinite(scale) or not 1 <= scale <= MAX_HIRES_SCALE:
        refuse("hr_scale", f"must be from 1 to {MAX_HIRES_SCALE:g}, not {scale}.")
    upscaler = HR_UPSCALERS.get((request.hr_upscaler or "Latent").strip().lower())
    if upscaler is None:
        refuse("hr_upscaler", f"celebctl has no upscaler '{request.hr_upscaler}'; use Latent "
               "or Lanczos (GET /sdapi/v1/upscalers).")
    steps = request.hr_second_pass_steps
    if not 0 <= steps <= MAX_STEPS:
        refuse("hr_second_pass_steps", f"must be from 0 (as many as steps) to {MAX_STEPS}.")
    denoise = _fraction("denoising_strength",
                        WEBUI_HIRES_DENOISE if request.denoising_strength is None
                        else request.denoising_strength)
    if (request.hr_sampler_name or "").strip().lower() not in SAME:
        try:
            other = samplers.split_sampler_name(request.hr_sampler_name)[0]
        except samplers.SamplerError:
            other = None
        if other is not made.sampler:
            refuse("hr_sampler_name", "the hires pass uses the first pass's sampler in "
                   f"celebctl ({made.sampler.name}); send it, 'Use same sampler' or nothing.")
    if (request.hr_scheduler or "").strip().lower() not in SAME:
        try:
            other_schedule = samplers.find_schedule(request.hr_scheduler)
        except samplers.SamplerError:
            other_schedule = None
        if other_schedule != made.schedule:
            refuse("hr_scheduler", "the hires pass uses the first pass's schedule type in "
                   f"celebctl ({made.schedule}); send it, 'Use same scheduler' or nothing.")
    checkpoint = (request.hr_checkpoint_name or "").strip()
    if checkpoint.lower() not in SAME and checkpoint not in served_titles:
        refuse("hr_checkpoint_name", "the hires pass uses the served model; send 'Use same "
               "checkpoint' or nothing.")
    for field, value, first in (("hr_prompt", request.hr_prompt, request.prompt),
                                ("hr_negative_prompt", request.hr_negative_prompt,
                                 request.negative_prompt or "")):
        if value and value != first:
            refuse(field, "the hires pass uses the first pass's prompts in celebctl; send "
                   "\"\" or the same text.")
    return HiresFix(scale=float(scale), steps=steps or None, denoise=denoise,
                    upscaler=upscaler).check()


def render_options_from_txt2img(request: Txt2ImgRequest, served_titles: set[str]
                                ) -> RenderOptions:
    """The WebUI txt2img request as celebctl render options; UnsupportedField (a 422 naming
    the field) for a value that would draw something else if it were ignored."""
    extra = request.model_extra or {}
    if extra.get("init_images"):
        refuse("init_images", "txt2img takes no init image; use /sdapi/v1/img2img.")
    for field in ("mask", "image_cfg_scale"):
        if extra.get(field):
            refuse(field, "not supported by txt2img.")
    made = sampler_choice(request)
    fields = _common(request, served_titles, made)
    fields["hires"] = _hires(request, made, served_titles)
    return RenderOptions(**fields)


def decode_init_image(value: Any) -> bytes:
    """One init image from the request: base64, possibly a ``data:image/...;base64,`` URL as
    browsers write them; at most the upload limit."""
    if not isinstance(value, str) or not value:
        refuse("init_images", "each init image is a base64 string.")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            refuse("init_images", "a data: URL must be base64 (data:image/png;base64,...).")
    if len(value) > (MAX_PHOTO_UPLOAD * 4) // 3 + 8:
        refuse("init_images", f"the image is larger than {MAX_PHOTO_UPLOAD // 2**20} MB.")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        refuse("init_images", "not base64 (send the image file's bytes base64-encoded).")
    if not data:
        refuse("init_images", "the image is empty.")
    return data


def render_options_from_img2img(request: Img2ImgRequest, served_titles: set[str]
                                ) -> tuple[RenderOptions, bytes]:
    """The WebUI img2img request as render options and the init image's bytes (decoded, not
    yet checked as an image: :func:`celebctl.server.work.stage_init_image` does that)."""
    if not request.init_images:
        refuse("init_images", "img2img needs one init image (base64).")
    if len(request.init_images) > 1:
        refuse("init_images", f"celebctl takes one init image per request, not "
               f"{len(request.init_images)}; send one request per image.")
    if request.resize_mode != 0:
        refuse("resize_mode", "only 0 (Just resize: the image is resized to width x height) "
               "is supported.")
    if request.mask:
        refuse("mask", "inpainting is not supported by celebctl serve.")
    if request.initial_noise_multiplier not in (None, 1):
        refuse("initial_noise_multiplier", "celebctl adds the noise as it is; send 1.")
    made = sampler_choice(request)
    fields = _common(request, served_titles, made)
    fields["strength"] = _fraction("denoising_strength",
                                   WEBUI_IMG2IMG_DENOISE if request.denoising_strength is None
                                   else request.denoising_strength)
    return RenderOptions(**fields), decode_init_image(request.init_images[0])
