"""``beamstream dashboard``: the web page of collections, heat maps, services and dead letters."""

from __future__ import annotations

import argparse
import threading

from beamstream.cli.params import port_or_zero
from beamstream.cli.service import run_stoppable
from beamstream.platform.kafka_clients import require_kafka
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
    parser.add_argument("--port", type=port_or_zero, default=8080,
                        help="port to listen on (default 8080; 0 picks a free one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT."""
    from beamstream.dashboard.auth import AuthError, staff_tokens
    from beamstream.dashboard.server import DashboardServer
    from beamstream.errors import BeamstreamError

    settings = load_settings()
    try:
        mode = "actions enabled" if staff_tokens(settings) else "read-only (no staff token configured)"
    except AuthError as exc:
        raise BeamstreamError(f"BEAMSTREAM_DASHBOARD_TOKEN_FILE: {exc.reason}") from None
    # At start-up only: once serving, the page shows what it has and its feed keeps retrying.
    require_kafka(settings)
    # No --log-level or --metrics-port here: the dashboard serves /metrics on its own port, and
    # BEAMSTREAM_METRICS_PORT (set for a deployment's services) must not open a second one.
    configure_json_logging("dashboard", settings=settings)

    def serve(stop: threading.Event) -> None:
        server = DashboardServer(settings, args.host, args.port).start()
        try:
            print(f"dashboard: {server.url} ({mode})", flush=True)
            stop.wait()
        finally:
            server.stop()

    try:
        run_stoppable(serve)
    except OSError as exc:  # the port is taken or not ours to bind
        raise BeamstreamError(str(exc)) from None
    return 0
