"""Samplers and schedule types by the WebUI's names -> diffusers schedulers (pure: no torch).

`render --sampler "DPM++ 2M" --schedule Karras` names a sampler and a schedule type as the
WebUI (1.9 and later) writes them, in any case. Each sampler is a diffusers scheduler class
with a few config overrides, as diffusers' scheduler overview lists the A1111/k-diffusion
equivalents (``use_karras_sigmas``, ``algorithm_type="sde-dpmsolver++"``,
``timestep_spacing="trailing"``, ...); each schedule type is more overrides on top:

- Karras, Exponential, Beta: ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
  ``use_beta_sigmas``, with ``timestep_spacing="linspace"`` so the sigmas span the model's
  whole range as the WebUI's do (diffusers' Euler family interpolates the range from the
  spaced timesteps);
- Uniform: ``timestep_spacing="linspace"`` (the WebUI's k-diffusion default);
- SGM Uniform: ``timestep_spacing="trailing"`` (what Lightning / Turbo / Hyper checkpoints need);
- DDIM: ``timestep_spacing="leading"``, ``steps_offset=1`` (the WebUI's DDIM timesteps).

"Automatic" means what it means in the WebUI: the sampler's own default schedule (Karras for
DPM++ 2M, DPM++ SDE, DPM2 and DPM2 a; Exponential for DPM++ 2M SDE; Uniform for Euler, Euler a,
Heun and LMS); for DDIM, PLMS, UniPC and LCM it is the scheduler config the model ships.

The older ``--scheduler ddim|dpm|euler`` stays: DDIM, DPM++ 2M or Euler with the model's own
scheduler config, untouched (so those renders keep their bytes); their PNG text names the
schedule type that config amounts to (:func:`schedule_label`).

A combination diffusers does not have is refused with what works; an unknown name lists the
known ones. DPM++ SDE needs the ``torchsde`` package, LMS and Beta need ``scipy`` (diffusers'
requirements): without them they are refused before anything loads, naming the package.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from typing import Any

from .errors import InvalidOption

AUTOMATIC = "Automatic"
UNIFORM = "Uniform"
KARRAS = "Karras"
EXPONENTIAL = "Exponential"
SGM_UNIFORM = "SGM Uniform"
BETA = "Beta"
DDIM_SCHEDULE = "DDIM"

SIGMA_FLAGS = {KARRAS: "use_karras_sigmas", EXPONENTIAL: "use_exponential_sigmas",
               BETA: "use_beta_sigmas"}
SPACINGS = {UNIFORM: "linspace", SGM_UNIFORM: "trailing", DDIM_SCHEDULE: "leading"}
# Schedule types in the order the WebUI lists them; Automatic first.
SCHEDULE_TYPES = (AUTOMATIC, UNIFORM, KARRAS, EXPONENTIAL, SGM_UNIFORM, DDIM_SCHEDULE, BETA)
# Old WebUI names and aliases of schedule types (its sd_schedulers names, any case).
_SCHEDULE_ALIASES = {"sgm_uniform": SGM_UNIFORM, "sgmuniform": SGM_UNIFORM}
# A schedule type -> the Python package diffusers needs for it.
SCHEDULE_NEEDS = {BETA: "scipy"}

ALL_SIGMAS = (KARRAS, EXPONENTIAL, BETA)
ALL_SPACINGS = (UNIFORM, SGM_UNIFORM, DDIM_SCHEDULE)


class SamplerError(InvalidOption):
    """An unknown sampler or schedule type, a combination diffusers lacks, a missing package."""


@dataclass(frozen=True)
class Sampler:
    """A WebUI sampler: its diffusers class, fixed overrides and the schedules it takes."""

    name: str
    cls: str
    automatic: str | None  # the schedule "Automatic" means; None: the model's own config
    schedules: tuple[str, ...]  # besides Automatic
    overrides: tuple[tuple[str, Any], ...] = ()
    stochastic: bool = False  # draws noise each step (from each image's generator)
    needs: str | None = None  # a Python package diffusers needs for it

    @property
    def schedule_types(self) -> tuple[str, ...]:
        """Every schedule type it takes, Automatic first, in the WebUI's order."""
        return tuple(s for s in SCHEDULE_TYPES if s == AUTOMATIC or s in self.schedules)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", KARRAS, ALL_SPACINGS + ALL_SIGMAS,
            (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", KARRAS, ALL_SPACINGS + ALL_SIGMAS,
            stochastic=True, needs="torchsde"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", EXPONENTIAL,
            ALL_SPACINGS + ALL_SIGMAS,
            (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)), stochastic=True),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", UNIFORM, ALL_SPACINGS,
            stochastic=True),
    Sampler("Euler", "EulerDiscreteScheduler", UNIFORM, ALL_SPACINGS + ALL_SIGMAS),
    Sampler("LMS", "LMSDiscreteScheduler", UNIFORM, ALL_SPACINGS + ALL_SIGMAS, needs="scipy"),
    Sampler("Heun", "HeunDiscreteScheduler", UNIFORM, ALL_SPACINGS + ALL_SIGMAS),
    Sampler("DPM2", "KDPM2DiscreteScheduler", KARRAS, ALL_SPACINGS + ALL_SIGMAS),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", KARRAS, ALL_SPACINGS + ALL_SIGMAS,
            stochastic=True),
    Sampler("DDIM", "DDIMScheduler", None, ALL_SPACINGS),
    Sampler("PLMS", "PNDMScheduler", None, ALL_SPACINGS, (("skip_prk_steps", True),)),
    Sampler("UniPC", "UniPCMultistepScheduler", None, ALL_SPACINGS + ALL_SIGMAS),
    Sampler("LCM", "LCMScheduler", None, (), stochastic=True),
)}
# `--scheduler` values of earlier releases -> the sampler they are (with the model's config).
LEGACY = {"ddim": "DDIM", "dpm": "DPM++ 2M", "euler": "Euler"}
# Other names people type for samplers: the WebUI's k_* aliases.
_SAMPLER_ALIASES = {"k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_euler": "Euler",
                    "k_lms": "LMS", "k_heun": "Heun", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a",
                    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE",
                    "k_dpmpp_2m_sde": "DPM++ 2M SDE", "k_lcm": "LCM"}


