"""Prompt similarity: CLIP text-image cosine, with a CLIP model loaded through transformers.

The published comparisons of Celeb Basis and its peers report it with CLIP ViT-L/14; celebctl
defaults to `openai/clip-vit-large-patch14` (a hub id, found in the Hugging Face cache when
offline) or a local folder, and has a small seeded CLIP built in code (`tiny-clip`) so the
evaluation runs offline in tests. Nothing here is used by fitting or rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelUnavailable

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
TINY_CLIP = "tiny-clip"
_TINY_CLIP_SEED = 3


@dataclass
class ClipScorer:
    """A loaded CLIP model with its tokenizer and image preprocessing."""

    model: Any
    tokenizer: Any
    image_processor: Any
    ref: str
    device: Any

    def text_features(self, texts: list[str]):
        """L2-normalised text embeddings (N, D)."""
        import torch

        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=77,
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            features = _features(self.model.get_text_features(**tokens))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def image_features(self, images: list[Any]):
        """L2-normalised image embeddings (N, D) of PIL images."""
        import torch

        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = _features(self.model.get_image_features(
                pixel_values=pixels.to(self.device, self.model.dtype)))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def similarity(self, texts: list[str], images: list[Any]) -> list[float]:
        """Cosine of each text with the image at the same position."""
        return (self.text_features(texts) * self.image_features(images)).sum(-1).cpu().tolist()


def _features(output: Any):
    """transformers 5 may return a model output instead of a tensor; take the pooled part."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("text_embeds", "image_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ModelUnavailable("The CLIP model returned no embeddings; is it a CLIP model?")


def tiny_clip() -> tuple[Any, Any, Any]:
    """A small CLIP with seeded random weights and the real CLIP tokenizer (for offline tests)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from .models import CLIP_VOCAB_SIZE, build_clip_tokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_CLIP_SEED)
        model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                          "width": 32})
    return model, build_clip_tokenizer(), processor


def load_clip(ref: str = DEFAULT_CLIP, device: Any = "cpu") -> ClipScorer:
    """Load CLIP by hub id, local folder or `tiny-clip`; ModelUnavailable says how to get it."""
    import torch

    from .models import quiet_libraries, resolve_device

    dev = resolve_device(device)
    if ref == TINY_CLIP:
        model, tokenizer, processor = tiny_clip()
    else:
        path = Path(ref).expanduser()
        source = str(path.resolve()) if path.exists() else ref
        try:
            with quiet_libraries(include_diffusers=False):
                from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

                model = CLIPModel.from_pretrained(source, use_safetensors=True)
                tokenizer = CLIPTokenizer.from_pretrained(source)
                processor = CLIPImageProcessor.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - hub, file and format errors of many kinds
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else \
                type(exc).__name__
            raise ModelUnavailable(
                f"Could not load the CLIP model '{ref}' for prompt similarity ({reason}). "
                f"Download it once with `hf download {DEFAULT_CLIP}` (then it works offline "
                "with HF_HUB_OFFLINE=1), pass a local folder with --clip PATH, or skip the "
                "column with --no-clip."
            ) from exc
    model.eval().requires_grad_(False)
    model.to(dev, torch.float32)
    return ClipScorer(model=model, tokenizer=tokenizer, image_processor=processor, ref=ref,
                      device=dev)
