"""What the routes share: the settings, the job queue, and waiting for a job from a request."""

from __future__ import annotations

import asyncio
import functools
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from .. import errors
from .jobs import Job, JobQueue
from .security import AccessRules
from .work import ServerSettings


class JobFailed(errors.CelebctlError):
    """A job's error, answered with the status its kind of error has."""

    def __init__(self, error: dict[str, str]):
        super().__init__(error.get("message", "The job failed."))
        self.kind = error.get("error", "")
        cls = getattr(errors, self.kind, None)
        self.like = cls if isinstance(cls, type) and issubclass(cls, errors.CelebctlError) \
            else None


@dataclass
class ServeState:
    """The server's settings and its one job queue."""

    settings: ServerSettings
    rules: AccessRules = field(default_factory=AccessRules)
    queue: JobQueue = field(default_factory=JobQueue)
    ready: threading.Event = field(default_factory=threading.Event)  # the load job ended
    load_job: Job | None = None
    _model_entry: dict[str, Any] | None = None

    def model_entry(self) -> dict[str, Any]:
        """The served model as the WebUI lists a checkpoint."""
        if self._model_entry is None:
            from ..rendering import model_label

            spec = self.settings.spec()
            label = model_label(spec)
            self._model_entry = {"title": label, "model_name": label, "hash": None,
                                 "sha256": None, "filename": spec.ref, "config": None}
        return self._model_entry

    async def run_blocking(self, function, *args, **kwargs) -> Any:
        """Run a blocking core call (registry reads, checks) off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(function, *args, **kwargs))


def get_state(request: Request) -> ServeState:
    """The FastAPI dependency that hands routes the server's state."""
    return request.app.state.serve


State = Annotated[ServeState, Depends(get_state)]


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_for_job(request: Request | None, job: Job, queue: JobQueue) -> bool:
    """Wait for ``job`` without blocking the event loop. If the client disconnects first, the
    job is cancelled (a running one stops at its next step) and False is returned."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake() -> None:
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(True))

    job.on_finish(wake)
    if request is None:
        await finished
        return True
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not finished.done():
            queue.cancel(job)
        gone.cancel()
    if not finished.done():
        return False
    return True
