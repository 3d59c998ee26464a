"""``beamstream dlq list|show|reinject|purge``: inspect and deal with dead letters."""

from __future__ import annotations

import argparse
import json
import sys

from beamstream.cli.commands.options import add_yes_flag, confirm
from beamstream.cli.commands.output import add_json_flag, print_json, print_table
from beamstream.cli.params import dead_letter_id, iso_time
from beamstream.engine import dead_letter_store as dlq
from beamstream.platform.kafka_clients import require_kafka
from beamstream.platform.settings import Settings, load_settings

REASON_WIDTH = 70


def register(subparsers) -> None:
    """Add the ``dlq`` command."""
    parser = subparsers.add_parser(
        "dlq",
        help="inspect, reinject and purge dead letters",
        description="Dead letters are messages no consumer could process, kept with the reason in the "
        "dead-letter topic. A dead letter is named by its PARTITION:OFFSET there (see `dlq list`).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="one line per dead letter")
    listing.add_argument("--service", metavar="S", help="only dead letters of service S (e.g. worker, archiver)")
    listing.add_argument("--since", type=iso_time, metavar="ISO",
                         help="only dead letters that failed at or after this time")
    add_json_flag(listing)

    show = actions.add_parser("show", help="everything about one dead letter, its payload decoded")
    show.add_argument("id", type=dead_letter_id, metavar="ID", help="PARTITION:OFFSET in the dead-letter topic")
    add_json_flag(show)

    again = actions.add_parser(
        "reinject", help="send dead letters back to their source topic",
        description="Produce each dead letter's original key, payload and headers back to its source topic "
        "(header beamstream-reinjected counts reinjections), in one transaction with a marker that stops it "
        "being reinjected twice. Fix the cause first (e.g. the missing file).")
    again.add_argument("ids", nargs="*", type=dead_letter_id, metavar="ID", help="PARTITION:OFFSET of each dead letter")
    again.add_argument("--all", action="store_true", help="every dead letter not reinjected yet")
    again.add_argument("--service", metavar="S", help="with --all: only dead letters of service S")
    again.add_argument("--dry-run", action="store_true", help="show what would be reinjected, write nothing")
    add_yes_flag(again)

    purge = actions.add_parser(
        "purge", help="remove dead letters, keeping a JSON copy",
        description="Kafka cannot delete single records: each partition of the dead-letter topic is cut "
        "at an offset (delete_records) after a JSON copy of every dead letter below it is written under "
        "<home>/dlq-purged/. With --before, a partition is cut at its first dead letter that failed at or "
        "after that time.")
    purge.add_argument("--before", type=iso_time, metavar="ISO", help="only dead letters that failed before this time")
    add_yes_flag(purge)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Carry out the dlq action."""
    return {"list": _list, "show": _show, "reinject": _reinject, "purge": _purge}[args.action](args)


def _list(args: argparse.Namespace) -> int:
    scan = dlq.read_dead_letters(_cluster_settings())
    entries = [e for e in scan.entries
               if e.of_service(args.service) and (args.since is None or e.failed_at >= args.since)]
    rows = [e.row() for e in entries]
    if args.json:
        print_json(rows)
        return 0
    print_table([_table_row(r) for r in rows],
                ("id", "failed_at", "service", "source", "dcid", "image", "attempts", "reinjected", "resolved",
                 "reason"))
    return 0


def _show(args: argparse.Namespace) -> int:
    settings = _cluster_settings()
    from beamstream.schemas.serde import make_serde

    [entry] = dlq.read_dead_letters(settings).find([args.id])
    described = entry.describe(make_serde(settings.schema_registry_url))
    if args.json:
        print_json(described)
        return 0
    for key, value in described.items():
        if key in ("key", "payload", "record_value") and isinstance(value, dict):
            value = _bytes_line(value)
        elif key == "headers":
            value = ", ".join(f"{h['key']}={_bytes_line(h['value'])}" for h in value) or "-"
        elif key == "payload_decoded":
            continue
        elif isinstance(value, dict):
            value = json.dumps(value, default=str)
        print(f"{key + ':':<18} {'-' if value is None else value}")
    if "payload_decoded" in described:
        print("payload decoded:")
        print(json.dumps(described["payload_decoded"], indent=2, default=str))
    return 0


def _reinject(args: argparse.Namespace) -> int:
    if bool(args.ids) == args.all:
        raise dlq.DeadLetterError("name the dead letters to reinject (PARTITION:OFFSET ...) or pass --all, not both")
    if args.service and not args.all:
        raise dlq.DeadLetterError("--service only goes with --all")
    settings = _cluster_settings()
    scan = dlq.read_dead_letters(settings)
    todo, skipped = dlq.select(scan, args.ids, args.all, args.service)
    if not todo:
        if args.all:
            print("no dead letters to reinject")
            return 0
        raise dlq.DeadLetterError(f"nothing to reinject: {'; '.join(_skipped_text(e) for e in skipped)}")
    _report_skipped(skipped)
    print_table([(e.id, e.value["source_topic"], e.value["dcid"], e.value["image_number"],
                  _short(e.value["reason"])) for e in todo], ("id", "to topic", "dcid", "image", "reason"))
    if args.dry_run:
        print(f"dry run: {len(todo)} dead letter(s) would be reinjected; nothing written")
        return 0
    confirm(f"Reinject {len(todo)} dead letter(s)?", args.yes, "reinject")
    done, late = dlq.reinject(settings, todo)
    _report_skipped(late)
    for item in done:
        print(f"reinjected {item.entry.id} -> {item.target} (reinjection {item.reinjected_count})")
    print(f"{len(done)} dead letter(s) reinjected")
    return 0


def _purge(args: argparse.Namespace) -> int:
    settings = _cluster_settings()
    plan = dlq.plan_purge(dlq.read_dead_letters(settings), args.before)
    if not plan.entries:
        print("nothing to purge")
        return 0
    cuts = ", ".join(f"[{p}] below {o}" for p, o in sorted(plan.cut.items()))
    confirm(f"Purge {len(plan.entries)} dead letter(s) from {plan.topic} ({cuts})?", args.yes, "purge")
    path = dlq.purge(settings, plan)
    print(f"purged {len(plan.entries)} dead letter(s) from {plan.topic} ({cuts})")
    print(f"copy: {path}")
    return 0


def _cluster_settings() -> Settings:
    """The settings, once the cluster has answered (every action reads the dead-letter topic)."""
    settings = load_settings()
    require_kafka(settings)
    return settings


def _table_row(row: dict) -> tuple:
    source = f"{row['source_topic']}[{row['source_partition']}]@{row['source_offset']}" if row["source_topic"] else None
    resolved = row["resolution"]["target"] if row["resolution"] else None
    return (row["id"], row["failed_at"][:19].replace("T", " "), row["service"], source, row["dcid"],
            row["image_number"], row["attempts"], row["reinjected_count"], resolved, _short(row["reason"]))


def _short(text: str | None) -> str | None:
    if text is None or len(text) <= REASON_WIDTH:
        return text
    return text[: REASON_WIDTH - 3] + "..."


def _bytes_line(view: dict | None) -> str:
    if view is None:
        return "-"
    if "text" in view:
        return repr(view["text"]) if len(view["text"]) <= 200 else repr(view["text"][:200]) + " ..."
    return f"{view['length']} bytes: {view['hex_preview']}"


def _skipped_text(entry: dlq.DeadLetterEntry) -> str:
    marker = entry.resolution
    return (f"{entry.id} was already reinjected as {marker['target_topic']}[{marker['target_partition']}]"
            f"@{marker['target_offset']} at {marker['resolved_at']:%Y-%m-%d %H:%M:%S} by {marker['resolved_by']}")


def _report_skipped(skipped: list[dlq.DeadLetterEntry]) -> None:
    for entry in skipped:
        print(f"skipping: {_skipped_text(entry)}", file=sys.stderr)
