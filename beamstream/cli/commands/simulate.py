"""``beamstream simulate gridscan|rotation``: a synthetic collection through the real producers."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from beamstream.cli.commands.output import add_json_flag, print_json
from beamstream.cli.commands.spool import EXIT_SPOOLED, SpoolStatus, add_spool_options, finish_spool, open_spooled
from beamstream.cli.params import dcid, detector_name, non_negative_float, positive_float, positive_int
from beamstream.cli.service import run_stoppable
from beamstream.platform.settings import load_settings


def _common(parser: argparse.ArgumentParser, frames_per_file: int) -> None:
    parser.add_argument("--rate", type=positive_float, default=20.0, metavar="HZ",
                        help="frames per second the detector writes (default 20)")
    parser.add_argument("--detector", type=detector_name, default="eiger2_1m",
                        help="detector preset: pilatus6m, eiger2-16m, eiger2-4m or eiger2-1m (default eiger2-1m, "
                        "the fastest to draw)")
    parser.add_argument("--format", choices=("cbf", "nexus"), default=None,
                        help="file format (default: what the detector writes: CBF for PILATUS, NeXus for EIGER)")
    parser.add_argument("--frames-per-file", type=positive_int, default=frames_per_file, metavar="N",
                        help=f"NeXus frames per data file (default {frames_per_file})")
    parser.add_argument("--dcid", type=dcid, default=None, help="data collection id (default: time-based)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where the files go (default: <home>/simulated, see `beamstream config`)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: equal seeds give equal frames (default 0)")
    parser.add_argument("--prerender", action="store_true",
                        help="draw every frame before the clock starts, so files appear exactly at --rate "
                        "even when drawing is slower")
    add_spool_options(parser, "simulate")
    add_json_flag(parser)


def register(subparsers) -> None:
    """Add the ``simulate`` command."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate a grid scan or rotation through the real producers",
        description="Announce a collection, write synthetic frames at detector rate (drawn ahead, then moved "
        "into place so files appear complete), let the file watcher announce each image, then end the "
        "collection. Events go through a local spool, so the simulation runs on while Kafka is unreachable; "
        "at the end it waits up to --drain-timeout for Kafka to take them. Stop with SIGINT/SIGTERM: the "
        "collection ends as aborted.",
        epilog=f"Exit status: 0 success, 3 images never announced or aborted, {EXIT_SPOOLED} events left in the "
        "spool, 128+N stopped by signal N, 2 on errors.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    grid = kinds.add_parser("gridscan", help="a snaked grid scan over one crystal",
                            description="A rows x cols grid scan; the crystal's true centre is reported.")
    grid.add_argument("--rows", type=positive_int, required=True, help="grid rows (slow axis)")
    grid.add_argument("--cols", type=positive_int, required=True, help="grid columns (fast axis)")
    grid.add_argument("--step", type=positive_float, default=20.0, metavar="UM", help="grid step in µm (default 20)")
    _common(grid, frames_per_file=10)
    rotation = kinds.add_parser("rotation", help="a rotation sweep", description="A rotation sweep of N images.")
    rotation.add_argument("--images", type=positive_int, required=True, metavar="N", help="number of images")
    rotation.add_argument("--start-angle", type=float, default=0.0, metavar="DEG", help="first angle (default 0)")
    rotation.add_argument("--width", type=non_negative_float, default=0.1, metavar="DEG",
                          help="degrees per image (default 0.1)")
    _common(rotation, frames_per_file=100)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the simulation; wait for the spool; print where the files went, the dcid and the outcome."""
    from beamstream.producers.simulator import DEFAULT_SPOOL, simulate_gridscan, simulate_rotation

    settings = load_settings()
    total = args.rows * args.cols if args.kind == "gridscan" else args.images
    publisher = open_spooled(settings, args.spool or DEFAULT_SPOOL, args.metrics_port)
    bar = tqdm(total=total, unit="img", desc="announced", file=sys.stderr, disable=None)
    status = SpoolStatus(bar, publisher)
    common = dict(detector=args.detector, fmt=args.format, out_dir=args.out, seed=args.seed, dcid=args.dcid,
                  frames_per_file=args.frames_per_file, prerender=args.prerender, on_progress=bar.update,
                  publisher=publisher)

    def work(stop):
        try:
            if args.kind == "gridscan":
                report = simulate_gridscan(settings, args.rows, args.cols, args.rate, step_um=args.step, stop=stop,
                                           **common)
            else:
                report = simulate_rotation(settings, args.images, args.rate, oscillation_start_deg=args.start_angle,
                                           oscillation_width_deg=args.width, stop=stop, **common)
        finally:
            status.close()
            bar.close()
            left = finish_spool(publisher, args.drain_timeout, stop)
        report.spool = left.as_dict()
        return report

    report, signum = run_stoppable(work)
    if args.json:
        print_json(report.as_dict())
    else:
        _print_report(report)
    if signum is not None:
        return 128 + signum
    if report.spool["batches"]:
        return EXIT_SPOOLED
    return 0 if report.status == "success" else 3


def _print_report(report) -> None:
    t = report.timings
    kind = (f"grid scan {report.grid['rows']}x{report.grid['columns']}" if report.grid
            else "rotation")
    print(f"dcid {report.dcid}: {kind}, {report.images} images, {report.detector} {report.format} "
          f"at {report.rate_hz:g} Hz")
    print(f"files: {report.file_template} ({len(report.files)} files in {report.out_dir})")
    print(f"announced {report.emitted}/{report.images} images: {report.status}, in {t.get('total_s')} s; "
          f"released at {t.get('achieved_rate_hz')} Hz, drawing at {t.get('render_rate_hz')} Hz")
    if report.true_centre is not None:
        row, column = report.true_centre
        print(f"true crystal centre: row {row:.2f}, column {column:.2f} (0-based grid positions)")
    if report.render_warning:
        print(f"warning: {report.render_warning}", file=sys.stderr)
