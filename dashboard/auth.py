"""Who may act on the dashboard: reading is open, actions need a staff bearer token.

:func:`authenticate` is the one place that turns a request's ``Authorization``
header into a :class:`Principal` or refuses it. A facility single sign-on (OIDC)
replaces it by validating the bearer token as a JWT against the provider's keys
and returning the ``sub``/``preferred_username`` claim as the principal's name;
nothing else changes.

Tokens come from ``BEAMSTREAM_DASHBOARD_TOKEN`` (one token) and/or the file named
by ``BEAMSTREAM_DASHBOARD_TOKEN_FILE`` (one per line, re-read on every action so a
token is revoked by editing the file). A token written ``name:secret`` names its
holder in the action log; a bare secret is called ``staff``.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from beamstream.platform.settings import Settings

_NAMED = re.compile(r"^([A-Za-z0-9_.@-]{1,64}):(.+)$")


@dataclass(frozen=True)
class Principal:
    """Someone allowed to act: the name the action log records and how they proved it."""

    name: str
    method: str = "token"


class AuthError(Exception):
    """A refused request: HTTP ``status`` (401 no credentials, 403 wrong ones or none configured) and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _parse(line: str) -> tuple[str, str] | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    named = _NAMED.match(line)
    return (named.group(1), named.group(2)) if named else ("staff", line)


def staff_tokens(settings: Settings) -> list[tuple[str, str]]:
    """Every configured (name, secret); raises AuthError(503) when the token file cannot be read."""
    tokens = []
    if settings.dashboard_token:
        parsed = _parse(settings.dashboard_token)
        if parsed:
            tokens.append(parsed)
    if settings.dashboard_token_file:
        try:
            text = Path(settings.dashboard_token_file).expanduser().read_text()
        except OSError as exc:
            raise AuthError(503, f"the staff token file cannot be read ({exc.strerror})") from None
        tokens.extend(p for p in map(_parse, text.splitlines()) if p)
    return tokens


def authenticate(settings: Settings, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization: Bearer <token>`` header, or AuthError."""
    tokens = staff_tokens(settings)
    if not tokens:
        raise AuthError(403, "this dashboard is read-only: no staff token is configured "
                             "(BEAMSTREAM_DASHBOARD_TOKEN or BEAMSTREAM_DASHBOARD_TOKEN_FILE)")
    if not authorization:
        raise AuthError(401, "this action needs a staff token: send 'Authorization: Bearer <token>'")
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
    presented_bytes = presented.strip().encode()
    match = None
    for name, secret in tokens:
        # Compare against every token in constant time, so timing tells nothing about which one nearly matched.
        if hmac.compare_digest(presented_bytes, secret.encode()) and match is None:
            match = name
    if match is None:
        raise AuthError(403, "the staff token is not valid")
    return Principal(match)
