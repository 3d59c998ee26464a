"""``beamstream feedback``: send each result to GDA as a legacy UDP "PIA:" datagram."""

from __future__ import annotations

import argparse

from beamstream.platform import metrics
from beamstream.platform.logs import configure_json_logging
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``feedback`` command."""
    parser = subparsers.add_parser(
        "feedback",
        help="forward per-image results to GDA over UDP (PIA datagrams)",
        description="Consume the results topic and send "
        "PIA:{dcid}:{image}:{spot_total}:{good_bragg}:{method1_res}:{total_signal} to GDA for each "
        "result. Runs until SIGTERM/Ctrl-C.",
    )
    parser.add_argument("--udp", required=True, metavar="HOST:PORT", help="where GDA listens")
    parser.add_argument("--from-beginning", action="store_true",
                        help="replay every retained result (a fresh consumer group) instead of new ones")
    metrics.add_port_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the forwarder."""
    from beamstream.connectors.gda_feedback import GdaFeedback, parse_address

    address = parse_address(args.udp)
    settings = load_settings()
    port = metrics.metrics_port(args.metrics_port)
    configure_json_logging("gda-feedback", settings=settings)
    if port is not None:
        metrics.serve(port, registry=metrics.FEEDBACK_REGISTRY)  # a daemon thread; it goes with the process
    feedback = GdaFeedback(settings, address, from_beginning=args.from_beginning)
    feedback.install_signal_handlers()
    sent = feedback.run()
    print(f"sent {sent} datagrams to {args.udp}")
    return 0
