"""`celebctl serve`: the registry and the renderer behind an HTTP server and a web page.

- :mod:`.app`: the app factory (routers, access checks, error handlers) and the uvicorn runner.
- :mod:`.jobs`: the job queue: one worker thread runs fits and renders one at a time.
- :mod:`.work`: what jobs do (renders on the warm model, fits through `add`'s core) and the
  checks a request passes before it queues.
- :mod:`.api_identities`, :mod:`.api_jobs`: celebctl's own API under ``/api``.
- :mod:`.webui`: the WebUI's API under ``/sdapi/v1`` (its field names and defaults outside,
  celebctl's inside).
- :mod:`.security`: where it listens, basic auth, CORS and cross-site checks.
- :mod:`.errors`: every error as JSON with a message. :mod:`.state`: what routes share.
- ``static/``: the page (plain HTML, CSS and JavaScript; nothing from the internet).

Only ``celebctl.cli.serve`` imports this package, so other commands never load FastAPI.
"""

from __future__ import annotations

from .app import create_app, run
from .security import AccessRules, check_exposure, parse_api_auth
from .work import RenderOptions, ServerSettings

__all__ = ["AccessRules", "RenderOptions", "ServerSettings", "check_exposure", "create_app",
           "parse_api_auth", "run"]