def sampler_names() -> list[str]:
    """The samplers' WebUI names, in the WebUI's order."""
    return list(SAMPLERS)


def _key(text: str) -> str:
    return " ".join(str(text).split()).casefold()


_BY_KEY = {**{_key(n): s for n, s in SAMPLERS.items()},
           **{_key(a): SAMPLERS[n] for a, n in _SAMPLER_ALIASES.items()}}
_SCHEDULE_BY_KEY = {**{_key(s): s for s in SCHEDULE_TYPES},
                    **{_key(a): s for a, s in _SCHEDULE_ALIASES.items()}}


def _did_you_mean(text: str, names: list[str]) -> str:
    close = difflib.get_close_matches(_key(text), [_key(n) for n in names], n=1, cutoff=0.6)
    if not close:
        return ""
    found = next(n for n in names if _key(n) == close[0])
    return f" Did you mean '{found}'?"


def split_sampler_name(text: str) -> tuple[Sampler, str | None]:
    """``text`` as a sampler, and the schedule type its name carries, if any: WebUI < 1.9 wrote
    "DPM++ 2M Karras" for what 1.9 writes as "DPM++ 2M" + "Karras". Raises SamplerError."""
    key = _key(text)
    if key in _BY_KEY:
        return _BY_KEY[key], None
    for schedule in SCHEDULE_TYPES[1:]:
        for name in (schedule, *[a for a, s in _SCHEDULE_ALIASES.items() if s == schedule]):
            suffix = " " + _key(name)
            if key.endswith(suffix) and key[:-len(suffix)] in _BY_KEY:
                return _BY_KEY[key[:-len(suffix)]], schedule
    raise SamplerError(
        f"Unknown sampler '{text}'.{_did_you_mean(text, sampler_names())} Known samplers (the "
        f"WebUI's names, any case): {', '.join(sampler_names())}.")


