"""Choosing the sampler: `--sampler`, `--schedule` and the older `--scheduler` (render, eval)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from .. import samplers


class SchedulerName(str, Enum):
    """`--scheduler` choices (earlier releases' way to pick a sampler)."""

    ddim = "ddim"
    dpm = "dpm"
    euler = "euler"


SamplerOpt = Annotated[str | None, typer.Option(
    "--sampler", metavar="NAME", help="Sampler by the WebUI's name (any case): "
    + ", ".join(samplers.SAMPLERS) + ". Default: the config's `sampler`, else DDIM. "
    "Few-step checkpoints: LCM, or Euler / Euler a with --schedule \"SGM Uniform\", and "
    "--guidance 1 (see docs/drawing.md).", show_default=False)]
ScheduleOpt = Annotated[str | None, typer.Option(
    "--schedule", metavar="TYPE", help="Schedule type, as the WebUI's \"Schedule type\": "
    + ", ".join(samplers.SCHEDULE_TYPES) + " (Automatic: the sampler's own, as in the "
    "WebUI; which sampler takes which: docs/drawing.md).", show_default=False)]
SchedulerOpt = Annotated[SchedulerName | None, typer.Option(
    "--scheduler", help="The older way to pick a sampler: ddim, dpm (DPM++ 2M), euler, with "
    "the model's own schedule. Use --sampler instead.", show_default=False)]


def check_sampler_options(scheduler: SchedulerName | None, sampler: str | None,
                          schedule: str | None) -> samplers.SamplerChoice:
    """The sampler choice, checked before anything loads: a bad name or combination given on
    the command line is a usage error (exit 2); a bad config value an error (exit 1)."""
    old = scheduler.value if scheduler else None
    try:
        if old is not None or sampler is not None:  # the config plays no part
            return samplers.choose(scheduler=old, sampler=sampler, schedule=schedule,
                                   configured=(None, None))
        if schedule is not None:
            samplers.find_schedule(schedule)
    except samplers.SamplerError as exc:
        hint = "'--sampler'" if sampler is not None else "'--schedule'"
        raise typer.BadParameter(str(exc), param_hint=hint) from None
    from .. import rendering

    return rendering.sampler_choice(schedule=schedule)
