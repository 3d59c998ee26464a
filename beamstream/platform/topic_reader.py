"""Follow topics live: decoded events read_committed on a background thread (the demo's view of its
collection; the tests' and benchmarks' eyes on the pipeline)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

from beamstream.platform.kafka_clients import make_consumer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.serde import make_serde


class TopicReader:
    """Reads decoded events from topics in a background thread with read_committed."""

    def __init__(self, settings: Settings, logical_topics: list[str], raw_topics: list[str] = ()) -> None:
        self.serde = make_serde(settings.schema_registry_url)
        self.records: dict[str, list[tuple[str, dict]]] = defaultdict(list)  # topic -> [(type, value)]
        self.received_at: dict[str, list[float]] = defaultdict(list)  # topic -> epoch seconds, same order
        self.raw: dict[str, list[tuple[bytes, bytes | None]]] = defaultdict(list)
        self.topics = {topic_name(settings, t): t for t in logical_topics}
        self._raw_topics = list(raw_topics)
        # Under the prefix like every group of a deployment (prefix ACLs in scram mode).
        self._consumer = make_consumer(settings, f"{settings.topic_prefix}test-reader-{uuid.uuid4().hex}")
        self._consumer.subscribe(list(self.topics) + self._raw_topics)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.2)
            if message is None or message.error():
                continue
            with self._lock:
                if message.topic() in self._raw_topics:
                    self.raw[message.topic()].append((message.key(), message.value()))
                else:
                    decoded = self.serde.decode(message.value(), message.topic())
                    self.records[self.topics[message.topic()]].append((decoded.name, decoded.value))
                    self.received_at[self.topics[message.topic()]].append(time.time())
        self._consumer.close()

    def values(self, logical_topic: str, record_type: str | None = None, dcid: int | None = None) -> list[dict]:
        with self._lock:
            return [v for name, v in self.records[logical_topic]
                    if (record_type is None or name == record_type) and (dcid is None or v.get("dcid") == dcid)]

    def arrivals(self, logical_topic: str, record_type: str | None = None,
                 dcid: int | None = None) -> list[tuple[float, dict]]:
        """(epoch seconds when read, value) of the records :meth:`values` would give, in reading order."""
        with self._lock:
            return [(at, v) for (name, v), at in zip(self.records[logical_topic], self.received_at[logical_topic],
                                                     strict=True)
                    if (record_type is None or name == record_type) and (dcid is None or v.get("dcid") == dcid)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
