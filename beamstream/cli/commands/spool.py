"""``beamstream spool list|drain``: the producers' local spools of events Kafka does not have yet; and what
``watch`` and ``simulate`` share about them (options, the status line, the last words)."""

from __future__ import annotations

import argparse
import sys
import threading

from beamstream.cli.commands.output import add_json_flag, print_json, print_table
from beamstream.cli.params import non_negative_float, port_number
from beamstream.errors import BeamstreamError
from beamstream.platform.settings import load_settings

#: Exit status when events are left in the spool (published by the next run or `beamstream spool drain`).
EXIT_SPOOLED = 4


def register(subparsers) -> None:
    """Add the ``spool`` command."""
    parser = subparsers.add_parser(
        "spool",
        help="list the producers' local spools, or publish what one holds",
        description="Producers (watch, simulate, an acquisition system's SpooledPublisher) write every batch of "
        "events to a spool on local disk (<home>/spool/NAME) before Kafka has it, and publish it, in order, "
        "when Kafka can be reached. A spool left with events (Kafka was down when its producer ended) is "
        "published by the next producer on the same spool, or by `spool drain`.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="every spool of this host: events waiting, oldest, holder",
                                 description="List this host's spools (under <home>/spool) with the events and "
                                 "batches not yet in Kafka, the oldest one's age and the process holding it.")
    add_json_flag(listing)
    listing.set_defaults(func=run_list)
    drain = actions.add_parser("drain", help="publish what a spool holds, then exit",
                               description="Publish a spool's batches to Kafka, in order (a batch is never split "
                               "over transactions), waiting for Kafka while it is unreachable. Refused while another "
                               "process holds the spool (that one publishes it).",
                               epilog=f"Exit status: 0 published, {EXIT_SPOOLED} events left (timeout or "
                               "signal), 2 on errors.")
    drain.add_argument("name", metavar="NAME", help="the spool's name (see `beamstream spool list`)")
    drain.add_argument("--timeout", type=non_negative_float, default=None, metavar="S",
                       help="give up after S seconds (default: wait until published or stopped)")
    add_json_flag(drain)
    drain.set_defaults(func=run_drain)


def run_list(args: argparse.Namespace) -> int:
    """Print every spool of this host."""
    from beamstream.producers.spool import list_spools, spool_root

    spools = list_spools(spool_root(load_settings()))
    if args.json:
        print_json([spool.as_dict() for spool in spools])
        return 0
    if not spools:
        print("no spools")
        return 0
    print_table([(s.name, s.events, s.batches, None if s.oldest_age_s is None else f"{s.oldest_age_s:.0f} s",
                  s.holder_pid, s.path) for s in spools],
                ("name", "events", "batches", "oldest", "held by", "path"))
    return 0


def run_drain(args: argparse.Namespace) -> int:
    """Publish one spool until it is empty, the timeout passes or a signal stops it."""
    from beamstream.cli.service import run_stoppable
    from beamstream.producers.publishing import open_publisher
    from beamstream.producers.spool import check_name, inspect_spool, spool_root

    settings = load_settings()
    directory = spool_root(settings) / check_name(args.name)
    if not directory.is_dir():
        raise BeamstreamError(f"no spool {args.name} under {spool_root(settings)} (see `beamstream spool list`)")
    before = inspect_spool(directory)
    publisher = open_publisher(settings, spool=args.name)
    left, signum = run_stoppable(lambda stop: finish_spool(publisher, args.timeout, stop))
    published = max(before.events - left.events, 0)
    if args.json:
        print_json({**left.as_dict(), "published_events": published})
    elif not left.batches:
        print(f"spool {args.name}: {published} events published; empty")
    if signum is not None:
        return 128 + signum
    return EXIT_SPOOLED if left.batches else 0


# -- shared by watch and simulate ------------------------------------------------------------------

def add_spool_options(parser: argparse.ArgumentParser, default: str) -> None:
    """``--spool``, ``--drain-timeout`` and ``--metrics-port`` of a producer command."""
    parser.add_argument("--spool", default=None, metavar="NAME",
                        help=f"the local spool events go through while Kafka is unreachable (default {default}); "
                        "a run on a spool with events left publishes them first")
    parser.add_argument("--drain-timeout", type=non_negative_float, default=120.0, metavar="S",
                        help="at the end, wait up to S seconds for Kafka to take the spooled events (default 120); "
                        "what is left stays in the spool")
    # Only the option, not BEAMSTREAM_METRICS_PORT: that names the port of a host's long-running service.
    parser.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                        help="serve Prometheus metrics (the spool's backlog) at http://0.0.0.0:PORT/metrics")


def open_spooled(settings, name: str, metrics_port: int | None):
    """The command's :class:`SpooledPublisher` on spool ``name`` (one-line errors), metrics served if asked."""
    from beamstream.platform import metrics
    from beamstream.producers.publishing import open_publisher
    from beamstream.producers.spool import SpoolBusy, check_name

    check_name(name)
    if metrics_port is not None:
        metrics.serve(metrics_port)
    try:
        return open_publisher(settings, spool=name)
    except SpoolBusy as exc:
        raise SpoolBusy(f"{exc} (give this run another with --spool NAME)") from None


def status_text(backlog) -> str:
    """The status line's spool part: ``spooled 0`` or ``Kafka unreachable: 120 events spooled``."""
    if backlog.connected:
        return f"spooled {backlog.events}"
    return f"Kafka unreachable: {backlog.events} events spooled"


class SpoolStatus:
    """Keeps a progress bar's postfix on the spool's backlog (once a second) while the command runs."""

    def __init__(self, bar, publisher) -> None:
        self.bar, self.publisher = bar, publisher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.set_postfix_str(status_text(self.publisher.backlog()), refresh=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def finish_spool(publisher, timeout_s: float | None, stop: threading.Event | None):
    """Wait for the spool to drain (a "waiting for Kafka" line every few seconds), then close it; the backlog
    left, announced in one line when there is one."""
    from beamstream.producers.publishing import drain_spool

    def waiting(backlog) -> None:
        print(f"waiting for Kafka: {backlog.events} events spooled in {backlog.path}", file=sys.stderr, flush=True)

    left = drain_spool(publisher, timeout_s, stop, on_waiting=waiting, announce=False)  # said below, once
    if left.batches:
        print(f"{left.events} events kept in spool {left.path}: published by the next run on spool "
              f"{left.name} or by `beamstream spool drain {left.name}`", file=sys.stderr, flush=True)
    return left
