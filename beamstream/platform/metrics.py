"""Prometheus metrics: what the workers do, and what the dashboard sees on the topics.

Worker processes count their own work (``beamstream_worker_*``) and serve it with
:func:`serve` when ``--metrics-port`` / ``BEAMSTREAM_METRICS_PORT`` is set. The
dashboard process serves ``/metrics`` with the pipeline as seen on the topics
(``beamstream_topic_*``) and the workers' consumer lag. The names differ so that
scraping both never counts an image twice.

The sinks (``beamstream_ispyb_sink_*``, ``beamstream_archiver_*``,
``beamstream_feedback_*``), the Bluesky bridge (``beamstream_bluesky_bridge_*``) and the
process monitor (``beamstream_monitor_*``) each keep their metrics in a registry of their own
(:data:`ISPYB_SINK_REGISTRY`, ...), so a service's ``/metrics`` lists its own work and its process, not other
services' counters stuck at zero.

Every call here is cheap (a lock-free-ish counter update), so the hot path can call
it unconditionally, whether or not anybody serves the metrics.
"""

from __future__ import annotations

import os

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

#: Environment variable naming a service's metrics port (worker, ispyb-sink, archiver, feedback, monitor).
METRICS_PORT_ENV = "BEAMSTREAM_METRICS_PORT"

# Latency buckets around the one-second promise: fine below a second, coarse above.
_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_ANALYSIS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
# A database batch takes milliseconds when healthy and seconds when the server struggles.
_DATABASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Archiving hashes a whole collection: seconds for a grid scan, minutes for 20,000 images.
_ARCHIVE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# -- worker side -----------------------------------------------------------------------
IMAGES_ANALYSED = Counter("beamstream_worker_images_analysed", "Images analysed and their result committed")
RESULT_LATENCY = Histogram("beamstream_worker_result_latency_seconds",
                           "From the image's arrival event to its result", buckets=_LATENCY_BUCKETS)
ANALYSIS_TIME = Histogram("beamstream_worker_analysis_seconds", "Spot finding and statistics time per image",
                          buckets=_ANALYSIS_BUCKETS)
DEAD_LETTERS = Counter("beamstream_worker_dead_letters", "Events sent to the dead-letter topic", ["error_type"])
SUMMARIES = Counter("beamstream_worker_summaries", "Collection summaries published")
DUPLICATE_IMAGES = Counter("beamstream_worker_duplicate_images",
                           "Image events skipped: their image was already answered for the same collection and job")

# -- dashboard side (the pipeline as seen on the topics) ----------------------------------
TOPIC_EVENTS = Counter("beamstream_topic_events", "Committed events read by the dashboard", ["topic", "record_type"])
TOPIC_RESULT_LATENCY = Histogram("beamstream_topic_result_latency_seconds",
                                 "Image arrival to result, from the results topic", buckets=_LATENCY_BUCKETS)
CONSUMER_LAG = Gauge("beamstream_consumer_lag", "Events not yet committed by a consumer group", ["group", "topic"])

# -- every service: log records that could not be shipped to the log topic --------------------
# Registered in the default registry and in each sink's, so every /metrics shows it.
LOG_RECORDS_DROPPED = Counter("beamstream_log_records_dropped",
                              "Log records not shipped to the log topic (queue full, Kafka unreachable)", ["reason"],
                              registry=REGISTRY)


# -- producers with a spool (watch, simulate, the acquisition-system API): what Kafka does not have yet --------
SPOOL_EVENTS = Gauge("beamstream_producer_spool_events", "Events in the local spool, not yet committed to Kafka",
                     ["spool"], registry=REGISTRY)
SPOOL_BATCHES = Gauge("beamstream_producer_spool_batches", "Batches (one transaction each) in the local spool",
                      ["spool"], registry=REGISTRY)
SPOOL_OLDEST_AGE = Gauge("beamstream_producer_spool_oldest_age_seconds",
                         "Age of the oldest batch in the local spool (0 when empty)", ["spool"], registry=REGISTRY)
