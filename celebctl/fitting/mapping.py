"""What a fit trains: the face-feature mapping (or the coefficients themselves), its optimiser,
and the caption templates it is trained under."""

from __future__ import annotations

from typing import Any

from ..captions import CAPTION_TEMPLATES, SUBJECT_PHRASE
from .settings import FACE_FEATURE_DIM, SUBJECT, FitSettings


def make_mapping(p: int, n_identities: int, direct: bool, generator, pack: int = 1):
    """The paper's mapping: face feature (512) -> linear -> LeakyReLU(0.2) -> (2, p), L2 per row.

    With ``direct`` the (2, p) coefficients of each identity are learned directly instead (the
    ablation in the paper), still L2-normalised per row. ``pack`` independent fits get one
    mapping each, every one initialised from ``generator``'s state at the call (so each starts
    where its lone fit would); they are stored stacked, which AdamW treats element by element,
    exactly as separate parameters. Returns a torch module whose call is
    ``mapping(features (pack * B, 512), identity (pack * B,)) -> (pack * B, 2, p)``, where the
    batch holds fit k's B samples at rows k * B ... and identity k * n + i is fit k's i-th.
    """
    import torch
    import torch.nn.functional as F

    class CoefficientMapping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.direct, self.pack = p, direct, pack
            if direct:
                raw = torch.randn((n_identities, 2, p), generator=generator)
                self.raw = torch.nn.Parameter(raw.repeat(pack, 1, 1))  # (pack * n, 2, p)
            else:
                weight = torch.randn((2 * p, FACE_FEATURE_DIM), generator=generator)  # N(0, 1)
                self.weight = torch.nn.Parameter(weight.repeat(pack, 1, 1))  # (pack, 2p, 512)
                self.bias = torch.nn.Parameter(torch.zeros((pack, 2 * p)))

        def forward(self, features, identity):
            if self.direct:
                raw = self.raw.index_select(0, identity)
            else:
                grouped = features.view(self.pack, -1, FACE_FEATURE_DIM)  # (pack, B, 512)
                raw = torch.baddbmm(self.bias[:, None, :], grouped, self.weight.transpose(1, 2))
                raw = F.leaky_relu(raw, 0.2).view(-1, 2, self.p)
            return F.normalize(raw, dim=-1)

        def coefficients_for(self, fit: int, identity: int, features):
            """Fit ``fit``'s coefficients (2, p) for its identity ``identity`` from one face
            feature (512,), outside the packed batch."""
            if self.direct:
                raw = self.raw[fit * (self.raw.shape[0] // self.pack) + identity]
            else:
                raw = F.leaky_relu(F.linear(features, self.weight[fit], self.bias[fit]), 0.2)
            return F.normalize(raw.view(2, self.p), dim=-1)

    return CoefficientMapping()


def tokenize_templates(tokenizer) -> list[Any]:
    """Every caption template, tokenised once, with the subject's two slots marked."""
    from ..prompting import IdentityMention, ParsedPrompt, tokenize_prompt

    tokenized = []
    for template in CAPTION_TEMPLATES:
        text = template.format(SUBJECT_PHRASE.format("\x00"))
        before, after = text.split("\x00")
        parsed = ParsedPrompt(text=text, segments=[before, IdentityMention(SUBJECT, 0, 0, True),
                                                   after])
        tokenized.append(tokenize_prompt(parsed, tokenizer))
    return tokenized


def make_optimizer(parameters, settings: FitSettings, device, captured: bool):
    """AdamW with torch's defaults but the method's lr; ``captured``: the step will be replayed
    as a CUDA graph, so AdamW keeps its step counter on the device (capturable)."""
    import torch

    if captured:
        return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay,
                                 capturable=True, foreach=True)
    return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
