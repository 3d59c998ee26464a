"""``beamstream watch``: announce a collection's images as they become readable on disk."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from beamstream.cli.commands.output import add_json_flag, print_json
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
        "Images found in one poll go out in one Kafka transaction. Stops when all images were announced, "
        "after --timeout seconds without a new image, or on SIGINT/SIGTERM, and reports what is missing.",
        epilog=f"Exit status: 0 all images announced, {EXIT_INCOMPLETE} some never arrived, "
        "128+N stopped by signal N, 1 or 2 on errors.",
    )
    parser.add_argument("--dcid", type=dcid, required=True, help="ISPyB data collection id")
    parser.add_argument("--template", required=True, metavar="PATH",
                        help="CBF template with # for the image number (/data/x/thau_1_####.cbf) "
                        "or an EIGER/NeXus master file (/data/x/scan_master.h5)")
    parser.add_argument("--images", type=positive_int, required=True, metavar="N", help="number of images")
    parser.add_argument("--start", type=positive_int, default=1, metavar="N",
                        help="number of the first image (default 1)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, metavar="S",
                        help="give up after S seconds without a new image (default 30)")
    parser.add_argument("--poll", type=positive_float, default=0.1, metavar="S",
                        help="seconds between looks at the files (default 0.1)")
    parser.add_argument("--end", action="store_true",
                        help="publish CollectionEnded (success or incomplete) when the watch ends")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Watch until done, timed out or signalled; print the report."""
    from beamstream.producers.publishing import open_publisher
    from beamstream.producers.scanning import make_scanner
    from beamstream.producers.watcher import watch

    settings = load_settings()
    scanner = make_scanner(args.template, args.images, args.start)  # a bad template fails before connecting
    publisher = open_publisher(settings)
    bar = tqdm(total=args.images, unit="img", desc=f"dcid {args.dcid}", file=sys.stderr, disable=None)
    try:
        report, signum = run_stoppable(lambda stop: watch(
            publisher, args.dcid, args.template, args.images, start=args.start, timeout_s=args.timeout,
            poll_s=args.poll, end=args.end, stop=stop, on_emitted=bar.update, scanner=scanner))
    finally:
        bar.close()
        publisher.close()
    if args.json:
        print_json(report.as_dict())
    else:
        print(report.summary())
    if signum is not None:
        return 128 + signum
    return 0 if report.status == "success" else EXIT_INCOMPLETE
