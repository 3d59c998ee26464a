"""``beamstream worker``: one analysis worker process (start as many as you like)."""

from __future__ import annotations

import argparse
import functools
import logging

from beamstream.cli.params import non_negative_float, positive_float, positive_int
from beamstream.cli.service import add_service_options, run_stoppable, start_service
from beamstream.errors import BeamstreamError
from beamstream.platform.processes import available_cores
from beamstream.platform.settings import Settings, load_settings
from beamstream.streams.answered_images import DEFAULT_RETENTION_S

log = logging.getLogger(__name__)


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
    parser.add_argument("--simulated-analysis-time", type=non_negative_float, default=0.0, metavar="SECONDS",
                        help="with --analysis noop: take this long per image (sleeping, no CPU), to try "
                        "scaling and latency with a realistic analysis time (default 0)")
    parser.add_argument("--backend", choices=("numba", "numpy", "dials"), default="numba",
                        help="spot-finding implementation (default numba)")
    parser.add_argument("--summary-timeout", type=non_negative_float, default=60.0, metavar="SECONDS",
                        help="after a collection ends, how long to wait for missing images (default 60)")
    parser.add_argument("--retries", type=positive_int, default=3, metavar="N",
                        help="tries per image before it goes to the dead-letter topic (default 3)")
    parser.add_argument("--retry-backoff", type=non_negative_float, default=0.5, metavar="SECONDS",
                        help="first retry delay, doubled each retry (default 0.5)")
    parser.add_argument("--threads", type=positive_int, default=available_cores(), metavar="N",
                        help="images analysed at once, each on its own thread (default: the cores available "
                        f"to this process, {available_cores()} here)")
    parser.add_argument("--stall-limit", type=positive_float, default=60.0, metavar="SECONDS",
                        help="a Kafka commit blocked this long makes the worker exit with code 75 for its "
                        "supervisor to restart it (default 60)")
    parser.add_argument("--answered-retention", type=positive_float, default=DEFAULT_RETENTION_S, metavar="SECONDS",
                        help="how long after its last answer a collection's answered images are remembered, so "
                        "a copy of an image event published again (a producer's spool after a crash) gets no "
                        f"second result (default {DEFAULT_RETENTION_S:.0f}, three days)")
    parser.add_argument("--at-least-once", action="store_true",
                        help="turn exactly-once processing off (only to measure its cost; results may "
                        "then be duplicated after a crash)")
    add_service_options(parser)
    parser.set_defaults(func=run)


def build_worker(args: argparse.Namespace, settings: Settings):
    """The Worker the arguments describe (separate from running it, for tests and the demo)."""
    from beamstream.diffraction.analysis import SpotFindingParams
    from beamstream.streams.analysers import analyse_file, noop_analysis, timed_noop_analysis
    from beamstream.streams.worker import Worker, WorkerOptions

    analyser = timed_noop_analysis(args.simulated_analysis_time) if args.simulated_analysis_time else noop_analysis
    if args.analysis == "real":
        from beamstream.diffraction.analysis import warm_up

        warm_up()  # compile the kernels before joining, not on the first image
        analyser = functools.partial(analyse_file, params=SpotFindingParams(backend=args.backend))
    options = WorkerOptions(summary_timeout_s=args.summary_timeout, retry_attempts=args.retries,
                            retry_backoff_s=args.retry_backoff, exactly_once=not args.at_least_once,
                            threads=args.threads, stall_limit_s=args.stall_limit,
                            answered_retention_s=args.answered_retention)
    return Worker(settings, analyser, options)


def run(args: argparse.Namespace) -> int:
    """Run the worker until SIGTERM/SIGINT (exit 0) or until a stage fails (exit 1)."""
    if args.simulated_analysis_time and args.analysis != "noop":
        raise BeamstreamError("--simulated-analysis-time needs --analysis noop")
    settings = load_settings()
    # Before the kernels' warm-up (seconds): an unreachable cluster is said at once.
    start_service(args, "worker", settings)
    worker = build_worker(args, settings)
    log.info("worker started", extra={"worker": worker.worker_id, "analysis": worker.analysis_kind,
                                      "threads": worker.options.threads, "exactly_once": worker.options.exactly_once})
    # The stages start under the runner's signal handlers: a SIGTERM from then on is a clean stop.
    code, _signal = run_stoppable(lambda stop: worker.start().run(stop))
    return code
