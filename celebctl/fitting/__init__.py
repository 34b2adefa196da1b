"""The Celeb Basis fit: face crops in, (2, p) coefficients per identity out.

The diffusion model, the VAE and the text encoder stay frozen; only a small mapping (or, with
``direct=True``, the coefficients themselves) is trained. Before the loop, augmented copies of
each identity's face crops are VAE-encoded once into a pool of latent distributions
(:mod:`celebctl.augment`), and every random draw of the loop is made up front
(:mod:`celebctl.fitstep`), so the loop itself runs only the text encoder and the UNet, forward
and backward, without waiting on the host.

Method figures (METHOD.md, read from the reference code): mapping 512 -> 2p, LeakyReLU 0.2,
per-token L2 norm; EMA 0.99 of the mapping's output, once per training sample; 400 steps per
identity, batch 2, AdamW, lr 1e-2; flip, colour jitter, paste at 10-100 % of the frame on black;
a fresh latent from the VAE's distribution at every step; noise-prediction MSE. The text
encoder, the identity vectors and the loss are fp32; only the UNet runs under autocast.

The package, one concept a module:

- ``settings``: what a fit takes and gives (FitSettings, FitSubject, FitResult);
- ``mapping``: what it trains (the mapping, its optimiser, the caption templates);
- ``phases``: the fit as prepare / train / finish, for one fit or a pack of independent ones;
- ``identities``: `add` and `joint` (check, load once, fit, register);
- ``people`` and ``batch``: `add-many` (who to fit from a folder or manifest; the batch job);
- ``refit``: `refit` (identities fitted again from their stored crops, for another checkpoint).
"""

from .identities import (
    FitOutcome,
    add_identity_from_photo,
    load_fit_model,
    prepare_photos,
    refit_jointly,
)
from .mapping import make_mapping, make_optimizer, tokenize_templates
from .phases import (
    PackedFitError,
    PreparedFit,
    TrainReport,
    finish,
    fit_identities,
    fit_packed,
    prepare_fit,
    train,
)
from .refit import RefitOutcome, refit_identities
from .settings import (
    DEFAULT_POOL_CPU,
    DEFAULT_POOL_GPU,
    FACE_FEATURE_DIM,
    MAX_PHOTOS,
    REPORT_EVERY_GPU,
    SUBJECT,
    FitResult,
    FitSettings,
    FitSubject,
    ProgressCallback,
)

__all__ = [
    "DEFAULT_POOL_CPU", "DEFAULT_POOL_GPU", "FACE_FEATURE_DIM", "MAX_PHOTOS", "REPORT_EVERY_GPU",
    "SUBJECT", "FitOutcome", "FitResult", "FitSettings", "FitSubject", "PackedFitError",
    "PreparedFit", "ProgressCallback", "TrainReport", "add_identity_from_photo", "finish",
    "fit_identities", "fit_packed", "load_fit_model", "make_mapping", "make_optimizer",
    "prepare_fit", "prepare_photos", "refit_identities", "refit_jointly", "RefitOutcome",
    "tokenize_templates", "train",
]
