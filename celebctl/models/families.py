"""What differs between the Stable Diffusion families, in one place.

- SD 1.x: one CLIP ViT-L/14 text encoder (768-d); the UNet reads its last hidden state.
- SD 2.x: one OpenCLIP ViT-H text encoder (1024-d, already cut to its penultimate layer in the
  released weights), read the same way; pad token "!"; v-prediction for 2.1 at 768 px.
- SDXL: CLIP ViT-L (768-d) and OpenCLIP ViT-bigG (1280-d, with a projection). The UNet reads
  the penultimate hidden states of both side by side (2048-d) and, as added conditions, the
  second encoder's pooled, projected embedding and six "time ids" (original size, crop top-left,
  target size); an empty negative prompt is all zeros (``force_zeros_for_empty_prompt``).

An identity's two token vectors are as wide as all the text encoders' tables side by side (768,
1024 or 768 + 1280): each encoder gets its slice in the identity's token slots, so both SDXL
encoders always see the same celebrity mixture. A future family (SD3, FLUX) adds its encoders
and conditions here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from .specs import FAMILIES


def label(family: str) -> str:
    """"SD 1.x", "SD 2.x" or "SDXL"."""
    return FAMILIES.get(family, (family,))[0]


def encoder_widths(text_encoders: Sequence[Any]) -> list[int]:
    """The token-embedding width of each text encoder, in order."""
    return [int(e.get_input_embeddings().weight.shape[1]) for e in text_encoders]


class SlotInjector:
    """Forward hooks on each text encoder's token-embedding lookup that put the identity's
    vectors (each encoder its slice) into their slots. ``set(mask, values)`` before each
    forward; ``values`` is (B, L, sum of widths)."""

    def __init__(self, text_encoders: Sequence[Any]):
        self.encoders = list(text_encoders)
        self.widths = encoder_widths(self.encoders)
        self.mask = None
        self.values = None

    def set(self, mask, values) -> None:
        self.mask, self.values = mask, values

    def _hook(self, start: int, width: int):
        import torch

        def swap(module, inputs, output):
            if self.mask is None:
                return output
            values = self.values[..., start:start + width].to(device=output.device,
                                                                dtype=output.dtype)
            return torch.where(self.mask.to(output.device)[..., None], values, output)

        return swap

    @contextlib.contextmanager
    def attached(self) -> Iterator[SlotInjector]:
        handles = []
        start = 0
        try:
            for encoder, width in zip(self.encoders, self.widths, strict=True):
                handles.append(encoder.get_input_embeddings().register_forward_hook(
                    self._hook(start, width)))
                start += width
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.mask = self.values = None


def encode(family: str, text_encoders: Sequence[Any], ids: Sequence[Any],
           clip_skip: int = 1) -> tuple[Any, Any]:
    """Prompt embeddings (B, L, width) and the pooled embedding (SDXL; else None) from each
    encoder's token ids (B, L), read at ``clip_skip`` (the WebUI's numbering; see
    :mod:`celebctl.clipskip`). Identity vectors are put in by a :class:`SlotInjector`."""
    import torch

    from ..clipskip import hidden_index

    index = hidden_index(family, clip_skip)
    if family != "sdxl":
        encoder = text_encoders[0]
        if index is None:
            return encoder(ids[0].to(encoder.device))[0], None
        out = encoder(ids[0].to(encoder.device), output_hidden_states=True)
        # An earlier layer goes through the final layer norm too, as the last one does
        # (transformers 5 keeps it on the model itself, 4 on its ``text_model``).
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return norm(out.hidden_states[index]), None
    states, pooled = [], None
    for encoder, token_ids in zip(text_encoders, ids, strict=True):
        out = encoder(token_ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[index])
        if out[0].ndim == 2:  # the projected, pooled output of the encoder with a projection
            pooled = out[0]
    return torch.cat(states, dim=-1), pooled


def time_ids(height: int, width: int, batch: int, device: Any, dtype: Any):
    """SDXL's added time ids: original size, crop top-left (0, 0), target size, per image."""
    import torch

    return torch.tensor([[height, width, 0, 0, height, width]], device=device,
                        dtype=dtype).repeat(batch, 1)


def added_conditions(family: str, pooled: Any, height: int, width: int, dtype: Any
                     ) -> dict[str, Any] | None:
    """The UNet's ``added_cond_kwargs`` (SDXL), for a batch of ``pooled`` embeddings."""
    if family != "sdxl":
        return None
    return {"text_embeds": pooled.to(dtype),
            "time_ids": time_ids(height, width, pooled.shape[0], pooled.device, dtype)}


def zero_empty_negative(family: str, unet_config: Any = None) -> bool:
    """Whether an empty negative prompt is all zeros rather than the encoded empty text."""
    return family == "sdxl"
