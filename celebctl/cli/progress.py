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

from .common import err

PHASES = {
    "pool": "Encoding augmented faces",
    "fit": "Fitting",
    "render": "Denoising",
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
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def callback(phase: str, done: int, total: int, info: dict[str, Any]) -> None:
        if phase == "note":
            progress.console.print(str(info.get("message", "")))
            return
        if phase not in tasks:
            tasks[phase] = progress.add_task(PHASES.get(phase, phase), total=total, extra="")
        extra = f"loss {info['loss']:.4f}" if "loss" in info else ""
        progress.update(tasks[phase], completed=done, total=total, extra=extra)

    with progress:
        yield callback
