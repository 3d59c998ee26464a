"""``beamstream feedback``: send each result to GDA as a legacy UDP "PIA:" datagram."""

from __future__ import annotations

import argparse

from beamstream.cli.service import add_service_options, run_stoppable, start_service
from beamstream.platform import metrics
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
    add_service_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the forwarder."""
    from beamstream.connectors.gda_feedback import GdaFeedback, parse_address

    address = parse_address(args.udp)
    settings = load_settings()
    start_service(args, "gda-feedback", settings, metrics.FEEDBACK_REGISTRY)
    feedback = GdaFeedback(settings, address, from_beginning=args.from_beginning)
    sent, _signal = run_stoppable(lambda _stop: feedback.run(), stop=feedback.stop_event)
    print(f"sent {sent} datagrams to {args.udp}")
    return 0
