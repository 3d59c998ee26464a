"""Per-image results straight back to the beamline as GDA's legacy UDP datagrams.

``PIA:{dcid}:{image}:{spot_total}:{good_bragg}:{method1_res}:{total_signal}``, one
per result, as Diamond's GDA listens for. UDP is fire-and-forget, so the consumer
commits after sending (at least once); GDA keeps the latest value per image.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import uuid
from datetime import UTC, datetime

from beamstream.schemas.serde import SerdeError, make_serde

from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import make_consumer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name

log = logging.getLogger("beamstream.gda_feedback")


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
    """Consumes results and sends a PIA datagram for each to GDA."""

    def __init__(self, settings: Settings, address: tuple[str, int], group_id: str | None = None,
                 from_beginning: bool = False) -> None:
        self.settings = settings
        self.address = address
        self.serde = make_serde(settings.schema_registry_url)
        self.topic = topic_name(settings, "results")
        self.group_id = group_id or f"{settings.topic_prefix}gda-feedback"
        # A fresh group starting from the earliest result replays a whole history;
        # the service's own group resumes where it stopped, new results only at first start.
        self.offset_reset = "latest"
        if from_beginning:
            self.group_id += f"-{uuid.uuid4().hex[:8]}"
            self.offset_reset = "earliest"
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self, max_messages: int | None = None, idle_timeout_s: float | None = None) -> int:
        """Forward results until stopped (or ``max_messages`` sent / idle for ``idle_timeout_s``)."""
        consumer = make_consumer(self.settings, self.group_id, offset_reset=self.offset_reset)
        consumer.subscribe([self.topic])
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        idle = 0.0
        try:
            while not self.stop_event.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error():
                    idle += 0.5
                    if idle_timeout_s is not None and idle >= idle_timeout_s:
                        break
                    continue
                idle = 0.0
                metrics.feedback_result_consumed()
                try:
                    result = self.serde.decode(message.value(), self.topic, "ImageResult").value
                except SerdeError as exc:
                    # Not ours to dead-letter: the workers own the results topic's contract.
                    log.warning("skipping undecodable result: %s", exc)
                    metrics.feedback_skipped(type(exc).__name__)
                    continue
                sock.sendto(pia_datagram(result), self.address)
                self.sent += 1
                metrics.datagram_sent((datetime.now(UTC) - result["event_time"]).total_seconds())
                consumer.commit(message, asynchronous=True)
                if max_messages is not None and self.sent >= max_messages:
                    break
        finally:
            consumer.close()
            sock.close()
        return self.sent

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
