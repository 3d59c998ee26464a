"""``beamstream demo``: the README's first command, showing everything that works.

It brings the local cluster up, starts analysis workers, simulates a grid scan
through the real producers (files written at detector rate, a file watcher
announcing them), and prints the heat map and the X-ray centre the pipeline
computed, next to the crystal's true position.

With ``--bluesky`` the grid scan is a real bluesky RunEngine plan instead
(:func:`beamstream.producers.bluesky_plans.grid_scan_and_centre`): ophyd-async
simulated motors and the synthetic EIGER over the same seed's crystal
(:mod:`beamstream.producers.bluesky_beamline`), its documents published by the
in-process callback, or with ``--bluesky-kafka`` by bluesky-kafka's Publisher to a
document topic the ``bluesky-bridge`` service reads. The plan waits for the
summary and moves the motors to the X-ray centre; the demo prints where they are.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from beamstream.cli.heatmap import render_heat_map
from beamstream.cli.params import detector_name, port_or_zero, positive_float, positive_int
from beamstream.errors import BeamstreamError
from beamstream.operations.cluster import LocalCluster
from beamstream.platform.kafka_clients import require_kafka
from beamstream.platform.processes import ServiceProcess
from beamstream.platform.settings import Settings, load_settings, path_within_roots
from beamstream.platform.topic_reader import TopicReader
from beamstream.platform.topics import apply_topics

#: The Bluesky demo's grid step: the simulator's default, so a seed puts the crystal where the simulator does.
BLUESKY_STEP_MM = 0.02
#: The modules ``--bluesky`` needs (the bluesky extra); ``--bluesky-kafka`` needs bluesky-kafka's too.
BLUESKY_MODULES = ("bluesky", "ophyd_async", "event_model")
#: The key of the demo RunEngine's documents on its document topic (one key: one partition, in order).
DOCUMENT_KEY = "beamstream-demo"


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
    parser.add_argument("--bluesky", action="store_true",
                        help="scan with a bluesky RunEngine plan instead of the simulator: ophyd-async simulated "
                        "motors x and y (20 um steps, rows along y) and a synthetic EIGER over the seed's crystal, "
                        "the run published by the in-process Beamstream callback; the plan waits for the summary "
                        "and moves the motors to the X-ray centre (--rate does not apply: frames are taken as the "
                        "motors arrive). Needs the bluesky extra: pip install -e '.[bluesky]'")
    parser.add_argument("--bluesky-kafka", action="store_true",
                        help="as --bluesky, but the RunEngine's documents go through bluesky-kafka's Publisher to "
                        "a document topic the demo creates (<prefix>simulated.bluesky.runengine.documents), and "
                        "a bluesky-bridge service turns them into image events")
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
    through = _bluesky_path(args)
    settings = load_settings()
    if through is not None:
        _bluesky_folder(settings)  # refused before anything connects
    ensure_cluster(settings)
    changes = apply_topics(settings)
    print(f"topics: {len(changes)} declared, {sum(c.action == 'created' for c in changes)} created")

    log_dir = settings.home / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    database = _prepare_database(settings)
    reader = TopicReader(settings, ["results", "announce", "summaries", "archive",
                                    *(["collections"] if through is not None else [])])
    workers = [ServiceProcess(settings, log_dir, f"worker{i}", "--summary-timeout", "15").start()
               for i in range(args.workers)]
    workers.append(ServiceProcess(settings, log_dir, "ispyb-sink", command="ispyb-sink").start())
    workers.append(ServiceProcess(settings, log_dir, "archiver", command="archiver").start())
    print(f"started {args.workers} analysis workers, the ISPyB sink and the archiver (logs in {log_dir})")
    dashboard = None if args.no_dashboard else _start_dashboard(settings, args.dashboard_port)
    try:
        n_images = args.rows * args.cols
        if through is None:
            report, summary = _simulated_scan(settings, args, database, reader)
        else:
            report, summary = _bluesky_scan(settings, args, through, database, reader, workers, log_dir)
        stored = _wait_for_rows(database, report.dcid, n_images)
        archived = _wait_for_archive(reader, report.dcid)
    finally:
        for worker in workers:
            worker.terminate()
        reader.close()
        if dashboard is not None and sys.exc_info()[0] is not None:
            dashboard.stop()
    _print_summary(summary, report)
    if through is not None:
        _print_motors(report)
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


def _simulated_scan(settings: Settings, args: argparse.Namespace, database, reader: TopicReader):
    """The simulator's grid scan through the file watcher, registered in ISPyB; (its report, its summary)."""
    from beamstream.producers.simulator import simulate_gridscan

    n_images = args.rows * args.cols
    with tqdm(total=n_images, desc="images announced", unit="img", file=sys.stderr) as bar:
        report = simulate_gridscan(settings, args.rows, args.cols, args.rate, detector=args.detector,
                                   seed=args.seed, on_progress=bar.update)
    print(f"simulated grid scan dcid {report.dcid}: {report.emitted} images of a {report.detector} "
          f"in {Path(report.file_template).parent}")
    register_collection(database, report)
    return report, _wait_for_summary(reader, report.dcid, n_images)


