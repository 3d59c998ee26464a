"""The dashboard's feed: a background read_committed consumer folding the topics into the view.

It reads every retained record from the beginning on start (its group id is its own
and it never commits), so a restarted dashboard shows the same picture. It counts
the records of every topic it reads for their rates, and measures the consumer
groups' lag every few seconds, for the page and for ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from confluent_kafka import KafkaException

from beamstream.dashboard.view import DashboardView
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import make_consumer
from beamstream.platform.lag import GroupLag
from beamstream.platform.settings import Settings
from beamstream.platform.topics import group_name, topic_name
from beamstream.schemas.serde import SerdeError, make_serde

log = logging.getLogger(__name__)

#: The logical topics the view is folded from.
FEED_TOPICS = ("collections", "results", "announce", "summaries", "heartbeats", "deadletter",
               "deadletter-resolved", "monitor")
#: Topics only counted, for their message rate (image events say nothing the results don't).
RATE_ONLY_TOPICS = ("images",)
#: (consumer group, topic) pairs whose lag the page shows: the work waiting at each stage.
LAG_WATCH = (("analysis", "images"), ("collect", "results"), ("collect", "collections"),
             ("ispyb-sink", "results"), ("ispyb-sink", "summaries"), ("archiver", "collections"))
#: How often the lags are measured (each costs a few admin and watermark requests).
LAG_INTERVAL_S = 10.0


class Feed:
    """Consumes :data:`FEED_TOPICS` in a daemon thread into ``view`` until :meth:`stop`; measures the
    lags of :data:`LAG_WATCH` in another."""

    def __init__(self, settings: Settings, view: DashboardView) -> None:
        self.settings, self.view = settings, view
        self.serde = make_serde(settings.schema_registry_url)
        self.topics = {topic_name(settings, t): t for t in FEED_TOPICS + RATE_ONLY_TOPICS}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name="dashboard-feed", daemon=True),
                         threading.Thread(target=self._run_lag, name="dashboard-lag", daemon=True)]
        self.undecodable = 0

    def start(self) -> Feed:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.1))

    def _run(self) -> None:
        consumer = make_consumer(self.settings, f"{self.settings.topic_prefix}dashboard-{uuid.uuid4().hex[:12]}")
        consumer.subscribe(list(self.topics))
        try:
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    self._fold(message)
        except Exception:  # the page must say the feed died rather than silently freeze
            log.exception("dashboard feed stopped")
            raise
        finally:
            consumer.close()

    def _run_lag(self) -> None:
        # Its own clients: offset queries on the feed's consumer wait behind its fetches (up to
        # fetch.wait.max.ms each), which made one round take longer than the interval and starved
        # the feed. This consumer never subscribes, so it never fetches.
        lag = GroupLag(self.settings)
        try:
            # The first round waits a full interval: nothing lags at start-up.
            while not self._stop.wait(LAG_INTERVAL_S):
                self._measure_lag(lag)
        finally:
            lag.close()

    def _fold(self, message) -> None:
        logical = self.topics[message.topic()]
        _kind, timestamp_ms = message.timestamp()
        self.view.count(logical, timestamp_ms / 1000 if timestamp_ms > 0 else time.time())
        if message.value() is None or logical in RATE_ONLY_TOPICS:
            return  # a tombstone on a compacted topic, or only counted
        try:
            decoded = self.serde.decode(message.value(), message.topic())
        except SerdeError:
            # Not ours to judge: the workers dead-letter what they cannot read; the view skips it.
            self.undecodable += 1
            log.debug("undecodable record on %s@%s", message.topic(), message.offset())
            return
        metrics.TOPIC_EVENTS.labels(topic=logical, record_type=decoded.name).inc()
        if decoded.name == "ImageResult":
            value = decoded.value
            metrics.TOPIC_RESULT_LATENCY.observe(max((value["result_time"] - value["event_time"]).total_seconds(), 0))
        self.view.apply(logical, decoded.name, decoded.value, message.partition(), message.offset(), message.key())

    def _measure_lag(self, lag: GroupLag) -> None:
        """Each watched group's lag on its topic (events not yet committed, summed over partitions)."""
        for logical_group, logical_topic in LAG_WATCH:
            if self._stop.is_set():
                return
            group, topic = group_name(self.settings, logical_group), topic_name(self.settings, logical_topic)
            try:
                progress = lag.progress(group, topic)
            except (KafkaException, TimeoutError, KeyError) as exc:
                log.debug("lag not measured: %s", exc)
                continue
            except Exception:  # a metric is never worth stopping the feed for
                log.debug("lag not measured", exc_info=True)
                continue
            metrics.CONSUMER_LAG.labels(group=group, topic=topic).set(progress.lag)
            self.view.record_lag(logical_group, logical_topic, progress.lag, progress.members, time.time())
