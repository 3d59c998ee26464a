"""``beamstream ispyb-sink``: store per-image results and collection summaries in ISPyB."""

from __future__ import annotations

import argparse
import logging

from beamstream.cli.params import batch_size, seconds_up_to_a_minute
from beamstream.cli.service import add_service_options, run_stoppable, start_service
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.settings import load_settings


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
    parser.add_argument("--batch-size", type=batch_size, default=500, metavar="N",
                        help="most messages per database transaction (default 500)")
    parser.add_argument("--batch-wait", type=seconds_up_to_a_minute, default=0.2, metavar="SECONDS",
                        help="longest wait to fill a batch (default 0.2)")
    add_service_options(parser)
    parser.set_defaults(func=run)


def check_schema(engine) -> None:
    """Raise a one-line error when the database answers but lacks a table the sink writes."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    try:
        tables = set(inspect(engine).get_table_names())
    except OperationalError as exc:  # unreachable now: the sink waits for it like for any outage
        logging.getLogger(__name__).warning(
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
    start_service(args, "ispyb-sink", settings, metrics.ISPYB_SINK_REGISTRY)
    engine = make_engine(settings.database_url)
    check_schema(engine)
    sink = IspybSink(settings, engine, SinkOptions(batch_size=args.batch_size, batch_wait_s=args.batch_wait))
    stats, _signal = run_stoppable(lambda _stop: sink.run(), stop=sink.stop_event)
    print(f"stored {stats.results} results and {stats.summaries} summaries; "
          f"{stats.dead_lettered} dead-lettered")
    return 0
