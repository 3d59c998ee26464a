"""``beamstream archiver``: write a manifest of every collection's files when it ends."""

from __future__ import annotations

import argparse
import logging

from beamstream.platform import metrics
from beamstream.platform.logs import configure_json_logging
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``archiver`` command."""
    parser = subparsers.add_parser(
        "archiver",
        help="archive manifests for finished collections",
        description="Consume collection events; when a collection ends, write a JSON manifest of its files "
        "(path, size, SHA-256; Eiger data files included) next to the data, or under BEAMSTREAM_ARCHIVE_ROOT, "
        "and emit one ArchiveComplete event on the archive topic. Runs until SIGTERM/Ctrl-C. Logs are JSON lines.",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    metrics.add_port_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the archiver until SIGTERM/SIGINT."""
    from beamstream.connectors.archiver import Archiver

    settings = load_settings()
    port = metrics.metrics_port(args.metrics_port)
    configure_json_logging("archiver", getattr(logging, args.log_level.upper()), settings=settings)
    if port is not None:
        metrics.serve(port, registry=metrics.ARCHIVER_REGISTRY)  # a daemon thread; it goes with the process
    archiver = Archiver(settings)
    archiver.install_signal_handlers()
    archiver.run()
    return 0
