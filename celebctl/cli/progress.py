"""Rich progress bars driven by the core's progress callbacks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..documents import visible
from .common import err

PHASES = {
    "people": "People",
    "pool": "Encoding augmented faces",
    "fit": "Fitting",
    "render": "Denoising",
    "images": "Rendering images",
    "eval": "Rendering the prompt set",
    "download": "Downloading the face-recognition weights",
}


class RateColumn(TextColumn):
    """Iterations per second, from rich's own speed estimate."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} it/s" if speed else "- it/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_callback(quiet: bool = False) -> Iterator[Any]:
    """Yield a callback(phase, done, total, info) that draws bars on stderr (or nothing)."""
    if quiet:
        yield None
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}", markup=False),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def new_task(label: str, total: float | None) -> TaskID:
        # The display starts with the first task, so a command that fails before any work
        # prints its error without an empty progress line in front of it.
        if not progress.live.is_started:
            progress.start()
        return progress.add_task(label, total=total, extra="")

    def callback(phase: str, done: int, total: int, info: dict[str, Any]) -> None:
        if phase == "note":
            progress.console.print(str(info.get("message", "")))
            return
        if phase == "load":
            model = visible(str(info.get("model", "the model")))
            part = visible(str(info.get("part", "")))
            if done == 0:
                label = f"Loading {model}" + (f": {part}" if part else "")
                if "load" not in tasks:
                    tasks["load"] = new_task(label, None)
                progress.update(tasks["load"], description=label)
            elif "load" in tasks:
                progress.update(tasks["load"], total=1, completed=1,
                                description=f"Loaded {model}",
                                extra=f"{info.get('seconds', 0):.1f} s")
            return
        if phase not in tasks:
            tasks[phase] = new_task(PHASES.get(phase, phase), total)
        extra = f"loss {info['loss']:.4f}" if "loss" in info else str(info.get("rate", ""))
        progress.update(tasks[phase], completed=done, total=total, extra=extra)

    try:
        yield callback
    finally:
        if progress.live.is_started:
            progress.stop()