PRODUCER_CONNECTED = Gauge("beamstream_producer_kafka_connected", "1 while the spool's publisher reaches Kafka",
                           ["spool"], registry=REGISTRY)


def spool_backlog(spool: str, batches: int, events: int, oldest_age_s: float | None, connected: bool) -> None:
    """A spool's backlog now, and whether its publisher reaches Kafka."""
    SPOOL_EVENTS.labels(spool=spool).set(events)
    SPOOL_BATCHES.labels(spool=spool).set(batches)
    SPOOL_OLDEST_AGE.labels(spool=spool).set(oldest_age_s or 0.0)
    PRODUCER_CONNECTED.labels(spool=spool).set(1 if connected else 0)

def _service_registry() -> CollectorRegistry:
    """A registry for one service: its own metrics, the process's (CPU, memory, GC) and the log shipper's."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, LOG_RECORDS_DROPPED):
        registry.register(collector)
    return registry


# -- ISPyB sink -------------------------------------------------------------------------
ISPYB_SINK_REGISTRY = _service_registry()
SINK_EVENTS = Counter("beamstream_ispyb_sink_events_consumed",
                      "Messages whose offsets the sink committed, by logical topic", ["topic"],
                      registry=ISPYB_SINK_REGISTRY)
SINK_ROWS = Counter("beamstream_ispyb_sink_rows_written",
                    "Results (ImageQualityIndicators rows) and summaries (AutoProcProgram) stored", ["kind"],
                    registry=ISPYB_SINK_REGISTRY)
SINK_BATCH_TIME = Histogram("beamstream_ispyb_sink_batch_seconds", "Database write time of one committed batch",
                            buckets=_DATABASE_BUCKETS, registry=ISPYB_SINK_REGISTRY)
SINK_OUTAGES = Counter("beamstream_ispyb_sink_outages",
                       "Database attempts that failed for an outage (consumption paused, batch retried)",
                       registry=ISPYB_SINK_REGISTRY)
SINK_DEAD_LETTERS = Counter("beamstream_ispyb_sink_dead_letters", "Messages the sink sent to the dead-letter topic",
                            ["error_type"], registry=ISPYB_SINK_REGISTRY)
SINK_RESULT_LATENCY = Histogram("beamstream_ispyb_sink_result_latency_seconds",
                                "From the image's arrival event to its row committed in ISPyB",
                                buckets=_LATENCY_BUCKETS, registry=ISPYB_SINK_REGISTRY)

# -- archiver ----------------------------------------------------------------------------
ARCHIVER_REGISTRY = _service_registry()
ARCHIVER_EVENTS = Counter("beamstream_archiver_events_consumed",
                          "Collection events handled, by record type (an aborted transaction's are handled again)",
                          ["record_type"], registry=ARCHIVER_REGISTRY)
ARCHIVED = Counter("beamstream_archiver_collections_archived", "Collections archived (ArchiveComplete committed)",
                   registry=ARCHIVER_REGISTRY)
ARCHIVE_SKIPPED = Counter("beamstream_archiver_collections_skipped", "Collection ends skipped as already archived",
                          registry=ARCHIVER_REGISTRY)
ARCHIVER_DEAD_LETTERS = Counter("beamstream_archiver_dead_letters",
                                "Collection events the archiver sent to the dead-letter topic", ["error_type"],
                                registry=ARCHIVER_REGISTRY)
ARCHIVE_TIME = Histogram("beamstream_archiver_manifest_seconds",
                         "Time to build (hash every file) and write one collection's manifest",
                         buckets=_ARCHIVE_BUCKETS, registry=ARCHIVER_REGISTRY)
ARCHIVE_LATENCY = Histogram("beamstream_archiver_latency_seconds",
                            "From the CollectionEnded event to its ArchiveComplete committed",
                            buckets=_ARCHIVE_BUCKETS, registry=ARCHIVER_REGISTRY)

# -- GDA feedback ------------------------------------------------------------------------
FEEDBACK_REGISTRY = _service_registry()
FEEDBACK_EVENTS = Counter("beamstream_feedback_results_consumed", "Results read from the results topic",
                          registry=FEEDBACK_REGISTRY)
FEEDBACK_SENT = Counter("beamstream_feedback_datagrams_sent", "PIA datagrams sent to GDA", registry=FEEDBACK_REGISTRY)
# Feedback does not dead-letter (the workers own the results topic's contract); it skips and counts.
FEEDBACK_SKIPPED = Counter("beamstream_feedback_results_skipped", "Results skipped because they did not decode",
                           ["error_type"], registry=FEEDBACK_REGISTRY)
FEEDBACK_LATENCY = Histogram("beamstream_feedback_latency_seconds",
                             "From the image's arrival event to its PIA datagram sent",
                             buckets=_LATENCY_BUCKETS, registry=FEEDBACK_REGISTRY)

# -- Bluesky bridge ----------------------------------------------------------------------
BLUESKY_BRIDGE_REGISTRY = _service_registry()
BRIDGE_DOCUMENTS = Counter("beamstream_bluesky_bridge_documents_consumed",
                           "Bluesky documents whose offsets the bridge committed, by document name",
                           ["document"], registry=BLUESKY_BRIDGE_REGISTRY)
BRIDGE_EVENTS = Counter("beamstream_bluesky_bridge_events_produced",
                        "Beamstream events the bridge committed, by record type", ["record_type"],
                        registry=BLUESKY_BRIDGE_REGISTRY)
BRIDGE_DEAD_LETTERS = Counter("beamstream_bluesky_bridge_dead_letters",
                              "Document messages the bridge sent to the dead-letter topic", ["error_type"],
                              registry=BLUESKY_BRIDGE_REGISTRY)

# -- process monitor ---------------------------------------------------------------------
MONITOR_REGISTRY = _service_registry()
MONITOR_WORKERS = Gauge("beamstream_monitor_workers", "Analysis workers now (local: started; observe-only: members)",
                        registry=MONITOR_REGISTRY)
MONITOR_TARGET = Gauge("beamstream_monitor_target_workers", "Analysis workers the scaling policy wants",
                       registry=MONITOR_REGISTRY)
MONITOR_LAG = Gauge("beamstream_monitor_lag", "Image events not yet committed by the analysis group",
                    registry=MONITOR_REGISTRY)
MONITOR_ARRIVAL = Gauge("beamstream_monitor_arrival_rate_hz", "Image events arriving per second",
                        registry=MONITOR_REGISTRY)
MONITOR_COMPLETION = Gauge("beamstream_monitor_completion_rate_hz", "Image events committed per second",
                           registry=MONITOR_REGISTRY)
MONITOR_DEAD_LETTERS = Counter("beamstream_monitor_dead_letters_seen", "Dead letters seen appearing",
                               registry=MONITOR_REGISTRY)
MONITOR_EVENTS = Counter("beamstream_monitor_events", "Monitor events published, by kind and code",
                         ["kind", "code"], registry=MONITOR_REGISTRY)


def monitor_observed(workers: int, target: int, lag: int, arrival_hz: float, completion_hz: float,
                     new_dead_letters: int) -> None:
    """One observation of the process monitor: the pool, the lag, the rates, new dead letters."""
    MONITOR_WORKERS.set(workers)
    MONITOR_TARGET.set(target)
    MONITOR_LAG.set(lag)
    MONITOR_ARRIVAL.set(arrival_hz)
    MONITOR_COMPLETION.set(completion_hz)
    MONITOR_DEAD_LETTERS.inc(new_dead_letters)


def monitor_event(kind: str, code: str) -> None:
    """One MonitorEvent published (``decision``/``scale_up``, ``warning``/``lag_growing``, ...)."""
    MONITOR_EVENTS.labels(kind=kind, code=code).inc()


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


def duplicate_image() -> None:
    """One image event skipped as a copy of one already answered."""
    DUPLICATE_IMAGES.inc()


def _seconds(latency_s: float) -> float:
    return max(latency_s, 0.0)  # clocks of different hosts can disagree slightly


def sink_batch_committed(topics: dict[str, int], results: int, summaries: int, write_s: float,
                         result_latencies_s: list[float]) -> None:
    """One ISPyB sink batch committed: messages per logical topic, rows stored, its database write time,
    and the arrival-to-stored latency of each result stored."""
    for topic, count in topics.items():
        SINK_EVENTS.labels(topic=topic).inc(count)
    SINK_ROWS.labels(kind="result").inc(results)
    SINK_ROWS.labels(kind="summary").inc(summaries)
    SINK_BATCH_TIME.observe(_seconds(write_s))
    for latency in result_latencies_s:
        SINK_RESULT_LATENCY.observe(_seconds(latency))


def sink_outage() -> None:
    """One ISPyB write that failed because the database was unavailable."""
    SINK_OUTAGES.inc()


def sink_dead_lettered(error_type: str) -> None:
    """One message dead-lettered by the ISPyB sink, by the error's type."""
    SINK_DEAD_LETTERS.labels(error_type=error_type or "unknown").inc()