def find_schedule(text: str) -> str:
    """The schedule type named ``text`` (any case). Raises SamplerError listing them."""
    key = _key(text)
    if key in _SCHEDULE_BY_KEY:
        return _SCHEDULE_BY_KEY[key]
    raise SamplerError(
        f"Unknown schedule type '{text}'.{_did_you_mean(text, list(SCHEDULE_TYPES))} Known "
        f"schedule types: {', '.join(SCHEDULE_TYPES)}.")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class SamplerChoice:
    """A checked sampler and schedule type; ``legacy`` is the `--scheduler` value it came from
    (then the model's own scheduler config is used as it is)."""

    sampler: Sampler
    schedule: str = AUTOMATIC
    legacy: str | None = None

    @property
    def key(self) -> str:
        """What the PNG's JSON records as "scheduler": the `--scheduler` value this choice is
        the same as (DDIM with Automatic is `ddim`), else the diffusers class."""
        if self.legacy is not None:
            return self.legacy
        same = [k for k, name in LEGACY.items() if name == self.sampler.name]
        return same[0] if same and not self.overrides() else self.sampler.cls

    def overrides(self) -> dict[str, Any]:
        """The config overrides on top of the model's scheduler config (none for legacy)."""
        if self.legacy is not None:
            return {}
        out = dict(self.sampler.overrides)
        schedule = self.sampler.automatic if self.schedule == AUTOMATIC else self.schedule
        if schedule is None:
            return out
        has_sigmas = any(s in self.sampler.schedules for s in ALL_SIGMAS)
        if has_sigmas:
            out.update({flag: False for flag in SIGMA_FLAGS.values()})
        if schedule in SIGMA_FLAGS:
            out[SIGMA_FLAGS[schedule]] = True
            out["timestep_spacing"] = "linspace"
        else:
            out["timestep_spacing"] = SPACINGS[schedule]
            if schedule == DDIM_SCHEDULE:
                out["steps_offset"] = 1
        return out

    def describe(self) -> str:
        """ "DPM++ 2M, Karras" as a person reads it."""
        return f"{self.sampler.name}, {self.schedule}"


def choice(sampler: str, schedule: str | None = None) -> SamplerChoice:
    """A WebUI sampler name (an old combined name like "DPM++ 2M Karras" too) and schedule type,
    checked: the combination must exist in diffusers and its package be installed."""
    found, carried = split_sampler_name(sampler)
    wanted = find_schedule(schedule) if schedule is not None else None
    if carried is not None and wanted is not None and carried != wanted:
        raise SamplerError(f"The sampler '{sampler}' already says schedule type {carried}; "
                           f"drop it from the name or drop --schedule {wanted}.")
    made = SamplerChoice(found, wanted or carried or AUTOMATIC)
    check_choice(made)
    return made


def check_choice(made: SamplerChoice) -> None:
    """Raise SamplerError for a schedule the sampler lacks or a package that is missing."""
    sampler, schedule = made.sampler, made.schedule
    if schedule not in sampler.schedule_types:
        takers = [s.name for s in SAMPLERS.values() if schedule in s.schedules]
        raise SamplerError(
            f"{sampler.name} has no '{schedule}' schedule in diffusers. With {sampler.name} use: "
            f"{', '.join(sampler.schedule_types)}. Samplers that take {schedule}: "
            f"{', '.join(takers) or 'none'}.")
    if sampler.needs and not _installed(sampler.needs):
        raise SamplerError(
            f"The {sampler.name} sampler needs the Python package '{sampler.needs}', which is "
            f"not installed: install it (pip install {sampler.needs}) or pick another sampler: "
            f"{', '.join(n for n, s in SAMPLERS.items() if not s.needs)}.")
    effective = sampler.automatic if schedule == AUTOMATIC else schedule
    needs = SCHEDULE_NEEDS.get(effective or "")
    if needs and not _installed(needs):
        raise SamplerError(
            f"The {effective} schedule needs the Python package '{needs}', which is not "
            f"installed: install it (pip install {needs}) or pick another schedule type: "
            f"{', '.join(s for s in sampler.schedule_types if s not in SCHEDULE_NEEDS)}.")


