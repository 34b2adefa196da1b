"""`celebctl serve`: the registry and renderer behind the WebUI's API, celebctl's API and a page."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import CelebTyper, DeviceOpt, DtypeOpt, ModelOpt, err, warn


def serve_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but a "
                                      "loopback address needs --api-auth (or --insecure).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (7860 is the WebUI's, so its "
                                      "clients find it).", min=1, max=65535)] = 7860,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    api_auth: Annotated[str | None, typer.Option(
        "--api-auth", help="USER:PASS (several separated by commas): every request needs HTTP "
        "basic auth, as with the WebUI's --api-auth.", show_default=False)] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Listen on a non-loopback address without --api-auth, on purpose."
    )] = False,
    cors_allow_origins: Annotated[str | None, typer.Option(
        "--cors-allow-origins", help="Comma-separated web origins (e.g. "
        "http://localhost:3000) whose pages may call the API; closed by default.",
        show_default=False)] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Most denoising steps a "
                                           "request may ask for.", min=1, max=1000)] = 150,
    max_images: Annotated[int, typer.Option("--max-images", help="Most images per request.",
                                            min=1, max=1000)] = 16,
    max_size: Annotated[int, typer.Option("--max-size", help="Largest width or height in px a "
                                          "request may ask for.", min=64, max=2048)] = 1024,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level (debug "
                                           "also logs each request).")] = "info",
) -> None:
    """Serve the registry and the renderer: the WebUI's API (/sdapi/v1: Open WebUI,
    SillyTavern, webuiapi...), celebctl's API (/api, docs at /docs) and a page at /.

    The model is loaded once and kept warm; jobs (fits, renders) run one at a time. Ctrl-C stops
    taking work, lets the running job finish, and exits (nothing is half-written).
    """
    from ..errors import InvalidOption

    # Checked before anything heavy is imported: a refused start is quick.
    from ..server.security import AccessRules, check_exposure, parse_api_auth

    users = parse_api_auth(api_auth)
    note = check_exposure(host, users, insecure)
    origins = [o.strip() for o in (cors_allow_origins or "").split(",") if o.strip()]
    if log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise InvalidOption("--log-level must be one of critical, error, warning, info, "
                            "debug, trace.")
    if note:
        warn(note)
    from ..server import ServerSettings, run

    settings = ServerSettings(model=model, device=device, dtype=dtype, max_steps=max_steps,
                              max_images=max_images, max_size=max_size)
    spec = settings.spec()  # an unknown model fails here, before the port opens
    shown = f"[{host}]" if ":" in host else host
    err.print(f"celebctl serve: {spec.ref} on http://{shown}:{port}/ (WebUI API at /sdapi/v1, "
              "celebctl API at /api, docs at /docs); Ctrl-C to stop.")
    run(settings, AccessRules(users=users, host=host, port=port, cors_origins=origins),
        log_level=log_level.lower())


serve_cmd.interrupt_message = (  # type: ignore[attr-defined]
    "Stopped; the running job had finished or was stopped before writing anything."
)


def register(app: CelebTyper) -> None:
    """Attach `serve` to the root app."""
    app.command("serve")(serve_cmd)