# -- the Bluesky path ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlueskyScan:
    """What the Bluesky demo's run announced (the fields :func:`register_collection` reads, from its
    CollectionStarted), the truth to compare with, and where the plan left the motors."""

    dcid: int
    file_template: str
    images: int
    experiment_type: str
    grid: dict
    #: The crystal's true centre, (row, column) in 0-based grid units, and (x, y) in mm.
    true_centre: tuple[float, float]
    true_mm: tuple[float, float]
    #: The X-ray centre the plan got, and the motors' positions after it moved them, (x, y) in mm.
    centre_mm: tuple[float, float]
    motors_mm: tuple[float, float]


def _bluesky_path(args: argparse.Namespace) -> str | None:
    """None without --bluesky/--bluesky-kafka, else how the run reaches Beamstream (``callback`` or
    ``bluesky-kafka``), once the extra's modules and an EIGER detector are there."""
    if not (args.bluesky or args.bluesky_kafka):
        return None
    needed = BLUESKY_MODULES + (("bluesky_kafka",) if args.bluesky_kafka else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise BeamstreamError(f"{'--bluesky-kafka' if args.bluesky_kafka else '--bluesky'} needs the bluesky "
                              f"extra: pip install -e '.[bluesky]' "
                              f"(no module {', '.join(missing)})")
    from beamstream.diffraction.detectors import PRESETS

    eigers = [key for key, preset in PRESETS.items() if preset.file_format == "nexus"]
    if args.detector not in eigers:
        raise BeamstreamError(f"--bluesky draws with a synthetic EIGER; choose --detector "
                              f"{' or '.join(key.replace('_', '-') for key in eigers)}")
    return "bluesky-kafka" if args.bluesky_kafka else "callback"


def _bluesky_folder(settings: Settings) -> Path:
    """Where the Bluesky demo's detector writes: ``<home>/bluesky``, which must be inside the data roots."""
    folder = (settings.home / "bluesky").absolute()
    if not path_within_roots(str(folder), settings.data_roots):
        raise BeamstreamError(f"the Bluesky demo writes into {folder}, outside the configured data roots "
                              f"({', '.join(settings.data_roots)}); workers would refuse its images")
    return folder


def _bluesky_scan(settings: Settings, args: argparse.Namespace, through: str, database, reader: TopicReader,
                  services: list[ServiceProcess], log_dir: Path) -> tuple[BlueskyScan, dict]:
    """Run ``grid_scan_and_centre`` on the simulated beamline, register the collection in ISPyB; (what the
    run did, its summary)."""
    from beamstream.producers.bluesky_beamline import crystal_at, simulated_beamline
    from beamstream.producers.simulator import SIMULATED_BEAMLINE, default_dcid, grid_crystal

    dcid, n_images = default_dcid(), args.rows * args.cols
    crystal = grid_crystal(args.rows, args.cols, args.seed)
    folder = _bluesky_folder(settings)
    beamline = simulated_beamline(folder, f"grid_{dcid}", crystal_at(crystal, BLUESKY_STEP_MM),
                                  detector=args.detector, seed=args.seed)
    close = _connect(beamline.engine, settings, through, services, log_dir)
    print(f"Bluesky grid scan dcid {dcid}: a RunEngine plan over ophyd-async SimMotors (rows along y, columns "
          f"along x, {BLUESKY_STEP_MM * 1000:g} um steps) with a synthetic {args.detector} writing into {folder}, "
          f"published {'through bluesky-kafka and the bridge' if through == 'bluesky-kafka' else 'in process'}")
    try:
        with _AnalysedBar(reader, dcid, n_images) as bar:
            summary = _scan_and_centre(beamline, settings, args.rows, args.cols, dcid,
                                       md={"beamline": SIMULATED_BEAMLINE})
            bar.finish(summary.images_analysed)
    finally:
        close()
    started = _wait_for_start(reader, dcid)
    position = beamline.crystal
    scan = BlueskyScan(dcid=dcid, file_template=started["file_template"], images=started["number_of_images"],
                       experiment_type=started["experiment_type"], grid=started["grid"], true_centre=crystal.centre,
                       true_mm=(position.x_mm, position.y_mm), centre_mm=summary.centre_mm,
                       motors_mm=beamline.where())
    register_collection(database, scan)
    return scan, summary.value


def _scan_and_centre(beamline, settings: Settings, rows: int, columns: int, dcid: int, md: dict):
    """The plan's summary; Ctrl-C (bluesky pauses the plan) aborts the run and stops the demo."""
    import logging

    from bluesky.utils import RunEngineInterrupted

    try:
        return beamline.scan_and_centre(settings, rows, columns, BLUESKY_STEP_MM, dcid=dcid,
                                        timeout_s=180 + rows * columns, md=md)
    except RunEngineInterrupted:  # nobody resumes a demo: end the run (its collection ends aborted)
        logging.getLogger(beamline.engine.log.logger.name).setLevel(logging.CRITICAL)  # no traceback of the abort
        beamline.engine.abort("interrupted")
        raise KeyboardInterrupt from None


def _connect(engine, settings: Settings, through: str, services: list[ServiceProcess], log_dir: Path):
    """Subscribe what publishes the RunEngine's documents; returns what to call once the run is over."""
    if through == "callback":
        from beamstream.producers.bluesky_callback import BeamstreamCallback

        callback = BeamstreamCallback.open(settings)
        engine.subscribe(callback)
        return callback.close
    from beamstream.producers.bluesky_beamline import create_document_topic, document_publisher
    from beamstream.producers.simulator import SIMULATED_BEAMLINE

    topic = create_document_topic(settings, f"{settings.topic_prefix}{SIMULATED_BEAMLINE}.bluesky.runengine.documents")
    services.append(ServiceProcess(settings, log_dir, "bluesky-bridge", "--topic", topic,
                                   command="bluesky-bridge").start())
    print(f"started the bluesky-bridge on document topic {topic}")
    publisher = document_publisher(settings, topic, DOCUMENT_KEY)
    engine.subscribe(publisher)
    return publisher.flush


class _AnalysedBar:
    """The ``images analysed`` bar of a collection, kept up to date from a thread while a plan runs in this one."""

    def __init__(self, reader: TopicReader, dcid: int, total: int) -> None:
        self.reader, self.dcid = reader, dcid
        self.bar = tqdm(total=total, desc="images analysed ", unit="img", file=sys.stderr)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="demo-progress", daemon=True)

    def __enter__(self) -> _AnalysedBar:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(0.2):
            self._show(len(self.reader.values("results", "ImageResult", self.dcid)))

    def _show(self, analysed: int) -> None:
        if analysed > self.bar.n:
            self.bar.update(analysed - self.bar.n)

    def finish(self, analysed: int) -> None:
        """Stop following; the bar shows ``analysed`` (the summary's count: results may still be on their way)."""
        self._stop.set()
        self._thread.join()
        self._show(analysed)


