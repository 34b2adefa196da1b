"""Prompt embeddings -> images + metadata, split by concept.

A prompt names identities; each expands in place to its two token vectors (see
:mod:`celebctl.prompting`), and the frozen pipeline runs as usual on the resulting
``prompt_embeds``. Nothing here mutates the model: the tokenizer and the embedding table stay
as loaded, so renders in one process never leak into each other. LoRAs (``<lora:NAME:W>``,
``--lora``) are the one exception, kept to :mod:`celebctl.loras`: fused for the renders that
ask for them, and the loaded weights put back exactly for the next render that does not.

Images go to a normal user folder as ``<prompt-slug>-<seed>.png`` (never overwriting a file) and
carry their settings as PNG text chunks: ``parameters`` in the WebUI's form and ``celebctl`` as
JSON. With the same seed and settings on the CPU the PNG bytes are identical.

- :mod:`.plan`: a request checked without loading a model (options, identities, basis, model,
  token counts).
- :mod:`.settings`: what depends on the device: images per batch, dtype, the scheduler (the
  sampler chosen by its WebUI name, :mod:`celebctl.samplers`, with the config's default).
- :mod:`.encoding`: identity vectors and the prompt pair encoded with the WebUI's emphasis.
- :mod:`.images`: file names, PNG metadata, contact sheets.
- :mod:`.img2img`: an init image (img2img) and the hires fix: a start part-way down the
  schedule, as diffusers' img2img pipelines start.
- :mod:`.render`: :func:`render_prompt`, which runs the above and denoises batch by batch
  (:mod:`celebctl.denoise`).
- :mod:`.promptfile`: a prompts file read safely, and its images' names.
- :mod:`.batch`: :func:`render_prompts_file`, every line times N seeds, batched across
  prompts, resumable, shared out between the processes of a launch.

Everything is re-exported here: ``from celebctl import rendering`` is all a caller needs. A test
that replaces a function must replace it where it is looked up (e.g.
``rendering.render.sample_images``), not here.
"""

from __future__ import annotations

from .batch import (
    PromptsPlan,
    PromptsResult,
    plan_prompt_lines,
    render_prompts_file,
)
from .encoding import (
    PromptEmbeds,
    apply_emphasis,
    encode_prompt_pair,
    identity_vectors_for,
)
from .images import (
    DEFAULT_OUT_DIR,
    SLUG_MAX_CHARS,
    _prepare_out_dir,
    _quote,
    contact_sheet,
    embedding_hashes,
    image_parameters,
    model_label,
    png_bytes,
    prompt_slug,
    read_png_metadata,
)
from .img2img import (
    DEFAULT_HIRES_DENOISE,
    DEFAULT_STRENGTH,
    HIRES_UPSCALERS,
    HiresFix,
    InitImage,
    Redraw,
    load_init_image,
    prepare_redraw,
)
from .plan import (
    IDENTITY_GUIDANCE,
    MAX_BATCH,
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    PLAIN_GUIDANCE,
    SCHEDULERS,
    RenderPlan,
    _packaged_tokenizer,
    _shared_basis,
    _source_photo,
    _tokenizer_for_plan,
    check_families,
    check_render_options,
    check_widths,
    default_guidance,
    noise_note,
    plan_render,
    shared_basis,
)
from .promptfile import (
    MAX_LINE_CHARS,
    MAX_LINES,
    PromptLine,
    image_name,
    read_prompts_file,
)
from .render import (
    ProgressCallback,
    RenderResult,
    check_basis_once,
    image_settings,
    render_prompt,
)
from .settings import (
    BYTES_PER_IMAGE_512,
    CPU_BATCH,
    MAX_AUTO_BATCH,
    auto_batch_size,
    make_scheduler,
    render_dtype,
    sampler_choice,
)

__all__ = [
    "DEFAULT_HIRES_DENOISE", "DEFAULT_STRENGTH", "HIRES_UPSCALERS", "HiresFix", "InitImage",
    "Redraw", "load_init_image", "prepare_redraw",
    "MAX_LINES", "MAX_LINE_CHARS", "PromptLine", "PromptsPlan", "PromptsResult",
    "check_basis_once", "image_name", "image_settings", "plan_prompt_lines",
    "read_prompts_file", "render_prompts_file",
    "BYTES_PER_IMAGE_512", "CPU_BATCH", "DEFAULT_OUT_DIR", "IDENTITY_GUIDANCE", "MAX_AUTO_BATCH",
    "MAX_BATCH", "MAX_IMAGES", "MAX_SEED", "MAX_SIZE", "MAX_STEPS", "MIN_SIZE", "PLAIN_GUIDANCE",
    "ProgressCallback", "PromptEmbeds", "RenderPlan", "RenderResult", "SCHEDULERS",
    "SLUG_MAX_CHARS", "_packaged_tokenizer", "_prepare_out_dir", "_quote", "_shared_basis",
    "_source_photo", "_tokenizer_for_plan", "apply_emphasis", "auto_batch_size", "check_families",
    "shared_basis",
    "check_render_options", "check_widths", "contact_sheet", "default_guidance",
    "embedding_hashes", "encode_prompt_pair", "identity_vectors_for", "image_parameters",
    "make_scheduler", "model_label", "noise_note", "plan_render", "png_bytes", "prompt_slug",
    "read_png_metadata", "render_dtype", "render_prompt", "sampler_choice",
]
