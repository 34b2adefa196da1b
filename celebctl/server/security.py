"""Who may talk to the server: where it listens, basic auth, CORS, and cross-site requests.

The rules (docs/serve.md, "Security"): listen on 127.0.0.1 unless told otherwise; any other
address needs ``--api-auth USER:PASS`` (HTTP basic auth, as the WebUI's ``--api-auth``) or
``--insecure`` said on purpose; no browser on another origin may read answers (CORS closed unless
``--cors-allow-origins``) or send requests that change things (the Origin check below, since a
form post needs no CORS preflight); on a loopback address the Host header must name it (a DNS
rebinding page cannot reach the server through its own host name).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import InvalidOption

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_api_auth(value: str | None) -> dict[str, str]:
    """``USER:PASS`` (several separated by commas, as the WebUI takes them) -> {user: pass}."""
    if value is None:
        return {}
    users: dict[str, str] = {}
    for pair in value.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise InvalidOption("--api-auth takes USER:PASS (several separated by commas), "
                                "with a non-empty user name and password.")
        users[user] = password
    return users


def check_exposure(host: str, users: dict[str, str], insecure: bool) -> str | None:
    """Refuse to listen beyond this machine without a password (InvalidOption); a warning to
    show when ``--insecure`` overrides that, else None."""
    if is_loopback(host) or users:
        return None
    if not insecure:
        raise InvalidOption(
            f"Refusing to listen on {host} without a password: anyone who can reach it could "
            "add, remove and render identities. Give --api-auth USER:PASS (clients then send "
            "HTTP basic auth), or --insecure if this network is yours alone.")
    return (f"Listening on {host} with no password (--insecure): anyone who can reach this "
            "address can use the registry.")


@dataclass
class AccessRules:
    """The checks every request passes before it reaches a route."""

    users: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 7860
    cors_origins: list[str] = field(default_factory=list)

    def check_credentials(self, header: str | None) -> bool:
        """True when auth is off or ``header`` (an Authorization header) names a user."""
        if not self.users:
            return True
        if not header or not header[:6].lower() == "basic ":
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        expected = self.users.get(user)
        # Compare in constant time, and compare something even for an unknown user.
        return secrets.compare_digest((expected or "\0").encode(), password.encode()) \
            and expected is not None

    def host_allowed(self, host_header: str | None) -> bool:
        """On a loopback address, only loopback host names (a DNS-rebinding guard)."""
        if not is_loopback(self.host):
            return True
        if not host_header:
            return False
        name = urlsplit(f"//{host_header}").hostname or ""
        return is_loopback(name)

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """A request that changes something may come from this server's own page, from an
        origin given with --cors-allow-origins, or from a program (no Origin header)."""
        if not origin:
            return True
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        if origin == "null":  # a sandboxed page or a file: never this server's own page
            return False
        parts = urlsplit(origin)
        return bool(host_header) and parts.netloc.lower() == host_header.lower()