def archiver_event(record_type: str) -> None:
    """One collections-topic event handled by the archiver (``undecodable`` when it did not decode)."""
    ARCHIVER_EVENTS.labels(record_type=record_type).inc()


def collection_archived(latency_s: float, manifest_s: float) -> None:
    """One ArchiveComplete committed: seconds since the collection ended, and its manifest's build time."""
    ARCHIVED.inc()
    ARCHIVE_LATENCY.observe(_seconds(latency_s))
    ARCHIVE_TIME.observe(_seconds(manifest_s))


def archive_skipped() -> None:
    """One collection end skipped because it was archived already."""
    ARCHIVE_SKIPPED.inc()


def archiver_dead_lettered(error_type: str) -> None:
    """One collection event dead-lettered by the archiver, by the error's type."""
    ARCHIVER_DEAD_LETTERS.labels(error_type=error_type or "unknown").inc()


def feedback_result_consumed() -> None:
    """One result read by the GDA feedback service."""
    FEEDBACK_EVENTS.inc()


def datagram_sent(latency_s: float) -> None:
    """One PIA datagram sent, ``latency_s`` after its image arrived."""
    FEEDBACK_SENT.inc()
    FEEDBACK_LATENCY.observe(_seconds(latency_s))


def feedback_skipped(error_type: str) -> None:
    """One result the feedback service skipped, by the error's type."""
    FEEDBACK_SKIPPED.labels(error_type=error_type or "unknown").inc()


