"""The app factory and the runner: routers, access checks, error handlers, the worker's life.

:func:`create_app` builds the FastAPI app (one router per resource: identities, render and
jobs, the WebUI's API, the page); :func:`run` serves it with uvicorn until Ctrl-C, which stops
taking work, cancels what waits, lets the running job finish and exits (a second Ctrl-C stops
the running job too: a fit then writes nothing, a render keeps the images it finished).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse

from .. import __version__
from . import api_identities, api_jobs, errors, webui, work
from .errors import error_body
from .jobs import JobQueue
from .security import AccessRules
from .state import ServeState

log = logging.getLogger("celebctl.server")

# The largest request body: 16 photos of 20 MB plus the form's text.
MAX_BODY = 16 * work.MAX_PHOTO_UPLOAD + 2**20
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


def _static(name: str) -> bytes:
    return resources.files("celebctl.server").joinpath("static", name).read_bytes()


def pages_router() -> APIRouter:
    """The page at / and its two files, read from the package (nothing from the internet)."""
    router = APIRouter(include_in_schema=False)
    files = {name: (_static(name), kind) for name, kind in STATIC_FILES.items()}
    index = _static("index.html")

    @router.get("/")
    async def page() -> Response:
        return Response(index, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in files:  # a fixed set: the request's name never reaches a path
            return JSONResponse(error_body("NotFound", f"No file '{name[:60]}'."),
                                status_code=404)
        data, kind = files[name]
        return Response(data, media_type=f"{kind}; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    return router


class _BodyTooLarge(Exception):
    pass


class AccessMiddleware:
    """Pure ASGI: host name, origin and credentials checked first; the body bounded."""

    def __init__(self, app: Any, rules: AccessRules, max_body: int = MAX_BODY):
        self.app, self.rules, self.max_body = app, rules, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await self._too_large()(scope, receive, send)
            return
        received = 0
        started = False

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return JSONResponse(error_body("RequestTooLarge", f"The request is larger than "
                                       f"{self.max_body // 2**20} MB (16 photos of "
                                       f"{work.MAX_PHOTO_UPLOAD // 2**20} MB at most)."),
                            status_code=413)

    def _refusal(self, scope, headers: dict[str, str]) -> JSONResponse | None:
        rules = self.rules
        if not rules.host_allowed(headers.get("host")):
            return JSONResponse(error_body("Forbidden", "This server answers only to its "
                                           "loopback address (127.0.0.1 or localhost)."),
                                status_code=403)
        if scope["method"] == "OPTIONS" and rules.cors_origins:
            return None  # CORS preflight: the CORS middleware answers it
        if not rules.check_credentials(headers.get("authorization")):
            return JSONResponse(error_body("Unauthorized", "This server needs a user name and "
                                           "password (HTTP basic auth, as given to "
                                           "`celebctl serve --api-auth`)."),
                                status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="celebctl"'})
        if scope["method"] in UNSAFE_METHODS and not rules.origin_allowed(
                headers.get("origin"), headers.get("host")):
            return JSONResponse(error_body("Forbidden", "Requests that change things are "
                                           "taken from this server's own page and from "
                                           "programs; start it with --cors-allow-origins to "
                                           "allow another web page."), status_code=403)
        return None


def create_app(settings: work.ServerSettings | None = None,
               rules: AccessRules | None = None, *, load_model: bool = True) -> FastAPI:
    """The celebctl server app. ``load_model`` False skips loading the model at start (it is
    then loaded by the first render)."""
    state = ServeState(settings=settings or work.ServerSettings(),
                       rules=rules or AccessRules(), queue=JobQueue())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.queue.start()
        if load_model:
            state.load_job = state.queue.submit("load", "load the model",
                                                work.load_model(state.settings))
            state.load_job.on_finish(state.ready.set)
        else:
            state.ready.set()
        try:
            yield
        finally:
            state.queue.close()
            await state.run_blocking(state.queue.join)

    app = FastAPI(title="celebctl", version=__version__, lifespan=lifespan,
                  description="Identities by name in Stable Diffusion prompts: celebctl's own "
                  "API under /api and the WebUI's under /sdapi/v1 (docs/serve.md).")
    app.state.serve = state
    errors.install(app)
    app.include_router(api_identities.router)
    app.include_router(api_jobs.router)
    app.include_router(webui.router)
    app.include_router(pages_router())
    if state.rules.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=state.rules.cors_origins,
                           allow_methods=["*"], allow_headers=["*"],
                           allow_credentials="*" not in state.rules.cors_origins)
    app.add_middleware(AccessMiddleware, rules=state.rules)
    return app


def run(settings: work.ServerSettings, rules: AccessRules, *, log_level: str = "info",
        on_started: Any = None) -> None:
    """Serve until Ctrl-C (or SIGTERM): the first stops taking work and cancels what waits, lets
    the running job finish, then exits; a second also stops the running job."""
    import uvicorn

    app = create_app(settings, rules)
    state: ServeState = app.state.serve

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 - uvicorn's signature
            if self.should_exit:
                state.queue.interrupt_running()
            else:
                state.queue.close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=rules.host, port=rules.port, log_level=log_level,
                            access_log=log_level == "debug", timeout_graceful_shutdown=None,
                            server_header=False, proxy_headers=False)
    server = Server(config)
    server.run()
    state.queue.close()
    state.queue.join()