def legacy_choice(scheduler: str) -> SamplerChoice:
    """The `--scheduler ddim|dpm|euler` of earlier releases. Raises SamplerError."""
    key = str(scheduler).strip().lower()
    if key not in LEGACY:
        raise SamplerError(f"Unknown scheduler '{scheduler}': use {', '.join(LEGACY)}, or a "
                           f"sampler by its WebUI name with --sampler ({', '.join(SAMPLERS)}).")
    return SamplerChoice(SAMPLERS[LEGACY[key]], AUTOMATIC, key)


DEFAULT = "ddim"  # without options or config: DDIM with the model's config, as ever


def choose(*, scheduler: str | None = None, sampler: str | None = None,
           schedule: str | None = None,
           configured: tuple[str | None, str | None] = (None, None)) -> SamplerChoice:
    """The sampler a render uses: ``scheduler`` (the older option), else ``sampler`` and
    ``schedule``, else ``configured`` (the config file's ``sampler`` and ``schedule``, as
    :func:`celebctl.models.configured_sampling` reads them), else DDIM as ever.

    ``--scheduler`` with ``--sampler`` is accepted only when both name the same sampler and no
    schedule is given. The config's ``schedule`` goes with the config's ``sampler``: a
    ``--sampler`` given alone means its Automatic schedule. Raises SamplerError.
    """
    if scheduler is not None:
        old = legacy_choice(scheduler)
        if schedule is not None or (sampler is not None
                                    and split_sampler_name(sampler) != (old.sampler, None)):
            raise SamplerError(
                f"--scheduler {old.legacy} and --sampler/--schedule both choose the sampler; "
                "give only --sampler NAME (and --schedule TYPE).")
        return old
    if sampler is None:
        conf_sampler, conf_schedule = configured
        if conf_sampler is not None and schedule is None:
            return choice(conf_sampler, conf_schedule)
        if schedule is None:
            return legacy_choice(DEFAULT)
        sampler = conf_sampler or SAMPLERS[LEGACY[DEFAULT]].name
    return choice(sampler, schedule)


def schedule_label(made: SamplerChoice, config: Any) -> str:
    """The schedule type to write in the PNG for ``made`` run with scheduler ``config`` (the
    built scheduler's): the chosen one, or for the older `--scheduler` what the model's own
    config amounts to ("Automatic" when that is the sampler's own default)."""
    if made.legacy is None:
        return made.schedule
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    label = next((s for s, flag in SIGMA_FLAGS.items() if get(flag, False)), None)
    if label is None:
        spacing = get("timestep_spacing", None)
        label = next((s for s, v in SPACINGS.items() if v == spacing), None)
    if label is None:
        return AUTOMATIC
    automatic = made.sampler.automatic
    if automatic is None:  # DDIM's own (WebUI) timesteps are the leading ones
        automatic = DDIM_SCHEDULE
    return AUTOMATIC if label == automatic else label


def from_infotext(fields: dict[str, str]) -> tuple[str | None, str | None]:
    """(sampler, schedule type) from the WebUI's settings line fields: "Sampler" and
    "Schedule type" (1.9+), or an older combined "Sampler: DPM++ 2M Karras". A sampler
    celebctl does not know is returned as written; a missing schedule type is None (before
    1.9 it meant the sampler's default then, not "Automatic")."""
    raw = fields.get("Sampler")
    schedule = fields.get("Schedule type")
    if raw is None:
        return None, schedule
    try:
        found, carried = split_sampler_name(raw)
    except SamplerError:
        return raw, schedule
    return found.name, schedule or carried
