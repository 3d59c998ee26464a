"""What every long-running command shares: its ``--log-level``/``--metrics-port`` options, JSON logs and
metrics, and running its work until SIGINT/SIGTERM stops it cleanly instead of killing it mid-transaction."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry

from beamstream.cli.params import port_number
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import require_kafka
from beamstream.platform.logs import configure_json_logging
from beamstream.platform.settings import Settings

T = TypeVar("T")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_LEVELS = ("debug", "info", "warning")


def add_service_options(parser: argparse.ArgumentParser, log_level_default: str = "info") -> None:
    """The ``--log-level`` and ``--metrics-port`` options of a long-running service."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=log_level_default,
                        help=f"level of the JSON log lines on stderr (default {log_level_default})")
    parser.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (default: "
                        f"${metrics.METRICS_PORT_ENV}, else off)")


def start_service(args: argparse.Namespace, service: str, settings: Settings,
                  registry: CollectorRegistry = metrics.REGISTRY) -> None:
    """Check the service's options and the cluster, then start its JSON logs and ``/metrics``.

    ``args`` comes from a parser given :func:`add_service_options`. In order: the metrics port
    (``--metrics-port``, else ``BEAMSTREAM_METRICS_PORT``) is checked, Kafka must answer
    (:func:`require_kafka`: one line and exit 2 within seconds when it does not; a supervisor
    restarts the service, and once running a service rides out outages by retrying), then log lines
    go out as JSON tagged ``service`` at ``--log-level`` and ``/metrics`` serves ``registry`` when a
    port is set. So a bad option or an unreachable cluster is a one-line error from a service that did
    nothing.
    """
    port = metrics.metrics_port(args.metrics_port)
    require_kafka(settings)
    configure_json_logging(service, getattr(logging, args.log_level.upper()), settings=settings)
    if port is not None:
        metrics.serve(port, registry=registry)  # a daemon thread; it goes with the process


def run_stoppable(work: Callable[[threading.Event], T], stop: threading.Event | None = None) -> tuple[T, int | None]:
    """Run ``work(stop)`` until it returns; the first SIGINT/SIGTERM sets ``stop``, the same signal again
    interrupts (KeyboardInterrupt: the command exits 130 without waiting for the clean stop).

    ``stop`` is a new Event unless the service has one of its own (a connector's
    ``stop_event``) to be set. Returns the work's result and the number of the
    signal that stopped it (None when it finished on its own); the work's
    exceptions are re-raised. The work runs in a thread while the main thread
    only waits: a signal handler must not set an Event the interrupted thread
    might be holding the lock of, and the main thread here holds none.
    """
    stop = stop if stop is not None else threading.Event()
    received: list[int] = []
    outcome: dict[str, object] = {}

    def handler(signum: int, frame: object) -> None:
        # Only a repeat of the same signal means "give up waiting": Ctrl-C reaches the whole process group,
        # so a worker that `beamstream monitor` or `demo` started gets the terminal's SIGINT and then its
        # parent's SIGTERM, two senders asking once each, and must still finish its transaction cleanly.
        if signum in received:
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()

    def target() -> None:
        try:
            outcome["value"] = work(stop)
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        thread = threading.Thread(target=target, name="command-work", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"], (received[0] if received else None)  # type: ignore[return-value]
