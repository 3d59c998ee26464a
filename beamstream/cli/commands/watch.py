"""``beamstream watch``: announce a collection's images as they become readable on disk."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from beamstream.cli.commands.output import add_json_flag, print_json
from beamstream.cli.commands.spool import EXIT_SPOOLED, SpoolStatus, add_spool_options, finish_spool, open_spooled
from beamstream.cli.params import dcid, positive_float, positive_int
from beamstream.cli.service import run_stoppable
from beamstream.platform.settings import load_settings

#: Exit status when images never arrived (0 = all announced, 128 + n = stopped by signal n).
EXIT_INCOMPLETE = 3


def register(subparsers) -> None:
    """Add the ``watch`` command."""
    parser = subparsers.add_parser(
        "watch",
        help="announce a collection's images as their files become readable",
        description="Poll for the images of one collection and publish an ImageArrived event for each, once, "
        "as soon as it is readable: CBF files once complete, EIGER/NeXus frames once written to a data file. "
        "Images found in one poll go out in one Kafka transaction. Events go through a local spool first, so "
        "watching goes on while Kafka is unreachable and they are published, in order, when it is back. Stops "
        "when all images were announced, after --timeout seconds without a new image (counted only while "
        "Kafka is reachable), or on SIGINT/SIGTERM, and reports what is missing; then waits up to "
        "--drain-timeout for the spool to drain.",
        epilog=f"Exit status: 0 all images announced, {EXIT_INCOMPLETE} some never arrived, {EXIT_SPOOLED} events "
        "left in the spool, 128+N stopped by signal N, 1 or 2 on errors.",
    )
    parser.add_argument("--dcid", type=dcid, required=True, help="ISPyB data collection id")
    parser.add_argument("--template", required=True, metavar="PATH",
                        help="CBF template with # for the image number (/data/x/thau_1_####.cbf) "
                        "or an EIGER/NeXus master file (/data/x/scan_master.h5)")
    parser.add_argument("--images", type=positive_int, required=True, metavar="N", help="number of images")
    parser.add_argument("--start", type=positive_int, default=1, metavar="N",
                        help="number of the first image (default 1)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, metavar="S",
                        help="give up after S seconds without a new image while Kafka is reachable (default 30)")
    parser.add_argument("--poll", type=positive_float, default=0.1, metavar="S",
                        help="seconds between looks at the files (default 0.1)")
    parser.add_argument("--end", action="store_true",
                        help="publish CollectionEnded (success or incomplete) when the watch ends")
    add_spool_options(parser, "watch-DCID")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Watch until done, timed out or signalled; wait for the spool; print the report."""
    from beamstream.producers.scanning import make_scanner
    from beamstream.producers.watcher import watch

    settings = load_settings()
    scanner = make_scanner(args.template, args.images, args.start)  # a bad template fails before anything
    publisher = open_spooled(settings, args.spool or f"watch-{args.dcid}", args.metrics_port)
    bar = tqdm(total=args.images, unit="img", desc=f"dcid {args.dcid}", file=sys.stderr, disable=None)
    status = SpoolStatus(bar, publisher)

    def work(stop):
        try:
            report = watch(publisher, args.dcid, args.template, args.images, start=args.start,
                           timeout_s=args.timeout, poll_s=args.poll, end=args.end, stop=stop,
                           on_emitted=bar.update, scanner=scanner)
        finally:
            status.close()
            bar.close()
            left = finish_spool(publisher, args.drain_timeout, stop)
        return report, left

    (report, left), signum = run_stoppable(work)
    if args.json:
        print_json({**report.as_dict(), "spool": left.as_dict()})
    else:
        print(report.summary())
    if signum is not None:
        return 128 + signum
    if left.batches:
        return EXIT_SPOOLED
    return 0 if report.status == "success" else EXIT_INCOMPLETE
