"""``beamstream topics apply|list``: the declared topics on the cluster."""

from __future__ import annotations

import argparse

from beamstream.cli.commands.output import add_json_flag, print_json, print_table
from beamstream.platform.kafka_clients import require_kafka
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import apply_topics, list_topics


def register(subparsers) -> None:
    """Add the ``topics`` command."""
    parser = subparsers.add_parser(
        "topics",
        help="create or update the declared topics",
        description="Topics are declared in code (beamstream/topics.py). `apply` creates missing ones, "
        "adds partitions and sets configs; it never deletes or shrinks. Safe to run repeatedly.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    add_json_flag(actions.add_parser("apply", help="make the cluster match the declarations"))
    add_json_flag(actions.add_parser("list", help="declared topics and their state"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Carry out the topics action."""
    settings = load_settings()
    require_kafka(settings)
    if args.action == "apply":
        changes = apply_topics(settings)
        if args.json:
            print_json([vars(c) for c in changes])
        else:
            print_table([(c.topic, c.action, c.detail) for c in changes], ("topic", "action", "detail"))
    else:
        rows = list_topics(settings)
        if args.json:
            print_json(rows)
        else:
            print_table(
                [(r["topic"], r["partitions"] if r["partitions"] is not None else "missing",
                  ",".join(r["record_types"]), r["description"]) for r in rows],
                ("topic", "partitions", "records", "purpose"),
            )
    return 0
