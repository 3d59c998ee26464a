"""``beamstream monitor``: watch the analysis lag and dead letters; scale local workers between bounds."""

from __future__ import annotations

import argparse
import shlex
import sys

from beamstream.cli.params import non_negative_float, non_negative_int, positive_float, positive_int
from beamstream.cli.service import add_service_options, run_stoppable, start_service
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.settings import load_settings

EPILOG = """\
examples:
  beamstream monitor --min-workers 1 --max-workers 4
  beamstream monitor --max-workers 8 --worker-args "--analysis real --backend numba"
  beamstream monitor --observe-only --json        # Kubernetes/KEDA or Compose owns the workers

Every observation, scaling decision and warning is also published on the monitor topic
(Avro MonitorEvent), where the dashboard and other tools can read it.
"""


def register(subparsers) -> None:
    """Add the ``monitor`` command."""
    parser = subparsers.add_parser(
        "monitor",
        help="watch lag and dead letters; start and stop local workers between bounds",
        description="Every --interval seconds, measure the analysis workers' lag on the images topic, the "
        "arrival and completion rates and new dead letters. In local mode, start worker processes when the "
        "lag asks for more (one per --lag-per-worker images waiting, up to --max-workers), stop one when fewer "
        "would have done for --scale-down-after seconds, and restart workers that die. Warn when the lag keeps "
        "growing or dead letters appear. Stop with SIGTERM or Ctrl-C: the workers it started stop cleanly.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--min-workers", type=non_negative_int, default=1, metavar="N",
                        help="workers kept running (default 1)")
    parser.add_argument("--max-workers", type=positive_int, default=4, metavar="N",
                        help="most workers started (default 4; more than the images topic's partitions is waste)")
    parser.add_argument("--lag-per-worker", type=positive_int, default=200, metavar="IMAGES",
                        help="images waiting that justify one worker (default 200)")
    parser.add_argument("--scale-down-after", type=non_negative_float, default=30.0, metavar="SECONDS",
                        help="how long fewer workers must have sufficed before one is stopped (default 30)")
    parser.add_argument("--interval", type=positive_float, default=5.0, metavar="SECONDS",
                        help="seconds between observations (default 5)")
    parser.add_argument("--worker-args", default="", metavar="ARGS",
                        help="arguments for the workers it starts, as one quoted string, e.g. "
                        "\"--analysis noop\" (default: none, i.e. real analysis)")
    parser.add_argument("--observe-only", action="store_true",
                        help="manage no processes: report the group's members and the workers it would want")
    parser.add_argument("--json", action="store_true",
                        help="print each event as a JSON line (events go to stdout, logs to stderr)")
    add_service_options(parser, log_level_default="warning")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the monitor until SIGTERM/SIGINT."""
    from beamstream.operations.monitor import Monitor, event_line
    from beamstream.operations.scaling import ScalingPolicy

    try:
        worker_args = tuple(shlex.split(args.worker_args))
    except ValueError as exc:
        raise BeamstreamError(f"--worker-args: {exc}") from None
    policy = ScalingPolicy(min_workers=args.min_workers, max_workers=args.max_workers,
                           lag_per_worker=args.lag_per_worker, scale_down_after_s=args.scale_down_after)
    try:
        policy.check()  # each bound is checked by its option's type; this checks them together
    except ValueError as exc:
        raise BeamstreamError(str(exc)) from None
    settings = load_settings()
    start_service(args, "monitor", settings, metrics.MONITOR_REGISTRY)

    def emit(event: dict) -> None:
        print(event_line(event, args.json), flush=True)

    monitor = Monitor(settings, policy, interval_s=args.interval, observe_only=args.observe_only,
                      worker_args=worker_args, emit=emit)
    code, _signal = run_stoppable(monitor.run)
    sys.stdout.flush()
    return code
