"""``/api/render`` and ``/api/jobs``: queue a render, follow any job (JSON or server-sent
events), fetch its pictures, cancel it; ``/api/status`` for the page."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .. import __version__
from ..errors import CelebctlError
from . import work
from .jobs import FINISHED, Job
from .state import ServeState, State

router = APIRouter(prefix="/api", tags=["render and jobs"])
EVENT_POLL_S = 0.1


class JobNotFound(CelebctlError):
    """No such job (it never was, or it is too old to be kept)."""


class RenderRequest(BaseModel):
    """A render, in `celebctl render`'s terms."""

    prompt: str
    negative: str = ""
    num_images: int = 1
    steps: int = 50
    guidance: float | None = None
    scheduler: str | None = None  # the older ddim/dpm/euler
    sampler: str | None = None  # the WebUI's names ("DPM++ 2M"); none: the config's, or DDIM
    schedule: str | None = None  # "Karras", ...
    clip_skip: int | None = None  # None: the identities' own
    seed: int | None = 0
    width: int | None = None
    height: int | None = None
    person: bool = True


@router.post("/render", status_code=202, summary="Queue a render; answers the job")
async def render(body: RenderRequest, state: State
                 ) -> dict[str, Any]:
    options = work.RenderOptions(
        prompt=body.prompt, negative=body.negative, num_images=body.num_images,
        steps=body.steps, guidance=body.guidance, scheduler=body.scheduler,
        sampler=body.sampler, schedule=body.schedule, clip_skip=body.clip_skip, seed=body.seed,
        width=body.width, height=body.height, person_noun=body.person)
    await state.run_blocking(work.check_render, state.settings, options)
    job = state.queue.submit("render", f"render: {body.prompt[:60]}",
                             work.render(state.settings, options))
    return {"job": job.to_dict()}


@router.get("/status", summary="The served model, the queue and the version")
async def status(state: State) -> dict[str, Any]:
    current = state.queue.current
    load = state.load_job
    loaded = state.ready.is_set() and (load is None or load.state == "done")
    return {"version": __version__, "model": state.model_entry()["title"],
            "model_ref": state.settings.spec().ref, "ready": loaded,
            "load_error": load.error if load is not None else None,
            "busy": current.to_dict() if current else None, "waiting": state.queue.waiting(),
            "limits": {"steps": state.settings.max_steps,
                       "images": state.settings.max_images,
                       "size": state.settings.max_size}}


def _job(state: ServeState, job_id: str) -> Job:
    job = state.queue.get(job_id)
    if job is None:
        raise JobNotFound(f"No job '{job_id[:40]}' (finished jobs are kept for a while only).")
    return job


@router.get("/jobs", summary="Recent jobs, newest last")
async def jobs(state: State) -> dict[str, Any]:
    return {"jobs": [job.to_dict() for job in state.queue.jobs()]}


@router.get("/jobs/{job_id}", summary="One job: state, progress, result or error")
async def job(job_id: str, state: State) -> dict[str, Any]:
    return _job(state, job_id).to_dict()


@router.post("/jobs/{job_id}/cancel", summary="Cancel a queued job or stop a running one")
async def cancel(job_id: str, state: State) -> dict[str, Any]:
    found = _job(state, job_id)
    state.queue.cancel(found)
    return found.to_dict()


@router.get("/jobs/{job_id}/images/{index}", summary="A rendered picture (PNG)",
            responses={200: {"content": {"image/png": {}}}})
async def image(job_id: str, index: int, state: State) -> Response:
    found = _job(state, job_id)
    if not 0 <= index < len(found.outputs):
        raise JobNotFound(f"Job '{found.id}' has {len(found.outputs)} image(s); no image "
                          f"{index}.")
    return Response(found.outputs[index], media_type="image/png")


@router.get("/jobs/{job_id}/events", summary="The job's progress as server-sent events")
async def events(job_id: str, state: State) -> StreamingResponse:
    found = _job(state, job_id)

    async def stream():
        seen = -1
        while True:
            if found.version != seen:
                seen = found.version
                yield f"event: job\ndata: {json.dumps(found.to_dict())}\n\n"
            if found.state in FINISHED:
                yield "event: end\ndata: {}\n\n"
                return
            if state.queue.closed and found.state not in ("running",):
                return
            await asyncio.sleep(EVENT_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
