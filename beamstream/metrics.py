"""Prometheus metrics: what the workers do, and what the dashboard sees on the topics.

Worker processes count their own work (``beamstream_worker_*``) and serve it with
:func:`serve` when ``--metrics-port`` / ``BEAMSTREAM_METRICS_PORT`` is set. The
dashboard process serves ``/metrics`` with the pipeline as seen on the topics
(``beamstream_topic_*``) and the workers' consumer lag. The names differ so that
scraping both never counts an image twice.

Every call here is cheap (a lock-free-ish counter update), so the hot path can call
it unconditionally, whether or not anybody serves the metrics.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Environment variable naming the worker's metrics port.
METRICS_PORT_ENV = "BEAMSTREAM_METRICS_PORT"

# Latency buckets around the one-second promise: fine below a second, coarse above.
_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_ANALYSIS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)

# -- worker side -----------------------------------------------------------------------
IMAGES_ANALYSED = Counter("beamstream_worker_images_analysed", "Images analysed and their result committed")
RESULT_LATENCY = Histogram("beamstream_worker_result_latency_seconds",
                           "From the image's arrival event to its result", buckets=_LATENCY_BUCKETS)
ANALYSIS_TIME = Histogram("beamstream_worker_analysis_seconds", "Spot finding and statistics time per image",
                          buckets=_ANALYSIS_BUCKETS)
DEAD_LETTERS = Counter("beamstream_worker_dead_letters", "Events sent to the dead-letter topic", ["error_type"])
SUMMARIES = Counter("beamstream_worker_summaries", "Collection summaries published")

# -- dashboard side (the pipeline as seen on the topics) ----------------------------------
TOPIC_EVENTS = Counter("beamstream_topic_events", "Committed events read by the dashboard", ["topic", "record_type"])
TOPIC_RESULT_LATENCY = Histogram("beamstream_topic_result_latency_seconds",
                                 "Image arrival to result, from the results topic", buckets=_LATENCY_BUCKETS)
CONSUMER_LAG = Gauge("beamstream_consumer_lag", "Events not yet committed by a consumer group", ["group", "topic"])


def image_analysed(latency_s: float, analysis_s: float) -> None:
    """One image analysed: its end-to-end latency and its analysis time, in seconds."""
    IMAGES_ANALYSED.inc()
    RESULT_LATENCY.observe(max(latency_s, 0.0))  # clocks of different hosts can disagree slightly
    ANALYSIS_TIME.observe(max(analysis_s, 0.0))


def dead_lettered(error_type: str) -> None:
    """One event dead-lettered, by the error's type."""
    DEAD_LETTERS.labels(error_type=error_type or "unknown").inc()


def summary_published() -> None:
    """One collection summary published."""
    SUMMARIES.inc()


def metrics_port(option: int | None = None) -> int | None:
    """The worker's metrics port: the option if given, else ``BEAMSTREAM_METRICS_PORT``, else None (off)."""
    if option is not None:
        return option
    raw = os.environ.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        from beamstream.errors import BeamstreamError

        raise BeamstreamError(f"{METRICS_PORT_ENV}: expected a port number, got {raw!r}")
    return int(raw)


def serve(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread (the worker's own process)."""
    start_http_server(port, addr=host, registry=registry)
