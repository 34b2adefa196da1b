"""Prompt encoding: identity vectors, the WebUI's emphasis, the prompt pair as the model sees it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BasisMismatch

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Components
    from .plan import RenderPlan


def identity_vectors_for(coefficients_by_name: dict[str, Any], basis: Any) -> dict[str, Any]:
    """name -> (2, hidden) fp32 token vectors, from each identity's (2, p) coefficients."""
    import torch

    from ..prompting import identity_vectors

    vectors = {}
    for name, array in coefficients_by_name.items():
        coefficients = torch.from_numpy(array).to(torch.float32)
        if coefficients.shape[-1] != basis.p:
            raise BasisMismatch(f"Identity '{name}' has {coefficients.shape[-1]} coefficients "
                                f"per token but basis {basis.id} has {basis.p} components.")
        vectors[name] = identity_vectors(coefficients, basis.mean, basis.components)
    return vectors


@dataclass
class PromptEmbeds:
    """A prompt and its negative, encoded: (1, 77, width) each, plus SDXL's pooled (1, D)."""

    prompt: Any
    negative: Any
    pooled: Any = None
    negative_pooled: Any = None


def apply_emphasis(states, weights, widths: Sequence[int] | None = None):
    """The WebUI's emphasis on one chunk's states (1, 77, width): each position scaled by its
    weight, then rescaled so the mean is what it was (A1111's "Original" mode). With SDXL's
    two encoders side by side (``widths``), each encoder's part is rescaled on its own, as the
    WebUI weights each encoder's output separately."""
    import torch

    if all(w == 1.0 for w in weights):
        return states
    factors = torch.tensor(weights, device=states.device, dtype=states.dtype)[None, :, None]
    parts = []
    for part in torch.split(states, list(widths or [states.shape[-1]]), dim=-1):
        original = part.mean()
        scaled = part * factors
        new = scaled.mean()
        # With a mean of ~0 (a final layer norm without bias, as in the built-in tiny models)
        # the rescale would divide by ~0 or multiply by ~0: keep the scaled states as they are.
        size = float(part.abs().mean())
        if min(float(original.abs()), float(new.abs())) > 1e-4 * size:
            scaled = scaled * (original / new)
        parts.append(scaled)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def encode_prompt_pair(components: Components, plan: RenderPlan, vectors: dict[str, Any]
                       ) -> PromptEmbeds:
    """The prompt and negative prompt encoded by the model's text encoder(s), in its dtype.

    Each is encoded in 75-token chunks (one for a short prompt) with the WebUI's weights
    applied, and the chunks side by side; the shorter of the two is padded with empty chunks so
    both have the same length. A short unweighted prompt is encoded exactly as diffusers'
    pipelines encode it (bit for bit). Each encoder gets its slice of the identity vectors
    (:mod:`celebctl.models.families`); for SDXL an empty negative prompt is zeros, and the
    pooled embedding is the first chunk's.
    """
    import torch

    from ..models import families
    from ..prompting import ParsedPrompt, build_slot_tensors, tokenize_chunks

    encoders = components.text_encoders
    family = components.family
    width = sum(families.encoder_widths(encoders))
    injector = families.SlotInjector(encoders)
    dtype = encoders[0].dtype

    def encode(parsed: ParsedPrompt, label: str) -> list[tuple[Any, Any]]:
        per_tokenizer = [tokenize_chunks(parsed, tokenizer, label=label)
                         for tokenizer in components.tokenizers]
        chunks = []
        for index in range(len(per_tokenizer[0])):
            ids = []
            mask = values = None
            for windows in per_tokenizer:
                token_ids, mask, values = build_slot_tensors(
                    [windows[index]], vectors, width, device=components.device,
                    dtype=torch.float32)
                ids.append(token_ids)
            with torch.no_grad(), injector.attached():
                injector.set(mask, values)
                states, pooled = families.encode(family, encoders, ids,
                                                 plan.clip_skip)
            states = apply_emphasis(states, per_tokenizer[0][index].weights,
                                    families.encoder_widths(encoders))
            chunks.append((states.to(dtype), None if pooled is None else pooled.to(dtype)))
        return chunks

    prompt = encode(plan.prompt, "prompt")
    if not plan.negative.text and families.zero_empty_negative(family):
        negative = [(torch.zeros_like(s), None if p is None else torch.zeros_like(p))
                    for s, p in prompt]
    else:
        negative = encode(plan.negative, "negative prompt")
    count = max(len(prompt), len(negative))
    if len(prompt) < count or len(negative) < count:
        blank = encode(ParsedPrompt(text=""), "prompt")[0]  # what an empty chunk encodes to
        prompt += [blank] * (count - len(prompt))
        if not plan.negative.text and families.zero_empty_negative(family):
            blank = (torch.zeros_like(blank[0]), None)
        negative += [blank] * (count - len(negative))
    return PromptEmbeds(prompt=torch.cat([s for s, _ in prompt], dim=1),
                        negative=torch.cat([s for s, _ in negative], dim=1),
                        pooled=prompt[0][1], negative_pooled=negative[0][1])
