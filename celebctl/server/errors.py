"""Every error as JSON with a message, never a traceback: the app's exception handlers.

The body is ``{"error": kind, "message": text, "detail": text}``: ``detail`` because the
WebUI's own errors and FastAPI's carry one, ``message`` for people. CelebctlError subclasses map
to the HTTP status that says what kind of problem it is.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import errors

log = logging.getLogger("celebctl.server")

STATUS = (  # the first class that matches wins
    (errors.IdentityNotFound, 404),
    (errors.BasisNotFound, 404),
    (errors.IdentityExists, 409),
    (errors.IdentityChanged, 409),
    (errors.RegistryBusy, 503),
    (errors.ModelUnavailable, 503),
    (errors.FaceEncoderUnavailable, 503),
    (errors.StorageError, 507),
    (errors.CorruptEntry, 500),
    (errors.SchemaError, 500),
    (errors.CelebctlError, 422),  # the request's fault: a name, an option, a photo, a prompt
)


class RequestTooLarge(errors.CelebctlError):
    """A request body past the server's limit (HTTP 413)."""


class Unauthorized(errors.CelebctlError):
    """No or wrong credentials (HTTP 401)."""


class Forbidden(errors.CelebctlError):
    """A request from an origin or host name the server does not serve (HTTP 403)."""


def status_for(exc: errors.CelebctlError) -> int:
    from .jobs import QueueClosed

    if isinstance(exc, RequestTooLarge):
        return 413
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, QueueClosed):
        return 503
    like = getattr(exc, "like", None)  # a job's error: the status of the error it reports
    if like is not None:
        return next((status for cls, status in STATUS if issubclass(like, cls)), 500)
    if type(exc).__name__ == "JobNotFound":
        return 404
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": kind, "message": message, "detail": message, **extra}


def install(app: Any) -> None:
    """Register the handlers on a FastAPI app."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def celebctl_error(request, exc: errors.CelebctlError):
        status = status_for(exc)
        headers = ({"WWW-Authenticate": 'Basic realm="celebctl"'}
                   if isinstance(exc, Unauthorized) else None)
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=status,
                            headers=headers)

    async def http_error(request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(error_body("HTTPError", message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def validation_error(request, exc: RequestValidationError):
        problems = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query",
                                                                             "path", "form"))
            problems.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
        message = "Invalid request: " + "; ".join(problems)
        return JSONResponse(error_body("ValidationError", message,
                                       fields=[p.split(":")[0] for p in problems]),
                            status_code=422)

    async def unexpected(request, exc: Exception):
        log.exception("Unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("InternalError", "The server hit an unexpected error "
                                       f"({type(exc).__name__}); see its log."),
                            status_code=500)

    app.add_exception_handler(errors.CelebctlError, celebctl_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