def bridge_committed(documents: dict[str, int], events: dict[str, int], dead_letters: dict[str, int]) -> None:
    """One committed batch of the Bluesky bridge: documents by name, events by record type, dead letters by
    error type."""
    for name, count in documents.items():
        BRIDGE_DOCUMENTS.labels(document=name).inc(count)
    for record_type, count in events.items():
        BRIDGE_EVENTS.labels(record_type=record_type).inc(count)
    for error_type, count in dead_letters.items():
        BRIDGE_DEAD_LETTERS.labels(error_type=error_type or "unknown").inc(count)


def log_record_dropped(reason: str) -> None:
    """One log record not shipped to the log topic (``queue_full``, ``delivery_failed``, ``error``)."""
    LOG_RECORDS_DROPPED.labels(reason=reason).inc()


def metrics_port(option: int | None = None) -> int | None:
    """The service's metrics port: the option if given, else ``BEAMSTREAM_METRICS_PORT``, else None (off)."""
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
    """Serve ``/metrics`` on ``host:port`` from a daemon thread (the service's own process).

    A port that cannot be bound (in use, privileged) is a one-line :class:`BeamstreamError`.
    """
    try:
        start_http_server(port, addr=host, registry=registry)
    except (OSError, OverflowError) as exc:  # in use or privileged; OverflowError: beyond 65535
        from beamstream.errors import BeamstreamError

        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BeamstreamError(f"cannot serve metrics on {host}:{port}: {reason}") from None
