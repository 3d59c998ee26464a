"""``beamstream ispyb-sink``: store per-image results and collection summaries in ISPyB."""

from __future__ import annotations

import argparse
import logging

from beamstream.cli.commands.stoppable import run_stoppable
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.logs import configure_json_logging
from beamstream.platform.settings import load_settings


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100000, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 60 seconds, got {text}")
    return value


def register(subparsers) -> None:
    """Add the ``ispyb-sink`` command."""
    parser = subparsers.add_parser(
        "ispyb-sink",
        help="store results and summaries in ISPyB (ImageQualityIndicators, AutoProcProgram)",
        description="Consume the results and summaries topics and write them to the ISPyB database "
        "(BEAMSTREAM_ISPYB_URL) in batches: one row per image in ImageQualityIndicators (reprocessing runs in "
        "ReprocessedImageQualityIndicators), one AutoProcProgram per processing run, closed by its summary. "
        "Offsets are committed only after the database commit, and every write is an idempotent upsert. "
        "A database outage pauses consumption until the database is back; messages that cannot be stored "
        "go to the dead-letter topic. Runs until SIGTERM/Ctrl-C. Logs are JSON lines.",
    )
    parser.add_argument("--batch-size", type=_batch_size, default=500, metavar="N",
                        help="most messages per database transaction (default 500)")
    parser.add_argument("--batch-wait", type=_seconds, default=0.2, metavar="SECONDS",
                        help="longest wait to fill a batch (default 0.2)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    metrics.add_port_option(parser)
    parser.set_defaults(func=run)


def check_schema(engine) -> None:
    """Raise a one-line error when the database answers but lacks a table the sink writes."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    try:
        tables = set(inspect(engine).get_table_names())
    except OperationalError as exc:  # unreachable now: the sink waits for it like for any outage
        logging.getLogger("beamstream.ispyb_sink").warning(
            "database not reachable at start-up, will keep trying: %s", str(exc.orig).splitlines()[0])
        return
    needed = ("ImageQualityIndicators", "AutoProcProgram", "ProcessingJob", "ReprocessedImageQualityIndicators")
    missing = [t for t in needed if t not in tables]
    if missing:
        raise BeamstreamError(f"the ISPyB database lacks table(s) {', '.join(missing)}; "
                              "run `beamstream ispyb-schema create`")


def run(args: argparse.Namespace) -> int:
    """Run the sink until stopped."""
    from beamstream.connectors.ispyb_schema import make_engine
    from beamstream.connectors.ispyb_sink import IspybSink, SinkOptions

    settings = load_settings()
    port = metrics.metrics_port(args.metrics_port)
    engine = make_engine(settings.database_url)
    check_schema(engine)
    configure_json_logging("ispyb-sink", getattr(logging, args.log_level.upper()), settings=settings)
    if port is not None:
        metrics.serve(port, registry=metrics.ISPYB_SINK_REGISTRY)  # a daemon thread; it goes with the process
    sink = IspybSink(settings, engine, SinkOptions(batch_size=args.batch_size, batch_wait_s=args.batch_wait))

    def work(stop):
        sink.stop_event = stop
        return sink.run()

    stats, _signal = run_stoppable(work)
    print(f"stored {stats.results} results and {stats.summaries} summaries; "
          f"{stats.dead_lettered} dead-lettered")
    return 0
