"""The job queue: one worker thread runs fits and renders one at a time, in order.

A job is a function of the :class:`Job` it runs as; it reports progress through
:meth:`Job.progress` (the core's progress callback), which raises :class:`JobInterrupted` once
the job was asked to stop, so a fit or render stops at its next step with nothing half-written
(the core writes all or nothing). Jobs and their results live in memory only; the newest
:attr:`JobQueue.keep` finished ones are kept for clients to fetch.
"""

from __future__ import annotations

import collections
import itertools
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CelebctlError

QUEUED, RUNNING, DONE, FAILED, INTERRUPTED, CANCELLED = (
    "queued", "running", "done", "error", "interrupted", "cancelled")
FINISHED = (DONE, FAILED, INTERRUPTED, CANCELLED)


class JobInterrupted(Exception):
    """Raised inside a job's progress callback once the job was asked to stop."""


class QueueClosed(CelebctlError):
    """The server is shutting down (or the queue is full) and takes no new job."""


@dataclass
class Job:
    """One unit of work and what is known about it."""

    id: str
    kind: str  # "load", "render", "add", "joint"
    label: str
    run: Callable[[Job], dict[str, Any]] = field(repr=False)
    number: int = 0
    state: str = QUEUED
    phase: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    outputs: list[bytes] = field(default_factory=list, repr=False)  # PNG bytes of a render
    version: int = 0  # moves on every change, for pollers and event streams
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def progress(self, phase: str, done: int, total: int, info: dict[str, Any]) -> None:
        """The core's progress callback; raises JobInterrupted when the job should stop."""
        if self._stop.is_set():
            raise JobInterrupted
        if phase == "note":
            self.message = str(info.get("message", ""))
        else:
            self.phase, self.done, self.total = phase, int(done), int(total)
        self.version += 1

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def is_finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` passed (False)."""
        return self._finished.wait(timeout)

    def on_finish(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from the worker thread) once the job has finished; at once when
        it already has."""
        with self._lock:
            if not self._finished.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def _finish(self, state: str) -> None:
        self.state = state
        self.finished = time.time()
        self.version += 1
        with self._lock:
            self._finished.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def fraction(self) -> float:
        """How far along the job is, 0 to 1."""
        if self.state in FINISHED:
            return 1.0
        return min(1.0, self.done / self.total) if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the job (what /api/jobs answers)."""
        return {
            "id": self.id, "kind": self.kind, "label": self.label, "state": self.state,
            "progress": {"phase": self.phase, "done": self.done, "total": self.total,
                         "fraction": round(self.fraction(), 4), "message": self.message},
            "created": self.created, "started": self.started, "finished": self.finished,
            "result": self.result, "error": self.error,
            "images": [f"/api/jobs/{self.id}/images/{n}" for n in range(len(self.outputs))],
        }


class JobQueue:
    """Jobs run one at a time by one worker thread, in the order they came."""

    def __init__(self, max_queued: int = 32, keep: int = 64):
        self.max_queued = max_queued
        self.keep = keep
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._closed = False
        self.current: Job | None = None
        self._worker = threading.Thread(target=self._work, name="celebctl-jobs", daemon=False)

    def start(self) -> None:
        self._worker.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, kind: str, label: str, run: Callable[[Job], dict[str, Any]]) -> Job:
        """Queue a job; QueueClosed when shutting down or when too many wait already."""
        with self._lock:
            if self._closed:
                raise QueueClosed("The server is shutting down and takes no new work.")
            waiting = sum(1 for j in self._jobs.values() if j.state == QUEUED)
            if waiting >= self.max_queued:
                raise QueueClosed(f"{waiting} jobs are waiting already; try again later.")
            job = Job(id=secrets.token_hex(8), kind=kind, label=label, run=run,
                      number=next(self._numbers))
            self._jobs[job.id] = job
            self._prune()
        self._pending.put(job)
        return job

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[:max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def waiting(self) -> int:
        """Jobs queued or running."""
        return sum(1 for j in self._jobs.values() if j.state in (QUEUED, RUNNING))

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a queued one never runs, a running one stops at its next step."""
        job._stop.set()
        with self._lock:
            if job.state == QUEUED:
                job._finish(CANCELLED)

    def interrupt_running(self) -> Job | None:
        """Stop the running job (the WebUI's interrupt); returns it, or None."""
        job = self.current
        if job is not None:
            self.cancel(job)
        return job

    def close(self) -> None:
        """Take no new job and cancel the queued ones; the running one finishes."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.state == QUEUED:
                    job._stop.set()
                    job._finish(CANCELLED)
        self._pending.put(None)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to finish its running job and stop."""
        if self._worker.is_alive():
            self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            with self._lock:
                if job.state != QUEUED:
                    continue
                job.state, job.started = RUNNING, time.time()
                job.version += 1
                self.current = job
            try:
                job.result = job.run(job)
                state = INTERRUPTED if job.stop_requested else DONE
            except JobInterrupted:
                state = INTERRUPTED
            except CelebctlError as exc:
                job.error = {"error": type(exc).__name__, "message": str(exc)}
                state = FAILED
            except KeyboardInterrupt:  # pragma: no cover - signals go to the main thread
                state = INTERRUPTED
            except Exception as exc:  # noqa: BLE001 - a job's bug must not stop the worker
                import logging

                logging.getLogger("celebctl.server").exception("Job %s failed", job.id)
                job.error = {"error": "InternalError",
                             "message": f"The job failed unexpectedly ({type(exc).__name__}); "
                                        "see the server's log."}
                state = FAILED
            finally:
                self.current = None
            job._finish(state)
