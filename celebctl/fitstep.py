"""One training step of the fit, as a pure function of a step index and static tensors.

Everything random in a fit is drawn up front, on the CPU from the fit's seed (so a seed gives
the same fit on every device): which pool sample and caption template each batch slot uses,
the diffusion timestep, the diffusion noise and the noise that samples a fresh latent from each
pool entry's distribution. The step then only indexes those tensors with a step index that
lives on the device, so it never waits on the host: the loss goes into a device buffer that the
caller reads every few steps, and the EMA of the coefficients is updated on the device.

On CUDA the step is captured once in a CUDA graph and replayed (the text encoder with the
identity slots, the UNet forward and backward, AdamW and the EMA); everywhere else, and as the
fallback when capture fails, the same function runs eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .models import families

WARMUP_STEPS = 3  # eager steps on a side stream before capture (CUDA needs them; they count)


def _vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class FitSchedule:
    """Every random draw of a fit, per step and batch slot (tensors on the fit's device).

    ``picks`` (S, B) pool indices; ``owners`` (S, B) identity indices; ``templates`` (S, B)
    caption template indices; ``timesteps`` (S, B); ``coef_signal`` / ``coef_noise`` (S, B) the
    sqrt(alpha_bar) and sqrt(1 - alpha_bar) of each timestep; ``noise`` and ``latent_noise``
    (S, B, C, h, w); ``ema_decay`` (S, n) and ``ema_weight`` (S, n, B) the per-sample EMA
    arithmetic (see :func:`ema_arrays`).
    """

    picks: Any
    owners: Any
    templates: Any
    timesteps: Any
    coef_signal: Any
    coef_noise: Any
    noise: Any
    latent_noise: Any
    ema_decay: Any
    ema_weight: Any

    @property
    def steps(self) -> int:
        return int(self.picks.shape[0])

    def to(self, device) -> FitSchedule:
        return FitSchedule(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def ema_arrays(owners, n_identities: int, momentum: float):
    """The EMA of each identity's coefficients, updated once per training sample.

    For identity i with samples x_1..x_k (in batch order) in a step, k sequential updates
    ``ema = m * ema + (1 - m) * x`` give ``ema' = m^k ema + sum_r (1 - m) m^(k-r) x_r``; its very
    first sample sets ``ema = x`` instead. Returned as ``decay`` (S, n) and ``weight`` (S, n, B)
    so that a step is ``ema = decay[s, :, None] * ema + weight[s] @ X`` with X (B, 2p).
    """
    import torch

    steps, batch = owners.shape
    decay = torch.ones((steps, n_identities), dtype=torch.float64)
    weight = torch.zeros((steps, n_identities, batch), dtype=torch.float64)
    seen = [False] * n_identities
    owner_rows = owners.tolist()
    for step in range(steps):
        for identity in range(n_identities):
            slots = [j for j, o in enumerate(owner_rows[step]) if o == identity]
            if not slots:
                continue
            k = len(slots)
            for r, slot in enumerate(slots, start=1):
                weight[step, identity, slot] = (1 - momentum) * momentum ** (k - r)
            decay[step, identity] = momentum ** k
            if not seen[identity]:
                # The first sample ever starts the average: ema = x_1, then the rest as usual.
                decay[step, identity] = 0.0
                weight[step, identity, slots[0]] = momentum ** (k - 1)
                seen[identity] = True
    return decay.float(), weight.float()


def build_schedule(*, steps: int, batch_size: int, pool_identity, n_identities: int,
                   n_templates: int, latent_shape: Sequence[int], alphas_cumprod,
                   num_train_timesteps: int, ema_momentum: float, seed: int) -> FitSchedule:
    """Draw every step's randomness from ``seed`` (CPU), as (S, B, ...) tensors.

    Sample j of step s belongs to identity (s * B + j) mod n, so every batch mixes identities;
    its pool entry is drawn uniformly among that identity's samples.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    owners = (torch.arange(steps * batch_size) % n_identities).view(steps, batch_size)
    by_identity = [torch.nonzero(pool_identity == i).flatten() for i in range(n_identities)]
    picks = torch.empty((steps, batch_size), dtype=torch.long)
    for i, members in enumerate(by_identity):
        where = owners == i
        count = int(where.sum())
        choice = torch.randint(len(members), (count,), generator=generator)
        picks[where] = members[choice]
    templates = torch.randint(n_templates, (steps, batch_size), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (steps, batch_size), generator=generator)
    alpha_bar = alphas_cumprod.to(torch.float64)[timesteps]
    shape = (steps, batch_size, *latent_shape)
    noise = torch.randn(shape, generator=generator)
    latent_noise = torch.randn(shape, generator=generator)
    decay, weight = ema_arrays(owners, n_identities, ema_momentum)
    return FitSchedule(
        picks=picks, owners=owners, templates=templates, timesteps=timesteps,
        coef_signal=alpha_bar.sqrt().float(), coef_noise=(1 - alpha_bar).sqrt().float(),
        noise=noise, latent_noise=latent_noise, ema_decay=decay, ema_weight=weight,
    )


@dataclass
class StepTensors:
    """The static tensors one step reads (all on the fit's device).

    A step trains ``pack`` independent fits side by side (a packed fit; 1 for `add` and
    `joint`). They share one schedule (each was drawn from the same seed, as its lone fit
    would draw it); fit k's pool entries are rows ``k * pool_per_fit ...`` of the pool tensors,
    its identities are ``k * n ...`` in ``ema`` and the mapping, and its batch slots are
    ``k * B ... (k + 1) * B - 1`` of the packed batch.
    """

    schedule: FitSchedule
    latent_mean: Any
    latent_std: Any
    features: Any
    scaling: float
    template_ids: list[Any]  # per text encoder, (T, L) long (their padding differs)
    template_slots: Any  # (T, 2) long: where the subject's two vectors go
    basis_mean: Any  # (2, hidden) fp32
    basis_components: Any  # (2, p, hidden) fp32
    loss: Any  # (S, pack) fp32, written by each step; starts as NaN (a step that never ran)
    ema: Any  # (pack * n, 2, p) fp32
    pack: int = 1

    @property
    def pool_per_fit(self) -> int:
        return int(self.latent_mean.shape[0]) // self.pack

    @property
    def identities_per_fit(self) -> int:
        return int(self.ema.shape[0]) // self.pack


def _autocast(device_type: str, dtype, enabled: bool):
    import torch

    # cache_enabled=False: a weight cast cached by autocast inside a captured region would be
    # a tensor the graph owns and frees (PyTorch's CUDA-graph notes); it costs nothing here.
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


class TrainStep:
    """``step(s)`` runs training step ``s``: mapping -> identity vectors -> text encoder (fp32)
    -> UNet under autocast -> per-fit MSE -> backward -> AdamW -> loss buffer and EMA, on the
    device, for every fit of the pack at once.

    The step index lives in a 0-dim device tensor, so the same work can be captured once in a
    CUDA graph and replayed (:meth:`capture`). Set ``device_index`` to run the eager steps
    through that very path too (tests compare it with the integer path on the CPU).
    """

    device_index = False

    def __init__(self, components, mapping, optimizer, tensors: StepTensors, prediction_type: str,
                 scaler=None, clip_skip: int = 1):
        import torch

        self.components = components
        self.mapping = mapping
        self.optimizer = optimizer
        self.t = tensors
        self.v_prediction = prediction_type == "v_prediction"
        self.scaler = scaler
        self.clip_skip = clip_skip  # the text encoder layer the captions are read at
        self.device = components.device
        self.unet_dtype = components.dtype
        self.index = torch.zeros((), dtype=torch.long, device=self.device)
        self.family = getattr(components, "family", "sd1")
        self.injector = families.SlotInjector(components.text_encoders)
        batch = tensors.schedule.picks.shape[1]
        pack = tensors.pack
        # Fit k's pool rows and identity slots start at these offsets (k * B slots each).
        self.pool_offsets = (torch.arange(pack, device=self.device)
                             * tensors.pool_per_fit).repeat_interleave(batch)
        self.owner_offsets = (torch.arange(pack, device=self.device)
                              * tensors.identities_per_fit).repeat_interleave(batch)
        resolution = int(tensors.latent_mean.shape[-1]) * _vae_scale(components.vae)
        self.time_ids = families.time_ids(resolution, resolution, batch * pack, self.device,
                                          self.unet_dtype) if self.family == "sdxl" else None
        self.graph = None
        self.warmed = 0  # steps run by capture() before it captured

    @contextlib.contextmanager
    def hooked(self):
        """Keep the slot hooks on the text encoder(s) for the duration of the fit."""
        with self.injector.attached():
            yield self

    def _slot_tensors(self, vectors, chosen):
        """The injector's mask and values for the chosen templates' two subject slots."""
        import torch

        t = self.t
        ids = [table.index_select(0, chosen) for table in t.template_ids]
        slots = t.template_slots.index_select(0, chosen)
        hidden = vectors.shape[-1]
        shape = ids[0].shape
        mask = torch.zeros(shape, dtype=torch.bool, device=self.device).scatter(1, slots, True)
        values = torch.zeros((*shape, hidden), device=self.device, dtype=vectors.dtype).scatter(
            1, slots[..., None].expand(-1, -1, hidden), vectors)
        return ids, mask, values

    def _forward_backward(self, step: int | None = None) -> None:
        """One step. ``step`` None reads the step index from the device tensor (what a CUDA
        graph replays); an int indexes the tables directly (views, no kernels: eager)."""
        import torch

        t, schedule, pack = self.t, self.t.schedule, self.t.pack
        s = self.index.view(1)

        def at(table, packed: bool = True):  # row s of a per-step table, once per fit
            row = table[step] if step is not None else table.index_select(0, s).squeeze(0)
            return row.repeat(pack, *([1] * (row.dim() - 1))) if packed and pack > 1 else row

        picks = at(schedule.picks) + self.pool_offsets
        latents = (t.latent_mean.index_select(0, picks)
                   + t.latent_std.index_select(0, picks) * at(schedule.latent_noise)) * t.scaling
        coeffs = self.mapping(t.features.index_select(0, picks),
                              at(schedule.owners) + self.owner_offsets)
        vectors = t.basis_mean + torch.einsum("btp,tph->bth", coeffs, t.basis_components)
        ids, mask, values = self._slot_tensors(vectors, at(schedule.templates))
        self.injector.set(mask, values)
        states, pooled = families.encode(self.family, self.components.text_encoders, ids,
                                         self.clip_skip)
        added = None
        if self.time_ids is not None:
            added = {"text_embeds": pooled.to(self.unet_dtype), "time_ids": self.time_ids}
        a = at(schedule.coef_signal)[:, None, None, None]
        b = at(schedule.coef_noise)[:, None, None, None]
        noise = at(schedule.noise)
        noisy = a * latents + b * noise
        target = a * noise - b * latents if self.v_prediction else noise
        with _autocast(self.device.type, self.unet_dtype, self.unet_dtype != torch.float32):
            prediction = self.components.unet(noisy.to(self.unet_dtype), at(schedule.timesteps),
                                              states.to(self.unet_dtype),
                                              added_cond_kwargs=added).sample
        # Each fit's loss is the mean over its own samples; their sum gives every fit exactly
        # the gradient of its lone fit (the fits share no parameter).
        per_fit = (prediction.float() - target).square().view(pack, -1).mean(dim=1)
        self._apply(per_fit.sum())
        with torch.no_grad():
            if step is not None:
                t.loss[step] = per_fit.detach()
            else:
                t.loss.index_copy_(0, s, per_fit.detach().view(1, pack))
            flat = coeffs.detach().view(pack, -1, coeffs[0].numel())  # (K, B, 2p)
            ema = t.ema.view(pack, t.identities_per_fit, -1)  # (K, n, 2p)
            ema.mul_(at(schedule.ema_decay, False)[None, :, None]).add_(
                at(schedule.ema_weight, False) @ flat)

    def _apply(self, loss) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def run(self, step: int) -> None:
        """Run step ``step`` (replaying the graph when one was captured)."""
        if self.graph is not None:
            self.index.fill_(step)
            self.graph.replay()
        elif self.device_index:
            self.index.fill_(step)
            self.optimizer.zero_grad(set_to_none=True)
            self._forward_backward()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._forward_backward(step)

    def capture(self, first_step: int) -> int:
        """Capture the step in a CUDA graph; returns how many steps were run to warm it up.

        The warm-up steps are real steps ``first_step``, ``first_step + 1``, ... (on a side
        stream, as CUDA requires; they also create AdamW's state before capture). Runs under
        the fit's own device, so a fit on ``cuda:1`` captures on ``cuda:1``'s streams. Raises
        whatever capture raises; the caller falls back.
        """
        import torch

        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            warm = min(WARMUP_STEPS, self.t.schedule.steps - first_step)
            with torch.cuda.stream(stream):
                for k in range(warm):  # real steps, through the same device-index path
                    self.index.fill_(first_step + k)
                    self.optimizer.zero_grad(set_to_none=True)
                    self._forward_backward()
                    self.warmed = k + 1
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if first_step + warm >= self.t.schedule.steps:
                return warm
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            # Captured on the warm-up stream: libraries that set up per-stream state lazily
            # (cuBLAS workspaces, hipBLASLt handles) did so during the warm-up, not mid-capture.
            with torch.cuda.graph(graph, stream=stream):
                self._forward_backward()
        self.graph = graph
        return warm
