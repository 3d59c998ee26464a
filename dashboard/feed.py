"""The dashboard's feed: a background read_committed consumer folding the topics into the view.

It reads every retained record from the beginning on start (its group id is its own
and it never commits), so a restarted dashboard shows the same picture. It also
measures the workers' consumer lag on the images topic every few seconds for
``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

from beamstream import metrics
from beamstream.kafka_clients import make_admin, make_consumer
from beamstream.settings import Settings
from beamstream.topics import topic_name
from dashboard.view import DashboardView
from schemas.serde import SerdeError, make_serde

log = logging.getLogger(__name__)

#: The logical topics the view is folded from.
FEED_TOPICS = ("collections", "results", "announce", "summaries", "heartbeats", "deadletter",
               "deadletter-resolved")
#: How often the workers' lag is measured (it costs a few admin and watermark requests).
LAG_INTERVAL_S = 10.0


class Feed:
    """Consumes :data:`FEED_TOPICS` in a daemon thread into ``view`` until :meth:`stop`."""

    def __init__(self, settings: Settings, view: DashboardView) -> None:
        self.settings, self.view = settings, view
        self.serde = make_serde(settings.schema_registry_url)
        self.topics = {topic_name(settings, t): t for t in FEED_TOPICS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)
        self.undecodable = 0
        self._admin = None  # made once: a client per measurement would leave librdkafka handles to the GC

    def start(self) -> Feed:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        consumer = make_consumer(self.settings, f"{self.settings.topic_prefix}dashboard-{uuid.uuid4().hex[:12]}")
        consumer.subscribe(list(self.topics))
        # The first measurement waits a full interval: nothing lags at start-up, and a librdkafka admin
        # request racing a process launch elsewhere in this process has crashed it (seen with Playwright).
        next_lag = time.monotonic() + LAG_INTERVAL_S
        try:
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    self._fold(message)
                if time.monotonic() >= next_lag:
                    next_lag = time.monotonic() + LAG_INTERVAL_S
                    self._measure_lag(consumer)
        except Exception:  # the page must say the feed died rather than silently freeze
            log.exception("dashboard feed stopped")
            raise
        finally:
            consumer.close()
            self._admin = None  # released here, in this thread, rather than whenever the GC gets to it

    def _fold(self, message) -> None:
        logical = self.topics[message.topic()]
        if message.value() is None:
            return  # a tombstone on a compacted topic
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

    def _measure_lag(self, consumer) -> None:
        """The workers' group lag on the images topic: end offsets minus committed offsets, summed."""
        group = f"{self.settings.topic_prefix}workers"
        images = topic_name(self.settings, "images")
        try:
            if self._admin is None:
                self._admin = make_admin(self.settings)
            future = self._admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                       request_timeout=5)[group]
            committed = {tp.partition: tp.offset for tp in future.result(5).topic_partitions
                         if tp.topic == images}
            lag = 0
            for partition, offset in committed.items():
                _low, high = consumer.get_watermark_offsets(TopicPartition(images, partition), timeout=2)
                lag += max(high - max(offset, 0), 0)
            metrics.CONSUMER_LAG.labels(group=group, topic=images).set(lag)
        except (KafkaException, TimeoutError, KeyError) as exc:
            log.debug("lag not measured: %s", exc)
        except Exception:  # a metric is never worth stopping the feed for
            log.debug("lag not measured", exc_info=True)