def _wait_for_start(reader: TopicReader, dcid: int, timeout: float = 30.0) -> dict:
    """The run's CollectionStarted (the plan had its summary, so it is committed: the reader is catching up)."""
    started = _first_read(reader, "collections", "CollectionStarted", dcid, timeout)
    if started is None:
        raise BeamstreamError(f"the CollectionStarted of dcid {dcid} was not read within {timeout:.0f} s")
    return started


def _first_read(reader: TopicReader, topic: str, record_type: str, dcid: int, timeout: float) -> dict | None:
    """The first ``record_type`` of ``dcid`` the reader has read from ``topic``, once it has one (None after
    ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = reader.values(topic, record_type, dcid)
        if found:
            return found[0]
        time.sleep(0.2)
    return None


def _print_motors(scan: BlueskyScan) -> None:
    (x, y), (mx, my), (tx, ty) = scan.centre_mm, scan.motors_mm, scan.true_mm
    print(f"the plan got the X-ray centre x {x:.4f} mm, y {y:.4f} mm and moved the motors there: "
          f"motors now at x {mx:.4f} mm, y {my:.4f} mm")
    print(f"true crystal position: x {tx:.4f} mm, y {ty:.4f} mm")


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
    return _first_read(reader, "archive", "ArchiveComplete", dcid, timeout)


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
