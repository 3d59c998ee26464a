"""``beamstream archiver``: write a manifest of every collection's files when it ends."""

from __future__ import annotations

import argparse

from beamstream.cli.service import add_service_options, run_stoppable, start_service
from beamstream.platform import metrics
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
    add_service_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the archiver until SIGTERM/SIGINT."""
    from beamstream.connectors.archiver import Archiver

    settings = load_settings()
    start_service(args, "archiver", settings, metrics.ARCHIVER_REGISTRY)
    archiver = Archiver(settings)
    # A signal sets the archiver's own event: it also interrupts a manifest's hashing in progress.
    run_stoppable(lambda _stop: archiver.run(), stop=archiver.stop_event)
    return 0
