"""``beamstream feedback``: send each result to GDA as a legacy UDP "PIA:" datagram."""

from __future__ import annotations

import argparse

from beamstream.logs import configure_json_logging
from beamstream.settings import load_settings


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the forwarder."""
    from connectors.gda_feedback import GdaFeedback, parse_address

    address = parse_address(args.udp)
    configure_json_logging("gda-feedback")
    feedback = GdaFeedback(load_settings(), address, from_beginning=args.from_beginning)
    feedback.install_signal_handlers()
    sent = feedback.run()
    print(f"sent {sent} datagrams to {args.udp}")
    return 0
