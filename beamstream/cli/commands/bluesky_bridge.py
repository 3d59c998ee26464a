"""``beamstream bluesky-bridge``: Bluesky run documents from bluesky-kafka topics into image events."""

from __future__ import annotations

import argparse

from beamstream.cli.params import kafka_topic
from beamstream.cli.service import add_service_options, run_stoppable, start_service
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``bluesky-bridge`` command."""
    parser = subparsers.add_parser(
        "bluesky-bridge",
        help="turn Bluesky run documents from bluesky-kafka topics into collection and image events",
        description="Consume the documents a bluesky-kafka Publisher sends from a RunEngine (msgpack (name, "
        "doc) messages, one key per publisher) and publish what each run means: one CollectionStarted "
        "(a grid scan's shape, origin and steps from its motor positions), one ImageArrived per image "
        "(the detector's file and frame) and one CollectionEnded, exactly once: the events, the consumed "
        "offsets and the run's state commit in one Kafka transaction (consumer group <prefix>bluesky-bridge, "
        "state in <prefix>bluesky-bridge-changelog), so a bridge killed and restarted mid-run announces no "
        "image twice. The document topics are the beamline's and must exist, with one partition count. A "
        "message that is not a document, or a document that cannot be translated (an event of an unseen "
        "descriptor, an unknown detector, a file outside BEAMSTREAM_DATA_ROOTS), goes to the dead-letter "
        "topic with its reason. Runs until SIGTERM/Ctrl-C. Logs are JSON lines.",
        epilog="example: beamstream bluesky-bridge --topic i03.bluesky.runengine.documents",
    )
    parser.add_argument("--topic", action="append", required=True, type=kafka_topic, metavar="TOPIC",
                        help="a document topic bluesky-kafka publishes to, e.g. i03.bluesky.runengine.documents "
                        "(not prefixed; repeat for more than one)")
    add_service_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the bridge until SIGTERM/SIGINT."""
    try:
        from beamstream.connectors.bluesky_bridge import BlueskyBridge
    except ModuleNotFoundError as exc:  # msgpack, msgpack-numpy and event-model come with the extra
        if (exc.name or "").startswith("beamstream"):
            raise
        raise BeamstreamError(f"the bridge needs the bluesky extra (pip install 'beamstream[bluesky]'): "
                              f"no module {exc.name!r}") from None

    settings = load_settings()
    start_service(args, "bluesky-bridge", settings, metrics.BLUESKY_BRIDGE_REGISTRY)
    bridge = BlueskyBridge(settings, args.topic)
    bridge.check_topics()
    run_stoppable(lambda _stop: bridge.run(), stop=bridge.stop_event)
    return 0
