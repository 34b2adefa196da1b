"""Progress driven by the core's progress callbacks: rich bars on a terminal, plain lines at a
steady pace when stderr is a file or a pipe (`make demo | tee log`, CI, nohup), where bars
would only show their final state."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
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


def _duration(seconds: float) -> str:
    """12 s, 3m05s, 2h04m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress:
    """A progress callback that writes one plain line per phase every 10 % of the work or every
    ``every_s`` seconds, whichever comes first, and at the end: what, done/total, the rate and
    the time left. For logs and pipes, where a bar cannot redraw itself."""

    def __init__(self, write: Callable[[str], None], every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.every_s, self.clock = write, every_s, clock
        # phase -> [start time, done at start, last line's time, last tenth, finished]
        self.phases: dict[str, list[Any]] = {}

    def __call__(self, phase: str, done: float, total: int | None, info: dict[str, Any]) -> None:
        if phase == "note":
            self.write(str(info.get("message", "")))
            return
        if phase == "load":
            model = visible(str(info.get("model", "the model")))
            part = visible(str(info.get("part", "")))
            if done == 0:
                self.write(f"Loading {model}" + (f": {part}" if part else "") + " ...")
            else:
                self.write(f"Loaded {model} in {info.get('seconds', 0):.1f} s")
            return
        now = self.clock()
        state = self.phases.get(phase)
        if state is None or done < state[1]:  # a new phase, or the same phase started again
            state = self.phases[phase] = [now, done, None, -1, False]
        tenth = math.floor(10 * done / total) if total else -1
        finished = bool(total) and done >= total
        due = (state[2] is None or tenth > state[3] or now - state[2] >= self.every_s
               or (finished and not state[4]))
        if not due or (state[4] and finished):
            return
        state[2], state[3], state[4] = now, tenth, finished
        self.write(self._line(phase, done, total, info, now - state[0], done - state[1]))

    @staticmethod
    def _line(phase: str, done: float, total: int | None, info: dict[str, Any],
              elapsed: float, progressed: float) -> str:
        parts = [f"{PHASES.get(phase, phase)}: {int(done)}"
                 + (f"/{total} ({100 * done / total:.0f} %)" if total else "")]
        if "loss" in info:
            parts.append(f"loss {info['loss']:.4f}")
        elif info.get("rate"):
            parts.append(visible(str(info["rate"])))
        rate = progressed / elapsed if elapsed > 0 and progressed > 0 else None
        if rate:
            parts.append(f"{rate:.2f} it/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if rate and total and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        return ", ".join(parts)


@contextlib.contextmanager
def progress_callback(quiet: bool = False) -> Iterator[Any]:
    """Yield a callback(phase, done, total, info) that draws bars on stderr (or nothing); plain
    lines (:class:`PlainProgress`) when stderr is not a terminal."""
    if quiet:
        yield None
        return
    if not err.is_terminal:
        yield PlainProgress(lambda line: err.print(line, crop=False))
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
