"""``beamstream demo``: the README's first command, showing everything that works.

It brings the local cluster up, starts analysis workers, simulates a grid scan
through the real producers (files written at detector rate, a file watcher
announcing them), and prints the heat map and the X-ray centre the pipeline
computed, next to the crystal's true position.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from beamstream.cli.heatmap import render_heat_map
from beamstream.cli.params import detector_name, port_or_zero, positive_float, positive_int
from beamstream.errors import BeamstreamError
from beamstream.operations.cluster import LocalCluster
from beamstream.platform.kafka_clients import require_kafka
from beamstream.platform.processes import ServiceProcess
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topic_reader import TopicReader
from beamstream.platform.topics import apply_topics


def register(subparsers) -> None:
    """Add the ``demo`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="run a simulated grid scan through the real pipeline on a local Kafka broker",
        description="Start the local Kafka cluster (unless an external one is configured), apply the "
        "topics, start analysis workers, simulate a grid scan (synthetic detector images written at "
        "detector rate, announced by the file watcher) and print the spot-count heat map and the "
        "X-ray centre as the pipeline computed them.",
    )
    parser.add_argument("--rows", type=positive_int, default=8, help="grid rows (default 8)")
    parser.add_argument("--cols", type=positive_int, default=10, help="grid columns (default 10)")
    parser.add_argument("--rate", type=positive_float, default=20.0, metavar="HZ", help="image rate (default 20 Hz)")
    parser.add_argument("--workers", type=positive_int, default=2, help="analysis worker processes (default 2)")
    parser.add_argument("--detector", type=detector_name, default="eiger2-1m",
                        help="simulated detector (default eiger2-1m)")
    parser.add_argument("--seed", type=int, default=7, help="crystal position seed (default 7)")
    parser.add_argument("--dashboard-port", type=port_or_zero, default=8080, metavar="PORT",
                        help="port of the web dashboard (default 8080; 0 picks a free one)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not serve the web dashboard")
    parser.set_defaults(func=run)


def ensure_cluster(settings: Settings) -> None:
    """Start the local cluster when no external one is configured."""
    if settings.uses_local_cluster:
        status = LocalCluster(settings).up()
        print(f"Kafka {status.kafka_version} running at {status.bootstrap} (data in {status.data_dir})")
    else:
        print(f"using the Kafka cluster at {settings.kafka_bootstrap}")
        require_kafka(settings)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from beamstream.producers.simulator import simulate_gridscan

    settings = load_settings()
    ensure_cluster(settings)
    changes = apply_topics(settings)
    print(f"topics: {len(changes)} declared, {sum(c.action == 'created' for c in changes)} created")

    log_dir = settings.home / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    database = _prepare_database(settings)
    reader = TopicReader(settings, ["results", "announce", "summaries", "archive"])
    workers = [ServiceProcess(settings, log_dir, f"worker{i}", "--summary-timeout", "15").start()
               for i in range(args.workers)]
    workers.append(ServiceProcess(settings, log_dir, "ispyb-sink", command="ispyb-sink").start())
    workers.append(ServiceProcess(settings, log_dir, "archiver", command="archiver").start())
    print(f"started {args.workers} analysis workers, the ISPyB sink and the archiver (logs in {log_dir})")
    dashboard = None if args.no_dashboard else _start_dashboard(settings, args.dashboard_port)
    try:
        n_images = args.rows * args.cols
        with tqdm(total=n_images, desc="images announced", unit="img", file=sys.stderr) as bar:
            report = simulate_gridscan(settings, args.rows, args.cols, args.rate, detector=args.detector,
                                       seed=args.seed, on_progress=bar.update)
        print(f"simulated grid scan dcid {report.dcid}: {report.emitted} images of a {report.detector} "
              f"in {Path(report.file_template).parent}")
        register_collection(database, report)
        summary = _wait_for_summary(reader, report.dcid, n_images)
        stored = _wait_for_rows(database, report.dcid, n_images)
        archived = _wait_for_archive(reader, report.dcid)
    finally:
        for worker in workers:
            worker.terminate()
        reader.close()
        if dashboard is not None and sys.exc_info()[0] is not None:
            dashboard.stop()
    _print_summary(summary, report)
    print(f"\nISPyB: {stored} rows for dcid {report.dcid} in ImageQualityIndicators at {settings.database_url}; "
          f"reprocess it with `beamstream go {report.dcid}` or from the dashboard")
    if archived is not None:
        print(f"archive manifest: {archived['manifest_path']} ({archived['files']} files, "
              f"{archived['total_bytes'] / 1e6:.1f} MB, {'complete' if archived['complete'] else 'incomplete'})")
    else:
        print("archive manifest: not written within the time limit; see the archiver log")
    if dashboard is not None:
        _linger(dashboard)
    return 0


def _linger(dashboard) -> None:
    """At a terminal, keep the page up for looking at until Ctrl-C; elsewhere (scripts, CI) just stop."""
    try:
        if sys.stdin.isatty() and sys.stdout.isatty():
            print(f"\ndashboard still at {dashboard.url}: press Ctrl-C to stop")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()


def _start_dashboard(settings: Settings, port: int):
    """Serve the dashboard from a thread of this process; print its address (a busy port is not fatal)."""
    from beamstream.dashboard.server import DashboardServer

    try:
        server = DashboardServer(settings, "127.0.0.1", port).start()
    except OSError as exc:
        print(f"dashboard not started: {exc} (try --dashboard-port 0)")
        return None
    print(f"dashboard: {server.url}")
    return server


def _prepare_database(settings: Settings):
    """The demo's ISPyB database (SQLite unless BEAMSTREAM_ISPYB_URL says otherwise), schema created."""
    from beamstream.connectors.ispyb_schema import create_schema, make_engine

    engine = make_engine(settings.database_url)
    create_schema(engine)
    return engine


def register_collection(engine, report) -> None:
    """Write the simulated collection into ISPyB as the acquisition system would, so that it can be
    reprocessed (``beamstream go``, the dashboard's Reprocess) like a real one."""
    from beamstream.connectors.ispyb_collections import create_collection
    from beamstream.producers.simulator import SIMULATED_BEAMLINE

    create_collection(engine, dcid=report.dcid, file_template=report.file_template, number_of_images=report.images,
                      experiment_type=report.experiment_type, grid=report.grid, beamline=SIMULATED_BEAMLINE)


def _wait_for_rows(engine, dcid: int, expected: int, timeout: float = 60.0) -> int:
    """ImageQualityIndicators rows of ``dcid`` once the sink has stored them all (or the time is up)."""
    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            count = connection.execute(
                text("SELECT COUNT(*) FROM ImageQualityIndicators WHERE dataCollectionId = :dcid"),
                {"dcid": dcid}).scalar_one()
        if count >= expected:
            break
        time.sleep(0.5)
    return count


def _wait_for_archive(reader: TopicReader, dcid: int, timeout: float = 60.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = reader.values("archive", "ArchiveComplete", dcid)
        if done:
            return done[0]
        time.sleep(0.3)
    return None


def _wait_for_summary(reader: TopicReader, dcid: int, n_images: int) -> dict:
    with tqdm(total=n_images, desc="images analysed ", unit="img", file=sys.stderr) as bar:
        deadline = time.monotonic() + 180 + n_images
        while time.monotonic() < deadline:
            bar.update(len(reader.values("results", "ImageResult", dcid)) - bar.n)
            summaries = reader.values("summaries", "CollectionSummary", dcid)
            if summaries:
                bar.update(n_images - bar.n)
                return summaries[0]
            time.sleep(0.2)
    raise BeamstreamError(f"no summary for dcid {dcid} within the time limit; see the worker logs")


def _print_summary(summary: dict, report) -> None:
    rows, columns = report.grid["rows"], report.grid["columns"]
    centre = summary["xray_centre"]
    marked = (centre["centre_row"], centre["centre_column"]) if centre else None
    print(f"\nspots per grid position (dcid {summary['dcid']}, {summary['images_analysed']}/"
          f"{summary['images_expected']} images, {summary['status']}):\n")
    print(render_heat_map(summary["heat_map"], rows, columns, marked))
    if centre:
        print(f"\nX-ray centre: row {centre['centre_row']:.2f}, column {centre['centre_column']:.2f} "
              f"(motors x {centre['centre_x_mm']:.3f} mm, y {centre['centre_y_mm']:.3f} mm); "
              f"diffracting region rows {centre['min_row']}-{centre['max_row']}, "
              f"columns {centre['min_column']}-{centre['max_column']}, best image {summary['best_image']}")
        true_row, true_column = report.true_centre
        print(f"true crystal centre: row {true_row:.2f}, column {true_column:.2f}")
    else:
        print("\nno diffraction found: no X-ray centre")
