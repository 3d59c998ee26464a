"""``beamstream replay``: re-inject a range of retained events onto the same topic."""

from __future__ import annotations

import argparse

from beamstream.cli.commands.options import add_yes_flag, confirm
from beamstream.cli.commands.output import print_table
from beamstream.cli.params import dcid, iso_time, non_negative_int
from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import require_kafka
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import resolve_topic


def register(subparsers) -> None:
    """Add the ``replay`` command."""
    parser = subparsers.add_parser(
        "replay",
        help="re-inject retained events of a topic (reprocessing is live processing)",
        description="Produce the retained events of TOPIC in a range back onto the same topic, unchanged but "
        "for a beamstream-replayed header, in one transaction; consumers process them exactly as live events. "
        "Ranges: from (inclusive) to (exclusive), by time (ISO 8601; local time without a zone) or by "
        "offset (the same offset in every partition); the end defaults to now.",
    )
    parser.add_argument("--topic", required=True, metavar="TOPIC",
                        help="declared topic, logical (images) or full name (beamstream.images)")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-time", type=iso_time, metavar="ISO", help="first event at or after this time")
    start.add_argument("--from-offset", type=non_negative_int, metavar="N", help="from offset N of each partition")
    end = parser.add_mutually_exclusive_group()
    end.add_argument("--to-time", type=iso_time, metavar="ISO",
                     help="up to (not including) the first event at this time")
    end.add_argument("--to-offset", type=non_negative_int, metavar="N",
                     help="up to (not including) offset N of each partition")
    parser.add_argument("--dcid", type=dcid, metavar="N", help="only the events of collection N (by key)")
    parser.add_argument("--dry-run", action="store_true", help="count the events per partition, write nothing")
    add_yes_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan, show, confirm and carry out the replay."""
    from beamstream.producers.replay import plan_replay, replay

    settings = load_settings()
    topic = resolve_topic(settings, args.topic)  # a topic that is not declared is refused before connecting
    check_range(args)
    require_kafka(settings)
    plan = plan_replay(
        settings, topic,
        from_time=args.from_time,
        from_offset=args.from_offset,
        to_time=args.to_time,
        to_offset=args.to_offset,
        dcid=args.dcid,
    )
    print_table([(p, start, end, plan.counts[p]) for p, (start, end) in sorted(plan.ranges.items())],
                ("partition", "from offset", "to offset", "events"))
    if args.dry_run:
        print(f"dry run: {plan.total} event(s) would be replayed onto {plan.topic}; nothing written")
        return 0
    confirm(f"Replay {plan.total} event(s) onto {plan.topic}?", args.yes, "replay")
    written = replay(settings, plan)
    print(f"replayed {sum(written.values())} event(s) onto {plan.topic}")
    return 0


def check_range(args: argparse.Namespace) -> None:
    """Refuse a range that ends where or before it starts: it holds no events whatever the topic holds."""
    if args.from_offset is not None and args.to_offset is not None and args.to_offset <= args.from_offset:
        raise BeamstreamError(f"no events in an empty range: --to-offset {args.to_offset} is not after "
                              f"--from-offset {args.from_offset}; nothing written")
    if args.from_time is not None and args.to_time is not None and args.to_time <= args.from_time:
        raise BeamstreamError(f"no events in an empty range: --to-time {args.to_time.isoformat()} is not after "
                              f"--from-time {args.from_time.isoformat()}; nothing written")
