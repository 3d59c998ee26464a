"""``beamstream dashboard``: the web page of collections, heat maps, services and dead letters."""

from __future__ import annotations

import argparse

from beamstream.platform.logs import configure_json_logging
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``dashboard`` command."""
    parser = subparsers.add_parser(
        "dashboard",
        help="serve the web dashboard (collections, heat maps, services, dead letters, /metrics)",
        description="Serve a web page that follows the pipeline live: collections with their progress, grid "
        "scan heat maps with the X-ray centre, spots and resolution per image of rotation scans, services "
        "(heartbeats) and dead letters. A JSON API sits under /api and Prometheus metrics at /metrics. Reading "
        "is open; reinjecting a dead letter or reprocessing a collection needs a staff token "
        "(BEAMSTREAM_DASHBOARD_TOKEN or BEAMSTREAM_DASHBOARD_TOKEN_FILE) and every action is logged. "
        "Logs are JSON lines; stop with SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT."""
    from beamstream.dashboard.auth import AuthError, staff_tokens
    from beamstream.dashboard.server import run_forever
    from beamstream.errors import BeamstreamError

    if not 0 <= args.port < 65536:
        raise BeamstreamError(f"--port must be between 0 and 65535, got {args.port}")
    settings = load_settings()
    try:
        mode = "actions enabled" if staff_tokens(settings) else "read-only (no staff token configured)"
    except AuthError as exc:
        raise BeamstreamError(f"BEAMSTREAM_DASHBOARD_TOKEN_FILE: {exc.reason}") from None
    configure_json_logging("dashboard", settings=settings)
    try:
        run_forever(settings, args.host, args.port,
                    on_ready=lambda url: print(f"dashboard: {url} ({mode})", flush=True))
    except OSError as exc:
        raise BeamstreamError(str(exc)) from None
    return 0
