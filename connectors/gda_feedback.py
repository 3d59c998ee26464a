"""Per-image results straight back to the beamline as GDA's legacy UDP datagrams.

``PIA:{dcid}:{image}:{spot_total}:{good_bragg}:{method1_res}:{total_signal}``, one
per result, as Diamond's GDA listens for. UDP is fire-and-forget, so the consumer
commits after sending (at least once); GDA keeps the latest value per image.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from confluent_kafka import Message, TopicPartition

from beamstream.engine.stage import Processor, Stage
from beamstream.engine.transactions import Output
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.retained import offset_bounds
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.serde import SerdeError, make_serde

log = logging.getLogger(__name__)


def pia_datagram(result: dict) -> bytes:
    """The PIA datagram for an ImageResult value; a missing resolution is sent as 0."""
    method1 = result.get("d_min_distl_method_1")
    return (
        f"PIA:{result['dcid']}:{result['image_number']}:{result['n_spots_total']}:"
        f"{result['n_spots_no_ice']}:{method1 if method1 is not None else 0:.2f}:"
        f"{result['total_intensity']:.0f}"
    ).encode()


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` to a tuple, with a clear error naming the bad value."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BeamstreamError(f"expected HOST:PORT for the GDA listener, got {text!r}")
    return host, int(port)


class GdaFeedback:
    """Consumes results and sends a PIA datagram for each to GDA (on the engine, at least once: UDP
    cannot be part of a Kafka transaction)."""

    def __init__(self, settings: Settings, address: tuple[str, int], group_id: str | None = None,
                 from_beginning: bool = False) -> None:
        self.settings = settings
        self.group_id = group_id or f"{settings.topic_prefix}gda-feedback"
        # A fresh group starting from the earliest result replays a whole history;
        # the service's own group resumes where it stopped, new results only at first start.
        offset_reset = "latest"
        if from_beginning:
            self.group_id += f"-{uuid.uuid4().hex[:8]}"
            offset_reset = "earliest"
        self.processor = FeedbackProcessor(settings, address)
        self.stage = Stage(settings, self.group_id, [self.processor.topic], self.processor, name="gda-feedback",
                           exactly_once=False, consumer_config={"auto.offset.reset": offset_reset})
        if not from_beginning:
            self.processor.on_assigned = self._pin_start
        self.stop_event = self.stage.stop_requested

    def _pin_start(self, partitions: list[TopicPartition]) -> None:
        """Commit the end of every assigned partition the group has never committed.

        "New results only" must mean from the first start, not from every rejoin: a partition that got no
        result yet would otherwise start from its latest offset again after each rebalance, skipping what
        arrived while it was unowned (seen after a broker outage)."""
        consumer = self.stage.consumer
        unstarted = [tp for tp in consumer.committed(partitions, timeout=30) if tp.offset < 0]
        if unstarted:
            bounds = offset_bounds(consumer, self.processor.topic, [tp.partition for tp in unstarted])
            consumer.commit(offsets=[TopicPartition(self.processor.topic, partition, end)
                                     for partition, (_, end) in bounds.items()], asynchronous=False)

    @property
    def sent(self) -> int:
        """Datagrams sent since the start."""
        return self.processor.sent

    def run(self, max_messages: int | None = None, idle_timeout_s: float | None = None) -> int:
        """Forward results until stopped (or ``max_messages`` sent / idle for ``idle_timeout_s``)."""
        self.processor.enough = (lambda: self.sent >= max_messages) if max_messages is not None else None
        self.processor.stop = self.stop_event
        try:
            self.stage.run(idle_timeout_s)
        finally:
            self.processor.close()
        return self.sent


class FeedbackProcessor(Processor):
    """One PIA datagram per decodable result."""

    def __init__(self, settings: Settings, address: tuple[str, int]) -> None:
        self.address = address
        self.serde = make_serde(settings.schema_registry_url)
        self.topic = topic_name(settings, "results")
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sent = 0
        self.enough: Callable[[], bool] | None = None
        self.stop: threading.Event | None = None
        self.on_assigned: Callable[[list[TopicPartition]], None] | None = None

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Partitions were assigned: ``on_assigned`` pins where a new group starts."""
        if self.on_assigned is not None:
            self.on_assigned(partitions)

    def process(self, messages: list[Message]) -> list[Output]:
        """Send a datagram per result; nothing goes back to Kafka."""
        for message in messages:
            metrics.feedback_result_consumed()
            try:
                result = self.serde.decode(message.value(), self.topic, "ImageResult").value
            except SerdeError as exc:
                # Not ours to dead-letter: the workers own the results topic's contract.
                log.warning("skipping undecodable result: %s", exc)
                metrics.feedback_skipped(type(exc).__name__)
                continue
            self.socket.sendto(pia_datagram(result), self.address)
            self.sent += 1
            metrics.datagram_sent((datetime.now(UTC) - result["event_time"]).total_seconds())
        if self.enough is not None and self.stop is not None and self.enough():
            self.stop.set()
        return []

    def close(self) -> None:
        """Close the socket."""
        self.socket.close()
