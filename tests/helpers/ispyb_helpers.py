"""Helpers of the ISPyB tests: a fresh database, results on Kafka, a sink in a thread, offsets."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from beamstream.connectors.ispyb_schema import create_schema, make_engine
from beamstream.connectors.ispyb_sink import IspybSink, SinkOptions, SinkStats
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.lag import GroupLag
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.examples import example_event
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import make_serde

#: Quick backoff so outage tests resume within a second of the database coming back.
FAST = SinkOptions(batch_wait_s=0.1, outage_backoff_s=0.2, outage_backoff_max_s=1.0, data_retry_backoff_s=0.05,
                   report_every_s=5.0)


def fresh_database(server_url: str) -> Engine:
    """A new database ``ispyb_<hex>`` on the server with the whole ISPyB schema; its engine."""
    name = f"ispyb_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    admin.dispose()
    engine = make_engine(make_url(server_url).set(database=name).render_as_string(hide_password=False))
    create_schema(engine)
    return engine


def result(dcid: int, image: int, processing_job_id: int | None = None, **fields) -> dict:
    """An ImageResult value for one image, with figures derived from the image number unless given."""
    value = example_event("ImageResult")
    value.update(dcid=dcid, image_number=image, processing_job_id=processing_job_id,
                 file_path=f"/data/grid/x_{image:04d}.cbf", n_spots_total=image * 3, n_spots_no_ice=image * 2,
                 n_spots_4A=image, total_intensity=image * 100.0, d_min_distl_method_1=1.0 + image / 100,
                 d_min_distl_method_2=1.5 + image / 100)
    value.update(fields)
    return value


def summary(dcid: int, expected: int, analysed: int, processing_job_id: int | None = None) -> dict:
    """A CollectionSummary value."""
    value = example_event("CollectionSummary")
    value.update(dcid=dcid, processing_job_id=processing_job_id, images_expected=expected,
                 images_analysed=analysed, status="complete" if analysed == expected else "incomplete",
                 missing_images=list(range(analysed + 1, expected + 1)), xray_centre=None, heat_map=[])
    return value


def publish(settings: Settings, logical_topic: str, record_type: str, values: Iterable[dict]) -> int:
    """Encode and send values (keyed by dcid) with a plain idempotent producer; returns how many."""
    serde, topic = make_serde(), topic_name(settings, logical_topic)
    producer = make_producer(settings)
    count = 0
    for value in values:
        producer.produce(topic, serde.encode(record_type, value, topic), dcid_key(value["dcid"]))
        count += 1
    producer.flush(30)
    return count


def publish_raw(settings: Settings, logical_topic: str, payloads: Iterable[tuple[bytes, bytes | None]]) -> None:
    """Send raw (key, value) pairs as they are."""
    producer = make_producer(settings)
    for key, value in payloads:
        producer.produce(topic_name(settings, logical_topic), value, key)
    producer.flush(30)


def stream(settings: Settings, values: list[dict], chunk: int, pause_s: float) -> None:
    """Publish ImageResult ``values`` as a steady stream: ``chunk`` results every ``pause_s`` seconds."""
    serde, topic = make_serde(), topic_name(settings, "results")
    producer = make_producer(settings)
    for start in range(0, len(values), chunk):
        for value in values[start:start + chunk]:
            producer.produce(topic, serde.encode("ImageResult", value, topic), dcid_key(value["dcid"]))
        producer.flush(30)
        time.sleep(pause_s)


class SinkThread:
    """An :class:`IspybSink` running in a thread; re-raises its error on :meth:`stop`."""

    def __init__(self, settings: Settings, engine: Engine, options: SinkOptions = FAST) -> None:
        self.sink = IspybSink(settings, engine, options)
        self.error: BaseException | None = None
        self.stats: SinkStats | None = None
        self.thread = threading.Thread(target=self._run, name="ispyb-sink", daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.sink.run()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def __enter__(self) -> SinkThread:
        self.thread.start()
        return self

    def stop(self) -> SinkStats:
        """Ask the sink to stop and wait for it."""
        self.sink.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the sink did not stop within 60 s"
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.sink.stop_event.set()
            self.thread.join(60)


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition",
               sink: SinkThread | None = None) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink is not None and sink.error is not None:
            raise sink.error
        try:
            if condition():
                return
        except Exception:  # the database may be down at the moment
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def scalar(engine: Engine, sql: str, **params):
    """One value from a query."""
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def committed_offsets(settings: Settings, group_id: str, logical_topic: str) -> dict[int, int]:
    """The group's committed offset per partition of a topic (its first offset where none was committed yet)."""
    lag = GroupLag(settings)
    try:
        return lag.committed_offsets(group_id, topic_name(settings, logical_topic), timeout_s=15)
    finally:
        lag.close()


def end_offsets(settings: Settings, logical_topic: str) -> dict[int, int]:
    """The high watermark of every partition of a topic."""
    lag = GroupLag(settings)
    try:
        return lag.end_offsets(topic_name(settings, logical_topic), timeout_s=15)
    finally:
        lag.close()


def messages_committed(offsets: dict[int, int]) -> int:
    """Messages below the committed offsets (a plain producer's offsets count messages)."""
    return sum(offsets.values())


def read_all(settings: Settings, logical_topic: str, expected: str | tuple[str, ...] | None = None,
             timeout: float = 15.0, count: int | None = None) -> list:
    """Every committed message of a topic, decoded, read from the beginning by a fresh group."""
    serde, topic = make_serde(), topic_name(settings, logical_topic)
    consumer = make_consumer(settings, f"reader-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    found: list = []
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error():
                if count is None and found and time.monotonic() - idle_since > 2.0:
                    break
                if count is not None and len(found) >= count:
                    break
                continue
            idle_since = time.monotonic()
            found.append(serde.decode(message.value(), topic, expected))
            if count is not None and len(found) >= count:
                break
    finally:
        consumer.close()
    return found
