"""Which CPU convolution kernels a fit uses for a given UNet.

On a CPU, torch runs fp32 convolutions through oneDNN by default. oneDNN pays a fixed cost per
call that only a large convolution repays: measured on the 2-core AMD EPYC of
docs/benchmarks.md, a 3x3 convolution forward and backward at batch 2 took 0.61 ms with oneDNN
and 0.40 ms with torch's own kernel at 32 channels on 8x8, 0.76 / 0.57 ms at 64 channels on
8x8, but 1.48 / 1.66 ms at 64 channels on 16x16 and 222 / 603 ms at 320 channels on 64x64 (the
SD 1.5 size). So the fit of a small UNet (the built-in test models) runs with oneDNN off, and
every real model keeps torch's default. The choice depends on the model and the latent size
only, so a seed gives the same fit every time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# channels_in x channels_out x height x width of the largest convolution for which torch's own
# CPU kernel measured faster than oneDNN (64 x 64 x 8 x 8 won, 64 x 64 x 16 x 16 lost).
NATIVE_CONV_MAX_WORK = 64 * 64 * 8 * 8


def largest_conv_work(unet: Any, latent_side: int) -> int:
    """channels^2 x area of the UNet's widest convolution level at this latent size."""
    channels = list(getattr(unet.config, "block_out_channels", []) or [])
    work = 0
    for level, width in enumerate(channels):
        side = max(1, latent_side >> level)
        work = max(work, int(width) * int(width) * side * side)
    return work


def prefers_native_convolutions(unet: Any, device: Any, dtype: Any, latent_side: int) -> bool:
    """True where torch's own fp32 CPU convolution beats oneDNN for this UNet (see above)."""
    import torch

    if getattr(device, "type", str(device)) != "cpu" or dtype != torch.float32:
        return False  # bf16 on a CPU needs oneDNN; GPUs do not use it
    work = largest_conv_work(unet, latent_side)
    return 0 < work <= NATIVE_CONV_MAX_WORK


@contextlib.contextmanager
def fit_convolutions(unet: Any, device: Any, dtype: Any, latent_side: int) -> Iterator[bool]:
    """Run the block with the faster CPU convolution kernels for this UNet; yields whether
    oneDNN was turned off (it is restored afterwards)."""
    import torch

    if not prefers_native_convolutions(unet, device, dtype, latent_side):
        yield False
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # only this switch: the other oneDNN flags stay
    try:
        yield True
    finally:
        torch.backends.mkldnn.enabled = before
