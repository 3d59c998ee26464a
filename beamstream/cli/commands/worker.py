"""``beamstream worker``: one analysis worker process (start as many as you like)."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import threading

from beamstream.errors import BeamstreamError
from beamstream.platform.logs import configure_json_logging
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``worker`` command."""
    parser = subparsers.add_parser(
        "worker",
        help="run an analysis worker (exactly-once)",
        description="Consume image events, analyse each image, publish results, keep per-collection "
        "tables and publish progress and one summary per collection. Start more workers to share the "
        "partitions; stop one with SIGTERM (or Ctrl-C) for a clean shutdown. Logs are JSON lines.",
    )
    parser.add_argument("--analysis", choices=("real", "noop"), default="real",
                        help="real: DIALS-compatible spot finding (default); noop: no analysis, for "
                        "measuring the pipeline itself")
    parser.add_argument("--simulated-analysis-time", type=float, default=0.0, metavar="SECONDS",
                        help="with --analysis noop: take this long per image (sleeping, no CPU), to try "
                        "scaling and latency with a realistic analysis time (default 0)")
    parser.add_argument("--backend", choices=("numba", "numpy", "dials"), default="numba",
                        help="spot-finding implementation (default numba)")
    parser.add_argument("--summary-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="after a collection ends, how long to wait for missing images (default 60)")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="tries per image before it goes to the dead-letter topic (default 3)")
    parser.add_argument("--retry-backoff", type=float, default=0.5, metavar="SECONDS",
                        help="first retry delay, doubled each retry (default 0.5)")
    parser.add_argument("--at-least-once", action="store_true",
                        help="turn exactly-once processing off (only to measure its cost; results may "
                        "then be duplicated after a crash)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (default: "
                        "$BEAMSTREAM_METRICS_PORT, else off)")
    parser.set_defaults(func=run)


def build_pipeline(args: argparse.Namespace):
    """The Pipeline the arguments describe (separate from running it, for tests and the demo)."""
    from beamstream.diffraction.analysis import SpotFindingParams
    from beamstream.streams.app import Pipeline, PipelineOptions
    from beamstream.streams.image_analysis import analyse_file, noop_analysis, timed_noop_analysis

    if args.summary_timeout < 0 or args.retries < 1 or args.retry_backoff < 0:
        raise BeamstreamError("--summary-timeout and --retry-backoff must be >= 0 and --retries >= 1")
    if args.simulated_analysis_time < 0 or args.simulated_analysis_time and args.analysis != "noop":
        raise BeamstreamError("--simulated-analysis-time must be >= 0 and needs --analysis noop")
    analysis = timed_noop_analysis(args.simulated_analysis_time) if args.simulated_analysis_time else noop_analysis
    if args.analysis == "real":
        from beamstream.diffraction.analysis import warm_up

        warm_up()  # compile the kernels before joining, not on the first image
        analysis = functools.partial(analyse_file, params=SpotFindingParams(backend=args.backend))
    options = PipelineOptions(summary_timeout_s=args.summary_timeout, retry_attempts=args.retries,
                              retry_backoff_s=args.retry_backoff, exactly_once=not args.at_least_once)
    return Pipeline(load_settings(), analysis, options)


def run(args: argparse.Namespace) -> int:
    """Run the worker until SIGTERM/SIGINT (exit 0) or until a stage fails (exit 1)."""
    from beamstream.platform import metrics

    level = getattr(logging, args.log_level.upper())
    pipeline = build_pipeline(args)
    port = metrics.metrics_port(args.metrics_port)
    if port is not None:
        metrics.serve(port)  # a daemon thread; it goes with the process
    configure_json_logging("worker", level, settings=pipeline.settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logging.getLogger("beamstream.worker").info("worker started", extra={
        "worker": pipeline.worker_id, "analysis": pipeline.analysis_name,
        "exactly_once": pipeline.options.exactly_once})
    return pipeline.start().run(stop)
